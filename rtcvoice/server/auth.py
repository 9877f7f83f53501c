"""Optional bearer-JWT auth: the user id of every request comes from a token the user's app issued.

Off unless a secret (HS256) or a public key (RS256/ES256/EdDSA) is configured. Tokens come in
``Authorization: Bearer <jwt>``, or ``?token=`` on WebSocket routes (browsers cannot set headers
on a WebSocket). A request without a valid token gets 401 JSON and creates nothing.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
from aiohttp import web
from aiohttp.typedefs import Middleware

from ..settings import Settings
from .errors import ApiError

log = logging.getLogger(__name__)

USER_ID = web.RequestKey("user_id", str)
# Probes and the static page need no token: they reveal nothing about anyone's calls.
PUBLIC_PATHS = frozenset({"/api/v1/voice/health", "/api/v1/streaming/realtime/health"})
REALTIME_PREFIX = "/api/v1/streaming/realtime/"
# The AI-service routes a backend calls (README "If you run the system of seed 001").
INTERNAL_PREFIXES = ("/internal/", "/session/")
ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA", "PS256"]


@dataclass(frozen=True)
class Authenticator:
    key: str
    algorithms: list[str]
    audience: str | None
    issuer: str | None
    user_claim: str
    require_exp: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator | None:
        if settings.auth_jwt_public_key:
            key = settings.auth_jwt_public_key
            if not key.lstrip().startswith("-----BEGIN"):
                key = Path(key).read_text()  # a path: read once at startup, never per request
            algorithms = ASYMMETRIC
        elif settings.auth_jwt_secret:
            key, algorithms = settings.auth_jwt_secret, ["HS256"]
        else:
            return None
        return cls(
            key=key,
            algorithms=algorithms,
            audience=settings.auth_jwt_audience or None,
            issuer=settings.auth_jwt_issuer or None,
            user_claim=settings.auth_user_claim,
            require_exp=settings.auth_require_exp,
        )

    def user_id(self, token: str) -> str:
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["exp"] if self.require_exp else [],
                    "verify_aud": self.audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized(
                "token_expired", "The token has expired; get a new one from your app."
            ) from None
        except jwt.InvalidTokenError as exc:
            raise _unauthorized("invalid_token", f"The token is not valid: {exc}.") from None
        user = claims.get(self.user_claim)
        if not isinstance(user, str | int) or isinstance(user, bool) or str(user) == "":
            raise _unauthorized(
                "invalid_token", f"The token has no '{self.user_claim}' claim naming the user."
            )
        return str(user)


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, {"WWW-Authenticate": 'Bearer realm="rtcvoice"'})


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None for any other header."""
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def token_from(request: web.Request) -> str | None:
    token = bearer_token(request.headers.get("Authorization", ""))
    if token is not None:
        return token
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return request.query.get("token") or None
    return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def auth_middleware(
    auth: Authenticator | None, *, internal_token: str = "", open_realtime_user_route: bool = False
) -> Middleware:
    """Checks the bearer JWT on every API route (401 without a valid one) and notes its user.

    ``internal_token``: the AI-service routes take this shared secret instead of a user's JWT.
    ``open_realtime_user_route``: ``/streaming/realtime/{user_id}`` takes no token (its user is
    the one in the path), as the realtime API's original design had it.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(INTERNAL_PREFIXES):
            if internal_token:
                _check_shared_secret(request, internal_token)
                return await handler(request)
        elif not path.startswith("/api/") or path in PUBLIC_PATHS:
            return await handler(request)
        if auth is None or (open_realtime_user_route and _is_realtime_user_route(path)):
            return await handler(request)
        token = token_from(request)
        if token is None:
            raise _unauthorized(
                "unauthorized", "Send 'Authorization: Bearer <token>' (or ?token= on WebSockets)."
            )
        request[USER_ID] = auth.user_id(token)
        return await handler(request)

    return middleware


def request_user(request: web.Request) -> str | None:
    """The authenticated user, or None in unauthenticated mode."""
    return request.get(USER_ID)


def _is_realtime_user_route(path: str) -> bool:
    rest = path[len(REALTIME_PREFIX) :] if path.startswith(REALTIME_PREFIX) else ""
    return bool(rest) and "/" not in rest and rest not in ("status", "health")


def _check_shared_secret(request: web.Request, secret: str) -> None:
    token = token_from(request)
    if token is None or not hmac.compare_digest(token.encode(), secret.encode()):
        raise _unauthorized(
            "unauthorized",
            "This route is for your backend: send 'Authorization: Bearer <internal_token>' "
            "(or ?token= on WebSockets).",
        )
