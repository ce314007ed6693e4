"""The FastAPI app: OpenAI's /v1 routes plus Hearth's /v1/internal extras, all over one AppState."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import KeyCheck
from api.errors import ApiError, install_error_handlers, refusal
from api.generation_run import GenerationRun
from api.dialect import MAX_CHOICES, adjust_prompt, enable_thinking, refuse_unsupported, token_controls, \
    with_controls
from api.lora_routes import add_lora_routes
from api.logprobs import CompletionLogprobs, chat_logprobs, token_text
from api.tools import ToolRequest, ToolStream, argument_chunks, forced_controls, parse_tool_calls, tool_request
from api.openai_format import SSE_DONE, Reply, finish_reason, model_card, sse
from api.schemas import (ChatCompletionRequest, CompletionRequest, DecodeRequest, EncodeRequest, LoadModelRequest,
                         LogitsRequest, TokenCountRequest, body_limit, parse, read_json, require_json_type,
                         requested_max_tokens, sampler_values)
from engine.generation import DoneEvent, QueuedEvent, StatsEvent, TextEvent, TokenEvent
from engine.model import Prompt
from prompts.reasoning import split_reply, splitter_for
from prompts.template_options import TemplateOptions
from engine.sampling import GenerationParams, TokenControls
from loaders.base import LoadError
from core.options import OptionError, specs
from web.guard import OriginPolicy, guard_middleware

# Load options that make a model folder run code on this machine (only an admin may set them over the API).
CODE_RUNNING_OPTIONS = ("trust_remote_code", "allow_pickle")
QUEUE_HEARTBEAT_S = 3.0   # how often a stream waiting in line says so (as an SSE comment)


def loaded_model(state, requested: str | None):
    """The loaded model when `requested` names it or is None (text-generation-webui's clients send no model);
    the errors say what is loaded and how to change it."""
    model = state.model
    if model is None:
        raise ApiError(400, "no model is loaded: load one on the Model tab or with POST /v1/internal/model/load",
                       param="model", code="model_not_loaded")
    if requested is not None and requested != model.name:
        raise ApiError(404, f"the model {requested!r} does not exist or is not loaded; this server has "
                            f"{model.name!r} loaded (see GET /v1/models)", param="model", code="model_not_found")
    return model


def sampler_params(state, data: dict, **overrides) -> GenerationParams:
    """The request's samplers over the app defaults; a value out of bounds is a 400 naming its field."""
    try:
        return state.generation_params(**{**sampler_values(data), **overrides})
    except OptionError as exc:
        message = str(exc)
        if exc.option is not None:   # the option's label is for people; the client sent the field's name
            label = next(s.label for s in specs(GenerationParams) if s.name == exc.option)
            message = message.replace(label, exc.option, 1)
        raise ApiError(400, message, param=exc.option, code="invalid_value") from None


def plan(state, model, prompt: Prompt, data: dict, controls: dict, allow_zero: bool = False) \
        -> tuple[Prompt, GenerationParams]:
    """The prompt as the dialect fields shape it, and the params: max_tokens bounded by what the context has
    left, the token-level controls on top."""
    requested = requested_max_tokens(data, allow_zero)
    prompt = adjust_prompt(prompt, model, data,
                           requested if requested is not None else state.generation_params().max_new_tokens)
    n_prompt, context = prompt.n_tokens, model.context_length
    if n_prompt >= context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                            f"{n_prompt} tokens: shorten the messages or the prompt",
                       param="messages" if "messages" in data else "prompt", code="context_length_exceeded")
    if requested is not None and n_prompt + requested > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but {n_prompt + requested}"
                            f" were requested ({n_prompt} in the prompt, {requested} for the completion): lower "
                            "max_tokens or shorten the prompt", param="max_tokens", code="context_length_exceeded")
    if requested == 0:   # echo with max_tokens 0: score the prompt, generate nothing
        controls = {**controls, "score_only": True}
        requested = 1
    max_tokens = requested if requested is not None else \
        min(state.generation_params().max_new_tokens, context - n_prompt)
    return prompt, with_controls(sampler_params(state, data, max_new_tokens=max_tokens), controls)


def _check_choices(req) -> None:
    if not 1 <= req.n <= MAX_CHOICES:
        raise ApiError(400, f"n must be from 1 to {MAX_CHOICES} (choices are generated one after another)",
                       param="n", code="invalid_value")


def _seeded(params: GenerationParams, index: int) -> GenerationParams:
    """The params of choice `index`: a fixed seed moves on per choice, so n choices differ but reproduce."""
    if index == 0 or params.seed < 0:
        return params
    return replace(params, seed=(params.seed + index) % 2**63)


async def _render(render, *args, **kwargs) -> Prompt:
    """Templates and tokenizers raise ValueError for prompts they cannot build; that is the client's 400."""
    try:
        return await run_in_threadpool(render, *args, **kwargs)
    except (ValueError, LoadError) as exc:
        raise ApiError(400, str(exc), code="invalid_prompt") from None


class _Logprobs:
    """One choice's logprobs in the reply's shape; None throughout when the request asked for none."""

    def __init__(self, reply: Reply, model, params: GenerationParams):
        self.kind = reply.kind
        self.wanted = isinstance(params, TokenControls) and params.logprobs is not None
        self.tokenizer = model.tokenizer
        self.completion = CompletionLogprobs(model.tokenizer) if self.wanted else None

    def block(self, events: list[TokenEvent]) -> dict | None:
        if not self.wanted:
            return None
        if self.kind == "chat":
            return chat_logprobs(self.tokenizer, events)
        return self.completion.block(events)


async def _respond(request: Request, state, model, prompt: Prompt, params: GenerationParams, reply: Reply,
                   stream: bool, n: int = 1, echo: str = "", tools: ToolRequest | None = None,
                   thinking: str | None = None) -> Any:
    """The reply, whole or streamed; with `tools` (offered, not switched off) calls in the text become
    tool_calls; with `thinking` (the chat template's source) a reasoning model's thinking is split from the
    reply into `reasoning_content`, the field DeepSeek, vLLM and llama.cpp's server use."""
    if stream:
        return StreamingResponse(_stream(request, state, model, prompt, params, reply, n, echo, tools, thinking),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    choices, used = [], 0
    for index in range(n):   # one after another: the one model generates one reply at a time
        tokens: list[TokenEvent] = []
        done: DoneEvent | None = None
        async for event in GenerationRun(state, prompt, _seeded(params, index)).events(request):
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, StatsEvent):
                used += event.new_tokens
            elif isinstance(event, DoneEvent):
                done = event
        assert done is not None, "a generation always ends with a DoneEvent"
        if done.reason == "error":
            raise ApiError(500, f"generation failed: {done.error}", code="generation_error")
        reasoning, said = split_reply(done.text, prompt.text, thinking) if thinking is not None else ("", done.text)
        text, calls = parse_tool_calls(said) if tools is not None else (echo + said, [])
        calls = tools.allowed(calls) if tools is not None else calls
        choices.append(reply.choice(index, text, done, _Logprobs(reply, model, params).block(tokens),
                                    [call.as_openai() for call in calls] or None, reasoning or None))
    return JSONResponse(reply.response(choices, used))


async def _stream(request: Request, state, model, prompt: Prompt, params: GenerationParams, reply: Reply,
                  n: int, echo: str, tools: ToolRequest | None, thinking: str | None):
    used = 0
    for index in range(n):
        logprobs = _Logprobs(reply, model, params)
        calls = ToolStream(tools) if tools is not None else None
        think = splitter_for(prompt.text, thinking) if thinking is not None else None
        if reply.kind == "chat":
            yield sse(reply.chunk(None, first=True, index=index))   # OpenAI opens a chat stream with the role
        # With prompt logprobs the echo waits for the prompt's scores, which come first from the run.
        unsent_echo = echo
        if echo and not logprobs.wanted:
            yield sse(reply.chunk(echo, index=index))
            unsent_echo = ""
        pending: list[TokenEvent] = []
        async for event in GenerationRun(state, prompt, _seeded(params, index)).events(request, QUEUE_HEARTBEAT_S):
            if isinstance(event, QueuedEvent):
                if event.ahead:   # an SSE comment: clients skip it, but their read timeouts see life
                    yield f": queued, {event.ahead} ahead\n\n"
                continue
            if isinstance(event, TokenEvent):
                pending.append(event)
                if event.prompt:
                    continue
            if unsent_echo:
                prompt_tokens = [e for e in pending if e.prompt]
                pending = [e for e in pending if not e.prompt]
                yield sse(reply.chunk(unsent_echo, index=index, logprobs=logprobs.block(prompt_tokens)))
                unsent_echo = ""
            if isinstance(event, TextEvent):
                text = event.text
                if think is not None:
                    reasoning, text = think.feed(text)
                    if reasoning:
                        yield sse(reply.chunk(None, index=index, reasoning=reasoning))
                    if not text:   # held back or thinking: its tokens' logprobs go with the next reply text
                        continue
                text = calls.feed(text) if calls is not None else text
                if text or calls is None:   # text held back as a possible tool call keeps its logprobs pending
                    yield sse(reply.chunk(text, index=index, logprobs=logprobs.block(pending) if pending else None))
                    pending = []
            elif isinstance(event, StatsEvent):
                used += event.new_tokens
            elif isinstance(event, DoneEvent):
                if event.reason == "error":
                    # The openai client raises APIError on a data line carrying "error".
                    yield sse(ApiError(500, f"generation failed: {event.error}", code="generation_error").body())
                    return
                finish = finish_reason(event)
                if think is not None:
                    reasoning, text = think.flush()
                    if reasoning:
                        yield sse(reply.chunk(None, index=index, reasoning=reasoning))
                    text = calls.feed(text) if calls is not None and text else text
                    if text:
                        yield sse(reply.chunk(text, index=index))
                if calls is not None:
                    rest, found = calls.finish()
                    if rest:
                        yield sse(reply.chunk(rest, index=index))
                    for position, call in enumerate(found):   # OpenAI's order: id and name, then arguments
                        yield sse(reply.chunk(None, index=index, tool_calls=[
                            {**call.as_openai(position), "function": {"name": call.name, "arguments": ""}}]))
                        for piece in argument_chunks(call.arguments):
                            yield sse(reply.chunk(None, index=index, tool_calls=[
                                {"index": position, "function": {"arguments": piece}}]))
                    finish = "tool_calls" if found else finish
                yield sse(reply.chunk(None, finish, stop_reason=event.stop_string, index=index,
                                      logprobs=logprobs.block(pending) if pending else None))
    if reply.include_usage:
        yield sse(reply.usage_chunk(used))
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
        _check_choices(req)
        model = loaded_model(state, req.model)
        refuse_unsupported(data)
        return data, req, model

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        data, req, model = await accepted(request, ChatCompletionRequest)
        tools = tool_request(data)
        options = TemplateOptions(tools=tools.definitions() if tools is not None else (),
                                  enable_thinking=enable_thinking(data))
        messages = req.chat_messages()
        if req.continue_final_message and messages[-1]["role"] == "assistant":
            prompt = await _render(state.continue_prompt, messages, options=options)
        else:
            prompt = await _render(state.chat_prompt, messages, options=options)
        controls = forced_controls(tools, model, token_controls(data, "chat", model))
        prompt, params = plan(state, model, prompt, data, controls)
        reply = Reply("chat", model.name, prompt.n_tokens, req.include_usage)
        return await _respond(request, state, model, prompt, params, reply, req.stream, req.n,
                              tools=tools if tools is not None and tools.active else None,
                              thinking=state.resolve_template().jinja)

    @app.post("/v1/completions")
    async def completions(request: Request):
        data, req, model = await accepted(request, CompletionRequest)
        if req.suffix:
            raise ApiError(400, "suffix: the loaded model's template has no fill-in-the-middle, so Hearth cannot "
                                "write text between a prompt and a suffix; leave suffix out",
                           param="suffix", code="unsupported_parameter")
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
        prompt, params = plan(state, model, prompt, data, token_controls(data, "text", model), allow_zero=req.echo)
        reply = Reply("text", model.name, prompt.n_tokens, req.include_usage)
        return await _respond(request, state, model, prompt, params, reply, req.stream, req.n,
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

    # ---- text-generation-webui's internal routes (SillyTavern calls them in its default mode) --------------
    def local_tokenizer(what: str):
        model = loaded_model(state, None)
        if not model.counts_tokens_locally:
            raise ApiError(400, f"the loaded model runs on another server, so Hearth has no tokenizer to {what} "
                                "with", code="unsupported_parameter")
        return model

    @app.post("/v1/internal/encode")
    async def encode(request: Request):
        await keys.require_user(request)
        req = parse(EncodeRequest, await read_json(request, body_limit(context_length())))
        local_tokenizer("encode")
        # As a raw prompt is tokenized for generation (BOS included where the tokenizer adds one), so the
        # count a client makes here is the count the model sees.
        ids = (await _render(state.raw_prompt, req.text)).ids if req.text else []
        return {"tokens": ids, "length": len(ids)}

    @app.post("/v1/internal/decode")
    async def decode(request: Request):
        await keys.require_user(request)
        req = parse(DecodeRequest, await read_json(request, body_limit(context_length())))
        model = local_tokenizer("decode")
        vocab = len(model.tokenizer)
        if not all(0 <= t < vocab for t in req.tokens):
            raise ApiError(400, f"tokens must be ids from 0 to {vocab - 1}", param="tokens", code="invalid_value")
        return {"text": model.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.post("/v1/internal/logits")
    async def logits(request: Request):
        """The next token's likeliest choices after a raw prompt, as {token: probability}."""
        await keys.require_user(request)
        req = parse(LogitsRequest, await read_json(request, body_limit(context_length())))
        if req.use_samplers:
            raise ApiError(400, "use_samplers: Hearth reports the model's own probabilities only; send "
                                "use_samplers: false", param="use_samplers", code="unsupported_parameter")
        model = local_tokenizer("score")
        if not req.prompt:
            raise ApiError(400, "prompt is empty: send the text to continue", param="prompt", code="invalid_prompt")
        prompt = await _render(state.raw_prompt, req.prompt)
        if prompt.n_tokens >= model.context_length:
            raise ApiError(400, f"the prompt ({prompt.n_tokens} tokens) does not fit this model's context "
                                f"({model.context_length} tokens)", param="prompt", code="context_length_exceeded")
        # One greedy token with its alternatives: they are the raw next-token distribution. EOS is banned only
        # so that the one token is reported (bans act after the scores are taken).
        params = with_controls(state.generation_params(max_new_tokens=1, temperature=0.0),
                               {"logprobs": req.top_logits, "ban_eos": True})
        top: tuple = ()
        async for event in GenerationRun(state, prompt, params).events(request):
            if isinstance(event, TokenEvent):
                top = event.top
            elif isinstance(event, DoneEvent) and event.reason == "error":
                raise ApiError(500, f"generation failed: {event.error}", code="generation_error")
        return {"logits": {token_text(model.tokenizer, i): math.exp(lp) for i, lp in top}}

    @app.post("/v1/internal/stop-generation")
    async def stop_generation(request: Request):
        """Stops the API's running generation (its stream then ends with finish_reason "stop")."""
        await keys.require_user(request)
        require_json_type(request, body_expected=False)
        state.stop("api")
        return "OK"

    @app.get("/v1/internal/model/info")
    async def model_info(request: Request):
        await keys.require_user(request)
        model = state.model
        if model is None:
            return {"model_name": None, "loader": None, "runtime": None, "context_length": None, "lora_names": []}
        return {"model_name": model.name, "loader": model.loader, "runtime": model.runtime,
                "context_length": model.context_length, "lora_names": list(state.applied_loras())}

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

    add_lora_routes(app, state, keys)
    return app
