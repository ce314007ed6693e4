"""The request fields beyond OpenAI's core that real clients send: text-generation-webui's dialect (SillyTavern's
default mode), OpenAI's and vLLM's token-level controls, and the fields Hearth knows but cannot honour.

Rule: an unknown field is ignored (clients send many), but a field Hearth knows is either honoured or refused
with a 400 naming it. A field whose value means "off" is never refused: SillyTavern sends every sampler it
knows, switched off, on every request.
"""
from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from typing import Any, Callable

from api.errors import ApiError
from engine.grammar import GrammarError, check_grammar, grammar_definition
from engine.model import Prompt
from engine.sampling import GenerationParams, TokenControls

MAX_CHOICES = 8           # n: choices are generated one after another, so each costs a whole generation
MAX_TOP_LOGPROBS = 20     # OpenAI's bound for chat's top_logprobs
MAX_LOGIT_BIAS = 100.0    # OpenAI's bound for a logit_bias value


def _number_is(*off: float) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, (int, float)) and value in off


def _falsy(value: Any) -> bool:
    return not value


# Samplers and features of text-generation-webui, vLLM and OpenAI that Hearth does not implement yet, each
# with what its "off" looks like.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tfs": (_number_is(1), "tail-free sampling"),
    "top_a": (_number_is(0), "top-a"),
    "epsilon_cutoff": (_number_is(0), "epsilon sampling"),
    "eta_cutoff": (_number_is(0), "eta sampling"),
    "guidance_scale": (_number_is(1), "classifier-free guidance"),
    "penalty_alpha": (_number_is(0), "contrastive search"),
    "num_beams": (_number_is(1), "beam search"),
    "encoder_repetition_penalty": (_number_is(1), "the encoder repetition penalty"),
    "no_repeat_ngram_size": (_number_is(0), "no_repeat_ngram_size"),
    "min_tokens": (_number_is(0), "a minimum reply length"),
    "functions": (_falsy, "function calling"),
    "guided_json": (_falsy, "vLLM's guided decoding (send response_format)"),
    "guided_regex": (_falsy, "vLLM's guided decoding"),
    "guided_grammar": (_falsy, "grammars"),
    "best_of": (lambda v: v is None or v == 1, "best_of"),
    "use_beam_search": (_falsy, "beam search"),
}


def refuse_unsupported(data: dict) -> None:
    for name, (is_off, what) in _UNSUPPORTED.items():
        if data.get(name) is not None and not is_off(data[name]):
            raise ApiError(400, f"{name}: Hearth does not support {what} yet; leave {name} out or switch it off",
                           param=name, code="unsupported_parameter")


def _flag(data: dict, name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false (got {value!r})", param=name, code="invalid_value")
    return value


def enable_thinking(data: dict) -> bool | None:
    """The request's thinking switch for templates that take one (Qwen3): vLLM's and SGLang's
    `chat_template_kwargs: {"enable_thinking": ...}` or text-generation-webui's top-level `enable_thinking`;
    None when neither is sent (the template's default). Other template kwargs are 400s naming them: Hearth
    hands a template only the variables it knows (prompts.template_options)."""
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise ApiError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs",
                           code="invalid_value")
        for name in kwargs:
            if name != "enable_thinking":
                raise ApiError(400, f"chat_template_kwargs.{name}: Hearth passes only enable_thinking to a chat "
                                    "template", param=f"chat_template_kwargs.{name}",
                               code="unsupported_parameter")
        if "enable_thinking" in kwargs:
            return _flag(kwargs, "enable_thinking") if kwargs["enable_thinking"] is not None else None
    return _flag(data, "enable_thinking") if data.get("enable_thinking") is not None else None


def _int(data: dict, name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high} (got {value!r})", param=name,
                       code="invalid_value")
    return value


def _token_id(text: Any, name: str, vocab: int) -> int:
    try:
        token_id = int(str(text).strip())
    except ValueError:
        raise ApiError(400, f"{name}: {text!r} is not a token id", param=name, code="invalid_value") from None
    if not 0 <= token_id < vocab:
        raise ApiError(400, f"{name}: token id {token_id} is outside this model's vocabulary (0 to {vocab - 1})",
                       param=name, code="invalid_value")
    return token_id


def _bias(data: dict, vocab: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    raw = data.get("logit_bias")
    if raw is not None:
        if not isinstance(raw, dict):
            raise ApiError(400, "logit_bias must map token ids to numbers", param="logit_bias")
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > MAX_LOGIT_BIAS:
                raise ApiError(400, f"logit_bias: the bias for {key} must be a number from -100 to 100 (got "
                                    f"{value!r})", param="logit_bias", code="invalid_value")
            bias[_token_id(key, "logit_bias", vocab)] = float(value)
    bans = data.get("custom_token_bans")
    if bans:   # text-generation-webui sends "12, 345"; a list of ids is accepted too
        items = bans.split(",") if isinstance(bans, str) else bans if isinstance(bans, list) else [bans]
        for item in items:
            if str(item).strip():
                bias[_token_id(item, "custom_token_bans", vocab)] = float("-inf")
    return bias


# Fields that need Hearth to see the model's tokens (not so for a model on another server). A remote server
# skips special tokens by default, so skip_special_tokens: true is honoured there and not listed.
_TOKEN_LEVEL = ("logprobs", "top_logprobs", "logit_bias", "custom_token_bans", "ban_eos_token", "ignore_eos",
                "temperature_last", "response_format", "grammar_string", "json_schema")


def _asks(data: dict, name: str) -> bool:
    value = data.get(name)
    if name == "response_format":   # {"type": "text"} is OpenAI's default, not a request for structure
        return bool(value) and not (isinstance(value, dict) and value.get("type") == "text")
    return bool(value)


def token_controls(data: dict, kind: str, model) -> dict[str, Any]:
    """The TokenControls fields the request sets (empty: none). kind: "chat" | "text"."""
    if not model.counts_tokens_locally:
        name = next((n for n in _TOKEN_LEVEL if _asks(data, n)), None)
        if name is not None:
            raise ApiError(400, f"{name}: the loaded model runs on another server, so Hearth does not see its "
                                "tokens; leave it out", param=name, code="unsupported_parameter")
        return {}
    controls: dict[str, Any] = {}
    if kind == "chat":
        if _flag(data, "logprobs"):
            controls["logprobs"] = _int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        elif data.get("top_logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        top = _int(data, "logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None:
            controls["logprobs"] = top
            if _flag(data, "echo"):
                controls["prompt_logprobs"] = True
    bias = _bias(data, len(model.tokenizer))
    if bias:
        controls["logit_bias"] = bias
    if _flag(data, "ban_eos_token") or _flag(data, "ignore_eos"):
        controls["ban_eos"] = True
    if _flag(data, "skip_special_tokens"):
        controls["skip_special_tokens"] = True
    if _flag(data, "temperature_last"):
        controls["temperature_last"] = True
    grammar = _grammar_request(data)
    if grammar is not None:
        name, kind, text = grammar
        if controls.get("ban_eos"):
            raise ApiError(400, f"{name} ends the reply when the output is complete, which ban_eos_token / "
                                "ignore_eos forbid: send one or the other", param=name)
        try:
            definition = grammar_definition(kind, text)
            check_grammar(model.tokenizer, model.eos_token_ids, definition)
        except GrammarError as exc:
            raise ApiError(400, f"{name}: {exc}", param=name, code="invalid_grammar") from None
        controls["grammar"] = definition
    return controls


def _grammar_request(data: dict) -> tuple[str, str, str] | None:
    """(field, llguidance format, grammar text) for the structured output the request asks for, or None.
    OpenAI's response_format, and text-generation-webui's grammar_string (GBNF) and json_schema."""
    response_format = data.get("response_format")
    if response_format:
        if not isinstance(response_format, dict) or response_format.get("type") not in (
                "text", "json_object", "json_schema"):
            raise ApiError(400, "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           param="response_format", code="invalid_value")
        if response_format["type"] == "json_object":
            return "response_format", "json_schema", json.dumps({"type": "object"})
        if response_format["type"] == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                               param="response_format", code="invalid_value")
            return "response_format", "json_schema", json.dumps(schema)
    if data.get("json_schema"):
        if not isinstance(data["json_schema"], dict):
            raise ApiError(400, "json_schema must be a JSON schema object", param="json_schema")
        return "json_schema", "json_schema", json.dumps(data["json_schema"])
    if data.get("grammar_string"):
        if not isinstance(data["grammar_string"], str):
            raise ApiError(400, "grammar_string must be GBNF text", param="grammar_string")
        return "grammar_string", "gbnf", data["grammar_string"]
    return None


def with_controls(params: GenerationParams, controls: dict[str, Any]) -> GenerationParams:
    """params as TokenControls when the request sets any (plain GenerationParams cost the decode loop nothing)."""
    if not controls:
        return params
    return TokenControls(**{f.name: getattr(params, f.name) for f in fields(GenerationParams)}, **controls)


def adjust_prompt(prompt: Prompt, model, data: dict, max_tokens: int) -> Prompt:
    """text-generation-webui's add_bos_token and truncation_length, on a prompt's token ids."""
    add_bos, limit = data.get("add_bos_token"), _int(data, "truncation_length", 1, 10**9)
    if add_bos is None and limit is None:
        return prompt
    if prompt.ids is None:
        name = "add_bos_token" if add_bos is not None else "truncation_length"
        raise ApiError(400, f"{name}: the loaded model runs on another server, so Hearth does not see its "
                            "tokens; leave it out", param=name, code="unsupported_parameter")
    ids = list(prompt.ids)
    if add_bos is not None:
        bos = model.tokenizer.bos_token_id
        if not isinstance(add_bos, bool):
            raise ApiError(400, f"add_bos_token must be true or false (got {add_bos!r})", param="add_bos_token")
        if not add_bos and bos is not None and ids[:1] == [bos] and len(ids) > 1:
            ids = ids[1:]
        elif add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
    if limit is not None:
        keep = limit - max_tokens
        if keep < 1:
            raise ApiError(400, f"truncation_length ({limit}) leaves no room for the prompt after max_tokens "
                                f"({max_tokens})", param="truncation_length", code="invalid_value")
        ids = ids[-keep:]   # text-generation-webui keeps the end: the newest text matters most
    if ids == list(prompt.ids):
        return prompt
    return replace(prompt, ids=ids, text=model.tokenizer.decode(ids, skip_special_tokens=False))


def stop_strings(data: dict) -> list[str] | None:
    """OpenAI's stop (a string or list) and text-generation-webui's stopping_strings, together."""
    stops: list[str] = []
    for name in ("stop", "stopping_strings"):
        value = data.get(name)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ApiError(400, f"{name} must be a string or a list of strings", param=name, code="invalid_value")
        stops.extend(v for v in values if v)
    return stops or None
