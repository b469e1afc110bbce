"""FastAPI dependencies: what ``create_app`` put on ``app.state``, one session per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from service.core.settings import Settings
from service.dispatch import JobDispatcher
from service.storage import ObjectStore


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's unit of work: routes commit it; anything uncommitted is rolled back on close. Async, as
    the app-state lookups below: FastAPI runs a sync dependency on a worker thread, a hand-off at each end
    of the request that costs more than opening a session (no I/O) or closing one with no transaction open;
    only the rollback of an open one is handed to a thread (it waits for the database)."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


async def get_dispatcher(request: Request) -> JobDispatcher:
    dispatcher: JobDispatcher = request.app.state.dispatcher
    return dispatcher


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
DispatcherDep = Annotated[JobDispatcher, Depends(get_dispatcher)]
LimitQuery = Annotated[int | None, Query(ge=1, description="page size; capped at the server's maximum")]


def page_size(settings: Settings, limit: int | None) -> int:
    """AIP-158: a missing limit means the default; one above the maximum is lowered to it."""
    return min(limit or settings.page_size_default, settings.page_size_max)
