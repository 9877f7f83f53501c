"""Where the store keeps threads and messages: its logical fields on physical tables and columns.

rtcvoice creates its two tables when they are missing (``conversations`` and ``messages``, or the
names configured). Pointed at an app's existing tables instead (``db_threads_table``,
``db_messages_table``), it uses them as they are, so voice turns show up in the app's own
text-chat history: it finds each field's column by name (snake_case, camelCase, common synonyms,
or ``db_columns``), converts values to each column's type, leaves out the fields the app has no
column for, and never alters the app's tables.

Both backends share all of this. Each one only introspects its database into ``TableInfo``
(mapping its column types to a ``Kind``), states its ``Dialect`` and the ``LayoutTypes`` of the
tables it creates, and runs the statements that ``Statements`` builds.
"""

from __future__ import annotations

import enum
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, TypeVar, cast

from .base import ROLES, MonotonicClock, StoredMessage, StoreError, Thread, check_id, new_id

if TYPE_CHECKING:
    from ..engines.base import Role
    from ..settings import Settings

log = logging.getLogger("rtcvoice.store")

RowT = TypeVar("RowT", Thread, StoredMessage)

DEFAULT_THREADS_TABLE = "conversations"
DEFAULT_MESSAGES_TABLE = "messages"

THREAD = "thread"
MESSAGE = "message"
THREAD_FIELDS: tuple[str, ...] = ("id", "user_id", "title", "created_at", "updated_at")
MESSAGE_FIELDS: tuple[str, ...] = (
    "id",
    "thread_id",
    "role",
    "content",
    "content_type",
    "interrupted",
    "session_id",
    "turn_id",
    "created_at",
    "seq",
)
FIELDS: dict[str, tuple[str, ...]] = {THREAD: THREAD_FIELDS, MESSAGE: MESSAGE_FIELDS}
# Without these the store cannot work at all. Every other field is optional: not stored when the
# app's table has no column for it.
REQUIRED: dict[str, tuple[str, ...]] = {
    THREAD: ("id", "user_id"),
    MESSAGE: ("id", "thread_id", "role", "content"),
}
# The column names of the tables rtcvoice creates (db_columns entries override them).
LAYOUT_COLUMNS: dict[str, dict[str, str]] = {
    THREAD: {name: name for name in THREAD_FIELDS},
    MESSAGE: {**{name: name for name in MESSAGE_FIELDS}, "thread_id": "conversation_id"},
}

_CREATED_AT = ("created_at", "createdAt", "inserted_at", "insertedAt", "created_on", "createdOn")
_UPDATED_AT = ("updated_at", "updatedAt", "modified_at", "modifiedAt", "updated_on", "updatedOn")
# Tried in order, exact names before case-insensitive matches.
CANDIDATES: dict[str, dict[str, tuple[str, ...]]] = {
    THREAD: {
        "id": ("id", "thread_id", "threadId", "conversation_id", "conversationId", "chat_id", "chatId"),
        "user_id": ("user_id", "userId", "owner_id", "ownerId", "account_id", "accountId"),
        "title": ("title", "name", "subject", "topic"),
        "created_at": _CREATED_AT,
        "updated_at": _UPDATED_AT,
    },
    MESSAGE: {
        "id": ("id", "message_id", "messageId"),
        "thread_id": (
            "conversation_id",
            "conversationId",
            "thread_id",
            "threadId",
            "chat_id",
            "chatId",
            "chat_conversation_id",
            "chatConversationId",
        ),
        "role": (
            "role",
            "sender_role",
            "senderRole",
            "author_role",
            "authorRole",
            "sender_type",
            "senderType",
        ),
        "content": ("content", "text", "body", "message"),
        "content_type": ("content_type", "contentType", "message_type", "messageType", "type", "kind"),
        "interrupted": ("interrupted", "is_interrupted", "isInterrupted"),
        "session_id": ("session_id", "sessionId"),
        "turn_id": ("turn_id", "turnId"),
        "created_at": _CREATED_AT,
        "seq": ("seq",),
    },
}

ROWID = "rowid"  # an order key: SQLite's rowid, not a field

# What rows written by an app may call the two sides of a chat.
_ASSISTANT_ALIASES = frozenset({"ai", "bot", "model", "agent", "chatbot", "gpt", "llm"})
_USER_ALIASES = frozenset({"human"})


# -- names ---------------------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # 63: PostgreSQL's limit


def check_identifier(name: str, what: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise StoreError(
            f"{what} {name!r} is not a plain name (letters, digits and _, not starting with a digit, "
            "at most 63 characters)"
        )
    return name


def check_table_name(name: str, what: str) -> str:
    parts = name.split(".")
    if len(parts) > 2:
        raise StoreError(f"{what} {name!r}: at most one schema. prefix (PostgreSQL), e.g. app.chat_messages")
    for part in parts:
        check_identifier(part, what)
    return name


def quote(name: str) -> str:
    """A name as SQL. Always quoted: PostgreSQL folds bare names to lower case, losing camelCase."""
    return '"' + name.replace('"', '""') + '"'


def quote_table(name: str) -> str:
    return ".".join(quote(part) for part in name.split("."))


def bare_table(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def valid_fields() -> str:
    return ", ".join(f"{kind}.{name}" for kind, names in FIELDS.items() for name in names)


def parse_db_columns(raw: str) -> dict[tuple[str, str], str]:
    """``thread.user_id=ownerId, message.thread_id=chatId`` as {(kind, field): column}."""
    mapping: dict[tuple[str, str], str] = {}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        key, equals, column = (part.strip() for part in entry.partition("="))
        kind, dot, name = key.partition(".")
        if not equals or not dot or not column or name not in FIELDS.get(kind, ()):
            raise StoreError(
                f"db_columns entry {entry!r} is not FIELD=column with FIELD one of: {valid_fields()}"
            )
        check_identifier(column, f"db_columns entry {entry!r}: column")
        if mapping.get((kind, name), column) != column:
            raise StoreError(f"db_columns sets {key} twice ({mapping[(kind, name)]!r} and {column!r})")
        mapping[(kind, name)] = column
    return mapping


@dataclass(frozen=True)
class SchemaConfig:
    """The tables and column names asked for; ``SchemaConfig()`` is rtcvoice's own layout."""

    threads_table: str = DEFAULT_THREADS_TABLE
    messages_table: str = DEFAULT_MESSAGES_TABLE
    columns: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_table_name(self.threads_table, "db_threads_table")
        check_table_name(self.messages_table, "db_messages_table")
        if self.threads_table.lower() == self.messages_table.lower():
            raise StoreError(f"db_threads_table and db_messages_table are both {self.threads_table!r}")
        for (kind, name), column in self.columns.items():
            if name not in FIELDS.get(kind, ()):
                raise StoreError(f"no field {kind}.{name}; the fields are: {valid_fields()}")
            check_identifier(column, f"column for {kind}.{name}")

    @classmethod
    def from_settings(cls, settings: Settings) -> SchemaConfig:
        return cls(
            settings.db_threads_table.strip(),
            settings.db_messages_table.strip(),
            parse_db_columns(settings.db_columns),
        )

    def explicit(self, kind: str, name: str) -> str | None:
        return self.columns.get((kind, name))

    def layout_column(self, kind: str, name: str) -> str:
        return self.columns.get((kind, name), LAYOUT_COLUMNS[kind][name])

    def table(self, kind: str) -> str:
        return self.threads_table if kind == THREAD else self.messages_table


# -- columns as the backends find them -----------------------------------------------------------


class Kind(enum.Enum):
    """What a column holds, as far as converting values goes."""

    TEXT = "text"  # also SQLite DATETIME/DATE/TIMESTAMP: a time there is ISO 8601 text
    INTEGER = "integer"  # a time there is epoch milliseconds
    REAL = "real"  # epoch seconds, rtcvoice's own form (also SQLite NUMERIC and untyped)
    NUMERIC = "numeric"  # PostgreSQL numeric: epoch seconds as a Decimal
    BOOLEAN = "boolean"
    TIMESTAMP = "timestamp"  # PostgreSQL timestamp without time zone: UTC, naive
    TIMESTAMPTZ = "timestamptz"
    DATE = "date"
    UUID = "uuid"


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    declared: str = ""  # the type as the database spells it (for a reference to this column)
    generated: bool = False  # the database assigns it: rowid alias, serial, identity
    needs_value: bool = False  # NOT NULL without a default: an INSERT without it fails
    # Of a second, in a time: p of a PostgreSQL timestamp(p); below 3 in an integer column means
    # epoch seconds, not milliseconds (a 32-bit integer cannot hold epoch milliseconds).
    fraction_digits: int = 6


@dataclass(frozen=True)
class TableInfo:
    name: str
    columns: tuple[Column, ...]
    has_rowid: bool = False  # SQLite: the rowid is insertion order when there is no seq

    def find(self, names: Iterable[str], taken: frozenset[str] = frozenset()) -> Column | None:
        """The first of ``names`` the table has; exact spellings win over other letter cases."""
        wanted = list(names)
        exact = {c.name: c for c in self.columns if c.name not in taken}
        for name in wanted:
            if name in exact:
                return exact[name]
        folded: dict[str, Column] = {}
        for column in exact.values():
            folded.setdefault(column.name.lower(), column)
        for name in wanted:
            if name.lower() in folded:
                return folded[name.lower()]
        return None


# -- values --------------------------------------------------------------------------------------

_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]{0,18}")
_INT64 = 2**63
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Epoch seconds reach 1e11 in the year 5138; epoch milliseconds passed it in 1973.
_MILLISECONDS_FROM = 1e11
_OFFSET_GAP = re.compile(r"\s+(?=(?:Z|[+-]\d{2}(?::?\d{2})?)$)", re.IGNORECASE)


def id_to_db(column: Column, value: str) -> object | None:
    """``value`` as ``column`` stores it; None when no row can have it (``"abc"`` in an integer)."""
    if column.kind is Kind.INTEGER:
        # Only the canonical spelling: "042" would come back as "42", a different id to the caller.
        if not _CANONICAL_INT.fullmatch(value) or not -_INT64 <= int(value) < _INT64:
            return None
        return int(value)
    if column.kind is Kind.UUID:
        try:
            return uuid.UUID(value)
        except ValueError:
            return None
    return value


def id_from_db(value: object) -> str:
    return _text(value)


def utc_datetime(ts: float, fraction_digits: int = 6) -> datetime:
    step = 10 ** (6 - min(max(fraction_digits, 0), 6))
    return _EPOCH + timedelta(microseconds=round(ts * 1_000_000 / step) * step)


def iso_text(ts: float) -> str:
    """``2024-05-01T12:00:00.123Z``."""
    moment = utc_datetime(ts, 3)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def time_to_db(column: Column, ts: float) -> object:
    kind = column.kind
    if kind is Kind.REAL:
        return ts
    if kind is Kind.NUMERIC:
        return Decimal(repr(ts))
    if kind is Kind.INTEGER:
        return round(ts * 1000) if column.fraction_digits >= 3 else round(ts)
    if kind is Kind.TIMESTAMPTZ:
        return utc_datetime(ts, column.fraction_digits)
    if kind is Kind.TIMESTAMP:
        return utc_datetime(ts, column.fraction_digits).replace(tzinfo=None)
    if kind is Kind.DATE:
        return utc_datetime(ts, 0).date()
    return iso_text(ts)


def time_from_db(value: object) -> float:
    """Epoch seconds from whatever an app stored: datetimes (naive is UTC), epoch seconds or
    milliseconds, ISO 8601 text as JavaScript, Sequelize or SQLAlchemy write it. 0.0 if unknown."""
    if value is None or isinstance(value, bool):
        return 0.0
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    if isinstance(value, int | float | Decimal):
        return _epoch_seconds(float(value))
    if isinstance(value, str | bytes):
        return _time_from_text(_text(value))
    return 0.0


def _epoch_seconds(number: float) -> float:
    return number / 1000 if abs(number) >= _MILLISECONDS_FROM else number


def _time_from_text(text: str) -> float:
    text = _OFFSET_GAP.sub("", text.strip())  # "12:00:00.123 +00:00" (Sequelize)
    try:
        return time_from_db(datetime.fromisoformat(text))
    except ValueError:
        pass
    try:
        return _epoch_seconds(float(text))
    except ValueError:
        log.debug("unreadable time %r: read as the epoch", text)
        return 0.0


def time_resolution(column: Column) -> float | None:
    """The step in which ``column`` keeps times; None for a float that keeps them as they are."""
    if column.kind in (Kind.REAL, Kind.NUMERIC, Kind.DATE, Kind.BOOLEAN):
        return None
    if column.kind in (Kind.TIMESTAMP, Kind.TIMESTAMPTZ):
        return float(10 ** -min(max(column.fraction_digits, 0), 6))
    if column.kind is Kind.INTEGER and column.fraction_digits < 3:
        # Whole seconds: a clock stepping a second per write would drift far ahead of the time.
        return None
    return 0.001  # epoch milliseconds, ISO text with milliseconds


def flag_to_db(column: Column, value: bool) -> object:
    if column.kind is Kind.BOOLEAN:
        return value
    if column.kind is Kind.NUMERIC:
        return Decimal(int(value))
    if column.kind in (Kind.INTEGER, Kind.REAL):
        return int(value)
    return "true" if value else "false"


def flag_from_db(value: object) -> bool:
    if isinstance(value, str | bytes):
        return _text(value).strip().lower() in ("1", "true", "t", "yes", "y")
    return bool(value)


def read_role(value: object) -> Role | None:
    """A role an app wrote, as user/assistant/system; None for one that is none of them (tool)."""
    if value is None:
        return None
    name = _text(value).strip().lower()
    if name in ROLES:
        return cast("Role", name)
    if name in _ASSISTANT_ALIASES or name.startswith("assistant"):
        return "assistant"
    if name in _USER_ALIASES:
        return "user"
    return None


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


# -- resolution ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedTable:
    """One table as the store uses it: which column holds each field it has."""

    name: str
    fields: Mapping[str, Column]  # a field without a column is not stored
    order: tuple[str, ...]  # fields (or ROWID), ascending: oldest (threads: least recent) first

    @property
    def sql_name(self) -> str:
        return quote_table(self.name)

    def column(self, name: str) -> Column:
        return self.fields[name]

    def sql(self, name: str) -> str:
        return quote(self.fields[name].name)

    def present(self, names: Iterable[str]) -> tuple[str, ...]:
        return tuple(n for n in names if n in self.fields)


@dataclass(frozen=True)
class ResolvedSchema:
    threads: ResolvedTable
    messages: ResolvedTable

    def clock_resolution(self) -> float | None:
        """The coarsest step any time column keeps: stamps one step apart stay apart there."""
        timed = [
            table.fields[name]
            for table, name in (
                (self.threads, "created_at"),
                (self.threads, "updated_at"),
                (self.messages, "created_at"),
            )
            if name in table.fields
        ]
        steps = [step for column in timed if (step := time_resolution(column)) is not None]
        return max(steps, default=None)


def resolve_table(kind: str, info: TableInfo, config: SchemaConfig) -> ResolvedTable:
    """Which column of ``info`` holds each of ``kind``'s fields; StoreError when it cannot work."""
    fields: dict[str, Column] = {}
    # A column given to one field in db_columns is no other field's candidate.
    explicit = frozenset(c for (k, _), c in config.columns.items() if k == kind)
    for name in FIELDS[kind]:
        column = _find_field(kind, name, info, config, explicit | {c.name for c in fields.values()})
        if column is not None:
            fields[name] = column
    for name in REQUIRED[kind]:
        if name not in fields:
            raise StoreError(_missing_message(kind, name, info))
    if kind == MESSAGE:
        _check_message_id(info, fields["id"])
        _drop_unassigned_seq(info, fields)
    _log_gaps(kind, info, fields)
    order = _message_order(info, fields) if kind == MESSAGE else _thread_order(fields)
    return ResolvedTable(info.name, fields, order)


def _find_field(
    kind: str, name: str, info: TableInfo, config: SchemaConfig, taken: frozenset[str]
) -> Column | None:
    explicit = config.explicit(kind, name)
    if explicit is None:
        return info.find(CANDIDATES[kind][name], taken)
    column = info.find([explicit])
    if column is None:
        raise StoreError(
            f"db_columns maps {kind}.{name} to {explicit!r}, but table {info.name!r} has no such column "
            f"(it has: {_column_list(info)})"
        )
    return column


def _missing_message(kind: str, name: str, info: TableInfo) -> str:
    return (
        f"table {info.name!r} has no column for {kind}.{name} (tried {', '.join(CANDIDATES[kind][name])}; "
        f"it has: {_column_list(info)}). If the table has it under another name, set "
        f"db_columns={kind}.{name}=COLUMN; if the table is not meant for rtcvoice, point "
        "db_threads_table/db_messages_table (or db_path/database_url) elsewhere"
    )


def _column_list(info: TableInfo) -> str:
    return ", ".join(c.name for c in info.columns) or "no columns"


def _check_message_id(info: TableInfo, column: Column) -> None:
    if column.kind is Kind.INTEGER and not column.generated:
        raise StoreError(
            f"column {column.name!r} of table {info.name!r} holds integers the database does not assign "
            "(no autoincrement, serial or identity), so rtcvoice has no message ids to give it; map "
            "message.id to a text or uuid column with db_columns, or let the database assign them"
        )


def _drop_unassigned_seq(info: TableInfo, fields: dict[str, Column]) -> None:
    seq = fields.get("seq")
    if seq is not None and not (seq.kind is Kind.INTEGER and seq.generated):
        # Only a sequence the database assigns orders rows by insertion; any other is the app's.
        log.info("table %r: column %r is not assigned by the database, not used as seq", info.name, seq.name)
        del fields["seq"]


def _log_gaps(kind: str, info: TableInfo, fields: Mapping[str, Column]) -> None:
    missing = [f"{kind}.{name}" for name in FIELDS[kind] if name not in fields and name != "seq"]
    if missing:
        log.info(
            "table %r has no column for %s: rtcvoice does not store them there (they read back as defaults)",
            info.name,
            ", ".join(missing),
        )
    used = {c.name for c in fields.values()}
    unfilled = [c.name for c in info.columns if c.needs_value and c.name not in used]
    if unfilled:
        log.warning(
            "table %r has NOT NULL columns without a default that rtcvoice has no value for (%s): "
            "its inserts there will fail until they get a DEFAULT",
            info.name,
            ", ".join(unfilled),
        )


def _message_order(info: TableInfo, fields: Mapping[str, Column]) -> tuple[str, ...]:
    if "seq" in fields:
        return ("seq",)
    if info.has_rowid:
        return (ROWID,)
    if "created_at" in fields:
        return ("created_at", "id")
    if fields["id"].kind is not Kind.INTEGER:
        log.warning(
            "table %r has no seq, no created_at and no integer id: its messages come back in id order, "
            "not in the order they were added",
            info.name,
        )
    return ("id",)


def _thread_order(fields: Mapping[str, Column]) -> tuple[str, ...]:
    times = [name for name in ("updated_at", "created_at") if name in fields][:1]
    return (*times, "id")


# -- the tables rtcvoice creates -----------------------------------------------------------------


@dataclass(frozen=True)
class LayoutTypes:
    """How one backend spells the types of the tables rtcvoice creates."""

    time: str
    seq: str
    flag: str  # ``{column}``: the column's quoted name


def index_ddl(
    config: SchemaConfig, kind: str, info: TableInfo, table: ResolvedTable, created: bool
) -> list[str]:
    """The index rtcvoice keeps on its own table: one it just created, or one with every column
    of its layout (made by an earlier rtcvoice). An app's table is never touched."""
    names = {c.name for c in info.columns}
    own = created or all(config.layout_column(kind, name) in names for name in FIELDS[kind])
    suffix, keys = ("_user_updated", ("user_id", "updated_at"))
    if kind == MESSAGE:
        suffix, keys = ("_conversation_seq", ("thread_id", "seq"))
    if not own or not all(key in table.fields for key in keys):
        return []
    return [
        f"CREATE INDEX IF NOT EXISTS {quote(bare_table(table.name) + suffix)}"
        f" ON {table.sql_name} ({', '.join(table.sql(key) for key in keys)})"
    ]


def threads_ddl(config: SchemaConfig, types: LayoutTypes) -> str:
    def col(name: str) -> str:
        return quote(config.layout_column(THREAD, name))

    return (
        f"CREATE TABLE IF NOT EXISTS {quote_table(config.threads_table)} (\n"
        f"    {col('id')} TEXT PRIMARY KEY,\n"
        f"    {col('user_id')} TEXT,\n"
        f"    {col('title')} TEXT NOT NULL DEFAULT '',\n"
        f"    {col('created_at')} {types.time} NOT NULL,\n"
        f"    {col('updated_at')} {types.time} NOT NULL\n"
        ")"
    )


def messages_ddl(config: SchemaConfig, types: LayoutTypes, threads: ResolvedTable) -> str:
    """The messages table, referencing ``threads`` (an app's own, possibly, with its id's type)."""

    def col(name: str) -> str:
        return quote(config.layout_column(MESSAGE, name))

    ref_type = threads.column("id").declared or "TEXT"
    # seq (SQLite: AUTOINCREMENT) is never reused, even after deletes, so seq order is insertion order.
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_table(config.messages_table)} (\n"
        f"    {col('seq')} {types.seq},\n"
        f"    {col('id')} TEXT NOT NULL UNIQUE,\n"
        f"    {col('thread_id')} {ref_type} NOT NULL REFERENCES {threads.sql_name} ({threads.sql('id')})"
        " ON DELETE CASCADE,\n"
        f"    {col('role')} TEXT NOT NULL CHECK ({col('role')} IN ('user', 'assistant', 'system')),\n"
        f"    {col('content')} TEXT NOT NULL,\n"
        f"    {col('content_type')} TEXT NOT NULL DEFAULT 'voice'"
        f" CHECK ({col('content_type')} IN ('text', 'voice')),\n"
        f"    {col('interrupted')} {types.flag.format(column=col('interrupted'))},\n"
        f"    {col('session_id')} TEXT,\n"
        f"    {col('turn_id')} TEXT,\n"
        f"    {col('created_at')} {types.time} NOT NULL\n"
        ")"
    )


# -- statements ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    placeholder: Callable[[int], str]  # 1-based position -> "?" or "$1"
    # A time kept as text, as SQL that compares in time order: ISO 8601 with "T" and "Z" and
    # Sequelize's "2024-05-01 12:00:00.000 +00:00" do not sort together as text.
    text_time: Callable[[str], str]
    returning: bool  # INSERT/UPDATE ... RETURNING, else lastrowid and rowcount


@dataclass(frozen=True)
class Query:
    sql: str
    args: tuple[object, ...]


@dataclass(frozen=True)
class Insert(Query):
    returns_id: bool  # the database assigns the id: read it back (RETURNING or lastrowid)


@dataclass(frozen=True)
class Touch(Query):
    is_update: bool  # found: a row updated (or RETURNING one); else the SELECT returned a row


@dataclass(frozen=True)
class NewMessage:
    touch: Touch  # run first: it bumps the thread's updated_at and says whether the thread exists
    insert: Insert
    message: StoredMessage  # as it reads back from the table


class _Params:
    """Placeholders in the order they appear in the SQL, with their values."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self.values: list[object] = []

    def __call__(self, value: object) -> str:
        self.values.append(value)
        return self._dialect.placeholder(len(self.values))


class Statements:
    """The SQL for one resolved schema in one dialect, and the conversions to and from its rows."""

    def __init__(self, schema: ResolvedSchema, dialect: Dialect) -> None:
        self.schema = schema
        self.dialect = dialect
        self.threads = schema.threads
        self.messages = schema.messages
        self._thread_fields = self.threads.present(THREAD_FIELDS)
        self._message_fields = self.messages.present(f for f in MESSAGE_FIELDS if f != "seq")
        self._thread_select = (
            f"SELECT {self._columns(self.threads, self._thread_fields)} FROM {self.threads.sql_name}"
        )

    @staticmethod
    def _columns(table: ResolvedTable, names: Sequence[str]) -> str:
        return ", ".join(table.sql(n) for n in names)

    # -- threads -----------------------------------------------------------------------------------

    def thread_key(self, thread_id: str) -> object | None:
        """The thread id as the threads table stores it; None: no thread can have it."""
        return id_to_db(self.threads.column("id"), thread_id)

    def new_thread(
        self, user_id: str | None, title: str, thread_id: str | None, now: float
    ) -> tuple[Insert, Thread]:
        """The INSERT, and the thread as it will read back (its id "" if the database assigns it)."""
        table = self.threads
        values: dict[str, object] = {"user_id": self._stored_id(table, "user_id", user_id), "title": title}
        key = self._new_thread_key(thread_id)
        if key is not None:
            values["id"] = key
        for name in ("created_at", "updated_at"):
            if name in table.fields:
                values[name] = time_to_db(table.column(name), now)
        values = _present(table, THREAD_FIELDS, values)
        return self._insert(table, values), self.thread_from_values({"id": "", **values})

    def _new_thread_key(self, thread_id: str | None) -> object | None:
        column = self.threads.column("id")
        if thread_id is not None:
            return self._stored_id(self.threads, "id", check_id(thread_id, "thread_id"))
        if column.generated:
            return None
        if column.kind is Kind.INTEGER:
            raise StoreError(
                f"thread ids in {self.threads.name}.{column.name} are integers the database does not "
                "assign: pass the thread id"
            )
        return id_to_db(column, new_id())

    def _stored_id(self, table: ResolvedTable, name: str, value: str | None) -> object | None:
        if value is None:
            return None
        column = table.column(name)
        key = id_to_db(column, value)
        if key is None:
            raise StoreError(
                f"{value!r} cannot be stored in {table.name}.{column.name} ({column.kind.value} column)"
            )
        return key

    def select_thread(self, key: object) -> Query:
        params = _Params(self.dialect)
        sql = f"{self._thread_select} WHERE {self.threads.sql('id')} = {params(key)}"
        return Query(sql, tuple(params.values))

    def list_threads(self, user_id: str | None, limit: int) -> Query | None:
        """None: no thread can belong to ``user_id`` (not a number, for an integer column)."""
        params = _Params(self.dialect)
        user = self.threads.sql("user_id")
        if user_id is None:
            # Not "IS ?": two spellings, so PostgreSQL can use the index for either.
            where = f"{user} IS NULL"
        else:
            key = id_to_db(self.threads.column("user_id"), user_id)
            if key is None:
                return None
            where = f"{user} = {params(key)}"
        order = ", ".join(f"{expr} DESC" for expr in self._order(self.threads))
        sql = f"{self._thread_select} WHERE {where} ORDER BY {order} LIMIT {params(limit)}"
        return Query(sql, tuple(params.values))

    def thread_from_row(self, row: Iterable[object]) -> Thread:
        return self.thread_from_values(dict(zip(self._thread_fields, row, strict=True)))

    def thread_from_values(self, values: Mapping[str, object]) -> Thread:
        created = time_from_db(values.get("created_at"))
        return Thread(
            id=id_from_db(values.get("id")),
            user_id=_optional_text(values.get("user_id")),
            title=_text(values.get("title")),
            created_at=created,
            updated_at=time_from_db(values["updated_at"]) if "updated_at" in values else created,
        )

    # -- messages ----------------------------------------------------------------------------------

    def new_message(self, draft: StoredMessage, now: float) -> NewMessage | None:
        """The statements that add ``draft``; None: no thread can have its thread id."""
        thread_key = self.thread_key(draft.thread_id)
        message_thread_key = id_to_db(self.messages.column("thread_id"), draft.thread_id)
        if thread_key is None or message_thread_key is None:
            return None
        table = self.messages
        values: dict[str, object] = {
            "thread_id": message_thread_key,
            "role": draft.role,
            "content": draft.content,
            "content_type": draft.content_type,
            "session_id": draft.session_id,
            "turn_id": draft.turn_id,
        }
        if not table.column("id").generated:
            values["id"] = id_to_db(table.column("id"), draft.id)
        if "interrupted" in table.fields:
            values["interrupted"] = flag_to_db(table.column("interrupted"), draft.interrupted)
        if "created_at" in table.fields:
            values["created_at"] = time_to_db(table.column("created_at"), now)
        values = _present(table, MESSAGE_FIELDS, values)
        message = self.message_from_values({"id": "", **values})
        assert message is not None  # the draft's role is checked already
        return NewMessage(self._touch(thread_key, now), self._insert(table, values), message)

    def _touch(self, thread_key: object, now: float) -> Touch:
        params = _Params(self.dialect)
        table = self.threads
        if "updated_at" not in table.fields:
            sql = f"SELECT 1 FROM {table.sql_name} WHERE {table.sql('id')} = {params(thread_key)}"
            return Touch(sql, tuple(params.values), is_update=False)
        stamp = time_to_db(table.column("updated_at"), now)
        updated = self._time(table, "updated_at", table.sql("updated_at"))
        # The later of the two: another writer may have stamped a later time already. Not
        # max()/GREATEST: an app's NULL would make SQLite's max() NULL.
        later = self._time(table, "updated_at", params(stamp))
        new_value = f"CASE WHEN {updated} > {later} THEN {table.sql('updated_at')} ELSE {params(stamp)} END"
        sql = (
            f"UPDATE {table.sql_name} SET {table.sql('updated_at')} = {new_value}"
            f" WHERE {table.sql('id')} = {params(thread_key)}"
        )
        if self.dialect.returning:
            sql += " RETURNING 1"
        return Touch(sql, tuple(params.values), is_update=True)

    def list_messages(self, thread_id: str, limit: int) -> Query | None:
        """None: no thread can have ``thread_id``."""
        key = id_to_db(self.messages.column("thread_id"), thread_id)
        if key is None:
            return None
        table = self.messages
        params = _Params(self.dialect)
        columns = self._columns(table, self._message_fields)
        order = self._order(table)
        keys = [quote(f"_rtcvoice_order_{i}") for i in range(len(order))]
        ordered = ", ".join(f"{expr} AS {alias}" for expr, alias in zip(order, keys, strict=True))
        latest = (
            f"SELECT {columns}, {ordered} FROM {table.sql_name} WHERE {table.sql('thread_id')} = {params(key)}"
            f" ORDER BY {', '.join(f'{expr} DESC' for expr in order)} LIMIT {params(limit)}"
        )
        sql = f"SELECT {columns} FROM ({latest}) AS latest ORDER BY {', '.join(keys)}"
        return Query(sql, tuple(params.values))

    def messages_from_rows(self, rows: Iterable[Iterable[object]]) -> list[StoredMessage]:
        found = (self.message_from_values(dict(zip(self._message_fields, row, strict=True))) for row in rows)
        return [message for message in found if message is not None]

    def message_from_values(self, values: Mapping[str, object]) -> StoredMessage | None:
        """None for a row whose role is none of user/assistant/system (an app's tool call)."""
        role = read_role(values.get("role"))
        if role is None:
            log.debug("skipping message %r: role %r", values.get("id"), values.get("role"))
            return None
        content_type = values.get("content_type")
        return StoredMessage(
            id=id_from_db(values.get("id")),
            thread_id=id_from_db(values.get("thread_id")),
            role=role,
            content=_text(values.get("content")),
            content_type="text" if content_type is None else _text(content_type),
            interrupted=flag_from_db(values.get("interrupted")),
            session_id=_optional_text(values.get("session_id")),
            turn_id=_optional_text(values.get("turn_id")),
            created_at=time_from_db(values.get("created_at")),
        )

    # -- shared ------------------------------------------------------------------------------------

    def _order(self, table: ResolvedTable) -> list[str]:
        return [key if key == ROWID else self._time(table, key, table.sql(key)) for key in table.order]

    def _time(self, table: ResolvedTable, name: str, expr: str) -> str:
        """``expr`` (the field's column or a value for it) as SQL that compares in time order."""
        is_text_time = name.endswith("_at") and table.column(name).kind is Kind.TEXT
        return self.dialect.text_time(expr) if is_text_time else expr

    def _insert(self, table: ResolvedTable, values: Mapping[str, object]) -> Insert:
        params = _Params(self.dialect)
        marks = ", ".join(params(value) for value in values.values())
        sql = f"INSERT INTO {table.sql_name} ({self._columns(table, list(values))}) VALUES ({marks})"
        returns_id = "id" not in values
        if returns_id and self.dialect.returning:
            sql += f" RETURNING {table.sql('id')}"
        return Insert(sql, tuple(params.values), returns_id=returns_id)


def _present(table: ResolvedTable, order: Sequence[str], values: Mapping[str, object]) -> dict[str, object]:
    """The values the table has columns for, in field order (for readable SQL)."""
    return {name: values[name] for name in order if name in values and name in table.fields}


def with_id(row: RowT, db_id: object) -> RowT:
    """The thread or message with the id the database assigned."""
    return replace(row, id=id_from_db(db_id))


def clock_for(clock: MonotonicClock, schema: ResolvedSchema) -> MonotonicClock:
    """``clock`` if it suits the tables' time columns (kept across a reopen, so it never goes
    back), else a new one that does."""
    resolution = schema.clock_resolution()
    return clock if clock.resolution == resolution else MonotonicClock(resolution)


def not_null_error(table: str, column: str, what: str) -> StoreError:
    return StoreError(
        f"cannot {what} in table {table!r}: its column {column!r} is NOT NULL without a default and "
        "rtcvoice has no value for it; give that column a DEFAULT (or allow NULL) in the app's schema"
    )
