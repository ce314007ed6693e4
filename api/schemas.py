"""Request bodies: reading them (bounded), their shape (pydantic) and their sampler fields.

Sampler fields are not listed here: every option declared on engine.sampling.GenerationParams is accepted
under its own name (top_k, min_p, repetition_penalty, ... as extra fields), plus OpenAI's names for the same
things (max_tokens, max_completion_tokens). Bounds come from that one declaration.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from api.dialect import stop_strings
from api.errors import ApiError
from engine.sampling import GenerationParams
from core.options import specs

SAMPLER_FIELDS = {s.name for s in specs(GenerationParams)} - {"max_new_tokens", "stop"}
# OpenAI's names for max_new_tokens, and text-generation-webui's own (SillyTavern sends it)
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
BYTES_PER_TOKEN_BOUND = 32   # generous: real text averages ~4 bytes per token
BODY_SLACK_BYTES = 64 * 1024  # JSON overhead and sampler fields
MAX_JSON_DEPTH = 64           # OpenAI's bodies nest a few levels; deeper is an attack on the parser
MAX_NAME_BYTES = 255          # the longest file name on common file systems, so the longest model name


def _plain_name(value: str) -> str:
    """Model names are folder names or a remote server's ids: printable, and short enough to be a file name."""
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"must be at most {MAX_NAME_BYTES} bytes long")
    if any(not ch.isprintable() for ch in value):
        raise ValueError("must not contain control characters such as newlines")
    return value


ModelName = Annotated[str, AfterValidator(_plain_name)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None   # an assistant turn that called tools (api.tools renders it)

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"message content of type {part.get('type')!r} is not supported (text only)",
                               param="messages", code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)


def as_chat(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    # "developer" is OpenAI's newer name for the system role; templates know only "system". A tool loop's
    # fields go along: templates that take tools render them (Mistral's reads tool_call_id).
    out = []
    for m in messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        extra = m.model_extra or {}
        message.update({k: extra[k] for k in ("tool_call_id", "name") if isinstance(extra.get(k), str)})
        out.append(message)
    return out


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: ModelName | None = None   # None: the loaded model (text-generation-webui clients send no model)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    # vLLM's extras (the remote loader sends them to continue a reply the user started)
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    def chat_messages(self) -> list[dict[str, Any]]:
        return as_chat(self.messages)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] = Field(union_mode="left_to_right")
    echo: bool = False
    suffix: str | None = None


class TokenCountRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    messages: list[ChatMessage] | None = None

    def chat_messages(self) -> list[dict[str, str]]:
        return as_chat(self.messages or [])


class EncodeRequest(BaseModel):
    """text-generation-webui's /v1/internal/encode (SillyTavern counts tokens with it)."""
    text: str


class DecodeRequest(BaseModel):
    tokens: list[int]


class LogitsRequest(BaseModel):
    """text-generation-webui's /v1/internal/logits: the next token's likeliest choices for a raw prompt.
    Clients send sampler fields along (ignored: the probabilities are the model's own)."""
    prompt: str
    use_samplers: bool = False
    top_logits: int = Field(50, ge=1, le=1000)


class LoadModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: ModelName
    loader: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)   # the loader's declared options


def body_limit(context_length: int | None) -> int:
    """Largest body worth reading: a prompt that fits the context cannot be much bigger than this."""
    return (context_length or 32768) * BYTES_PER_TOKEN_BOUND + BODY_SLACK_BYTES


def require_json_type(request: Request, body_expected: bool = True) -> None:
    """415 unless the body is declared as JSON. A browser can send text/plain or form bodies to any site
    without asking it first (a "simple" request); application/json it cannot, so this refuses those."""
    content_type = request.headers.get("content-type")
    if content_type is None and not body_expected and request.headers.get("content-length", "0") == "0" \
            and "transfer-encoding" not in request.headers:
        return   # a POST with no body at all
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "send the request body as JSON with 'Content-Type: application/json' (got "
                            f"{content_type or 'no Content-Type'})", code="unsupported_media_type")


def check_json_values(data: Any) -> None:
    """400 for bodies the parser accepts but the rest of Hearth cannot use: nesting deeper than
    MAX_JSON_DEPTH, and lone UTF-16 surrogates (JSON's "\\ud800"), which are not text and fail in tokenizers."""
    pending = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request contains a lone UTF-16 surrogate (such as \\ud800), which is "
                                    "not text: send valid Unicode", code="invalid_json") from None
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep",
                               code="invalid_json")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, refusing (400) bodies over `limit` bytes before reading them whole, and (415) bodies
    not declared as JSON before reading them at all."""
    require_json_type(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(400, f"request body of {int(declared)} bytes is larger than this model's context can "
                            f"use ({limit} bytes at most)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(400, f"request body is larger than this model's context can use ({limit} bytes at "
                                "most)", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json") from None
    check_json_values(data)
    return data


def parse(model_type: type[BaseModel], data: Any) -> Any:
    """Validate `data` as `model_type`; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model_type.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def requested_max_tokens(data: dict, allow_zero: bool = False) -> int | None:
    """max_tokens / max_completion_tokens / max_new_tokens as a positive int (0 too with `allow_zero`: a
    completion that only scores its echoed prompt), None when absent."""
    for name in MAX_TOKENS_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
            raise ApiError(400, f"{name} must be a positive integer (got {value!r})", param=name,
                           code="invalid_value")
        return value
    return None


def sampler_values(data: dict) -> dict[str, Any]:
    """The request's sampler fields under GenerationParams names (unset ones are left to the defaults)."""
    values = {name: data[name] for name in SAMPLER_FIELDS if data.get(name) is not None}
    stops = stop_strings(data)
    if stops is not None:
        values["stop"] = stops
    if data.get("do_sample") is False:   # text-generation-webui's switch for greedy decoding
        values["temperature"] = 0.0
    return values
