"""LoRA routes, text-generation-webui style: list the adapters, apply some to the loaded model, remove them.

Applying or removing changes what every client's next reply comes from, like loading a model: both need the
admin key (whenever the API has a key), and allow_pickle (a pickled adapter_model.bin can run code) needs a
configured admin key even on a keyless API.
"""
from __future__ import annotations

import math

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from api.auth import KeyCheck
from api.errors import ApiError
from api.schemas import ModelName, body_limit, parse, read_json, require_json_type
from loaders.base import LoadError


class LoadLorasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_names: list[ModelName] = Field(min_length=1)
    lora_weights: list[float] | None = None   # one per name; 1.0 each when left out
    allow_pickle: bool = False
    save: bool = False                        # remember them for the loaded model (re-applied at each load)

    @field_validator("lora_weights")
    @classmethod
    def _finite(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and not all(math.isfinite(w) for w in weights):
            raise ValueError("LoRA weights must be finite numbers")
        return weights


def add_lora_routes(app: FastAPI, state, keys: KeyCheck) -> None:
    @app.get("/v1/internal/lora/list")
    async def lora_list(request: Request):
        await keys.require_user(request)
        return {"lora_names": [info.name for info in state.list_loras()],
                "loras": [info.describe() for info in state.list_loras()]}

    @app.post("/v1/internal/lora/load")
    async def lora_load(request: Request):
        """Make these adapters (at these weights) the loaded model's, replacing any it had."""
        await keys.require_admin(request)
        req = parse(LoadLorasRequest, await read_json(request, body_limit(None)))
        if req.allow_pickle:
            await keys.require_configured_admin(request, "allow_pickle")
        weights = req.lora_weights if req.lora_weights is not None else [1.0] * len(req.lora_names)
        if len(weights) != len(req.lora_names):
            raise ApiError(400, "lora_weights needs one weight per name in lora_names", param="lora_weights")
        try:
            applied = await run_in_threadpool(state.set_loras, dict(zip(req.lora_names, weights)),
                                              req.allow_pickle, req.save)
        except LoadError as exc:
            raise ApiError(400, str(exc), param="lora_names", code="lora_failed") from None
        return {"lora_names": list(applied), "lora_weights": list(applied.values())}

    @app.post("/v1/internal/lora/unload")
    async def lora_unload(request: Request):
        """Remove every adapter: the model computes exactly what it did before."""
        await keys.require_admin(request)
        require_json_type(request, body_expected=False)
        try:
            await run_in_threadpool(state.set_loras, {})
        except LoadError as exc:
            raise ApiError(400, str(exc), code="lora_failed") from None
        return {"lora_names": []}
