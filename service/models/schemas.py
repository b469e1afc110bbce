from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.core.fields import Identifier, Text

# Models are referenced by name in URLs and bodies, so names are URL-safe.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="unique; how URLs and bodies refer to it")
    dataset_id: Identifier
    spec: dict[str, Any] = Field(
        description="ModelSpec: architecture, num_classes, input_shape, feature_layer"
    )
    checkpoint_path: Text = Field(
        min_length=1,
        description="a .safetensors file inside the server's data directory (LETHE_DATA_DIR): relative to "
        "it, or absolute",
    )
    training_recipe: dict[str, Any] | None = Field(
        default=None,
        description="how the model was trained (epochs, lr, batch_size, weight_decay); the audit's "
        "reference models are trained the same way. Default: the engine's recipe",
    )
    training_sample_ids: list[Identifier] | None = Field(
        default=None,
        description="the train samples of the dataset the model was trained on (default: all of them); "
        "erasures requested before the model existed are queued for it only for samples in this set",
    )


class VersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    number: int
    parent_id: str | None
    status: str
    checkpoint_sha256: str
    checkpoint_size: int
    storage_uri: str
    method: str | None
    config: dict[str, Any] | None
    metrics_before: dict[str, Any] | None
    metrics_after: dict[str, Any] | None
    rejection_reason: str | None
    created_by_job_id: str | None
    covered_request_ids: list[str] = []
    erased_sample_count: int = Field(
        default=0, description="train samples this version no longer holds (inherited along its lineage)"
    )
    created_at: datetime
    updated_at: datetime


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    dataset_id: Identifier
    spec: dict[str, Any]
    training_recipe: dict[str, Any] | None
    training_data: dict[str, Any] | None = Field(
        description="at registration: how many of its training samples earlier requests asked to erase, and "
        "the requests queued for it because of them"
    )
    created_at: datetime
    active_version: VersionOut


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None


class VersionList(BaseModel):
    items: list[VersionOut]
