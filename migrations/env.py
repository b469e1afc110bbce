"""Alembic environment: the URL comes from the Alembic config (``service.core.database.migrate``) or, for the
``alembic`` command line, from the service settings (``LETHE_DATABASE_URL``)."""

from __future__ import annotations

from alembic import context

import service.tables  # noqa: F401  (registers every table on Base.metadata)
from service.core.database import Base, make_engine
from service.core.settings import Settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            # Batch mode: SQLite cannot ALTER constraints, so Alembic recreates the table there.
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
