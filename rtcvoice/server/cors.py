"""CORS for the API, so a front end on another origin (a Vite dev server, the app's own host) can call it.

Off unless ``cors_origins`` names origins. A preflight (OPTIONS with Access-Control-Request-Method)
is answered here, before routing, for every API path; other responses get the allow headers.
Socket.IO answers its own CORS (python-socketio's ``cors_allowed_origins``), so its path is left
alone here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate"
PREFLIGHT_MAX_AGE_S = 600


def parse_origins(setting: str) -> frozenset[str]:
    """Origins as browsers send them (scheme://host[:port], no path); ``*`` for any."""
    origins = {o.strip().rstrip("/") for o in setting.split(",") if o.strip()}
    for origin in origins - {"*"}:
        if "://" not in origin or origin.count("/") > 2:
            raise ValueError(
                f"cors_origins: {origin!r} is not an origin; write it as the browser shows it, "
                "e.g. http://localhost:5173 (scheme, host and port only)"
            )
    return frozenset(origins)


def cors_middleware(origins: frozenset[str], *, skip_prefix: str = "/socket.io") -> Middleware:
    any_origin = "*" in origins

    def allowed(origin: str | None) -> bool:
        return origin is not None and (any_origin or origin in origins)

    def add_cors_headers(response: web.StreamResponse, origin: str | None) -> None:
        # Every response says Vary: Origin, also those without the allow headers: a shared cache
        # must not hand a response made for one origin (or for none) to another.
        response.headers.add(hdrs.VARY, "Origin")
        if origin is None or not allowed(origin):
            return
        # The origin itself rather than "*": bearer tokens and cookies may be sent with credentials.
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if request.path.startswith(skip_prefix):
            return await handler(request)
        preflight_asked = (
            request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        )
        if preflight_asked and allowed(origin):
            preflight = web.Response(status=204)
            add_cors_headers(preflight, origin)
            preflight.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOWED_METHODS
            requested = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
            preflight.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested or "Authorization, Content-Type"
            preflight.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = str(PREFLIGHT_MAX_AGE_S)
            return preflight
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            add_cors_headers(exc, origin)  # redirects and errors raised past the JSON error middleware
            raise
        if not response.prepared:  # a WebSocket is already upgraded: no headers to add
            add_cors_headers(response, origin)
        return response

    return middleware
