"""Threads and messages shared by text chat and voice: SQLite by default, PostgreSQL by URL.

``create_store(settings)`` picks the backend; call ``await store.open()`` before use and
``await store.close()`` at shutdown. ``rtcvoice.store.postgres`` needs the ``postgres`` extra
(asyncpg), so it is imported only when a PostgreSQL URL is configured. ``db_threads_table``,
``db_messages_table`` and ``db_columns`` point the store at an app's own tables (schema.py).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..settings import Settings
from .base import ContentType, Store, StoredMessage, StoreError, Thread, ThreadExists, ThreadNotFound, iso_utc
from .schema import SchemaConfig
from .sqlite import SqliteStore

__all__ = [
    "ContentType",
    "SchemaConfig",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredMessage",
    "Thread",
    "ThreadExists",
    "ThreadNotFound",
    "create_store",
    "iso_utc",
]

POSTGRES_SCHEMES = ("postgres", "postgresql")


def create_store(settings: Settings) -> Store:
    """PostgreSQL when ``settings.database_url`` is set, else SQLite at ``settings.db_path``.

    The store is not opened yet. A URL of another kind, or a PostgreSQL URL without asyncpg
    installed, raises StoreError: silently falling back to SQLite would split the history. So
    does a bad table name or db_columns entry; the tables' columns are checked by ``open()``.
    """
    schema = SchemaConfig.from_settings(settings)
    url = settings.database_url.strip()
    if not url:
        return SqliteStore(settings.db_path, schema)
    if urlsplit(url).scheme.lower() not in POSTGRES_SCHEMES:
        raise StoreError(
            "database_url must be a PostgreSQL URL (postgresql://user:password@host:port/database)"
        )
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise StoreError(
            f"database_url needs asyncpg ({exc}): pip install 'rtcvoice[postgres]', or unset it to use SQLite"
        ) from exc
    return PostgresStore(url, schema=schema)
