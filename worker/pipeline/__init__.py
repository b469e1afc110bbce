"""One job from claim to its end: the only worker code that touches the database, one module per stage.

Each stage ends in its own commit, so a job whose worker died resumes rather than redoes (its lease lapses,
another worker claims it again) and a crash never leaves half-written state:

1. ``claim``: queued -> running, lease taken (or an abandoned running/evaluating job taken over); the worker
   that ends a model's job sends on its next one. ``job``: the run, its heartbeat and how it ends.
2. ``references``: the model lineage's audit reference set, loaded, or built and registered in its own commit
   when the model has none. A ``build_references`` job runs this stage alone.
3. ``unlearn``: the base version's checkpoint (hash-verified) and the job's samples loaded; unlearning; the
   new checkpoint stored; running -> evaluating. A job claimed again in ``evaluating`` starts from its
   checkpoint.
4. ``audit``: the per-sample membership audit, once per request the job holds, and the population metrics.
5. ``register``: ONE transaction: the version, the erased samples, each request's settlement, the job's end.
6. ``purge``: a ``purge`` job, queued by the requests ``register`` completed (after ``LETHE_PURGE_AFTER``,
   never past their due date): deletes every copy that still holds erased samples (checkpoints of versions
   that hold them, reference-set columns, the dataset array's rows once no model needs them), tombstones
   what it deleted, pseudonymises the identifiers, writes the erasure ledger, and only then completes the
   requests.

A request whose audit failed is never dropped. In a job with other requests it is retried once: the failures
of the model's batches together in a coalescing job of ``escalation_method`` (default: exact retraining with
the model's recipe, which cannot leave membership behind), or each alone with its own method when there is
no escalation (a label-free dataset, or ``LETHE_ESCALATION_METHOD=""``). Alone, or failing its retry, it is
rejected: the model keeps its samples (they are not recorded as erased, and the next job of the model trains
on them as remaining data), the request is NOT fulfilled, its due date keeps running and a new request
(another method, or retrain) is needed. A rejected version and its checkpoint stay in the registry as
evidence of the attempt, until a later erasure of samples it holds purges it.
"""

from worker.pipeline.claim import run_job
from worker.pipeline.data import JobSets, load_checkpoint, load_sets, open_rows, read_verified
from worker.pipeline.errors import JobFailed, NothingReady
from worker.pipeline.register import rules_from_settings

__all__ = [
    "JobFailed",
    "JobSets",
    "NothingReady",
    "load_checkpoint",
    "load_sets",
    "open_rows",
    "read_verified",
    "rules_from_settings",
    "run_job",
]
