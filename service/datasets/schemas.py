from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from service.core.fields import Identifier, Text, exactly_one_of


class SampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_id: Identifier
    row: int = Field(ge=0, description="index into the array file's x")
    label: int | None = Field(default=None, ge=0)
    split: Literal["train", "audit"] = Field(description="audit samples are held out and never trained on")
    subject_id: Identifier | None = None


class DatasetCreate(BaseModel):
    """A dataset: its array (exactly one of ``array_path`` and ``array_object``) and its samples."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra=exactly_one_of(("array_path", "array_object"))
    )

    name: Identifier
    array_path: Text | SkipJsonSchema[None] = Field(
        default=None,
        min_length=1,
        description="an .npz inside the server's data directory (LETHE_DATA_DIR; relative to it, or "
        "absolute) whose array x is float32 (N, C, H, W), already normalised; or give array_object",
    )
    array_object: Text | SkipJsonSchema[None] = Field(
        default=None,
        min_length=1,
        description="instead of array_path: the key of such an .npz that the client put in the object store, "
        "under its inputs/ prefix (e.g. 'team/mnist.npz' for s3://bucket/prefix/inputs/team/mnist.npz)",
    )
    num_classes: int | None = Field(
        default=None, ge=2, description="required when samples carry labels; omit for a label-free dataset"
    )
    samples: list[SampleIn] = Field(min_length=1)


class SampleCounts(BaseModel):
    train: int
    audit: int
    models: int = Field(description="models registered on the dataset")
    erased_from_every_model: int = Field(
        description="samples no model registered on the dataset holds any more (0 while it has no model)"
    )


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    array_uri: str = Field(description="the array's object in the store; its key is the SHA-256 of its bytes")
    num_rows: int
    sample_shape: list[int]
    num_classes: int | None
    labelled: bool
    created_at: datetime
    samples: SampleCounts


class SampleErasure(BaseModel):
    model_id: str
    version_id: str = Field(description="the first version of the model that no longer holds the sample")
    request_id: str | None = Field(description="None: the model was declared never trained on it")
    erased_at: datetime


class SampleOut(BaseModel):
    sample_id: str
    row: int
    label: int | None = Field(
        description="None for a label-free dataset, or once the sample's row was purged"
    )
    split: str
    subject_id: str | None = Field(
        description="never shown for a sample a deletion request erased: the list must not tell who "
        "exercised the right (the service keeps such subjects only as keyed hashes once purged)"
    )
    purged_at: datetime | None = Field(
        description="when the sample's row was deleted from the dataset array (every model had erased it)"
    )
    erased_from: list[SampleErasure] = Field(
        description="the models that no longer hold the sample, each since which version"
    )
    erased_from_every_model: bool = Field(
        description="every model registered on the dataset has erased it (false while it has no model)"
    )


class SamplePage(BaseModel):
    items: list[SampleOut]
    next_cursor: str | None
