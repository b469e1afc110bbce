"""Erasure reports' building blocks and errors (the signed reports of real jobs: test_audit_pipeline.py)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.cli import main as lethe
from service.core.settings import Settings
from service.jobs import service as jobs_service
from service.reports import builder, commitment
from service.reports.builder import canonical_bytes
from service.reports.keys import KeyRing, sign, verify
from tests.service.conftest import job_of


def test_the_commitment_proves_one_id_included_without_listing_any() -> None:
    salt = commitment.new_salt()
    ids = [f"img-{i:05d}" for i in range(37)]
    root = commitment.merkle_root(salt, ids)
    assert root == commitment.merkle_root(salt, list(reversed(ids)))  # order-free
    assert root != commitment.merkle_root(commitment.new_salt(), ids)  # the salt hides guessable ids
    for sample_id in ("img-00000", "img-00017", "img-00036"):
        proof = commitment.inclusion_proof(salt, ids, sample_id)
        assert commitment.verify_inclusion(salt, sample_id, proof, root)
    proof = commitment.inclusion_proof(salt, ids, "img-00017")
    assert not commitment.verify_inclusion(salt, "img-99999", proof, root)


def test_canonical_json_is_byte_stable_and_signatures_bind_the_bytes(tmp_path: Any) -> None:
    content = {"b": [1, 2.5, None], "a": {"z": "ü", "y": 1e-7}}
    data = canonical_bytes(content)
    assert data == canonical_bytes({"a": {"y": 1e-7, "z": "ü"}, "b": [1, 2.5, None]})
    assert data.startswith(b'{"a":{"y":1e-7,"z":"')
    key = KeyRing(tmp_path).generate()
    signature = sign(key, data)
    assert verify(key.public_raw, data, signature)
    assert not verify(key.public_raw, data.replace(b"2.5", b"2.6"), signature)
    assert not verify(KeyRing(tmp_path).generate().public_raw, data, signature)
    assert KeyRing(tmp_path).active().key_id != key.key_id  # the newest key is active


def test_a_worker_run_from_an_uninstalled_tree_reports_no_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found on a GPU worker started with PYTHONPATH: the missing distribution failed the whole settlement.
    def missing(name: str) -> str:
        raise builder.metadata.PackageNotFoundError(name)

    builder.code_version.cache_clear()
    monkeypatch.setattr(builder.metadata, "version", missing)
    try:
        assert builder.code_version() == builder.NOT_INSTALLED
    finally:
        builder.code_version.cache_clear()


def test_report_errors_are_problems(client: TestClient, model: dict[str, Any]) -> None:
    assert client.get("/deletion-requests/nope/report").status_code == 404
    assert client.get("/report-keys").json() == {"items": []}
    answer = client.post("/deletion-requests", json={"model": model["name"], "sample_ids": ["s4"]})
    request = answer.json()
    assert client.post(f"/jobs/{job_of(request)}/cancel").status_code == 202
    no_key = client.get(f"/deletion-requests/{request['id']}/report")
    assert no_key.status_code == 503 and no_key.json()["type"] == "/problems/no-signing-key"


@pytest.mark.parametrize("suffix", ["report", "report.json", "report.sig"])
def test_unknown_requests_have_no_report(client: TestClient, suffix: str) -> None:
    answer = client.get(f"/deletion-requests/00000000-0000-0000-0000-000000000000/{suffix}")
    assert answer.status_code == 404 and answer.json()["type"] == "/problems/deletion-request-not-found"


def test_keygen_rotates_and_if_none_keeps_an_existing_key(tmp_path: Any) -> None:
    assert lethe(["report", "keygen", "--dir", str(tmp_path), "--if-none"]) == 0
    first = KeyRing(tmp_path).active().key_id
    assert lethe(["report", "keygen", "--dir", str(tmp_path), "--if-none"]) == 0
    assert [key.key_id for key in KeyRing(tmp_path).signing_keys()] == [first]
    assert lethe(["report", "keygen", "--dir", str(tmp_path)]) == 0
    keys = KeyRing(tmp_path).public_keys()
    assert len(keys) == 2 and keys[0]["key_id"] == first and [k["active"] for k in keys] == [False, True]
    assert all((tmp_path / p.name).stat().st_mode & 0o077 == 0 for p in tmp_path.glob("*.pem"))


def test_a_failed_request_has_a_report_that_says_what_failed(
    client: TestClient, model: dict[str, Any], settings: Settings, session: Session
) -> None:
    key = KeyRing(settings.report_key_dir).generate()
    request = client.post("/deletion-requests", json={"model": model["name"], "sample_ids": ["s5"]}).json()
    jobs_service.finish(
        session, job_of(request), "failed", error_reason="load_error", error_detail="disk gone"
    )
    session.commit()
    report = client.get(f"/deletion-requests/{request['id']}/report").json()
    assert report["request"]["state"] == "failed" and not report["request"]["due_date_met"]
    [erasure] = report["erasures"]
    assert erasure["state"] == "failed" and erasure["model"]["name"] == model["name"]
    assert erasure["outcome"]["error"] == {"reason": "load_error", "detail": "disk gone"}
    assert erasure["outcome"]["verdict"] is None and not erasure["outcome"]["passed"]
    assert report["signing"] == {"algorithm": "Ed25519", "key_id": key.key_id}
