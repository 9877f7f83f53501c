"""Absolute URLs for clients: the configured public URL, or the scheme and host the request came to."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from ..cluster.proxy import BASE_HEADER, HOP_HEADER
from .keys import SETTINGS


def public_base(request: web.Request) -> str:
    """``https://host[:port]`` (no trailing slash) at which clients reach this server.

    Behind a proxy that terminates TLS, set ``public_url``: the request alone says http.
    """
    configured = request.app[SETTINGS].public_url.strip().rstrip("/")
    if configured:
        return configured
    relayed = request.headers.get(BASE_HEADER) if HOP_HEADER in request.headers else None
    if relayed and not check_url(relayed):
        return relayed.rstrip("/")  # the node the client reached relayed this request here
    return f"{request.scheme}://{request.host}"


def websocket_url(request: web.Request, path: str) -> str:
    """The absolute ``ws://`` or ``wss://`` URL of ``path`` on this server."""
    base = urlsplit(public_base(request))
    scheme = "wss" if base.scheme == "https" else "ws"
    prefix = base.path.rstrip("/")
    return f"{scheme}://{base.netloc}{prefix}{path}"


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a base URL (http(s)://host[:port][/path]), or None if it can."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        return "must be an http:// or https:// URL such as https://voice.example.com"
    return None


def check_public_url(url: str) -> None:
    """ValueError, with the fix, for a public_url that cannot be a base for clients' URLs."""
    if not url.strip():
        return
    problem = check_url(url)
    if problem:
        raise ValueError(f"public_url {url!r} {problem}")
