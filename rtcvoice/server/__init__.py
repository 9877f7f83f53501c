"""The HTTP server: routes, sessions, errors."""

from .app import ENGINES, SESSIONS, SETTINGS, create_app

__all__ = ["create_app", "ENGINES", "SESSIONS", "SETTINGS"]
