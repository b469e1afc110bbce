from service.storage.objects import (
    CachedStore,
    CorruptObject,
    InvalidInputKey,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StoredObject,
    open_store,
    worker_store,
)
from service.storage.safetensors_format import (
    NotSafetensors,
    parse_safetensors_header,
    read_safetensors_header,
)

__all__ = [
    "CachedStore",
    "CorruptObject",
    "InvalidInputKey",
    "LocalStore",
    "NotSafetensors",
    "ObjectNotFound",
    "ObjectStore",
    "S3Store",
    "StoredObject",
    "open_store",
    "parse_safetensors_header",
    "read_safetensors_header",
    "worker_store",
]
