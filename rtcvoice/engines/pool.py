"""The HTTP client of the engines that call a model server (OpenAI-compatible LLM, STT and TTS).

With many nodes sharing one model pool (README "Many nodes"), each node caps its requests in
flight per engine (``pool_max_requests``): more wait for a free connection, up to the engine's
timeout, so one busy node cannot take the whole pool (scale.md §3.7, Ray Serve's
``max_ongoing_requests``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import openai


def pooled_http_client(max_requests: int) -> Any:
    """A client holding at most ``max_requests`` connections; None (the SDK's own) for no cap."""
    if max_requests <= 0:
        return None
    # Newer openai releases are built on httpx2, older ones on httpx: the limits of whichever it uses.
    http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    return openai.DefaultAsyncHttpxClient(
        limits=http.Limits(max_connections=max_requests, max_keepalive_connections=max_requests)
    )
