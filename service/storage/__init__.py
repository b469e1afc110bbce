from service.storage.checkpoints import (
    CheckpointNotFound,
    CheckpointStore,
    CorruptCheckpoint,
    LocalCheckpointStore,
    StoredObject,
)
from service.storage.safetensors_format import NotSafetensors, parse_safetensors_header

__all__ = [
    "CheckpointNotFound",
    "CheckpointStore",
    "CorruptCheckpoint",
    "LocalCheckpointStore",
    "NotSafetensors",
    "StoredObject",
    "parse_safetensors_header",
]
