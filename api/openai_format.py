"""Response bodies and server-sent-event chunks exactly as OpenAI's API (and so the openai client) has them."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.generation import DoneEvent, StatsEvent

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

    def usage(self, stats: StatsEvent | None) -> dict:
        completion = stats.new_tokens if stats is not None else 0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    # ---- streaming ------------------------------------------------------------------------------------
    def chunk(self, text: str | None, finish: str | None = None, first: bool = False,
              stop_reason: str | None = None) -> dict:
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {**self._head("text_completion"), "choices": [choice]}
        if finish is not None and stop_reason is not None:
            choice["stop_reason"] = stop_reason   # vLLM's field: which stop string ended the reply
        if self.include_usage:
            body["usage"] = None   # OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self, stats: StatsEvent | None) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(stats)}

    # ---- whole responses ------------------------------------------------------------------------------
    def response(self, text: str, done: DoneEvent, stats: StatsEvent | None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason(done)}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(done)}
            body = self._head("text_completion")
        if done.stop_string is not None:
            choice["stop_reason"] = done.stop_string
        return {**body, "choices": [choice], "usage": self.usage(stats)}


def model_card(model, created: int) -> dict:
    """A loaded model as /v1/models lists it; context length under Hearth's and vLLM's names."""
    return {"id": model.name, "object": "model", "created": created, "owned_by": "hearth",
            "loader": model.loader, "runtime": model.runtime, "context_length": model.context_length,
            "max_model_len": model.context_length}
