"""``lethe demo``: the whole service in one process, on the code path production uses.

SQLite under ./var/demo instead of Postgres, the in-process dispatcher instead of Celery + Redis, and the real
API served by uvicorn on a free loopback port. Every step a product backend takes goes through HTTP.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from service.app import create_app
from service.clients.service import create_client
from service.core.database import make_engine, make_session_factory, migrate
from service.core.settings import Settings
from service.dispatch import InProcessDispatcher
from service.reports.keys import KeyRing
from worker.checkpoints import load_state_dict, state_dict_to_bytes
from worker.datasets.builtin import BuiltinDataset, load_dataset
from worker.engine.config import TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.progress import ProgressCallback
from worker.engine.spec import ModelSpec, mnist_cnn_spec
from worker.engine.training import train

DEMO_DIR = Path("var/demo")
SAMPLES_PER_SUBJECT = 50
SEED = 0
# The subject the demo erases, and how many of its samples carry a wrong label (as real records do): a model
# that memorised them leaks the subject's membership, which is what the audit must see gone.
DEMO_SUBJECT = "subject-0008"
DEMO_WRONG_LABELS = 15


def say(text: str = "") -> None:
    print(text, flush=True)


def write_dataset(dataset: BuiltinDataset, path: Path) -> None:
    """The array file the service reads: ``x`` only, uncompressed so workers memory-map it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=dataset.x)


def subject_of_rows(dataset: BuiltinDataset, per_subject: int = SAMPLES_PER_SUBJECT) -> dict[int, str]:
    """Each train row's data subject: ``per_subject`` rows each, drawn by a seeded permutation (the arrays
    are sorted by class; a real person's data spans classes)."""
    order = np.random.default_rng(SEED).permutation(dataset.train_rows)
    return {int(row): f"subject-{position // per_subject:04d}" for position, row in enumerate(order)}


def with_wrong_labels(dataset: BuiltinDataset, subject: str, count: int) -> tuple[BuiltinDataset, np.ndarray]:
    """``dataset`` with ``count`` of ``subject``'s train rows given another class's label (seeded), and those
    rows."""
    subjects = subject_of_rows(dataset)
    rows = np.array(sorted(row for row, owner in subjects.items() if owner == subject))
    rng = np.random.default_rng(SEED)
    chosen = np.sort(rng.choice(rows, count, replace=False))
    labels = dataset.y.copy()
    labels[chosen] = (labels[chosen] + rng.integers(1, dataset.num_classes, count)) % dataset.num_classes
    return dataclasses.replace(dataset, y=labels), chosen


def dataset_body(
    dataset: BuiltinDataset, array_path: Path, per_subject: int = SAMPLES_PER_SUBJECT
) -> dict[str, Any]:
    """POST /datasets: builtin train rows are the train split (``per_subject`` rows per data subject, see
    :func:`subject_of_rows`), builtin held-out rows the audit split."""
    subjects = subject_of_rows(dataset, per_subject)
    samples = [
        {
            "sample_id": dataset.sample_ids[row],
            "row": int(row),
            "label": int(dataset.y[row]),
            "split": "train",
            "subject_id": subjects[int(row)],
        }
        for row in dataset.train_rows
    ]
    samples += [
        {
            "sample_id": dataset.sample_ids[row],
            "row": int(row),
            "label": int(dataset.y[row]),
            "split": "audit",
        }
        for row in dataset.heldout_rows
    ]
    return {
        "name": dataset.name,
        "array_path": str(array_path.resolve()),
        "num_classes": dataset.num_classes,
        "samples": samples,
    }


def train_initial_checkpoint(
    dataset: BuiltinDataset,
    spec: ModelSpec,
    config: TrainingConfig,
    seed: int = SEED,
    progress: ProgressCallback | None = None,
) -> bytes:
    """The model a product team would bring: trained on the train split, as safetensors bytes."""
    torch.manual_seed(seed)
    model: nn.Module = build_model(spec)
    rows = torch.from_numpy(dataset.train_rows)
    data = TensorSplit(torch.from_numpy(dataset.x)[rows], torch.from_numpy(dataset.y)[rows])
    train(model, data, config, RunContext(progress=progress, seed=seed))
    return state_dict_to_bytes(model)


def memorised_labels(checkpoint: bytes, spec: ModelSpec, dataset: BuiltinDataset, rows: np.ndarray) -> int:
    """How many of ``rows``' labels the checkpoint's model predicts."""
    model = load_state_dict(checkpoint, spec).eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(dataset.x[rows])).argmax(1).numpy()
    return int((predicted == dataset.y[rows]).sum())


class LocalServer:
    """uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="lethe-demo-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.should_exit = True
        self._thread.join()


def poll_job(
    client: httpx.Client, job_id: str, on_update: Callable[[dict[str, Any]], None], interval: float = 1.0
) -> dict[str, Any]:
    """GET /jobs/{id} until it is done; ``on_update`` sees every answer."""
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").raise_for_status().json()
        on_update(job)
        if job["done"]:
            return job
        time.sleep(interval)


def progress_printer() -> Callable[[dict[str, Any]], None]:
    """Prints a job's progress when it changes: the reference build model by model, then unlearning."""
    last = [""]

    def on_update(job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        if job["state"] == "running" and progress.get("phase") == "audit_references":
            line = (
                f"  running: first audited job of this model, audit reference model {progress['epoch']}/"
                f"{progress['total_epochs']}"
            )
        elif job["state"] == "running" and progress.get("total_steps"):
            losses = ", ".join(f"{name} {value:.3f}" for name, value in progress["losses"].items())
            line = (
                f"  running: unlearning step {progress['step']}/{progress['total_steps']}, "
                f"epoch {progress['epoch']}/{progress['total_epochs']}  ({losses})"
            )
        else:
            line = f"  {job['state']}"
        if line != last[0]:
            say(line)
            last[0] = line

    return on_update


def _print_outcome(client: httpx.Client, job: dict[str, Any], request_id: str, model: dict[str, Any]) -> None:
    say()
    say(f"Job {job['id']} ended: {job['state'].upper()}")
    if job["error"]:
        say(f"  reason: {job['error']['reason']}: {job['error']['detail']}")
    metrics = job.get("metrics") or {}
    if request_id in metrics.get("audits", {}):
        _print_audit(metrics, request_id)
    versions = client.get(f"/models/{model['name']}/versions").raise_for_status().json()["items"]
    by_id = {version["id"]: version for version in versions}
    say(f"\nModel {model['name']!r}: versions and lineage")
    for version in versions:
        parent = by_id.get(version["parent_id"])
        origin = f"from v{parent['number']} by {version['method']}" if parent else "imported checkpoint"
        say(
            f"  v{version['number']}  {version['status']:<10} {origin:<32} "
            f"sha256 {version['checkpoint_sha256'][:16]}...  covers requests {version['covered_request_ids']}"
        )
    request = client.get(f"/deletion-requests/{request_id}").raise_for_status().json()
    say(f"\nDeletion request {request['id']}: {request['state']}")
    say(f"  received {request['received_at']}, due {request['due_at']} (GDPR: one month)")
    say(f"  completed {request['completed_at']}")
    for erasure in request["erasures"]:
        say(
            f"  model {erasure['model']}: {erasure['state']}, verdict {erasure['verdict']}, "
            f"version {erasure['result_version']}, {len(erasure['attempts'])} attempt(s)"
        )
    erased = erased_sample_ids(client, model["dataset_id"], request_id)
    if erased:
        shown = ", ".join(erased[:6]) + (", ..." if len(erased) > 6 else "")
        say(f"  {len(erased)} samples now recorded as erased from {model['name']!r}: {shown}")
    else:
        say("  no sample is recorded as erased: the active model still holds them; a new request is needed")


def _print_audit(metrics: dict[str, Any], request_id: str) -> None:
    before, after, audit = metrics["before"], metrics["after"], metrics["audits"][request_id]
    say("\nThe rule, fixed before the job ran:")
    for line in audit["rule"]["text"]:
        say(f"  - {line}")
    membership = audit["membership"]
    say(
        f"\nPer-sample membership audit ({audit['references']['references']} reference models, "
        f"{membership['after']['samples']} forgotten samples vs never-seen controls), before -> after:"
    )
    rows = [
        ("share beyond never-seen controls' upper 5% tail", "member_share"),
        ("  expected of never-seen data", "member_share_expected"),
        ("  its binomial p-value", "member_share_p"),
        ("share beyond their lower 5% tail (over-forgetting)", "over_forgetting_share"),
        ("  its binomial p-value", "over_forgetting_share_p"),
        ("most member-like sample, Holm-corrected p", "min_sample_p_member_holm"),
        ("attack AUC (forgotten vs never-seen)", "auc"),
        ("attack TPR at 1% FPR", "tpr_at_1pct_fpr"),
    ]
    for label, key in rows:
        say(f"  {label:<52} {membership['before'][key]:>9} -> {membership['after'][key]:>9}")
    say("\nUtility on never-seen data (accuracy %, before -> after):")
    utility = audit["utility"]
    overall = utility["overall"]
    say(
        f"  overall {overall['before']:>6} -> {overall['after']:>6}  "
        f"(95% interval after {overall['after_interval']})"
    )
    classes = "  ".join(
        f"{label}: {block['before']:.0f}->{block['after']:.0f}"
        for label, block in utility["per_class"].items()
    )
    say(f"  per class  {classes}")
    say(
        f"  population metrics: forgotten samples {before['forget_accuracy']} -> {after['forget_accuracy']}, "
        f"remaining {before['remaining_accuracy']} -> {after['remaining_accuracy']}, population attack "
        f"(LAF lineage) {before['attack_success_rate']} -> {after['attack_success_rate']}"
    )
    gate = audit["gate"]
    say(
        f"\nVerdict: {audit['verdict'].upper().replace('_', ' ')}; "
        f"gate {'PASSED' if gate['passed'] else 'FAILED'}"
        f" (residual membership p = {gate['residual_membership_p']}, over-forgetting p = "
        f"{gate['over_forgetting_p']}, audit drop {gate['audit_drop']} points, largest class drop "
        f"{gate['largest_class_drop']})"
    )
    for failure in gate["failures"]:
        say(f"  - {failure}")
    for subject, outcome in audit["subjects"].items():  # named by a salted commitment, as in the report
        say(
            f"  subject {subject[:12]}...: {outcome['verdict']} (share of its {outcome['samples']} samples "
            f"scored member-like: {outcome['member_share_before']} before, "
            f"{outcome['member_share_after']} after)"
        )
    say("  the five samples scored most like members after unlearning (t: calibrated score; p: one-sided):")
    for sample in sorted(audit["samples"], key=lambda s: -s["t_after"])[:5]:
        say(
            f"    sample {sample['sample'][:12]}...: t {sample['t_before']:>6} -> {sample['t_after']:>6}, "
            f"p_member {sample['p_member_before']:.3g} -> {sample['p_member_after']:.3g} "
            f"({sample['outcome']})"
        )
    timings = metrics["timings"]
    say(
        f"  audit {audit['seconds']} s (with the population metrics and the forward passes they share: "
        f"{timings['evaluation_seconds']} s); unlearning {timings['unlearn_seconds']} s"
    )


def erased_sample_ids(client: httpx.Client, dataset_id: str, request_id: str) -> list[str]:
    """Ids of the samples ``request_id`` erased from some model, paging through GET /datasets/{id}/samples."""
    found: list[str] = []
    params: dict[str, Any] = {"limit": 500}
    while True:
        page = client.get(f"/datasets/{dataset_id}/samples", params=params).raise_for_status().json()
        found += [
            s["sample_id"]
            for s in page["items"]
            if any(erasure["request_id"] == request_id for erasure in s["erased_from"])
        ]
        if page["next_cursor"] is None:
            return found
        params["cursor"] = page["next_cursor"]


# The demo's two API clients, in its own tenant: the product backend files requests, the compliance officer
# reads their outcome and downloads the signed reports.
DEMO_TENANT = "demo"
DEMO_CLIENTS = {
    "demo-backend": ("datasets:write", "datasets:read", "models:write", "models:read", "deletions:write",
                     "deletions:read", "jobs:read"),
    "demo-compliance": ("deletions:read", "jobs:read", "reports:read"),
}  # fmt: skip


def demo_tokens(session_factory: sessionmaker[Session]) -> dict[str, str]:
    """Create the demo's clients (what ``lethe clients create`` does) and return their tokens."""
    tokens = {}
    with session_factory.begin() as session:
        for name, scopes in DEMO_CLIENTS.items():
            tokens[name] = create_client(session, name, DEMO_TENANT, scopes).token
            say(f"   lethe clients create {name} --tenant {DEMO_TENANT} --scopes {','.join(scopes)}")
    return tokens


def run_demo(initial_epochs: int = 10, workdir: Path = DEMO_DIR, serve: bool = False) -> int:
    started = time.monotonic()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    settings = Settings(
        database_url=f"sqlite:///{(workdir / 'lethe.db').resolve()}",
        storage_url=str(workdir / "store"),
        cache_dir=workdir / "cache",
        dispatcher="inprocess",
        report_key_dir=workdir / "report-keys",
        # One request at a time here: no reason to wait for others to coalesce with.
        batch_wait_s=0,
        data_dir=workdir,  # the dataset's array file and the initial checkpoint are written here
    )
    KeyRing(settings.report_key_dir).generate()  # the demo's own signing key, under var/ (never committed)
    say(f"Lethe demo: SQLite and checkpoints under {workdir}/, in-process worker, API over real HTTP.\n")
    migrate(settings.database_url)

    say("1. Load mnist5k (5,000 MNIST digits: 4,000 train, 1,000 held out for the audit) ...")
    dataset, mislabelled = with_wrong_labels(load_dataset("mnist5k"), DEMO_SUBJECT, DEMO_WRONG_LABELS)
    say(
        f"   {DEMO_SUBJECT}, the subject who will ask for erasure, has {len(mislabelled)} of its "
        f"{SAMPLES_PER_SUBJECT} samples mislabelled, as real records can be"
    )
    array_path = workdir / "mnist5k.npz"
    write_dataset(dataset, array_path)
    spec = mnist_cnn_spec(dataset.num_classes, dataset.input_shape)

    say(f"2. Train the initial model: the paper's MNIST CNN, {initial_epochs} epochs on the train split ...")
    last = [0.0]

    def progress(event: Any) -> None:
        if time.monotonic() - last[0] > 3 or event.step == event.total_steps:
            last[0] = time.monotonic()
            say(f"   epoch {event.epoch}/{event.total_epochs}, step {event.step}/{event.total_steps}")

    checkpoint = train_initial_checkpoint(
        dataset, spec, TrainingConfig(epochs=initial_epochs), progress=progress
    )
    checkpoint_path = workdir / "initial.safetensors"
    checkpoint_path.write_bytes(checkpoint)
    memorised = memorised_labels(checkpoint, spec, dataset, mislabelled)
    say(
        f"   it predicts {memorised} of those wrong labels back; the audit measures how far the subject's "
        "samples leak"
    )

    session_factory = make_session_factory(make_engine(settings.database_url))
    say("3. Create the API's clients (bearer tokens, shown once; only their SHA-256 is stored):")
    tokens = demo_tokens(session_factory)
    dispatcher = InProcessDispatcher(session_factory, settings)
    app = create_app(settings, dispatcher, session_factory=session_factory)
    with (
        LocalServer(app) as server,
        httpx.Client(base_url=server.url, timeout=60, headers=_bearer(tokens["demo-backend"])) as client,
        httpx.Client(base_url=server.url, timeout=60, headers=_bearer(tokens["demo-compliance"])) as officer,
    ):
        say(
            f"4. API up at {server.url}. As demo-backend, register the dataset "
            f"(5,000 samples; {SAMPLES_PER_SUBJECT} per data subject) ..."
        )
        registered = (
            client.post("/datasets", json=dataset_body(dataset, array_path)).raise_for_status().json()
        )
        say(f"   POST /datasets -> {registered['id']}: {registered['samples']}")
        # The recipe the model was trained with: the audit's reference models are trained the same way.
        body = {"name": "mnist-cnn", "dataset_id": registered["id"], "spec": spec.to_dict(),
                "checkpoint_path": str(checkpoint_path.resolve()),
                "training_recipe": {"epochs": initial_epochs}}  # fmt: skip
        model = client.post("/models", json=body).raise_for_status().json()
        version = model["active_version"]
        say(
            f"   POST /models -> {model['name']!r} v{version['number']} "
            f"(sha256 {version['checkpoint_sha256'][:16]}...)"
        )

        subject = DEMO_SUBJECT
        say(f"5. A data subject asks for erasure: POST /deletion-requests for {subject!r} ...")
        # The default method (calibrated for labelled data) and config; any method and field of
        # worker.engine.config can be set.
        body = {"model": model["name"], "subject_id": subject, "reason": "GDPR Art. 17"}
        job = _erase(client, body, model, first=True)
        if job["state"] == "rejected":
            say(
                "\n6. The evidence did not support the erasure, so the request is not fulfilled and nothing "
                "is marked forgotten.\n   The backend asks again with exact unlearning (retrain on the "
                "remaining data with the model's own\n   recipe and a new initialisation):"
            )
            retrain = {"epochs": initial_epochs, "seed": SEED + 1}
            job = _erase(client, {**body, "method": "retrain", "config": retrain}, model, first=False)
        download_reports(officer, server.url, workdir)
        if serve:
            serve_console(server.url, tokens)
    say(f"\nDemo finished in {time.monotonic() - started:.0f} s.")
    return 0 if job["state"] in ("succeeded", "rejected") else 1


def serve_console(url: str, tokens: dict[str, str]) -> None:
    """``lethe demo --serve``: the API stays up with what the demo left, for a look around the console."""
    say(f"\nThe compliance console: {url}/console/  (Ctrl-C ends the demo)")
    say(f"   sign in as demo-compliance (the compliance officer): {tokens['demo-compliance']}")
    say(f"   or as demo-backend (models, versions and checkpoints too): {tokens['demo-backend']}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("   console closed")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def download_reports(client: httpx.Client, url: str, workdir: Path) -> None:
    """Every settled request's signed report: downloaded by the compliance officer's client, then verified
    against the API's public key (``lethe report verify``; the key list needs no token)."""
    from service.cli import main as lethe

    say("\nErasure reports, as demo-compliance (signed canonical JSON and its PDF; verified with "
        "`lethe report verify --url`):")  # fmt: skip
    jobs = client.get("/jobs").raise_for_status().json()["items"]
    for request_id in [request_id for job in reversed(jobs) for request_id in job["request_ids"]]:
        issued = time.monotonic()
        report = client.get(f"/deletion-requests/{request_id}/report").raise_for_status()
        issued_s = time.monotonic() - issued
        path = workdir / "reports" / f"{request_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(report.content)
        signature = client.get(f"/deletion-requests/{request_id}/report.sig").raise_for_status()
        path.with_suffix(".sig").write_text(signature.text)
        pdf = client.get(f"/deletion-requests/{request_id}/report.pdf").raise_for_status()
        path.with_suffix(".pdf").write_bytes(pdf.content)
        outcomes = ", ".join(
            f"{e['model']['name']}: verdict {e['outcome']['verdict']}, passed {e['outcome']['passed']}"
            for e in report.json()["erasures"]
        )
        say(f"  {path} ({len(report.content):,} bytes, signed on first download in {issued_s:.2f} s)")
        say(f"    {outcomes}")
        say(f"    the PDF for people: {path.with_suffix('.pdf')}")
        code = lethe(["report", "verify", str(path), "--url", url])
        if code != 0:
            raise RuntimeError(f"the report of request {request_id} did not verify")


def _erase(
    client: httpx.Client, body: dict[str, Any], model: dict[str, Any], *, first: bool
) -> dict[str, Any]:
    """POST /deletion-requests, poll its job, print the outcome; the job as it ended."""
    answer = client.post("/deletion-requests", json=body).raise_for_status()
    request = answer.json()
    job_id = request["erasures"][0]["job_id"]
    say(
        f"   {answer.status_code} Accepted: request {request['id']} ({request['sample_count']} samples, "
        f"method {request['method']}) at {answer.headers['Location']}, its job /jobs/{job_id}"
    )
    say(
        "   Poll GET /jobs/{id} while the worker "
        + ("builds the audit and unlearns:" if first else "retrains:")
    )
    job = poll_job(client, job_id, progress_printer())
    if job["state"] == "succeeded":  # its purge runs next: the request completes when that is done
        settled = wait_settled(client, request["id"])
        _print_outcome(client, job, request["id"], model)
        _print_purge(settled)
    else:
        _print_outcome(client, job, request["id"], model)
    return job


def wait_settled(client: httpx.Client, request_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """GET /deletion-requests/{id} until it leaves ``processing`` (its erasures and their purges done)."""
    deadline = time.monotonic() + timeout_s
    while True:
        request: dict[str, Any] = client.get(f"/deletion-requests/{request_id}").raise_for_status().json()
        if request["state"] != "processing" or time.monotonic() > deadline:
            return request
        time.sleep(0.5)


def _print_purge(request: dict[str, Any]) -> None:
    """What the purge deleted, what it kept, and why (GDPR Art. 17 against Art. 5(2) and 17(3)(e))."""
    for erasure in request["erasures"]:
        purge = erasure.get("purge")
        if not purge:
            continue
        say(f"\nPurge of every copy that held the samples ({erasure['model']}): {purge['state']}, "
            f"{purge['purged_at']}")  # fmt: skip
        record = purge.get("record") or {}
        for version in record.get("checkpoints", []):
            say(f"  deleted: checkpoint of v{version['number']} ({version['status']}), sha256 "
                f"{version['sha256'][:16]}...: it was trained on the subject; the version stays as a "
                "tombstone (410 Gone)")  # fmt: skip
        kinds: dict[str, int] = {}
        for obj in record.get("objects", []):
            kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
        say(f"  deleted objects in the store (every version): {kinds}")
        rows = record.get("dataset_rows_purged", 0)
        say(f"  dataset rows zeroed in a new generation of the array: {rows}; adopted input copies "
            f"deleted: {record.get('inputs_deleted', 0)}")  # fmt: skip
        say(f"  subjects kept only as keyed hashes: {record.get('subjects_pseudonymised', 0)} sample(s) "
            "and the request itself")  # fmt: skip
        for kept in record.get("kept", []):
            say(f"  kept: {kept['kind']}: {kept['reason']}")
        for warning in record.get("warnings", []):
            say(f"  warning: {warning}")
    say("  kept as the accountability record (Art. 5(2), 17(3)(e)): the request (subject as a keyed hash),"
        "\n  its hash-chained trail, the signed report, and the suppression list of erased samples; "
        "the erasure\n  ledger in the store, so `lethe purge replay` re-applies every purge after a "
        "database restore.")  # fmt: skip
    say(f"  request {request['id']}: {request['state'].upper()} at {request['completed_at']}")


if __name__ == "__main__":
    sys.exit(run_demo())
