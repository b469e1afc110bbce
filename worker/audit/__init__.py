"""The evidence of erasure, free of HTTP and database code: reference models, the per-sample membership
test, the utility comparison and the gate. The pipeline, the benchmark and ``lethe audit`` call it."""

from worker.audit.gate import AuditRules
from worker.audit.references import LabelledRows, ReferenceSet, build_reference_set
from worker.audit.run import audit_unlearning

__all__ = ["AuditRules", "LabelledRows", "ReferenceSet", "audit_unlearning", "build_reference_set"]
