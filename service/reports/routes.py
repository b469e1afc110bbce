from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session

from service.clients.security import requires
from service.clients.service import Principal
from service.core.problems import NotAcceptable
from service.core.settings import Settings
from service.dependencies import SessionDep, SettingsDep
from service.reports import service
from service.reports.keys import KeyRing

router = APIRouter(tags=["reports"])
JSON_MEDIA = "application/json"
PDF_MEDIA = "application/pdf"


ReportReader = Annotated[Principal, requires("reports:read")]


def _report(
    request_id: str, caller: Principal, session: Session, settings: Settings, http: Request, media: str
) -> Response:
    report = service.get_or_sign(session, settings, request_id, caller.tenant)
    form = "pdf" if media == PDF_MEDIA else "json"
    service.record_download(session, report, form, caller.actor, _address(http))
    session.commit()
    if media == PDF_MEDIA:
        from service.reports.pdf import render_pdf  # matplotlib: imported by the first PDF asked for

        body = render_pdf(json.loads(report.content), report.sha256, report.key_id)
        digest = hashlib.sha256(body).hexdigest()
    else:
        body, digest = report.content.encode(), report.sha256
    etag = f'"{digest}"'
    headers = {
        "ETag": etag,
        "Lethe-Signing-Key": report.key_id,
        "Link": f"</deletion-requests/{request_id}/report.sig>; rel=signature",
    }
    if http.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media, headers=headers)


def _address(http: Request) -> str | None:
    return http.client.host if http.client else None


def _negotiate(accept: str) -> str:
    """application/json unless the client asks for the PDF before JSON."""
    for media in (part.split(";")[0].strip() for part in accept.split(",")):
        if media in (JSON_MEDIA, "application/*", "*/*", ""):
            return JSON_MEDIA
        if media == PDF_MEDIA:
            return PDF_MEDIA
    raise NotAcceptable(
        "report-media-type", "the report is served as application/json or application/pdf",
        available=[JSON_MEDIA, PDF_MEDIA],
    )  # fmt: skip


@router.get("/deletion-requests/{request_id}/report", response_class=Response)
def get_report(
    request_id: str, caller: ReportReader, session: SessionDep, settings: SettingsDep, request: Request
) -> Response:
    """The request's erasure report: RFC 8785 canonical JSON, the exact bytes its detached Ed25519
    signature (``report.sig``) covers; with ``Accept: application/pdf``, the PDF rendered from it. 404
    until the request has settled."""
    media = _negotiate(request.headers.get("accept", "*/*"))
    return _report(request_id, caller, session, settings, request, media)


@router.get("/deletion-requests/{request_id}/report.json", response_class=Response)
def get_report_json(
    request_id: str, caller: ReportReader, session: SessionDep, settings: SettingsDep, request: Request
) -> Response:
    return _report(request_id, caller, session, settings, request, JSON_MEDIA)


@router.get("/deletion-requests/{request_id}/report.pdf", response_class=Response)
def get_report_pdf(
    request_id: str, caller: ReportReader, session: SessionDep, settings: SettingsDep, request: Request
) -> Response:
    """The PDF for people, rendered from the signed JSON (which stays the source of truth)."""
    return _report(request_id, caller, session, settings, request, PDF_MEDIA)


@router.get("/deletion-requests/{request_id}/report.sig")
def get_report_signature(
    request_id: str, caller: ReportReader, session: SessionDep, settings: SettingsDep, request: Request
) -> dict[str, str]:
    """The report's detached signature: algorithm, key id, base64 signature, SHA-256 of the signed bytes."""
    report = service.get_or_sign(session, settings, request_id, caller.tenant)
    service.record_download(session, report, "signature", caller.actor, _address(request))
    session.commit()
    return service.signature_document(report)


@router.get("/report-keys")
def list_report_keys(settings: SettingsDep) -> dict[str, object]:
    """Every report-signing public key (raw Ed25519, base64) with its id and SHA-256 fingerprint; old keys
    stay listed after a rotation, so the reports they signed still verify. Public, without a token: anyone
    handed a report must be able to check its signature."""
    return {"items": KeyRing(settings.report_key_dir).public_keys()}
