"""Prompt fitting is linear in the history (issue 14, item 9): a long history costs a few small counts, never one
render of the whole chat per dropped turn, and the answer is the one the one-turn-at-a-time search gives."""
from __future__ import annotations

import math
import random

from prompts.truncation import fit_messages



def history(turns: int, rng: random.Random | None = None) -> list[dict]:
    rng = rng or random.Random(0)
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i} " + "word " * rng.randint(1, 30)})
        messages.append({"role": "assistant", "content": f"answer {i} " + "word " * rng.randint(1, 30)})
    messages.append({"role": "user", "content": "and now?"})
    return messages


def fit_one_turn_at_a_time(messages, count, budget):
    """The search as it was: drop the oldest turn and count again until it fits (the reference)."""
    from prompts.truncation import split_turns
    system, turns = split_turns(messages)
    for dropped in range(len(turns)):
        kept = system + [m for t in turns[dropped:] for m in t]
        if count(kept) <= budget or dropped == len(turns) - 1:
            return kept, dropped


def test_the_fitted_turns_equal_the_one_turn_at_a_time_search():
    rng = random.Random(7)
    count = lambda kept: sum(len(m["content"].split()) + 4 for m in kept)
    for _ in range(200):
        messages = history(rng.randint(0, 60), rng)
        budget = rng.randint(1, 900)
        fitted = fit_messages(messages, count, budget)
        kept, dropped = fit_one_turn_at_a_time(messages, count, budget)
        assert (fitted.messages, fitted.dropped_turns) == (kept, dropped)
        assert fitted.tokens == count(kept) and fitted.fits == (count(kept) <= budget)


def test_an_800_turn_history_costs_a_few_small_counts():
    messages = history(800)
    sizes = []

    def count(kept):
        sizes.append(len(kept))
        return sum(len(m["content"].split()) + 4 for m in kept)

    fitted = fit_messages(messages, count, budget=2000)
    assert 0 < fitted.dropped_turns < 800 and fitted.fits
    assert len(sizes) <= 2 * math.ceil(math.log2(800)) + 2
    kept_turns = 801 - fitted.dropped_turns
    # No count looks at more than twice the turns that fit (plus the system message).
    assert max(sizes) <= 2 * (2 * kept_turns) + 1


def test_an_800_turn_chat_on_the_default_model_keeps_the_most_turns_that_fit(loaded_state):
    """Through the real template and tokenizer: what is kept fits, and one more old turn would not."""
    messages = history(800)
    prompt = loaded_state.chat_prompt(messages, max_new_tokens=256)
    budget = loaded_state.model.context_length - 256
    assert 0 < prompt.dropped_turns < 800 and prompt.n_tokens <= budget
    one_more = loaded_state.chat_prompt(messages[:1] + messages[1 + 2 * (prompt.dropped_turns - 1):])
    assert one_more.n_tokens > budget
    assert "oldest turns" in prompt.notice
