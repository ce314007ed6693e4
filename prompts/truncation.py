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
    """Keep the system messages and as many of the newest turns as fit in `budget` tokens; the newest turn is
    always kept.

    Counting renders and tokenizes the kept messages, so it is the cost to save: the search gallops from the
    newest turn (1, 2, 4, ... turns) and then bisects, so every count covers at most about twice what fits and
    an 800-turn history costs a dozen small counts, not 800 renders of the whole chat. It relies on a longer
    suffix of turns never counting fewer tokens than a shorter one.
    """
    system, turns = split_turns(messages)
    counted: dict[int, int] = {}

    def tokens_keeping(n: int) -> int:          # n = how many of the newest turns are kept
        if n not in counted:
            counted[n] = count_tokens(system + [m for turn in turns[len(turns) - n:] for m in turn])
        return counted[n]

    def fitted(n: int) -> Fitted:
        kept = system + [m for turn in turns[len(turns) - n:] for m in turn]
        return Fitted(kept, len(turns) - n, tokens_keeping(n), tokens_keeping(n) <= budget)

    if len(turns) <= 1 or tokens_keeping(1) > budget:
        return fitted(min(len(turns), 1))
    fits, too_many = 1, None                   # invariant: `fits` turns fit; `too_many` turns do not
    while too_many is None:
        trial = min(fits * 2, len(turns))
        if tokens_keeping(trial) <= budget:
            fits = trial
            if fits == len(turns):
                return fitted(fits)
        else:
            too_many = trial
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        if tokens_keeping(middle) <= budget:
            fits = middle
        else:
            too_many = middle
    return fitted(fits)
