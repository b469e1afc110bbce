"""Imports every table module so ``Base.metadata`` is complete (for Alembic and the mapper registry)."""

from service.audit import tables as audit_tables
from service.clients import tables as clients_tables
from service.datasets import tables as datasets_tables
from service.deletion_requests import tables as deletion_requests_tables
from service.erasures import tables as erasures_tables
from service.idempotency import tables as idempotency_tables
from service.jobs import tables as jobs_tables
from service.models import tables as models_tables
from service.reports import tables as reports_tables
from service.trail import tables as trail_tables
from service.webhooks import tables as webhooks_tables

__all__ = [
    "audit_tables",
    "clients_tables",
    "datasets_tables",
    "deletion_requests_tables",
    "erasures_tables",
    "idempotency_tables",
    "jobs_tables",
    "models_tables",
    "reports_tables",
    "trail_tables",
    "webhooks_tables",
]
