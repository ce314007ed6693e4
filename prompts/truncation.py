"""Fitting a conversation into the context window: keep the system message and the newest turns, drop the
oldest whole turns (a user message with the replies to it), and say how many were dropped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Fitted:
    messages: list[dict]
    dropped_turns: int
    tokens: int            # prompt tokens of the kept messages
    fits: bool             # False when even the newest turn alone is over budget

    def notice(self) -> str:
        if not self.dropped_turns and self.fits:
            return ""
        parts = []
        if self.dropped_turns:
            parts.append(f"dropped the {self.dropped_turns} oldest turn{'s' if self.dropped_turns > 1 else ''} "
                         "to fit the context")
        if not self.fits:
            parts.append("the newest message alone is longer than the context allows")
        return "; ".join(parts)


def split_turns(messages: Sequence[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(system messages, turns); a turn starts at a user message and holds what follows until the next one."""
    system = [m for m in messages if m["role"] == "system"]
    turns: list[list[dict]] = []
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return system, turns


def fit_messages(messages: Sequence[dict], count_tokens: Callable[[list[dict]], int], budget: int) -> Fitted:
    """Drop the oldest turns until `count_tokens(messages)` <= budget; the newest turn is always kept."""
    system, turns = split_turns(messages)
    dropped = 0
    while True:
        kept = system + [m for turn in turns[dropped:] for m in turn]
        tokens = count_tokens(kept)
        if tokens <= budget:
            return Fitted(kept, dropped, tokens, True)
        if dropped >= len(turns) - 1:
            return Fitted(kept, dropped, tokens, False)
        dropped += 1
