from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import IO, Annotated, Any, BinaryIO

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from service.clients.security import requires
from service.clients.service import Principal
from service.core.fields import Identifier
from service.core.files import consume_data_file, open_data_file
from service.core.pagination import NameCursorQuery
from service.core.problems import PAYLOAD_TOO_LARGE, PROBLEM_MEDIA_TYPE, InvalidInput, PayloadTooLarge
from service.core.settings import Settings
from service.deletion_requests.routes import dispatch_all
from service.dependencies import (
    DispatcherDep,
    LimitQuery,
    SessionDep,
    SettingsDep,
    StoreDep,
    page_size,
)
from service.dispatch import JobDispatcher
from service.models import service
from service.models.schemas import (
    MODEL_NAME_PATTERN,
    ModelCreate,
    ModelOut,
    ModelPage,
    VersionList,
    VersionOut,
)
from service.models.tables import Model, ModelVersion
from service.storage import ObjectStore

router = APIRouter(prefix="/models", tags=["models"])
_STREAM_CHUNK = 1 << 20


def _versions_out(session: Session, model: Model, versions: Sequence[ModelVersion]) -> list[VersionOut]:
    covered = service.covered_request_ids(session, versions)
    erased = service.erased_sample_counts(session, model)
    return [
        VersionOut.model_validate(version).model_copy(
            update={
                "covered_request_ids": covered.get(version.id, []),
                "erased_sample_count": erased.get(version.id, 0),
            }
        )
        for version in versions
    ]


def _model_out(session: Session, model: Model) -> ModelOut:
    [active] = _versions_out(session, model, [service.active_version(session, model)])
    return ModelOut(
        id=model.id,
        name=model.name,
        dataset_id=model.dataset_id,
        spec=model.spec,
        training_recipe=model.training_recipe,
        training_data=model.training_data,
        created_at=model.created_at,
        active_version=active,
    )


def _create(
    session: Session,
    settings: Settings,
    store: ObjectStore,
    dispatcher: JobDispatcher,
    response: Response,
    *,
    tenant: str,
    name: str,
    dataset_id: str,
    spec: dict[str, Any],
    checkpoint: IO[bytes],
    checkpoint_size: int,
    training_recipe: dict[str, Any] | None,
    training_sample_ids: list[str] | None = None,
) -> ModelOut:
    model, _version, dispatches = service.register_model(
        session,
        store,
        settings,
        tenant=tenant,
        name=name,
        dataset_id=dataset_id,
        spec=spec,
        checkpoint=checkpoint,
        checkpoint_size=checkpoint_size,
        training_recipe=training_recipe,
        training_sample_ids=training_sample_ids,
    )
    session.commit()
    dispatch_all(dispatcher, dispatches)
    response.headers["Location"] = f"/models/{model.name}"
    return _model_out(session, model)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelOut)
def register_model(
    body: ModelCreate,
    caller: Annotated[Principal, requires("models:write")],
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    response: Response,
) -> ModelOut:
    """Register a model whose first version imports a server-side safetensors checkpoint.

    Erasures requested dataset-wide before it existed are queued for it at once (``training_data`` says
    which), unless ``training_sample_ids`` shows it was not trained on those samples. The checkpoint file is
    deleted once stored (``LETHE_CONSUME_INPUTS``): the store's copy is the one a purge reaches."""
    with open_data_file(
        settings.data_dir, body.checkpoint_path, "checkpoint_path", settings.max_checkpoint_bytes
    ) as (checkpoint, size):
        created = _create(
            session,
            settings,
            store,
            dispatcher,
            response,
            tenant=caller.tenant,
            name=body.name,
            dataset_id=body.dataset_id,
            spec=body.spec,
            checkpoint=checkpoint,
            checkpoint_size=size,
            training_recipe=body.training_recipe,
            training_sample_ids=body.training_sample_ids,
        )
    if settings.consume_inputs:
        consume_data_file(settings.data_dir, body.checkpoint_path)
    return created


@router.post("/upload", status_code=status.HTTP_201_CREATED, response_model=ModelOut)
def upload_model(
    caller: Annotated[Principal, requires("models:write")],
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    response: Response,
    name: Annotated[str, Form(pattern=MODEL_NAME_PATTERN)],
    dataset_id: Annotated[Identifier, Form()],
    spec: Annotated[str, Form(description="the ModelSpec as a JSON object")],
    checkpoint: Annotated[UploadFile, File(description="a .safetensors file")],
    training_recipe: Annotated[
        str | None, Form(description="JSON object: epochs, lr, batch_size, weight_decay (optional)")
    ] = None,
) -> ModelOut:
    """The multipart variant of ``POST /models``: the checkpoint travels in the request."""
    spec_dict = _json_object(spec, "spec", "invalid-spec")
    recipe = (
        None
        if training_recipe is None
        else _json_object(training_recipe, "training_recipe", "invalid-training-recipe")
    )
    return _create(
        session,
        settings,
        store,
        dispatcher,
        response,
        tenant=caller.tenant,
        name=name,
        dataset_id=dataset_id,
        spec=spec_dict,
        checkpoint=checkpoint.file,
        checkpoint_size=_upload_size(checkpoint, settings.max_checkpoint_bytes),
        training_recipe=recipe,
    )


def _upload_size(upload: UploadFile, max_bytes: int) -> int:
    """The upload's size. The form parser spooled it to a temporary file (beyond 1 MB), so it is read from
    there in chunks, never held in memory whole."""
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    if size > max_bytes:
        raise PayloadTooLarge(
            PAYLOAD_TOO_LARGE,
            f"the checkpoint is larger than the limit of {max_bytes} bytes",
            limit=max_bytes,
        )
    return size


def _json_object(text: str, field: str, problem: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(problem, f"{field} is not JSON", field=field) from exc
    if not isinstance(value, dict):
        raise InvalidInput(problem, f"{field} must be a JSON object", field=field)
    return value


@router.get("", response_model=ModelPage)
def list_models(
    caller: Annotated[Principal, requires("models:read")],
    session: SessionDep,
    settings: SettingsDep,
    cursor: NameCursorQuery = None,
    limit: LimitQuery = None,
) -> ModelPage:
    """The caller's tenant's models, by name."""
    page = service.list_models(session, caller.tenant, cursor, page_size(settings, limit))
    return ModelPage(items=[_model_out(session, model) for model in page.items], next_cursor=page.next_cursor)


@router.get("/{name}", response_model=ModelOut)
def get_model(
    name: str, caller: Annotated[Principal, requires("models:read")], session: SessionDep
) -> ModelOut:
    return _model_out(session, service.get_model(session, name, caller.tenant))


@router.get("/{name}/versions", response_model=VersionList)
def list_versions(
    name: str, caller: Annotated[Principal, requires("models:read")], session: SessionDep
) -> VersionList:
    model = service.get_model(session, name, caller.tenant)
    return VersionList(items=_versions_out(session, model, service.list_versions(session, model)))


@router.get("/{name}/versions/{number}", response_model=VersionOut)
def get_version(
    name: str, number: int, caller: Annotated[Principal, requires("models:read")], session: SessionDep
) -> VersionOut:
    model = service.get_model(session, name, caller.tenant)
    [version] = _versions_out(session, model, [service.get_version(session, model, number)])
    return version


@router.post(
    "/{name}/versions/{number}/activate",
    response_model=VersionOut,
    responses={410: {"description": "the version was purged",
                     "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
)  # fmt: skip
def activate_version(
    name: str, number: int, caller: Annotated[Principal, requires("admin")], session: SessionDep
) -> VersionOut:
    """Roll the model back (or forward) to this version: an operator's operation, refused for a version that
    holds an erased sample (409) or was purged (410), and while a job of the model runs."""
    model = service.get_model(session, name, caller.tenant)
    version = service.activate_version(session, model, number, caller.actor)
    session.commit()
    [out] = _versions_out(session, model, [version])
    return out


@router.get(
    "/{name}/versions/{number}/checkpoint",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        410: {
            "description": "the version was purged: it held erased samples (its row is a tombstone)",
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        },
    },
)
def download_checkpoint(
    name: str,
    number: int,
    caller: Annotated[Principal, requires("models:read")],
    session: SessionDep,
    store: StoreDep,
) -> StreamingResponse:
    """The version's safetensors file, verified against its SHA-256 before streaming."""
    model = service.get_model(session, name, caller.tenant)
    version = service.get_version(session, model, number)
    handle = service.open_checkpoint(store, version)
    return StreamingResponse(
        _stream(handle),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(version.checkpoint_size),
            "Content-Disposition": f'attachment; filename="{name}-v{number}.safetensors"',
            "ETag": f'"{version.checkpoint_sha256}"',
        },
    )


def _stream(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(_STREAM_CHUNK):
            yield chunk
