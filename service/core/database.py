"""SQLAlchemy engine, sessions, the declarative ``Base`` and programmatic migrations.

The same code runs on Postgres (production, tests) and SQLite (the demo): JSON columns become JSONB on
Postgres, timestamps are always timezone-aware UTC, and SQLite gets its foreign keys switched on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    MetaData,
    Table,
    Text,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Session, make_transient_to_detached, sessionmaker
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


# Up to this many rows a table, write_together sends them as arrays in one statement; a bulk call's thousands
# go by executemany, each row's values dumped faster than the same values quoted into an array literal.
_ARRAY_ROWS = 100


def write_together(
    session: Session,
    inserts: Sequence[tuple[type[Base], Sequence[Base | dict[str, Any]]]],
    updates: Sequence[tuple[type[Base], Sequence[dict[str, Any]]]] = (),
) -> None:
    """INSERT the new objects (or plain rows) of several tables, each after those it refers to, and UPDATE
    rows of some (each row: its primary key and the columns it sets). On Postgres, up to :data:`_ARRAY_ROWS`
    rows a table, in one statement: a data-modifying CTE a table, its rows sent as one array a column
    (``INSERT ... SELECT unnest(...)``, ``UPDATE ... FROM (SELECT unnest(...))``: a statement of one shape,
    built and compiled once), foreign keys checked at its end; otherwise a statement a table (an
    executemany). A JSON column's None is SQL NULL, as a flush that leaves it out writes. The new objects
    then belong to the session as if loaded: no flush writes them again."""
    written = [
        (model, [row_of(item) if isinstance(item, Base) else item for item in items])
        for model, items in inserts
        if items
    ]
    changed = [(model, rows) for model, rows in updates if rows]
    if not written and not changed:
        return
    connection = session.connection()  # the connection, not the ORM's unit of work
    if connection.dialect.name == "postgresql" and all(
        len(rows) <= _ARRAY_ROWS for _model, rows in [*written, *changed]
    ):
        shape = (
            tuple((model, tuple(rows[0])) for model, rows in written),
            tuple((model, tuple(rows[0])) for model, rows in changed),
        )
        if shape not in _STATEMENTS:
            _STATEMENTS[shape] = _statement(*shape)
        parameters = {}
        for prefix, group in (("insert", written), ("update", changed)):
            for model, rows in group:
                table = _table(model)
                for name in rows[0]:
                    values = [row[name] for row in rows]
                    if isinstance(table.c[name].type, JSON):
                        values = [None if value is None else json.dumps(value) for value in values]
                    parameters[f"{prefix}_{table.name}_{name}"] = values
        connection.execute(_STATEMENTS[shape], parameters)
    else:
        for model, rows in written:
            table = _table(model)
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


_Shape = tuple[tuple[type[Base], tuple[str, ...]], ...]
_STATEMENTS: dict[tuple[_Shape, _Shape], Any] = {}  # write_together's statements, by tables and columns


def _table(model: type[Base]) -> Table:
    return model.__table__  # type: ignore[return-value]


def _arrays(prefix: str, table: Table, names: Sequence[str]) -> list[Any]:
    """``unnest(:prefix_table_column)`` for each column (a JSON column's array as text, each value cast back:
    None is SQL NULL, as a flush that leaves it out writes)."""
    arrays = []
    for name in names:
        column, key = table.c[name], f"{prefix}_{table.name}_{name}"
        if isinstance(column.type, JSON):
            arrays.append(cast(func.unnest(bindparam(key, type_=ARRAY(Text))), JSONB).label(name))
        else:
            arrays.append(func.unnest(bindparam(key, type_=ARRAY(column.type))).label(name))
    return arrays


def _statement(inserts: _Shape, updates: _Shape) -> Any:
    statements: list[Any] = []
    for model, names in inserts:
        table = _table(model)
        statements.append(insert(table).from_select(names, select(*_arrays("insert", table, names))))
    for model, names in updates:
        table = _table(model)
        [key] = table.primary_key.columns
        rows = select(*_arrays("update", table, names)).subquery(f"{table.name}_rows")
        values = {name: rows.c[name] for name in names if name != key.name}
        statements.append(update(table).where(key == rows.c[key.name]).values(values))
    *ctes, last = statements
    return last.add_cte(*(statement.cte(f"write_{i}") for i, statement in enumerate(ctes)))
