"""Log lines as text, or as one JSON object per line carrying the node, session and turn ids.

The ids come from context variables: a call's transport sets ``session_id_var`` before it makes
the call's Conversation, so every task the call starts afterwards (turns, replies, speech) logs
under that session without passing the id around. ``extra={"session_id": ...}`` on a single
log call wins over the context.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

session_id_var: ContextVar[str | None] = ContextVar("rtcvoice_session_id", default=None)
turn_id_var: ContextVar[str | None] = ContextVar("rtcvoice_turn_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose INFO lines are per packet or per request: at INFO they drown the calls' own lines.
NOISY_LOGGERS = ("aioice", "aiortc", "faster_whisper", "httpx")


@contextlib.contextmanager
def log_context(*, session_id: str | None = None, turn_id: str | None = None) -> Iterator[None]:
    """Log under these ids inside the block (and in tasks created inside it); None leaves one as it is."""
    tokens = []
    if session_id is not None:
        tokens.append((session_id_var, session_id_var.set(session_id)))
    if turn_id is not None:
        tokens.append((turn_id_var, turn_id_var.set(turn_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Stamps each record with the ids in force where it was logged.

    On the handler, not the formatter: a handler that formats later or elsewhere (a queue, a
    thread) would otherwise read another task's context.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = session_id_var.get()
        if getattr(record, "turn_id", None) is None:
            record.turn_id = turn_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC), level, logger, message, node, session_id, turn_id."""

    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id or None

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.node_id:
            entry["node"] = self.node_id
        # Records that did not pass a ContextFilter (a handler added without one) still get the ids.
        session_id = getattr(record, "session_id", None) or session_id_var.get()
        turn_id = getattr(record, "turn_id", None) or turn_id_var.get()
        if session_id:
            entry["session_id"] = session_id
        if turn_id:
            entry["turn_id"] = turn_id
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_handler(fmt: str, node_id: str | None = None) -> logging.Handler:
    """A stderr handler writing ``fmt`` ("text" or "json"); ValueError for anything else."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(node_id))
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log_format {fmt!r} is not one of text, json")
    handler.addFilter(ContextFilter())
    return handler


def setup_logging(level: str, fmt: str = "text", node_id: str | None = None) -> None:
    """Configure the root logger for the process (replacing any handler it had)."""
    logging.basicConfig(level=level.upper(), handlers=[make_handler(fmt, node_id)], force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
