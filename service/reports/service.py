"""Issuing and reading erasure reports. Never commits: the route does."""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.problems import NotFound, Unavailable
from service.core.settings import Settings
from service.deletion_requests import service as requests_service
from service.reports import commitment
from service.reports.builder import build_content
from service.reports.keys import KeyRing, NoSigningKey, sign
from service.reports.tables import ErasureReport
from service.trail import service as trail


def canonical_bytes(content: dict[str, Any]) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme): the same content always gives the same bytes to sign."""
    return rfc8785.dumps(content)


def get_or_issue(session: Session, settings: Settings, request_id: str) -> ErasureReport:
    """The request's report, issued and signed now if this is its first download (its content depends only
    on the settled request, so issuing it later changes nothing but the moment it was signed)."""
    request = requests_service.get_request(session, request_id)
    existing = session.get(ErasureReport, request_id)
    if existing is not None:
        return existing
    if request.state == "processing":
        raise NotFound(
            "report-not-ready",
            f"deletion request {request_id} has not settled yet (state processing): its report is issued "
            "once it completes, is rejected, fails or is canceled",
            request_id=request_id,
        )
    try:
        key = KeyRing(settings.report_key_dir).active()
    except NoSigningKey as exc:
        raise Unavailable("no-signing-key", "the service has no report-signing key configured") from exc
    salt = commitment.new_salt()
    content = build_content(session, request, salt)
    content["trail"] = trail.request_segment(session, request_id)  # the request's history, to its settling
    content["signing"] = {"algorithm": "Ed25519", "key_id": key.key_id}  # the report names its key
    data = canonical_bytes(content)
    signature = sign(key, data)
    report = ErasureReport(
        request_id=request_id, content=data.decode(), sha256=hashlib.sha256(data).hexdigest(),
        key_id=key.key_id, signature=signature["signature"], commitment_salt=salt.hex(),
    )  # fmt: skip
    try:
        with session.begin_nested():
            session.add(report)
            trail.append(
                session, "report.issued", actor="api", subject_type="report", subject_id=request_id,
                request_id=request_id, data={"sha256": report.sha256, "key_id": report.key_id},
            )  # fmt: skip
    except IntegrityError:  # a concurrent first download issued it: serve that one
        winner = session.get(ErasureReport, request_id, populate_existing=True)
        assert winner is not None
        return winner
    return report


def record_download(session: Session, report: ErasureReport, what: str, client: str | None) -> None:
    """Every download is an event of the trail (who, when, which form)."""
    trail.append(
        session, "report.downloaded", actor=f"api client {client or 'unknown'}", subject_type="report",
        subject_id=report.request_id, request_id=report.request_id,
        data={"form": what, "sha256": report.sha256},
    )  # fmt: skip


def signature_document(report: ErasureReport) -> dict[str, str]:
    return {"algorithm": "Ed25519", "key_id": report.key_id, "signature": report.signature,
            "signed_sha256": report.sha256}  # fmt: skip
