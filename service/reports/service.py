"""Issuing and reading erasure reports. Never commits: the route does."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.core.clock import utcnow
from service.core.problems import NotFound, Unavailable
from service.core.settings import Settings
from service.deletion_requests import service as requests_service
from service.reports.builder import canonical_bytes
from service.reports.generation import generate
from service.reports.keys import KeyRing, NoSigningKey, sign
from service.reports.tables import ErasureReport
from service.trail import service as trail


@dataclass(frozen=True)
class SignedReport:
    request_id: str
    content: str  # the signed bytes (UTF-8)
    sha256: str
    key_id: str
    signature: str

    @classmethod
    def of(cls, row: ErasureReport) -> SignedReport:
        assert row.content and row.sha256 and row.key_id and row.signature  # set together when signed
        return cls(row.request_id, row.content, row.sha256, row.key_id, row.signature)


def get_or_sign(session: Session, settings: Settings, request_id: str, tenant: str) -> SignedReport:
    """The request's signed report. Its facts were generated when the request settled; the first download
    signs them with the active key (named inside the signed bytes), and later downloads serve those bytes."""
    request = requests_service.get_request(session, request_id, tenant)
    report = session.get(ErasureReport, request_id, with_for_update=True)
    if request.state == "processing":
        raise NotFound(
            "report-not-ready",
            f"deletion request {request_id} has not settled yet (state processing): its report is generated "
            "once it completes, is rejected, fails or is canceled",
            request_id=request_id,
        )
    if report is None:  # settled before reports existed
        report = generate(session, request, actor="api")
    if report.content is not None:
        return SignedReport.of(report)
    try:
        key = KeyRing(settings.report_key_dir).active()
    except NoSigningKey as exc:
        raise Unavailable("no-signing-key", "the service has no report-signing key configured") from exc
    content = json.loads(report.facts)
    content["signing"] = {"algorithm": "Ed25519", "key_id": key.key_id}  # the report names its key
    data = canonical_bytes(content)
    report.content, report.sha256 = data.decode(), hashlib.sha256(data).hexdigest()
    report.key_id, report.signature, report.signed_at = key.key_id, sign(key, data)["signature"], utcnow()
    session.flush()
    trail.append(
        session, "report.signed", actor="api", subject_type="report", subject_id=request_id,
        request_id=request_id, data={"sha256": report.sha256, "key_id": key.key_id},
    )  # fmt: skip
    return SignedReport.of(report)


def signature_document(report: SignedReport) -> dict[str, str]:
    return {"algorithm": "Ed25519", "key_id": report.key_id, "signature": report.signature,
            "signed_sha256": report.sha256}  # fmt: skip


def record_download(
    session: Session, report: SignedReport, what: str, actor: str, address: str | None
) -> None:
    """Every download is an event of the trail (who, from where, when, which form)."""
    trail.append(
        session, "report.downloaded", actor=actor, subject_type="report",
        subject_id=report.request_id, request_id=report.request_id,
        data={"form": what, "sha256": report.sha256, "address": address},
    )  # fmt: skip
