"""OpenAI tool calling: the request's tools checked, and tool calls out of the model's text.

The prompt side is the chat template's (prompts.template_options, prompts.tool_prompt): a template that takes
`tools` renders the tool list and the tool turns itself, any other gets them in the Hermes convention.
The output side parses the three formats models actually emit: Hermes/Qwen `<tool_call>` JSON, Llama 3.1
JSON (`{"name": ..., "parameters": ...}`, optionally after `<|python_tag|>`) and Mistral's
`[TOOL_CALLS] [{...}]`. A forced tool (tool_choice "required" or a named function) is guaranteed by a
grammar (engine.grammar.tool_call_grammar), so its reply always parses.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from api.errors import ApiError
from engine.grammar import GrammarError, check_grammar, tool_call_grammar
from prompts.tool_prompt import HERMES_CLOSE, HERMES_OPEN

LLAMA_TAG, MISTRAL_TAG = "<|python_tag|>", "[TOOL_CALLS]"
# Text that can begin a tool call; content before it streams as content, from it on the reply is held back.
_STARTS = (HERMES_OPEN, LLAMA_TAG, MISTRAL_TAG)
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.S)

@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str          # JSON text, as OpenAI sends it
    id: str = ""

    def as_openai(self, index: int | None = None) -> dict:
        body = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return body if index is None else {"index": index, **body}


@dataclass(frozen=True)
class ToolRequest:
    """What a request asks of tools: the functions, whether the model may / must call, and which."""
    functions: tuple[dict, ...]     # OpenAI's {"name", "description", "parameters"}
    choice: str                     # "auto" | "none" | "required" | a function's name
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"

    def definitions(self) -> tuple[dict, ...]:
        """The tools offered to the model, as OpenAI's definitions (what templates take); none for "none"."""
        return tuple({"type": "function", "function": f} for f in self.functions) if self.active else ()

    def allowed(self, calls: list[ToolCall]) -> list[ToolCall]:
        """The calls the reply may carry: the first only with parallel_tool_calls false."""
        return calls if self.parallel else calls[:1]

    def grammar(self) -> str | None:
        """The constraint that makes the reply one call of the forced function(s); None unless forced."""
        if not self.forced:
            return None
        chosen = [f for f in self.functions if self.choice == "required" or f["name"] == self.choice]
        return tool_call_grammar([(f["name"], _closed(f.get("parameters") or {"type": "object"})) for f in chosen])


def _closed(schema: dict) -> dict:
    """A parameters schema that says nothing of extra properties, closed to them: what the model writes still
    validates against the original, and a small model left free invents properties until max_tokens."""
    if schema.get("type") == "object" and "additionalProperties" not in schema and schema.get("properties"):
        return {**schema, "additionalProperties": False}
    return schema


def tool_request(data: dict) -> ToolRequest | None:
    """The request's tools, tool_choice and parallel_tool_calls, checked (400s name the field); None without
    tools."""
    tools = data.get("tools")
    if not tools:
        if data.get("tool_choice") not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools to choose from", param="tool_choice", code="invalid_value")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                "\"parameters\": {...}}}}", param=f"tools[{i}]", code="invalid_value")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param=f"tools[{i}]", code="invalid_value")
        functions.append(function)
    choice = data.get("tool_choice") or "auto"
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ApiError(400, "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                                "\"function\": {\"name\": ...}}", param="tool_choice", code="invalid_value")
        if name not in {f["name"] for f in functions}:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among tools", param="tool_choice",
                           code="invalid_value")
        choice = name
    elif choice not in ("auto", "none", "required"):
        raise ApiError(400, f"tool_choice must be \"auto\", \"none\", \"required\" or a function (got {choice!r})",
                       param="tool_choice", code="invalid_value")
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be true or false", param="parallel_tool_calls")
    return ToolRequest(tuple(functions), choice, parallel is not False)


def forced_controls(tools: ToolRequest | None, model, controls: dict[str, Any]) -> dict[str, Any]:
    """`controls` with the grammar of a forced tool call added (unchanged when no tool is forced)."""
    if tools is None or not tools.forced:
        return controls
    if not model.counts_tokens_locally:
        raise ApiError(400, "tool_choice: the loaded model runs on another server, so Hearth cannot force a "
                            "tool call by constrained decoding; send tool_choice \"auto\"", param="tool_choice",
                       code="unsupported_parameter")
    if "grammar" in controls:
        raise ApiError(400, "tool_choice: a forced tool call already fixes the reply's form; leave "
                            "response_format / grammar_string out", param="tool_choice", code="invalid_value")
    if controls.get("ban_eos"):
        raise ApiError(400, "tool_choice: a forced tool call ends the reply after the call, which ban_eos_token"
                            " / ignore_eos forbid: send one or the other", param="tool_choice")
    try:
        definition = tools.grammar()
        check_grammar(model.tokenizer, model.eos_token_ids, definition)
    except GrammarError as exc:
        raise ApiError(400, f"tools: a function's parameters are not a JSON schema Hearth can follow: {exc}",
                       param="tools", code="invalid_grammar") from None
    return {**controls, "grammar": definition}


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _as_call(obj: Any) -> ToolCall | None:
    """A parsed JSON object as a call: {"name", "arguments"} (Hermes, Mistral) or {"name", "parameters"}
    (Llama 3.1); None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):   # some models emit the arguments already as JSON text
        return ToolCall(obj["name"], arguments, _new_id())
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False), _new_id())


def _json_values(text: str) -> list[Any] | None:
    """The JSON values in `text` one after another (separated by whitespace, `;` or `,`), or None when any
    part is not JSON."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in ";,"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        values.append(value)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished reply. Text that only looks like a call (unparseable JSON) stays content,
    so nothing the model said is lost."""
    if HERMES_OPEN in text:
        before = text[:text.index(HERMES_OPEN)].strip()
        calls = []
        for match in _HERMES.finditer(text):
            values = _json_values(match.group(1))
            found = [_as_call(v) for v in values or []]
            if not values or None in found:
                return text, []
            calls.extend(found)
        return before or None, calls
    for tag in (MISTRAL_TAG, LLAMA_TAG):
        if tag in text:
            before, _, rest = text.partition(tag)
            values = _json_values(rest)
            flat = [item for v in values or [] for item in (v if isinstance(v, list) else [v])]
            found = [_as_call(v) for v in flat]
            if not found or None in found:
                return text, []
            return before.strip() or None, found
    stripped = text.strip()
    if stripped.startswith(("{", "[")):   # Llama 3.1's bare JSON call
        values = _json_values(stripped)
        flat = [item for v in values or [] for item in (v if isinstance(v, list) else [v])]
        found = [_as_call(v) for v in flat]
        if found and None not in found:
            return None, found
    return text, []


class ToolStream:
    """Splits a streamed reply into content deltas and tool calls. Content is passed on until the text could
    be the start of a call (a tag, or a reply opening with `{` / `[`); from there it is held, and the calls
    are parsed when the reply ends (a call is only known to be one when its JSON closes)."""

    def __init__(self, tools: ToolRequest) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0          # characters of self.text already passed on as content
        self.holding = False

    def feed(self, piece: str) -> str:
        """The content to send now for this piece of the reply ("" while holding)."""
        self.text += piece
        if self.holding:
            return ""
        if not self.text[self.sent:].strip():
            return ""   # leading whitespace: wait to see whether a call follows
        if self.sent == 0 and self.text.lstrip().startswith(("{", "[")):
            self.holding = True
            return ""
        for tag in _STARTS:
            at = self.text.find(tag, self.sent)
            if at >= 0:
                self.holding = True
                out, self.sent = self.text[self.sent:at], at
                return out
        # Keep back a tail that may be a tag's beginning, cut by the tokenizer.
        keep = max((k for tag in _STARTS for k in range(1, len(tag)) if self.text.endswith(tag[:k])), default=0)
        end = len(self.text) - keep
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, calls) when the reply ends."""
        rest = self.text[self.sent:]
        if not self.holding:
            return rest, []
        content, calls = parse_tool_calls(rest)
        return (content or "") if calls else rest, self.tools.allowed(calls)


def argument_chunks(arguments: str, size: int = 16) -> list[str]:
    """A call's arguments in pieces, as OpenAI streams them (clients concatenate them)."""
    return [arguments[i:i + size] for i in range(0, len(arguments), size)] or [""]
