"""POST /v1/models (streamed upload), GET /v1/models, GET /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentUser, ServicesDep, SettingsDep
from api.schemas import ModelPublic, ModelsPublic
from api.uploads import MODEL_TEXT_FIELDS, receive_upload
from modules.storage.model_catalog import (
    get_model_meta,
    list_model_metas,
    save_upload,
    validate_model_bytes,
)

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "arch": {
                            "type": "string",
                            "maxLength": 4096,
                            "description": (
                                "The architecture of a bare state_dict file: a built-in arch "
                                "name (resnet18, resnet34, resnet50, mobilenet_v2, vgg11, "
                                'vgg16, ...) or a JSON arch such as {"name": "resnet18", '
                                '"num_classes": 10}.'
                            ),
                        },
                    },
                }
            }
        },
    }
}


def to_public(meta: dict[str, Any]) -> ModelPublic:
    """The response body for one model."""
    return ModelPublic.model_validate(
        {k: v for k, v in meta.items() if k in ModelPublic.model_fields}
    )


@router.post("", status_code=201, response_model=ModelPublic, openapi_extra=UPLOAD_BODY)
async def upload_model(
    request: Request, user: CurrentUser, settings: SettingsDep, services: ServicesDep
) -> ModelPublic:
    """Upload a model (.pt checkpoint, .pt2 torch.export program, .skops or .onnx) as the
    multipart field `file`; a bare state_dict needs the field `arch` too."""
    upload = await receive_upload(
        request, limit=settings.max_upload_bytes, text_fields=MODEL_TEXT_FIELDS
    )
    arch = upload.texts.get("arch") or None
    artifact = await run_in_threadpool(validate_model_bytes, upload.data, upload.filename, arch)
    meta = await run_in_threadpool(
        lambda: save_upload(
            services.store,
            user_id=user,
            filename=upload.filename,
            data=upload.data,
            artifact=artifact,
            arch=arch,
        )
    )
    return to_public(meta)


@router.get("", response_model=ModelsPublic)
def list_models(user: CurrentUser, services: ServicesDep) -> ModelsPublic:
    """Your uploaded models, newest first."""
    metas = list_model_metas(services.store, user_id=user)
    return ModelsPublic(data=[to_public(m) for m in metas], count=len(metas))


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, user: CurrentUser, services: ServicesDep) -> ModelPublic:
    """One of your models; 404 for an unknown id or another user's."""
    return to_public(get_model_meta(services.store, user_id=user, model_id=model_id))
