"""Stop strings in a stream: emit text as soon as it cannot be the start of a stop string.

Streamed text must never show a partial stop string ("<|im_st" before we know it becomes "<|im_start|>"),
so text that could still grow into a stop string is held back until the next piece decides it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopStringFilter:
    stops: list[str]
    _pending: str = field(default="", init=False)
    stopped_on: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.stops = [s for s in dict.fromkeys(self.stops) if s]

    def push(self, text: str) -> str:
        """Feed new text; returns what may be shown now. After a stop string is seen, `stopped_on` is set
        and the returned text ends right before it."""
        if self.stopped_on is not None:
            return ""
        buf = self._pending + text
        first = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.stopped_on = first[1]
            self._pending = ""
            return buf[: first[0]]
        hold = 0
        for s in self.stops:
            # The longest tail of buf that is a proper prefix of s must wait.
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation the held-back tail was not a stop string after all."""
        out, self._pending = ("" if self.stopped_on else self._pending), ""
        return out


class IncrementalDecoder:
    """Turns a growing list of token ids into new text pieces without re-decoding everything.

    Decodes a short window (from `prefix` to the end) and emits the part after what that window
    decoded to before; waits while the tail is an incomplete UTF-8 sequence (shown as U+FFFD).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def text(self) -> str:
        return self._decode(self.ids)
