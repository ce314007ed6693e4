"""The shared decode loop on the real default model: golden answer, streaming, stop, limits."""
import threading

from engine.generation import DoneEvent, StatsEvent, TextEvent, collect
from engine.sampling import GenerationParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(**kw) -> GenerationParams:
    return GenerationParams(temperature=0.0, **kw)


def test_greedy_golden_answer(loaded_state):
    prompt = loaded_state.chat_prompt(QUESTION)
    text, done, stats = collect(loaded_state.generate(prompt, greedy(max_new_tokens=24)))
    assert "Paris" in text
    assert done.reason == "eos"
    assert stats.prompt_tokens == len(prompt.ids) and stats.new_tokens > 0
    assert stats.tokens_per_second > 0


def test_events_stream_text_then_stats_then_done(loaded_state):
    events = list(loaded_state.generate(loaded_state.chat_prompt(QUESTION), greedy(max_new_tokens=24)))
    kinds = [type(e) for e in events]
    assert kinds.count(TextEvent) > 1, "the reply must arrive in several pieces"
    assert kinds[-2:] == [StatsEvent, DoneEvent]
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == events[-1].text


def test_max_new_tokens_is_respected(loaded_state):
    prompt = loaded_state.raw_prompt("Once upon a time")
    text, done, stats = collect(loaded_state.generate(prompt, greedy(max_new_tokens=5)))
    assert done.reason == "max_tokens" and stats.new_tokens == 5


def test_stop_string_ends_reply_and_is_not_shown(loaded_state):
    prompt = loaded_state.chat_prompt(QUESTION)
    text, done, _ = collect(loaded_state.generate(prompt, greedy(max_new_tokens=24, stop=["Paris"])))
    assert done.reason == "stop_string" and done.stop_string == "Paris"
    assert "Paris" not in text and text.startswith("The capital of France is")


def test_stop_takes_effect_within_one_token(loaded_state):
    prompt = loaded_state.raw_prompt("Once upon a time, in a land far away,")
    events = loaded_state.generate(prompt, greedy(max_new_tokens=200), key="t")
    pieces = 0
    for event in events:
        if isinstance(event, TextEvent):
            pieces += 1
            if pieces == 3:
                assert loaded_state.stop("t")
        if isinstance(event, StatsEvent):
            stats = event
        if isinstance(event, DoneEvent):
            done = event
    assert pieces >= 3, "the story must have been long enough to stop"
    assert done.reason == "cancelled"
    # Three text pieces shown, then at most the one token already being produced when stop came.
    assert stats.new_tokens <= 4
    assert not loaded_state.stop("t"), "the cancel flag is released when the generation ends"


def test_seeded_sampling_is_reproducible(loaded_state):
    prompt = loaded_state.raw_prompt("My favourite colour is")
    params = GenerationParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_new_tokens=12)
    first, _, _ = collect(loaded_state.generate(prompt, params))
    second, _, _ = collect(loaded_state.generate(prompt, params))
    assert first == second


def test_generation_waits_for_the_one_in_flight(loaded_state):
    """Two callers at once: the second runs after the first, both complete."""
    prompt = loaded_state.chat_prompt(QUESTION)
    results = {}

    def run(key):
        results[key] = collect(loaded_state.generate(prompt, greedy(max_new_tokens=24), key=key))[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["a"] == results["b"] and "Paris" in results["a"]
