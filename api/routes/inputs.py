"""POST /v1/inputs (streamed .npz upload), GET /v1/inputs, GET /v1/inputs/{id}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentUser, ServicesDep, SettingsDep
from api.quotas import LimitsDep, declared_length
from api.routes.models import UPLOAD_BODY
from api.schemas import InputsListPublic, InputsPublic
from api.uploads import INPUTS_SUFFIXES, receive_upload
from modules.storage.inputs_catalog import (
    get_inputs_meta,
    list_inputs_metas,
    save_inputs,
    validate_inputs_bytes,
)

router = APIRouter(prefix="/v1/inputs", tags=["inputs"])


def to_public(meta: dict[str, Any]) -> InputsPublic:
    """The response body for one inputs file."""
    return InputsPublic.model_validate(
        {k: v for k, v in meta.items() if k in InputsPublic.model_fields}
    )


@router.post("", status_code=201, response_model=InputsPublic, openapi_extra=UPLOAD_BODY)
async def upload_inputs(
    request: Request,
    user: CurrentUser,
    settings: SettingsDep,
    services: ServicesDep,
    limits: LimitsDep,
) -> InputsPublic:
    """Upload an inputs file (.npz, one array per model input) as the multipart field `file`."""
    await run_in_threadpool(
        limits.check_upload, services, user, declared_bytes=declared_length(request)
    )
    upload = await receive_upload(
        request, limit=settings.max_upload_bytes, suffixes=INPUTS_SUFFIXES, what="inputs file"
    )
    arrays = await run_in_threadpool(validate_inputs_bytes, upload.data, upload.filename)
    meta = await run_in_threadpool(
        lambda: save_inputs(
            services.store,
            user_id=user,
            filename=upload.filename,
            data=upload.data,
            arrays=arrays,
        )
    )
    return to_public(meta)


@router.get("", response_model=InputsListPublic)
def list_inputs(user: CurrentUser, services: ServicesDep) -> InputsListPublic:
    """Your inputs files, newest first."""
    metas = list_inputs_metas(services.store, user_id=user)
    return InputsListPublic(data=[to_public(m) for m in metas], count=len(metas))


@router.get("/{inputs_id}", response_model=InputsPublic)
def get_inputs(inputs_id: str, user: CurrentUser, services: ServicesDep) -> InputsPublic:
    """One of your inputs files; 404 for an unknown id or another user's."""
    return to_public(get_inputs_meta(services.store, user_id=user, inputs_id=inputs_id))
