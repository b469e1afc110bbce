"""The bare stack's floor, for ``worker.bench.api_compare``: FastAPI + SQLAlchemy + psycopg, one endpoint
that validates a body like a deletion request's and inserts one row in one transaction, served the way Lethe
is (one uvicorn process, a sync handler, a pool as large as Lethe's, the startup heap frozen). Nothing else:
no authentication, no idempotency, no trail, no queue. ``uvicorn --factory
worker.bench.baseline_app:create_app`` with ``LETHE_BENCH_BASELINE_URL`` naming its database (the table is
created at start)."""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import JSON, DateTime, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

POOL_SIZE = 8  # LETHE_API_CONCURRENCY's default


class _Base(DeclarativeBase):
    pass


class BaselineRequest(_Base):
    __tablename__ = "baseline_requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    subject_id: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    subject_id: str = Field(min_length=1, max_length=200)
    config: dict[str, Any] | None = None


def session(request: Request) -> Iterator[Session]:
    """The request's session, as Lethe's ``get_session`` gives it (a module-level dependency: the handler's
    annotations are strings, resolved in this module's namespace)."""
    with request.app.state.session_factory() as s:
        yield s


class RequestOut(BaseModel):
    id: str
    model: str
    subject_id: str
    received_at: datetime


def create_app() -> FastAPI:
    engine = create_engine(os.environ["LETHE_BENCH_BASELINE_URL"], pool_size=POOL_SIZE)
    _Base.metadata.create_all(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        gc.collect()  # served as Lethe is: its startup heap frozen (service.app.create_served_app)
        gc.freeze()
        yield

    app = FastAPI(lifespan=lifespan)
    app.state.session_factory = sessionmaker(engine, expire_on_commit=False)

    @app.post("/deletion-requests", status_code=status.HTTP_202_ACCEPTED, response_model=RequestOut)
    def create(body: RequestIn, s: Annotated[Session, Depends(session)]) -> RequestOut:
        row = BaselineRequest(
            id=str(uuid.uuid4()), model=body.model, subject_id=body.subject_id, config=body.config or {},
            received_at=datetime.now(UTC),
        )  # fmt: skip
        s.add(row)
        s.commit()
        return RequestOut(id=row.id, model=row.model, subject_id=row.subject_id, received_at=row.received_at)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
