"""Response bodies and server-sent-event chunks exactly as OpenAI's API (and so the openai client) has them."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.generation import DoneEvent

FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "cancelled": "stop", "max_tokens": "length"}


def finish_reason(done: DoneEvent) -> str:
    return FINISH_REASONS.get(done.reason, "stop")


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class Reply:
    """The fields every chunk and response of one request shares."""
    kind: str             # "chat" | "text"
    model: str
    prompt_tokens: int
    include_usage: bool = False
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    # ---- streaming ------------------------------------------------------------------------------------
    def chunk(self, text: str | None, finish: str | None = None, first: bool = False,
              stop_reason: str | None = None, index: int = 0, logprobs: dict | None = None,
              tool_calls: list[dict] | None = None, reasoning: str | None = None) -> dict:
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            if reasoning:
                delta["reasoning_content"] = reasoning
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body = {**self._head("text_completion"), "choices": [choice]}
        if finish is not None and stop_reason is not None:
            choice["stop_reason"] = stop_reason   # vLLM's field: which stop string ended the reply
        if self.include_usage:
            body["usage"] = None   # OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(completion_tokens)}

    # ---- whole responses ------------------------------------------------------------------------------
    def choice(self, index: int, text: str | None, done: DoneEvent, logprobs: dict | None = None,
               tool_calls: list[dict] | None = None, reasoning: str | None = None) -> dict:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            if reasoning:
                message["reasoning_content"] = reasoning
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": index, "message": message, "logprobs": logprobs,
                      "finish_reason": "tool_calls" if tool_calls else finish_reason(done)}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(done)}
        if done.stop_string is not None:
            choice["stop_reason"] = done.stop_string
        return choice

    def response(self, choices: list[dict], completion_tokens: int) -> dict:
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        return {**body, "choices": choices, "usage": self.usage(completion_tokens)}


def model_card(model, created: int) -> dict:
    """A loaded model as /v1/models lists it; context length under Hearth's and vLLM's names."""
    return {"id": model.name, "object": "model", "created": created, "owned_by": "hearth",
            "loader": model.loader, "runtime": model.runtime, "context_length": model.context_length,
            "max_model_len": model.context_length}
