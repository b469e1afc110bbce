"""The audit through the service, on the real Postgres and the worker pipeline (run in-process): a no-op
deletion of a memorised subject is rejected and marks nothing forgotten; exact retraining is accepted; the
model's reference set is built by its first job, and again on demand; ``lethe audit run`` fails the base
version audited against itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from service.cli import main as lethe
from service.reports.keys import KeyRing
from tests.audit.memorised import RECIPE, REFERENCES, SPEC, SUBJECT
from tests.service.conftest import job_of
from tests.service.memorised_service import MemorisedService, memorised_dataset_body, memorised_service
from worker.checkpoints import state_dict_to_bytes
from worker.demo import erased_sample_ids

pytestmark = pytest.mark.slow


MODEL = "memorised"


class Env(MemorisedService):
    model = MODEL

    def run_dispatched(self) -> str | None:
        return self.run_job(self.dispatcher.dispatched.pop())

    def erase(self, method: str, config: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        answer = self.client.post(
            "/deletion-requests",
            json={"model": self.model, "subject_id": SUBJECT, "method": method, "config": config},
        )
        assert answer.status_code == 202, answer.text
        return answer.json(), self.run_dispatched()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, module_database_url: str) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("audit")
    # Files of later tests lie in their own tmp_path: the data root is the session's base.
    with memorised_service(
        tmp, module_database_url, audit_references=REFERENCES, data_dir=tmp_path_factory.getbasetemp()
    ) as service:
        model = service.register_model(MODEL)
        assert model["training_recipe"]["lr"] == RECIPE.lr
        yield Env(**vars(service))


def test_a_no_op_is_rejected_and_marks_nothing_forgotten(env: Env) -> None:
    missing = env.client.get(f"/models/{env.model}/audit-references")
    assert missing.status_code == 404 and missing.json()["type"].endswith("reference-set-not-found")

    request, state = env.erase("finetune", {"lr": 1e-9, "epochs": 1})
    assert state == "rejected"
    job = env.client.get(f"/jobs/{job_of(request)}").json()
    assert job["error"]["reason"] == "audit_gate" and "residual membership" in job["error"]["detail"]
    assert job["metrics"]["rule"]["level"] == env.settings.audit_level  # the rule travels with the numbers
    assert job["metrics"]["audits"][request["id"]]["verdict"] == "residual_membership"
    settled = env.client.get(f"/deletion-requests/{request['id']}").json()
    assert settled["state"] == "rejected"
    [erasure] = settled["erasures"]
    assert erasure["state"] == "rejected" and erasure["verdict"] == "residual_membership"
    audit = erasure["audit"]
    assert audit["verdict"] == "residual_membership" and not audit["passed"]
    # The job's evidence names the subject only by a commitment whose salt nobody kept.
    [subject] = audit["subjects"].values()
    assert subject["verdict"] == "residual_membership" and SUBJECT not in json.dumps(job["metrics"])
    assert erased_sample_ids(env.client, env.dataset_id, request["id"]) == []
    assert [v["status"] for v in env.client.get(f"/models/{env.model}/versions").json()["items"]] == [
        "active", "rejected"
    ]  # fmt: skip
    # The job built the lineage's reference set before auditing: a client made no extra call.
    references = env.client.get(f"/models/{env.model}/audit-references").json()
    assert references["references"] == REFERENCES and references["job_id"] == job_of(request)
    assert references["summary"]["recipe"]["epochs"] == RECIPE.epochs


def test_exact_retraining_is_accepted_and_marks_the_subject_forgotten(env: Env) -> None:
    before = env.client.get(f"/models/{env.model}/audit-references").json()
    request, state = env.erase("retrain", {"epochs": RECIPE.epochs, "lr": RECIPE.lr, "seed": 12345})
    assert state == "succeeded"
    settled = env.client.get(f"/deletion-requests/{request['id']}").json()
    assert settled["state"] == "completed" and settled["erasures"][0]["verdict"] == "forgotten"
    assert len(erased_sample_ids(env.client, env.dataset_id, request["id"])) == len(env.case.subject_rows)
    assert env.client.get(f"/models/{env.model}/audit-references").json()["id"] == before["id"]  # reused


def test_lethe_audit_run_fails_the_base_version_against_itself(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LETHE_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("LETHE_STORAGE_URL", env.settings.storage_url)
    monkeypatch.setenv("LETHE_PSEUDONYM_KEY_FILE", str(env.settings.pseudonym_key_file))
    held = tmp_path / "held.txt"  # samples no request erased: the model still holds them
    held.write_text("\n".join(env.case.dataset.sample_ids[r] for r in env.case.remaining_rows[:30]))
    out = tmp_path / "audit.json"
    model = ["--model", env.model, "--tenant", "acme"]
    versions = env.client.get(f"/models/{env.model}/versions").json()["items"]
    active = next(v for v in versions if v["status"] == "active")["number"]
    assert lethe(["audit", "run", *model, "--version", str(active), "--base-version", str(active),
                  "--forget-ids", str(held), "--json", str(out)]) == 1  # fmt: skip
    assert json.loads(out.read_text())["verdict"] == "unchanged"
    # A checkpoint unlearned elsewhere (here: that version's bytes) is audited the same way.
    checkpoint = tmp_path / "elsewhere.safetensors"
    checkpoint.write_bytes(env.client.get(f"/models/{env.model}/versions/{active}/checkpoint").content)
    assert lethe(["audit", "run", *model, "--checkpoint", str(checkpoint), "--base-version", str(active),
                  "--forget-ids", str(held), "--json", str(out)]) == 1  # fmt: skip
    assert json.loads(out.read_text())["audited"] == str(checkpoint)
    # After the purge the erased subject cannot be audited again: its rows and the base it was in are gone.
    erased = tmp_path / "erased.txt"
    erased.write_text("\n".join(env.case.dataset.sample_ids[r] for r in env.case.subject_rows))
    assert lethe(["audit", "run", *model, "--version", str(active), "--base-version", "1",
                  "--forget-ids", str(erased), "--json", str(out)]) == 2  # fmt: skip
    assert lethe(["audit", "run", *model, "--version", str(active), "--base-version", str(active),
                  "--forget-ids", str(erased), "--json", str(out)]) == 2  # fmt: skip
    assert lethe(["audit", "run", "--model", "nope", "--version", "1", "--forget-ids", str(held),
                  "--json", str(out)]) == 2  # fmt: skip


def test_references_rebuild_on_demand_as_a_job(env: Env) -> None:
    before = env.client.get(f"/models/{env.model}/audit-references").json()
    bad = env.client.post(f"/models/{env.model}/audit-references", json={"references": 3})
    assert bad.status_code == 422 and bad.json()["type"].endswith("invalid-reference-count")
    answer = env.client.post(f"/models/{env.model}/audit-references", json={"references": 4})
    assert answer.status_code == 202 and answer.headers["Location"] == f"/jobs/{answer.json()['id']}"
    assert answer.json()["kind"] == "build_references" and answer.json()["request_ids"] == []
    assert env.run_dispatched() == "succeeded"
    job = env.client.get(f"/jobs/{answer.json()['id']}").json()
    # The build trains the audit's 4 and the steering references (progress counts both).
    steering = env.settings.audit_steering_references
    assert job["progress"]["phase"] == "audit_references" and job["progress"]["total_epochs"] == 4 + steering
    after = env.client.get(f"/models/{env.model}/audit-references").json()
    assert after["id"] != before["id"] and after["references"] == 4
    assert after["summary"]["steering_references"] == steering


def test_a_label_free_dataset_is_audited_against_the_base_models_predictions(
    env: Env, tmp_path: Path
) -> None:
    case = env.case
    np.savez(tmp_path / "free.npz", x=case.dataset.x)
    body = memorised_dataset_body(case, tmp_path / "free.npz")
    body.update(name="digits-label-free", num_classes=None)
    for sample in body["samples"]:
        sample["label"] = None
    dataset = env.client.post("/datasets", json=body)
    assert dataset.status_code == 201, dataset.text
    (tmp_path / "m.safetensors").write_bytes(state_dict_to_bytes(case.initial))
    model = env.client.post("/models", json={
        "name": "label-free", "dataset_id": dataset.json()["id"], "spec": SPEC.to_dict(),
        "checkpoint_path": str(tmp_path / "m.safetensors"), "training_recipe": {"epochs": 2},
    })  # fmt: skip
    assert model.status_code == 201, model.text
    answer = env.client.post(
        "/deletion-requests", json={"model": "label-free", "subject_id": SUBJECT, "config": {"epochs": 1}}
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["method"] == "mixunlearn-agnostic"
    state = env.run_dispatched()
    job = env.client.get(f"/jobs/{job_of(answer.json())}").json()
    assert state in ("succeeded", "rejected"), job["error"]
    assert job["metrics"]["before"]["labels"] == "base_model"
    assert job["metrics"]["audits"][answer.json()["id"]]["verdict"] in (
        "forgotten", "no_measurable_signal", "residual_membership", "over_forgetting"
    )  # fmt: skip


def test_lethe_audit_build_references_runs_a_build_job_and_follows_it(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LETHE_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("LETHE_STORAGE_URL", env.settings.storage_url)
    monkeypatch.setenv("LETHE_DISPATCHER", "inprocess")  # the job runs in this process, on the same pipeline
    before = env.client.get(f"/models/{env.model}/audit-references").json()
    assert lethe(["audit", "build-references", env.model, "--tenant", "acme", "--references", "2"]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "succeeded" in out
    after = env.client.get(f"/models/{env.model}/audit-references").json()
    assert after["id"] != before["id"] and after["references"] == 2
    assert lethe(["audit", "build-references", "nope"]) == 2


def _download(env: Env, request_id: str, where: Path) -> tuple[Path, dict[str, Any]]:
    answer = env.client.get(f"/deletion-requests/{request_id}/report")
    assert answer.status_code == 200, answer.text
    assert answer.headers["ETag"].strip('"') == hashlib.sha256(answer.content).hexdigest()
    report = where / f"{request_id}.json"
    report.write_bytes(answer.content)
    signature = env.client.get(f"/deletion-requests/{request_id}/report.sig")
    assert signature.status_code == 200
    report.with_suffix(".sig").write_text(signature.text)
    return report, json.loads(answer.content)


def _public_key_file(env: Env, key_id: str, where: Path) -> Path:
    keys = {key["key_id"]: key for key in env.client.get("/report-keys").json()["items"]}
    path = where / f"{key_id}.pub"
    path.write_text(keys[key_id]["public_key"])
    return path


def test_signed_reports_verify_name_no_ids_and_fail_on_any_change(env: Env, tmp_path: Path) -> None:
    requests = env.client.get("/jobs", params={"model": env.model, "state": "rejected"}).json()["items"]
    rejected_request = requests[-1]["request_ids"][0]
    report_path, report = _download(env, rejected_request, tmp_path)
    [erasure] = report["erasures"]
    assert erasure["outcome"]["verdict"] == "residual_membership" and not erasure["outcome"]["passed"]
    assert report["method_class"] == "approximate (empirically audited)"
    assert report["samples"]["count"] == len(env.case.subject_rows)
    assert erasure["evidence"]["membership"]["before"]["residual_membership_p"] < 0.05
    assert erasure["outcome"]["rule"]["level"] == env.settings.audit_level
    text = report_path.read_text()
    assert SUBJECT not in text and not any(
        env.case.dataset.sample_ids[r] in text for r in env.case.subject_rows
    )
    # The same bytes on every download.
    assert (
        env.client.get(f"/deletion-requests/{rejected_request}/report.json").content
        == report_path.read_bytes()
    )
    key_id = json.loads(report_path.with_suffix(".sig").read_text())["key_id"]
    public_key = _public_key_file(env, key_id, tmp_path)
    assert lethe(["report", "verify", str(report_path), "--public-key", str(public_key)]) == 0

    tampered = tmp_path / "tampered.json"
    data = bytearray(report_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    signature = str(report_path.with_suffix(".sig"))
    assert (
        lethe(["report", "verify", str(tampered), "--signature", signature, "--public-key", str(public_key)])
        == 1
    )

    # Rotation: a new key signs new reports; the old report still verifies under the old, still listed key.
    new_key = KeyRing(env.settings.report_key_dir).generate()
    completed = env.client.get("/jobs", params={"model": env.model, "state": "succeeded"}).json()["items"]
    new_path, new_report = _download(env, completed[-1]["request_ids"][0], tmp_path)
    assert json.loads(new_path.with_suffix(".sig").read_text())["key_id"] == new_key.key_id
    assert (
        new_report["erasures"][0]["outcome"]["verdict"] == "forgotten"
        and new_report["request"]["due_date_met"]
    )
    assert lethe(["report", "verify", str(report_path), "--public-key", str(public_key)]) == 0
    new_public = _public_key_file(env, new_key.key_id, tmp_path)
    assert lethe(["report", "verify", str(new_path), "--public-key", str(new_public)]) == 0
    assert lethe(["report", "verify", str(report_path), "--public-key", str(new_public)]) == 1


def test_no_report_before_the_request_settles_and_one_once_it_is_canceled(env: Env) -> None:
    sample_ids = [env.case.dataset.sample_ids[r] for r in env.case.remaining_rows[:5]]
    answer = env.client.post(
        "/deletion-requests", json={"model": env.model, "sample_ids": sample_ids, "method": "finetune"}
    )
    assert answer.status_code == 202, answer.text
    request = answer.json()
    env.dispatcher.dispatched.remove(job_of(request))
    early = env.client.get(f"/deletion-requests/{request['id']}/report")
    assert early.status_code == 404 and early.json()["type"] == "/problems/report-not-ready"
    assert env.client.post(f"/jobs/{job_of(request)}/cancel").status_code == 202
    report = env.client.get(f"/deletion-requests/{request['id']}/report").json()
    [erasure] = report["erasures"]
    assert report["request"]["state"] == "canceled" and erasure["outcome"]["state"] == "canceled"
    assert erasure["evidence"] is None and "nothing here is evidence" in erasure["limitations"]
    html = env.client.get(f"/deletion-requests/{request['id']}/report", headers={"Accept": "text/html"})
    assert html.status_code == 406 and html.json()["available"] == ["application/json", "application/pdf"]
    pdf = env.client.get(f"/deletion-requests/{request['id']}/report", headers={"Accept": "application/pdf"})
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")  # the summary page alone: no evidence


def test_the_pdf_is_rendered_from_the_report_and_its_pages_are_not_blank(env: Env) -> None:
    import pypdfium2

    rejected = env.client.get("/jobs", params={"model": env.model, "state": "rejected"}).json()["items"]
    request_id = rejected[-1]["request_ids"][0]
    answer = env.client.get(f"/deletion-requests/{request_id}/report", headers={"Accept": "application/pdf"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/pdf"
    assert env.client.get(f"/deletion-requests/{request_id}/report.pdf").content == answer.content  # stable
    document = pypdfium2.PdfDocument(answer.content)
    assert len(document) == 2  # the summary, then the evidence
    for index in range(len(document)):
        pixels = document[index].render(scale=1).to_numpy()
        assert (pixels.min(axis=-1) < 200).mean() > 0.01, f"page {index + 1} is blank"
    text = document[0].get_textpage().get_text_range()
    assert "Erasure report" in text and "NOT ERASED" in text


def test_lethe_audit_verify_chain_passes_then_names_a_tampered_event(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LETHE_DATABASE_URL", env.settings.database_url)
    assert lethe(["audit", "verify-chain"]) == 0
    assert "intact" in capsys.readouterr().out
    kinds = [
        e["kind"]
        for e in env.client.get("/deletion-requests/" + _any_request(env) + "/trail").json()["items"]
    ]
    assert "samples.erased" in kinds and "erasure.completed" in kinds
    with env.session_factory.begin() as session:  # an operator edits history behind the trigger's back
        session.execute(text("ALTER TABLE trail_events DISABLE TRIGGER trail_events_append_only"))
        session.execute(text("UPDATE trail_events SET actor = 'nobody' WHERE seq = 3"))
        session.execute(text("ALTER TABLE trail_events ENABLE TRIGGER trail_events_append_only"))
    assert lethe(["audit", "verify-chain"]) == 1
    assert "BROKEN at event 3" in capsys.readouterr().out


def _any_request(env: Env) -> str:
    succeeded = env.client.get("/jobs", params={"model": env.model, "state": "succeeded"}).json()["items"]
    return str(succeeded[-1]["request_ids"][0])
