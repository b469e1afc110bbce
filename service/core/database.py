"""SQLAlchemy engine, sessions, the declarative ``Base`` and programmatic migrations.

The same code runs on Postgres (production, tests) and SQLite (the demo): JSON columns become JSONB on
Postgres, timestamps are always timezone-aware UTC, and SQLite gets its foreign keys switched on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql
from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    MetaData,
    Row,
    Select,
    Table,
    Text,
    Update,
    any_,
    bindparam,
    cast,
    column,
    create_engine,
    event,
    func,
    insert,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Session,
    SessionTransaction,
    make_transient_to_detached,
    sessionmaker,
)
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can drop and alter them on every backend (SQLite batch mode).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way in and out; SQLite drops the offset, so it is restored on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use service.core.clock.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSONType}


def make_engine(url: str, **kwargs: Any) -> Engine:
    # Bound parameters are personal data (subject and sample ids): never in an error message or a log line.
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        # The in-process dispatcher and uvicorn use the connection from other threads.
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _enable_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: routes serialise objects after committing them.
    return sessionmaker(bind=engine, expire_on_commit=False)


def migrate(url: str, revision: str = "head") -> None:
    """Run ``alembic upgrade <revision>`` against ``url`` (what ``lethe migrate`` calls)."""
    command.upgrade(alembic_config(url), revision)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read a literal % in a password as a reference.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest migration's revision: what a database must be at for this code to run on it."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def new_id() -> str:
    """Primary keys of resources the API exposes: random UUIDs, as text so SQLite and Postgres agree."""
    return str(uuid.uuid4())


def among(session: Session, column: Any, values: Sequence[Any]) -> Any:
    """``column IN (values)``; on Postgres ``column = ANY(:values)``, one array parameter however many values
    (an IN list is rendered and sent a parameter a value: a tenth of a bulk call's CPU went to that)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


def one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    """A CHECK that ``column`` holds one of ``values`` (named ``ck_<table>_<column>`` by the convention)."""
    allowed = ", ".join(f"'{value}'" for value in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=column)


def row_of(obj: Base) -> dict[str, Any]:
    """A new object's column values as an INSERT takes them, each column's Python default applied where it
    has no value (as a flush would), and every one held by the object (none is left to load once it is
    written: the object is not yet in a session, so they go straight into its state)."""
    state = inspect(obj)
    held = state.dict
    row = {}
    for prop in state.mapper.column_attrs:
        column = prop.columns[0]
        value = held.get(prop.key)
        if value is None and column.default is not None and not column.default.is_clause_element:
            default: Any = column.default
            value = default.arg(None) if default.is_callable else default.arg
        held[prop.key] = row[column.key] = value
    return row


# Up to this many rows a table, write_together sends them as one JSON document in one statement; a bulk call's
# thousands go by COPY, whose rows Postgres parses faster than the same values in one document.
_STATEMENT_ROWS = 100


def write_together(
    session: Session,
    inserts: Sequence[tuple[type[Base], Sequence[Base | dict[str, Any]]]],
    updates: Sequence[tuple[type[Base], Sequence[dict[str, Any]]]] = (),
) -> None:
    """INSERT the new objects (or plain rows) of several tables, each after those it refers to, and UPDATE
    rows of some (each row: its primary key and the columns it sets). On Postgres, up to
    :data:`_STATEMENT_ROWS` rows a table, in one statement: a data-modifying CTE a table, its rows sent as
    one JSON document (``INSERT ... SELECT ... FROM jsonb_to_recordset(...)``, ``UPDATE ... FROM
    jsonb_to_recordset(...)``: a statement of one shape, built and compiled once; one parameter a table,
    encoded by the C JSON encoder, where an array a column cost the driver more than the rest of the write),
    foreign keys checked at its end; more (a bulk call's thousands), a COPY a table; elsewhere (SQLite) an
    executemany a table. A JSON column's None is SQL NULL, as a flush that leaves it out writes. The new
    objects then belong to the session as if loaded: no flush writes them again."""
    written = _merged((model, [row_of(item) if isinstance(item, Base) else item for item in items])
                      for model, items in inserts)  # fmt: skip
    changed = _merged(updates)
    if not written and not changed:
        return
    connection = session.connection()  # the connection, not the ORM's unit of work
    if connection.dialect.name == "postgresql" and all(
        len(rows) <= _STATEMENT_ROWS for _model, rows in [*written, *changed]
    ):
        shape = (
            tuple((model, tuple(rows[0])) for model, rows in written),
            tuple((model, tuple(rows[0])) for model, rows in changed),
        )
        if shape not in _STATEMENTS:
            _STATEMENTS[shape] = _statement(*shape)
        parameters = {
            f"{prefix}{i}": _json_document(rows)
            for prefix, group in (("insert", written), ("update", changed))
            for i, (_model, rows) in enumerate(group)
        }
        connection.execute(_STATEMENTS[shape], parameters)
    else:
        for model, rows in written:
            table = _table(model)
            if connection.dialect.name == "postgresql":
                _copy(connection, table, rows)
                continue
            # A JSON column none of the rows sets is left out (SQL NULL); executemany would write JSON null.
            unset = {name for name in rows[0] if isinstance(table.c[name].type, JSON)} - {
                name for row in rows for name, value in row.items() if value is not None
            }
            connection.execute(
                insert(table), [{k: v for k, v in row.items() if k not in unset} for row in rows]
            )
        for model, rows in changed:
            table = _table(model)
            [key] = table.primary_key.columns
            names = [name for name in rows[0] if name != key.name]
            statement = update(table).where(key == bindparam("row_key"))
            statement = statement.values({name: bindparam(f"row_{name}") for name in names})
            connection.execute(
                statement,
                [{f"row_{k}" if k != key.name else "row_key": v for k, v in r.items()} for r in rows],
            )
    for _model, items in inserts:
        for item in items:
            if isinstance(item, Base):
                make_transient_to_detached(item)
                session.add(item)


# Rows queued on a session to be written at its commit (Session.info), and what adds rows at that moment.
_AT_COMMIT = "lethe.write_at_commit"
Inserts = list[tuple[type[Base], Sequence[Base | dict[str, Any]]]]
Updates = list[tuple[type[Base], Sequence[dict[str, Any]]]]
Writes = tuple[Inserts, Updates]
_COMMIT_WRITERS: list[Callable[[Session], Writes]] = []


def write_at_commit(
    session: Session,
    inserts: Sequence[tuple[type[Base], Sequence[Base | dict[str, Any]]]],
    updates: Sequence[tuple[type[Base], Sequence[dict[str, Any]]]] = (),
) -> None:
    """:func:`write_together` when the session's transaction commits, in the statement that writes
    everything written then (the trail's events: see :func:`commit_writer`); a rollback discards them. New
    objects are written as they stand now and stay out of the session (nothing of them is written again).
    For rows nothing reads back from the database before the commit (an idempotency answer; a deletion
    request, whose answer is built from the objects in hand): one round trip fewer, and none while the
    transaction holds a job's row."""
    queued: Writes = session.info.setdefault(_AT_COMMIT, ([], []))
    queued[0].extend(
        (model, [row_of(i) if isinstance(i, Base) else i for i in items]) for model, items in inserts
    )
    queued[1].extend(updates)


class PreconditionFailed(Exception):
    """A statement queued by :func:`require_at_commit` matched no row: the commit wrote nothing."""


_REQUIRED = "lethe.required_at_commit"


def require_at_commit(session: Session, statement: Update, parameters: dict[str, Any], reason: str) -> None:
    """Run ``statement`` with ``parameters`` (an UPDATE ... RETURNING whose WHERE states what must still
    hold) when the session commits, before anything queued for that commit is written; if it returns no
    row, the commit raises :class:`PreconditionFailed` (``reason``) having written nothing. An optimistic
    write: a row read without its lock is changed there, relative to what it then holds, and stays locked
    only until the commit. A commit that appends trail events runs it with the head's lock, in one
    statement (:func:`select_after_required`)."""
    session.info.setdefault(_REQUIRED, []).append((statement, parameters, reason))


def commit_writer(writer: Callable[[Session], Writes]) -> Callable[[Session], Writes]:
    """Register what a module writes at every commit (rows to insert, rows to update), computed then: its
    rows go in the commit's one statement with those queued by :func:`write_at_commit`."""
    _COMMIT_WRITERS.append(writer)
    return writer


AnySelect = Select[*tuple[Any, ...]]
_GUARDED: dict[tuple[Update, AnySelect], AnySelect] = {}  # a statement behind an update: built once


def select_after_required(session: Session, statement: AnySelect) -> Row[*tuple[Any, ...]] | None:
    """The one row of ``statement`` (a SELECT that may lock it), read after the session's updates queued
    by :func:`require_at_commit` run; :class:`PreconditionFailed` when one matched no row. With one such
    update, in one round trip: the update a CTE that the row's selection depends on (an initial plan run
    before the scan), so its row locks are taken first, as everywhere (a job's row before the trail's
    head); no row then means the update matched none, or ``statement`` found none (both are refused: the
    caller retries without the update)."""
    required = session.info.pop(_REQUIRED, [])
    connection = session.connection()
    if len(required) != 1 or connection.dialect.name != "postgresql":  # SQLite: no UPDATE in a WITH
        _run_required(connection, required)
        return connection.execute(statement).one_or_none()
    [(update_statement, parameters, reason)] = required
    key = (update_statement, statement)
    if key not in _GUARDED:
        done = update_statement.cte("required")
        _GUARDED[key] = statement.where(select(literal(1)).select_from(done).exists()).add_cte(done)
    row = connection.execute(_GUARDED[key], parameters).one_or_none()
    if row is None:
        raise PreconditionFailed(reason)
    return row


def _run_required(connection: Connection, required: Sequence[tuple[Update, dict[str, Any], str]]) -> None:
    for statement, parameters, reason in required:
        if connection.execute(statement, parameters).first() is None:
            raise PreconditionFailed(reason)


@event.listens_for(Session, "before_commit")
def _write_at_commit(session: Session) -> None:
    queued_inserts, queued_updates = session.info.pop(_AT_COMMIT, ([], []))
    inserts: Inserts = list(queued_inserts)
    updates: Updates = list(queued_updates)
    for writer in _COMMIT_WRITERS:  # the trail's takes the head with the required updates first
        more_inserts, more_updates = writer(session)
        inserts += more_inserts
        updates += more_updates
    _run_required(session.connection(), session.info.pop(_REQUIRED, []))  # a commit that appends no event
    write_together(session, inserts, updates)


@event.listens_for(Session, "after_transaction_end")
def _discard_at_end(session: Session, transaction: SessionTransaction) -> None:
    # A transaction that ends without committing (rollback, close) takes its queued rows with it.
    if transaction.parent is None:
        session.info.pop(_AT_COMMIT, None)
        session.info.pop(_REQUIRED, None)


_Shape = tuple[tuple[type[Base], tuple[str, ...]], ...]
_STATEMENTS: dict[tuple[_Shape, _Shape], Any] = {}  # write_together's statements, by tables and columns


def _table(model: type[Base]) -> Table:
    return model.__table__  # type: ignore[return-value]


def _recordset(key: str, table: Table, names: Sequence[str]) -> Any:
    """``jsonb_to_recordset(:key) AS key(column type, ...)``: the rows of one JSON document (a JSON column's
    value nested as it is; null is SQL NULL, as a flush that leaves a column out writes)."""
    columns = [column(name, table.c[name].type) for name in names]
    document = cast(bindparam(key, type_=Text), JSONB)
    return func.jsonb_to_recordset(document).table_valued(*columns).render_derived(name=key, with_types=True)


def _json_value(value: Any) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use service.core.clock.utcnow()")
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value write_together sends")


def _json_document(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(rows, default=_json_value, allow_nan=False, separators=(",", ":"))


def _copy(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """The rows by COPY (a JSON value as its text); a constraint it breaks is raised as an INSERT's would be
    (SQLAlchemy's IntegrityError)."""
    names = list(rows[0])
    json_columns = [i for i, name in enumerate(names) if isinstance(table.c[name].type, JSON)]
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, names))
    )
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(statement) as copy:
            for row in rows:
                values = [row[name] for name in names]
                for i in json_columns:
                    values[i] = None if values[i] is None else json.dumps(values[i])
                copy.write_row(values)
    except psycopg.IntegrityError as exc:
        raise IntegrityError(f"COPY {table.name}", None, exc) from exc


def _merged(
    groups: Iterable[tuple[type[Base], Sequence[dict[str, Any]]]],
) -> list[tuple[type[Base], list[dict[str, Any]]]]:
    """The rows of each table (and set of columns) together, where it first comes, empty groups left out."""
    merged: dict[tuple[type[Base], tuple[str, ...]], list[dict[str, Any]]] = {}
    for model, rows in groups:
        if rows:
            merged.setdefault((model, tuple(rows[0])), []).extend(rows)
    return [(model, rows) for (model, _names), rows in merged.items()]


def _statement(inserts: _Shape, updates: _Shape) -> Any:
    statements: list[Any] = []
    for i, (model, names) in enumerate(inserts):
        table = _table(model)
        rows = _recordset(f"insert{i}", table, names)
        statements.append(insert(table).from_select(names, select(*(rows.c[name] for name in names))))
    for i, (model, names) in enumerate(updates):
        table = _table(model)
        [key] = table.primary_key.columns
        rows = _recordset(f"update{i}", table, names)
        values = {name: rows.c[name] for name in names if name != key.name}
        statements.append(update(table).where(key == rows.c[key.name]).values(values))
    *ctes, last = statements
    return last.add_cte(*(statement.cte(f"write_{i}") for i, statement in enumerate(ctes)))
