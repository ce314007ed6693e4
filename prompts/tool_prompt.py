"""A conversation with tools, in the form a chat template gets it.

A template that takes `tools` (prompts.template_options) gets the messages nearly as OpenAI sends them:
assistant turns keep their `tool_calls` (arguments as objects, the way transformers and vLLM hand them to
Qwen's and Llama's templates, which write `arguments | tojson`), tool results stay `role: "tool"`.
Any other template gets the Hermes convention, which Qwen, Hermes and many fine-tunes were trained on and
which needs nothing from the template: the tool list in the system message inside `<tools>`, calls as
`<tool_call>{json}</tool_call>`, results as `<tool_response>` in a user turn. It is also what a server that
applies its own, unknown template gets (a remote model), so the tools reach the model either way.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from engine.model import Message, content_text

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call>"
    "</tool_call> XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")

# The fields of a message a tools-taking template reads besides role and content.
_TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


def _arguments(value: Any) -> Any:
    """A call's arguments as an object: OpenAI sends JSON text, templates were written for the object."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _template_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    return {**call, "function": {**function, "arguments": _arguments(function.get("arguments"))}}


def template_messages(messages: Sequence[Message]) -> list[Message]:
    """Messages for a template that renders tools itself: the tool fields kept, call arguments as objects."""
    out = []
    for message in messages:
        kept = {"role": message["role"], "content": message.get("content") or ""}
        kept.update({k: message[k] for k in _TOOL_FIELDS if message.get(k) is not None})
        if message.get("reasoning_content"):   # a reply's thinking, for templates that show it (Qwen3's tool loop)
            kept["reasoning_content"] = message["reasoning_content"]
        if "tool_calls" in kept:
            kept["tool_calls"] = [_template_call(c) for c in kept["tool_calls"]]
        out.append(kept)
    return out


def _call_text(call: dict) -> str:
    function = call.get("function") or {}
    body = json.dumps({"name": function.get("name"), "arguments": _arguments(function.get("arguments"))},
                      ensure_ascii=False)
    return f"{HERMES_OPEN}\n{body}\n{HERMES_CLOSE}"


def hermes_messages(messages: Sequence[Message], tools: Sequence[dict] = ()) -> list[Message]:
    """Messages in the Hermes convention, for a template that knows nothing of tools: `tools` (OpenAI tool
    definitions) in the system message, assistant tool calls as `<tool_call>` text, tool results as
    `<tool_response>` user turns (consecutive results in one turn). Content stays as it was (text or parts)
    where no tool is involved."""
    out: list[Message] = []
    results_open = False     # the last message is a user turn made of tool results
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in message["tool_calls"] if isinstance(c, dict))
            out.append({"role": "assistant", "content": f"{content_text(content)}\n{calls}".strip()})
        elif role == "tool":
            response = f"<tool_response>\n{content_text(content)}\n</tool_response>"
            if results_open:
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response})
            results_open = True
            continue
        else:
            out.append({"role": role, "content": content})
        results_open = False
    if tools:
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        system = SYSTEM_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{content_text(out[0]['content'])}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out
