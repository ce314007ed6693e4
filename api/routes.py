"""The FastAPI app: OpenAI's /v1 routes plus Hearth's /v1/internal extras, all over one AppState."""
from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import KeyCheck
from api.errors import ApiError, install_error_handlers, refusal
from api.generation_run import GenerationRun
from api.openai_format import SSE_DONE, Reply, finish_reason, model_card, sse
from api.schemas import (ChatCompletionRequest, CompletionRequest, LoadModelRequest, TokenCountRequest,
                         body_limit, parse, read_json, require_json_type, requested_max_tokens, sampler_values)
from engine.generation import DoneEvent, StatsEvent, TextEvent
from engine.model import Prompt
from engine.sampling import GenerationParams
from loaders.base import LoadError
from core.options import OptionError
from web.guard import OriginPolicy, guard_middleware

# Load options that make a model folder run code on this machine (only an admin may set them over the API).
CODE_RUNNING_OPTIONS = ("trust_remote_code", "allow_pickle")


def loaded_model(state, requested: str):
    """The loaded model when `requested` names it; the errors say what is loaded and how to change it."""
    model = state.model
    if model is None:
        raise ApiError(400, "no model is loaded: load one on the Model tab or with POST /v1/internal/model/load",
                       param="model", code="model_not_loaded")
    if requested != model.name:
        raise ApiError(404, f"the model {requested!r} does not exist or is not loaded; this server has "
                            f"{model.name!r} loaded (see GET /v1/models)", param="model", code="model_not_found")
    return model


def generation_params(state, model, prompt: Prompt, data: dict) -> GenerationParams:
    """The request's samplers over the app defaults, with max_tokens bounded by what the context has left."""
    n_prompt, context = prompt.n_tokens, model.context_length
    if n_prompt >= context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                            f"{n_prompt} tokens: shorten the messages or the prompt",
                       param="messages" if "messages" in data else "prompt", code="context_length_exceeded")
    max_tokens = requested_max_tokens(data)
    if max_tokens is not None and n_prompt + max_tokens > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but {n_prompt + max_tokens}"
                            f" were requested ({n_prompt} in the prompt, {max_tokens} for the completion): lower "
                            "max_tokens or shorten the prompt", param="max_tokens", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(state.generation_params().max_new_tokens, context - n_prompt)
    try:
        return state.generation_params(**sampler_values(data), max_new_tokens=max_tokens)
    except OptionError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None


def _check_single_choice(req) -> None:
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported (one loaded model generates one reply at a time)", param="n")


async def _render(render, *args) -> Prompt:
    """Templates and tokenizers raise ValueError for prompts they cannot build; that is the client's 400."""
    try:
        return await run_in_threadpool(render, *args)
    except (ValueError, LoadError) as exc:
        raise ApiError(400, str(exc), code="invalid_prompt") from None


async def _respond(request: Request, state, prompt: Prompt, params: GenerationParams, reply: Reply,
                   stream: bool, echo: str = "") -> Any:
    run = GenerationRun(state, prompt, params)
    if stream:
        return StreamingResponse(_stream(request, run, reply, echo), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done: DoneEvent | None = None
    stats: StatsEvent | None = None
    async for event in run.events(request):
        if isinstance(event, StatsEvent):
            stats = event
        elif isinstance(event, DoneEvent):
            done = event
    assert done is not None, "a generation always ends with a DoneEvent"
    if done.reason == "error":
        raise ApiError(500, f"generation failed: {done.error}", code="generation_error")
    return JSONResponse(reply.response(echo + done.text, done, stats))


async def _stream(request: Request, run: GenerationRun, reply: Reply, echo: str):
    if reply.kind == "chat":
        yield sse(reply.chunk(None, first=True))   # OpenAI opens a chat stream with the role
    if echo:
        yield sse(reply.chunk(echo))
    stats: StatsEvent | None = None
    async for event in run.events(request):
        if isinstance(event, TextEvent):
            yield sse(reply.chunk(event.text))
        elif isinstance(event, StatsEvent):
            stats = event
        elif isinstance(event, DoneEvent):
            if event.reason == "error":
                # The openai client raises APIError on a data line carrying "error".
                yield sse(ApiError(500, f"generation failed: {event.error}", code="generation_error").body())
                return
            yield sse(reply.chunk(None, finish_reason(event), stop_reason=event.stop_string))
    if reply.include_usage:
        yield sse(reply.usage_chunk(stats))
    yield SSE_DONE


def _admin_only_choices(state, req: LoadModelRequest) -> str | None:
    """What in a load request needs the admin key even on a keyless API: a loader that sends every chat to
    another server (it could be anyone's), or an option that runs code shipped with the model."""
    try:
        elsewhere = not state.needs_model_folder(req.loader)
    except LoadError as exc:   # an unknown loader
        raise ApiError(400, str(exc), param="loader", code="load_failed") from None
    choices = ([f"the {req.loader} loader"] if elsewhere else []) + \
        [name for name in CODE_RUNNING_OPTIONS if req.args.get(name)]
    return " and ".join(choices) or None


def create_app(state, keys: KeyCheck, policy: OriginPolicy) -> FastAPI:
    """The API behind web.guard: requests from Hosts and browser Origins the policy refuses never reach it."""
    app = FastAPI(title="Hearth OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  middleware=guard_middleware(policy, refusal, credentials=False))
    install_error_handlers(app)
    started = int(time.time())

    def context_length() -> int | None:
        model = state.model
        return model.context_length if model is not None else None

    async def accepted(request: Request, schema):
        """The steps every generation route takes first: key, body (bounded by the context), schema, model."""
        await keys.require_user(request)
        data = await read_json(request, body_limit(context_length()))
        req = parse(schema, data)
        _check_single_choice(req)
        return data, req, loaded_model(state, req.model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        data, req, model = await accepted(request, ChatCompletionRequest)
        messages = req.chat_messages()
        if req.continue_final_message and messages[-1]["role"] == "assistant":
            prompt = await _render(state.continue_prompt, messages)
        else:
            prompt = await _render(state.chat_prompt, messages)
        params = generation_params(state, model, prompt, data)
        reply = Reply("chat", model.name, prompt.n_tokens, req.include_usage)
        return await _respond(request, state, prompt, params, reply, req.stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        data, req, model = await accepted(request, CompletionRequest)
        if isinstance(req.prompt, list) and req.prompt and all(isinstance(t, int) for t in req.prompt):
            ids = list(req.prompt)   # token ids, as vLLM and OpenAI accept them
            if not model.counts_tokens_locally:
                raise ApiError(400, "this model has no tokenizer here (it runs on another server): send the "
                                    "prompt as text", param="prompt", code="invalid_prompt")
            vocab = len(model.tokenizer) if hasattr(model.tokenizer, "__len__") else None
            if vocab is not None and not all(0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be between 0 and {vocab - 1}", param="prompt")
            prompt = Prompt(text=model.tokenizer.decode(ids), ids=ids, template_source="token ids")
        else:
            texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if len(texts) != 1:
                raise ApiError(400, "send one prompt per request (batches of prompts are not supported)",
                               param="prompt")
            if not texts[0]:
                raise ApiError(400, "prompt is empty: send the text to continue", param="prompt",
                               code="invalid_prompt")
            prompt = await _render(state.raw_prompt, texts[0])
        params = generation_params(state, model, prompt, data)
        reply = Reply("text", model.name, prompt.n_tokens, req.include_usage)
        return await _respond(request, state, prompt, params, reply, req.stream,
                              echo=prompt.text if req.echo else "")

    @app.get("/v1/models")
    async def list_models(request: Request):
        await keys.require_user(request)
        model = state.model
        return {"object": "list", "data": [model_card(model, started)] if model is not None else []}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        await keys.require_user(request)
        model = state.model
        if model is None or model.name != model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist or is not loaded", param="model",
                           code="model_not_found")
        return model_card(model, started)

    # ---- Hearth extras -----------------------------------------------------------------------------------
    @app.post("/v1/internal/token-count")
    async def token_count(request: Request):
        await keys.require_user(request)
        req = parse(TokenCountRequest, await read_json(request, body_limit(context_length())))
        if (req.text is None) == (req.messages is None):
            raise ApiError(400, "send either text (counted as a raw prompt) or messages (counted through the "
                                "chat template)")
        if state.model is None:
            raise ApiError(400, "no model is loaded, so there is no tokenizer to count with",
                           code="model_not_loaded")
        if req.messages is not None:
            prompt = await _render(state.chat_prompt, req.chat_messages())
        else:
            prompt = await _render(state.raw_prompt, req.text)
        return {"length": prompt.n_tokens, "context_length": state.model.context_length}

    @app.get("/v1/internal/model/info")
    async def model_info(request: Request):
        await keys.require_user(request)
        model = state.model
        if model is None:
            return {"model_name": None, "loader": None, "runtime": None, "context_length": None}
        return {"model_name": model.name, "loader": model.loader, "runtime": model.runtime,
                "context_length": model.context_length}

    @app.get("/v1/internal/model/list")
    async def model_list(request: Request):
        await keys.require_user(request)
        return {"model_names": state.list_models()}

    @app.post("/v1/internal/model/load")
    async def load_model(request: Request):
        await keys.require_admin(request)
        req = parse(LoadModelRequest, await read_json(request, body_limit(None)))
        admin_only = _admin_only_choices(state, req)
        if admin_only is not None:
            await keys.require_configured_admin(request, admin_only)
        try:
            await run_in_threadpool(state.load_model, req.model_name, req.loader, req.args)
        except LoadError as exc:
            raise ApiError(400, str(exc), param="model_name", code="load_failed") from None
        return await model_info(request)

    @app.post("/v1/internal/model/unload")
    async def unload_model(request: Request):
        await keys.require_admin(request)
        require_json_type(request, body_expected=False)
        was_loaded = state.model is not None
        stopped = await run_in_threadpool(state.unload_model)   # generations on the model end first
        return {"unloaded": was_loaded, "stopped_generations": stopped}

    return app
