from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.core.problems import NotAcceptable
from service.dependencies import SessionDep, SettingsDep
from service.reports import service
from service.reports.keys import KeyRing

router = APIRouter(tags=["reports"])
JSON_MEDIA = "application/json"


def _report(request_id: str, session: SessionDep, settings: SettingsDep, http: Request) -> Response:
    report = service.get_or_issue(session, settings, request_id)
    session.commit()
    etag = f'"{report.sha256}"'
    headers = {
        "ETag": etag,
        "Lethe-Signing-Key": report.key_id,
        "Link": f"</deletion-requests/{request_id}/report.sig>; rel=signature",
    }
    if http.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(report.content.encode(), media_type=JSON_MEDIA, headers=headers)


@router.get("/deletion-requests/{request_id}/report", response_class=Response)
def get_report(request_id: str, session: SessionDep, settings: SettingsDep, request: Request) -> Response:
    """The request's erasure report: RFC 8785 canonical JSON, the exact bytes its detached Ed25519
    signature (``report.sig``) covers. 404 until the request has settled."""
    accept = request.headers.get("accept", "*/*")
    if not any(kind in accept for kind in (JSON_MEDIA, "*/*", "application/*")):
        raise NotAcceptable(
            "report-media-type",
            "the report is served as application/json (the PDF rendering is not built yet)",
            available=[JSON_MEDIA],
        )
    return _report(request_id, session, settings, request)


@router.get("/deletion-requests/{request_id}/report.json", response_class=Response)
def get_report_json(
    request_id: str, session: SessionDep, settings: SettingsDep, request: Request
) -> Response:
    return _report(request_id, session, settings, request)


@router.get("/deletion-requests/{request_id}/report.sig")
def get_report_signature(request_id: str, session: SessionDep, settings: SettingsDep) -> dict[str, str]:
    """The report's detached signature: algorithm, key id, base64 signature, SHA-256 of the signed bytes."""
    report = service.get_or_issue(session, settings, request_id)
    session.commit()
    return service.signature_document(report)


@router.get("/report-keys")
def list_report_keys(settings: SettingsDep) -> dict[str, object]:
    """Every report-signing public key (raw Ed25519, base64) with its id and SHA-256 fingerprint; old keys
    stay listed after a rotation, so the reports they signed still verify."""
    return {"items": KeyRing(settings.report_key_dir).public_keys()}
