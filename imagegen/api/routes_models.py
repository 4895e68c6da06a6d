"""GET /v1/models in OpenAI's list shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from imagegen.api.access import authenticate
from imagegen.api.deps import ServicesDep
from imagegen.api.errors import APIError
from imagegen.api.schemas import ModelList, ModelOut

router = APIRouter(dependencies=[Depends(authenticate)])  # any valid key


def _out(services: ServicesDep, name: str) -> ModelOut:
    m = services.models[name]
    f = m.family
    return ModelOut(
        id=m.name, created=m.created, family=f.name, samplers=sorted(f.samplers), guidance=f.guidance,
        negative_prompt=f.negative_prompt, defaults=dict(m.defaults.__dict__),
    )  # fmt: skip


@router.get("/v1/models", response_model=ModelList)
async def list_models(services: ServicesDep) -> ModelList:
    return ModelList(data=[_out(services, name) for name in services.models])


@router.get("/v1/models/{model_id}", response_model=ModelOut)
async def get_model(model_id: str, services: ServicesDep) -> ModelOut:
    if model_id not in services.models:
        raise APIError(404, "model_not_found", f"model {model_id!r} does not exist", "model")
    return _out(services, model_id)
