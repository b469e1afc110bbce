"""Service settings: environment variables prefixed ``LETHE_`` (or a ``.env`` file)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.engine.spec import BUILTIN_ARCHITECTURES

ENV_PREFIX = "LETHE_"
# Variables with these prefixes belong to the test suite and the benches, not to a service process.
FOREIGN_ENV_PREFIXES = ("LETHE_TEST_", "LETHE_BENCH_")


def _unknown(name: str, known: list[str], where: str, prefix: str = "") -> ValueError:
    # A typo would otherwise be ignored and its default used without a word.
    near = difflib.get_close_matches(name.lower().removeprefix(prefix.lower()), known, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{near[0].upper() if prefix else near[0]}?" if near else ""
    return ValueError(f"unknown setting {name} ({where}){hint}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, data: Any) -> Any:
        """Every process builds its Settings first: an unknown name stops it there, naming the nearest field.
        Keywords and ``.env`` entries arrive in ``data``; the environment is read for known names only, so
        its ``LETHE_`` variables are checked here."""
        known = sorted(cls.model_fields)
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise _unknown(str(key), known, "keyword or .env entry")
        for variable in sorted(os.environ):
            upper = variable.upper()
            if not upper.startswith(ENV_PREFIX) or upper.startswith(FOREIGN_ENV_PREFIXES):
                continue
            if upper[len(ENV_PREFIX) :].lower() not in cls.model_fields:
                raise _unknown(variable, known, "environment variable", ENV_PREFIX)
        return data

    # Postgres is the source of truth; the demo overrides this with a SQLite file.
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/lethe"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The object store of checkpoints, dataset arrays and audit reference sets: a local directory (one
    # machine), or s3://bucket/prefix (endpoint and credentials the usual way: AWS_ENDPOINT_URL,
    # AWS_ACCESS_KEY_ID, ...). A worker keeps what it reads from S3 in cache_dir, at most cache_max_bytes.
    storage_url: Annotated[str, BeforeValidator(str)] = "var/store"
    cache_dir: Path = Path("var/cache")
    cache_max_bytes: Annotated[int, Field(gt=0)] = 50 * 1024**3
    # Paths in request bodies (checkpoint_path, array_path) must name regular files inside this directory
    # (relative to it, or absolute); checkpoints are read at most max_checkpoint_bytes (also the multipart
    # upload limit), array files are refused above max_array_bytes (only their header is read). JSON and
    # other bodies: at most max_body_bytes (413 beyond).
    data_dir: Path = Path("var/data")
    max_checkpoint_bytes: Annotated[int, Field(gt=0)] = 2 * 1024**3
    max_array_bytes: Annotated[int, Field(gt=0)] = 64 * 1024**3
    max_body_bytes: Annotated[int, Field(gt=0)] = 64 * 1024**2
    dispatcher: Literal["celery", "inprocess"] = "celery"
    # Per API client, on POST requests (the `limits` library's notation; "" turns limits off): beyond them a
    # 429 problem with Retry-After. Counted in process memory (memory://, one API process) or in Redis
    # (redis://host:port/db: several API processes share one count).
    rate_limit: str = "20/second;600/minute"
    rate_limit_storage_url: str = "memory://"

    # Architectures the workers can build: the engine's built-ins plus any a deployment registers with
    # worker.engine.models.register_architecture. A model naming another is refused at registration.
    architectures: list[str] = list(BUILTIN_ARCHITECTURES)

    max_samples_per_request: int = 10_000
    # Coalescing: a model's requests (same method and configuration) join one job until it holds
    # batch_max_samples samples or batch_wait_s has passed since its first, whichever comes first; requests
    # arriving while the model's job runs join the next one. batch_max_samples=1: one job per request.
    batch_max_samples: Annotated[int, Field(ge=1)] = 10_000
    batch_wait_s: Annotated[float, Field(ge=0)] = 30.0
    # A request that fails its audit inside a batch is retried once: with the failures of its batch in one job
    # of this method (exact retraining, with the model's recipe; for a label-free dataset, or set to ""),
    # else alone with its own method. One that fails again, or fails alone, is rejected.
    escalation_method: str = "retrain"
    gdpr_due_days: int = 30
    # Hint sent with 202 answers: how long a client should wait before polling the job.
    retry_after_seconds: int = 5
    page_size_default: int = 50
    page_size_max: int = 500

    # The membership audit (worker/audit). Reference models per model lineage (even: complementary pairs), and
    # their seed. 4: about 2.4 exact retrains on mnist5k, kept the exact-retrain and no-op rates of 16 on the
    # calibration protocol (docs/audit.md).
    audit_references: Annotated[int, Field(ge=2, le=64, multiple_of=2)] = 4
    audit_reference_seed: Annotated[int, Field(ge=0)] = 0
    # More reference models, built in the same set as the audit's and never read by it, that steer a
    # calibrated method (the default, ``calibrated``): each forgotten sample's target is the score they give
    # it when they never trained on it. A calibrated job on a set built without them rebuilds the set first;
    # with 0 here such a job fails (``invalid_config``) instead.
    audit_steering_references: Annotated[int, Field(ge=0, le=64, multiple_of=2)] = 4
    # References that forget too: a purge removes erased samples' columns from the model's reference set; once
    # the share removed since the set was built reaches audit_references_refresh_share, or the set is older
    # than audit_references_max_age_days (0: no age limit), a build job retrains it on the remaining data, and
    # the old set's blob is deleted once the new one is in place.
    audit_references_refresh_share: Annotated[float, Field(gt=0, le=1)] = 0.1
    audit_references_max_age_days: Annotated[float, Field(ge=0)] = 0.0
    # The gate: each membership test (residual membership, over-forgetting) at family-wise level
    # audit_level over a request's samples; neither overall audit accuracy nor any class may drop
    # significantly more than gate_max_audit_drop (gate_max_class_drop) points (exact paired tests).
    audit_level: Annotated[float, Field(gt=0, lt=1)] = 0.05
    gate_max_audit_drop: float = 2.0
    gate_max_class_drop: float = 5.0
    # Requests smaller than this whose base model shows no signal are "insufficient power".
    audit_min_samples: int = 20

    # Erasure reports: the directory of Ed25519 signing keys (`lethe report keygen`), read by the API only.
    report_key_dir: Path = Path("var/report-keys")
    # Purge (service/purges, worker/pipeline/purge.py): once a request's erasure from a model completes, every
    # copy that still holds its samples is deleted after purge_after_s (0: at once; never past the request's
    # due date), and only then is the request completed. Subjects of erased samples are kept as HMAC-SHA256
    # under the pseudonym key (also the source of report commitment salts), which lives outside the
    # database: pseudonym_key (hex, 32 bytes; a secret of the deployment), else a file in pseudonym_key_file
    # created on first use (one machine). Destroying the key makes every pseudonym and salt unlinkable.
    purge_after_s: Annotated[float, Field(ge=0)] = 0.0
    # A purge job that failed is queued again this long after (its requests stay processing meanwhile).
    purge_retry_s: Annotated[float, Field(ge=0)] = 300.0
    # Inputs are consumed: a file of data_dir or an inputs/ key is deleted once registration has stored its
    # bytes, so Lethe holds one copy of what it is given (the store's) and a purge reaches every copy; the
    # data directory is the API's alone, which no worker on another machine could purge. False: the inputs
    # stay, and their owner erases them (a purge deletes what a worker can reach and reports the rest).
    consume_inputs: bool = True
    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: Path = Path("var/keys/pseudonym.key")
    # Stored first answers to Idempotency-Keys are replayed for this long, then deleted (1 h to 30 days).
    idempotency_ttl_s: Annotated[float, Field(ge=3600, le=30 * 86400)] = 24 * 3600.0

    # Logs: one JSON object a line (json), or plain text (text), from every process.
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # `lethe api`. api_concurrency: requests one API process works on at once (each holds one database
    # connection from the pool of that size); more wait their turn, holding nothing. Scale out with more
    # processes: one process runs Python on one core at a time.
    api_concurrency: Annotated[int, Field(ge=1, le=200)] = 8
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # Workers. A job holds a lease on its row, renewed every progress_interval_s; when it lapses (the worker
    # died) the job can be claimed again and resumes. Redis redelivers an unacknowledged message after
    # job_visibility_timeout_s: keep it above the longest job.
    job_lease_s: int = 120
    job_visibility_timeout_s: int = 6 * 3600
    progress_interval_s: float = 1.0
    # The sweeper re-dispatches, every sweep_interval_s, jobs queued for over sweep_min_age_s whose message is
    # gone, and jobs whose lease lapsed.
    sweep_interval_s: int = 60
    sweep_min_age_s: int = 120
    # A worker serves its Prometheus series (job phases, outcomes) on this port (0: not served).
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # Intra-op CPU threads per job (0: torch's default, one per core).
    torch_threads: int = 0
    # Rows of the remaining set the job evaluates (all of it when smaller).
    eval_remaining_rows: int = 2_000

    # Webhooks (service/webhooks, worker/webhooks.py). An event is retried with exponential backoff (doubling
    # from webhook_initial_backoff_s up to webhook_max_backoff_s, with jitter) until webhook_retry_window_s
    # after it was written, then its delivery is failed. Each attempt waits at most webhook_timeout_s for
    # connect, each read and write; each worker sends up to webhook_concurrency at once and looks for due
    # deliveries every webhook_poll_interval_s. deletion_request.due_soon: an open request within
    # webhook_due_soon_days of its due date (0: never), checked every webhook_due_soon_interval_s by one
    # worker.
    webhook_due_soon_days: Annotated[int, Field(ge=0)] = 7
    # Endpoints whose host resolves to a loopback, private or link-local address are refused (at
    # registration and at each send) unless this is set: a deployment whose receivers are internal.
    webhook_allow_private_hosts: bool = False
    webhook_retry_window_s: Annotated[float, Field(gt=0)] = 24 * 3600.0
    webhook_initial_backoff_s: Annotated[float, Field(gt=0)] = 5.0
    webhook_max_backoff_s: Annotated[float, Field(gt=0)] = 3600.0
    webhook_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    webhook_concurrency: Annotated[int, Field(ge=1, le=64)] = 8
    webhook_poll_interval_s: Annotated[float, Field(gt=0)] = 2.0
    webhook_due_soon_interval_s: Annotated[int, Field(ge=1)] = 300
