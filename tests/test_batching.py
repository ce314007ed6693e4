"""Several generations in one decode step (engine.batch) and the scheduler that admits them: each slot's logits
equal its single-stream logits, concurrent greedy replies equal each reply alone, a cancelled slot frees, stop
strings hold per slot. CPU tests run eagerly; GPU tests (captured batched steps) skip without CUDA."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.generation import DoneEvent, QueuedEvent, TextEvent, collect
from engine.model import Prompt
from engine.runtime import Engine, load_engine_model
from engine.sampling import GenerationParams
from engine.weights import load_transformer
from scheduler import Scheduler
from tests.test_engine import save_tiny

CPU = [torch.device("cpu")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
WAIT = 300   # seconds: generous, the machine may be loaded


def reference(model, prompt: list[int], forced: list[int]) -> list[torch.Tensor]:
    """Single-stream logits: after the prompt, then after each forced token."""
    engine = Engine(model, 128, use_graphs=False, prefill_chunk=5)
    with torch.inference_mode():
        out = [engine.prefill(prompt)]
        out += [engine.decode(torch.tensor(t, device=engine.device), len(prompt) + i).clone()
                for i, t in enumerate(forced)]
    return out


def run_slot(batch, prompt: list[int], forced: list[int], out: list, joined: threading.Event | None = None,
             after: tuple[threading.Event, ...] = ()) -> None:
    """One generation's thread, teacher-forced: join (after the `after` events), then hand in `forced`."""
    for event in after:
        assert event.wait(WAIT)
    slot, logits = batch.join(prompt, None)
    out.append(logits)
    for i, token in enumerate(forced):
        out.append(batch.advance(slot, torch.tensor(token, device=batch.engine.device)))
        if joined is not None and i == 2:
            joined.set()   # three steps in: the next slot may join now
    batch.leave(slot)


def batched_logits(model, slots: int, scripts: list[tuple[list[int], list[int]]],
                   graphs: bool = False) -> list[list[torch.Tensor]]:
    """Run each (prompt, forced) script in its own thread on one Batch: slot i joins once slot i - 1 has made
    three steps, so slots join a running batch; shorter scripts leave while the others go on."""
    from engine.batch import Batch

    engine = Engine(model, 128, use_graphs=graphs, prefill_chunk=5, slots=slots)
    batch = Batch(engine)
    outs = [[] for _ in scripts]
    marks = [threading.Event() for _ in scripts]
    threads = [threading.Thread(target=run_slot, args=(batch, prompt, forced, outs[i], marks[i],
                                                       (marks[i - 1],) if i else ()))
               for i, (prompt, forced) in enumerate(scripts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    batch.close()
    assert batch.widest >= 2, "the slots never shared a step"
    return outs


def scripts_for(vocab: int, more: int = 0) -> list[tuple[list[int], list[int]]]:
    """Prompts of different lengths (one longer than a prefill chunk) and forced replies of different lengths;
    `more` scripts after the first four, each a step longer than the last."""
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()
    return [(ids(7), ids(14)), (ids(12), ids(5)), (ids(3), ids(9)), (ids(9), ids(6))] + [
        (ids(4 + i), ids(12 + i)) for i in range(more)]


@pytest.mark.parametrize("which", ["default", "tiny-gqa-window"])
def test_batched_decode_logits_equal_single_stream_logits_per_slot(which, default_model_dir, tmp_path):
    if which == "default":
        model, _ = load_transformer(default_model_dir, CPU, torch.float32, repack_int4=False)
    else:   # grouped-query attention and a sliding window shorter than the sequences
        save_tiny(tmp_path, "mistral-gqa-window")
        model, _ = load_transformer(tmp_path, CPU, torch.float32)
    scripts = scripts_for(model.args.vocab_size)
    expected = [reference(model, prompt, forced) for prompt, forced in scripts]
    got = batched_logits(model, 3, scripts)   # four scripts on three slots: the last joins a freed row
    for slot, (want, have) in enumerate(zip(expected, got)):
        assert len(have) == len(want)
        for step, (w, h) in enumerate(zip(want, have)):
            torch.testing.assert_close(h, w, atol=2e-4, rtol=2e-4, msg=lambda m: f"slot {slot} step {step}: {m}")


def prefilled_together_and_alone(model) -> tuple[list, list, list, list]:
    """Chunks of three prompts (lengths 7, 3 and 5, the last after 4 positions already in its row) prefilled
    one by one into rows 1-3, then together (engine.Engine.prefill_rows, the shorter ones padded) from a cleared
    cache: (logits alone, logits together, caches alone, caches together), caches as [(k_all, v_all)] a layer."""
    g = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist()
    earlier, chunks = ids(4), [(ids(7), 0), (ids(3), 0), (ids(5), 4)]
    engine = Engine(model, 64, use_graphs=False, prefill_chunk=64, slots=4)
    caches = lambda: [(layer.attention.kv_cache.k_all.clone(), layer.attention.kv_cache.v_all.clone())
                      for layer in engine.model.layers]
    with torch.inference_mode():
        engine.prefill_chunk_at(earlier, 0, 3)
        alone = [engine.prefill_chunk_at(c, start, 1 + b) for b, (c, start) in enumerate(chunks)]
        alone_caches = caches()
        for layer in engine.model.layers:
            layer.attention.kv_cache.k_all.zero_()
            layer.attention.kv_cache.v_all.zero_()
        engine.prefill_chunk_at(earlier, 0, 3)
        together = engine.prefill_rows(chunks, first_row=1)
        together_caches = caches()
    # only the positions each row holds: padding writes beyond them
    ends = [start + len(c) for c, start in chunks]
    cut = lambda cs: [[(k[1 + b, :, :end], v[1 + b, :, :end]) for b, end in enumerate(ends)] + [(k[0], v[0])]
                      for k, v in cs]
    return alone, together, cut(alone_caches), cut(together_caches)


@pytest.mark.parametrize("which", ["default", "tiny-gqa-window"])
def test_prompts_prefilled_together_give_each_row_its_own_logits_and_cache(which, default_model_dir, tmp_path):
    """engine.Engine.prefill_rows on CPU (fp32): each row gets the logits and cache entries its chunk gets
    prefilled alone; row 0 stays untouched."""
    if which == "default":
        model, _ = load_transformer(default_model_dir, CPU, torch.float32, repack_int4=False)
    else:
        save_tiny(tmp_path, "mistral-gqa-window")
        model, _ = load_transformer(tmp_path, CPU, torch.float32)
    alone, together, alone_caches, together_caches = prefilled_together_and_alone(model)
    for b, (w, h) in enumerate(zip(alone, together)):
        torch.testing.assert_close(h, w, atol=2e-4, rtol=2e-4, msg=lambda m: f"row {1 + b}: {m}")
    for want, have in zip(alone_caches, together_caches):
        assert not have[-1][0].any() and not have[-1][1].any()   # row 0
        torch.testing.assert_close(have, want, atol=2e-4, rtol=2e-4)


@needs_cuda
def test_prompts_prefilled_together_on_cuda_match_each_alone(tmp_path):
    """The same on the GPU path (bf16; the fused RoPE + cache kernel with [B, S] positions): to bf16 rounding."""
    save_tiny(tmp_path, "mistral-gqa-window")
    model, _ = load_transformer(tmp_path, [torch.device("cuda")], torch.bfloat16)
    alone, together, alone_caches, together_caches = prefilled_together_and_alone(model)
    for w, h in zip(alone, together):
        assert (h - w).abs().max() <= 0.05 * w.abs().max()
    for want, have in zip(alone_caches, together_caches):
        assert not have[-1][0].any() and not have[-1][1].any()
        torch.testing.assert_close(have, want, atol=0.05, rtol=0.02)


def joined_together(batch, count: int, threads: list[threading.Thread]) -> None:
    """Start `threads` (each joins `batch` once) while the driver is held as if a step ran, and let it go once
    `count` slots wait with their prompts: its first job is then their shared prefill."""
    with batch.cond:
        batch.busy = True
    for t in threads:
        t.start()
    with batch.cond:
        assert batch.cond.wait_for(lambda: len(batch.slots) == count, WAIT)
        assert all(s.pending for s in batch.slots)
        batch.busy = False
        batch.cond.notify_all()


def test_slots_joining_at_once_share_prefill_passes_and_keep_their_own_logits(tmp_path):
    """Four prompts waiting together in an empty four-slot batch are prefilled in shared passes (prefill_chunk 8:
    two positions each a pass, padded where a prompt is shorter), and each gets the logits of its prompt and
    forced tokens alone."""
    from engine.batch import Batch

    save_tiny(tmp_path, "mistral-gqa-window")
    model, _ = load_transformer(tmp_path, CPU, torch.float32)
    scripts = scripts_for(model.args.vocab_size)
    expected = [reference(model, prompt, forced) for prompt, forced in scripts]
    engine = Engine(model, 128, use_graphs=False, prefill_chunk=8, slots=4)
    batch = Batch(engine)
    outs = [[] for _ in scripts]
    threads = [threading.Thread(target=run_slot, args=(batch, *script, out)) for script, out in zip(scripts, outs)]
    joined_together(batch, len(scripts), threads)
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    batch.close()
    assert batch.widest_prefill == len(scripts)
    for slot, (want, have) in enumerate(zip(expected, outs)):
        assert len(have) == len(want)
        for step, (w, h) in enumerate(zip(want, have)):
            torch.testing.assert_close(h, w, atol=2e-4, rtol=2e-4, msg=lambda m: f"slot {slot} step {step}: {m}")


def test_a_prompt_that_cannot_run_fails_alone_when_prefilled_with_others(tmp_path):
    """Four newcomers waiting together (the driver held busy until all have joined, so they share a prefill
    pass), one with an id outside the vocabulary: the shared pass fails, each prompt then runs alone, and only
    that one ends with the error; the others get their own logits."""
    from engine.batch import Batch

    save_tiny(tmp_path, "mistral-gqa-window")
    model, _ = load_transformer(tmp_path, CPU, torch.float32)
    scripts = scripts_for(model.args.vocab_size)[:3]
    expected = [reference(model, prompt, forced) for prompt, forced in scripts]
    batch = Batch(Engine(model, 128, use_graphs=False, prefill_chunk=64, slots=4))
    outs, errors = [[] for _ in scripts], []

    def bad() -> None:
        try:
            batch.join([1, model.args.vocab_size + 5], None)
        except IndexError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_slot, args=(batch, *script, out)) for script, out in zip(scripts, outs)]
    threads.append(threading.Thread(target=bad))
    joined_together(batch, 4, threads)
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    batch.close()
    assert len(errors) == 1 and "index" in str(errors[0]).lower()
    for slot, (want, have) in enumerate(zip(expected, outs)):
        assert len(have) == len(want)
        for step, (w, h) in enumerate(zip(want, have)):
            torch.testing.assert_close(h, w, atol=2e-4, rtol=2e-4, msg=lambda m: f"slot {slot} step {step}: {m}")


def assert_every_slot_freed(batch) -> None:
    """A slot left during a step is freed right after that step: wait for that, then check."""
    deadline = time.monotonic() + WAIT
    while batch.slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batch.slots == []


@pytest.fixture(scope="module")
def default_models(default_model_dir):
    """The default model twice: batching three slots, and one stream at a time (the reference). In fp32 (not
    packed for the CPU int4 kernel): the int4 kernel's rounding differs with the number of rows, which turned one
    near-tie in these greedy replies."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    eos = [tokenizer.eos_token_id]
    made = {n: load_engine_model(default_model_dir, tokenizer=tokenizer, eos_token_ids=eos, context_length=512,
                                 loader="test", device="cpu", slots=n, repack_int4=False) for n in (3, 1)}
    yield made
    for model in made.values():
        model.unload()


def chat(model, text: str) -> Prompt:
    rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=False)
    return Prompt(text=rendered, ids=model.tokenizer.encode(rendered, add_special_tokens=False))


QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea."]
GREEDY = dict(temperature=0.0, max_new_tokens=32)


def alone(model, text: str, **params) -> DoneEvent:
    return collect(model.generate(chat(model, text), GenerationParams(**{**GREEDY, **params})))[1]


@pytest.fixture(scope="module")
def alone_replies(default_models) -> dict[str, str]:
    """Each question's greedy reply from the single-stream model: the reference several tests compare with,
    made once (an fp32 stream on CPU takes seconds per reply)."""
    return {q: alone(default_models[1], q).text for q in QUESTIONS}


def concurrently(scheduler: Scheduler, model, jobs: list[tuple[str, dict]]) -> list[list[object]]:
    """Submit every job, then read each handle in its own thread; returns each one's events."""
    handles = [scheduler.submit(lambda cancel, t=text, p=params: model.generate(
        chat(model, t), GenerationParams(**{**GREEDY, **p}), cancel), f"user{i}") for i, (text, params) in enumerate(jobs)]
    events = [[] for _ in handles]
    threads = [threading.Thread(target=lambda h=h, e=e: e.extend(h)) for h, e in zip(handles, events)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    return events


def staggered(scheduler: Scheduler, model, jobs: list[tuple[str, dict]]) -> list[list[object]]:
    """As `concurrently`, but job i + 1 starts once job i has its first text, and job i's reader waits for
    that before it reads on: the jobs hold rows 0, 1, 2 in order, so the first to end frees a row below
    another's (which then moves into it)."""
    started = [threading.Event() for _ in jobs]
    events = [[] for _ in jobs]

    def read(i: int, text: str, params: dict) -> None:
        if i:
            assert started[i - 1].wait(WAIT)
        handle = scheduler.submit(lambda cancel: model.generate(chat(model, text), GenerationParams(
            **{**GREEDY, **params}), cancel), f"user{i}")
        for event in handle:
            events[i].append(event)
            if isinstance(event, TextEvent) and not started[i].is_set():
                started[i].set()
                if i + 1 < len(jobs):
                    assert started[i + 1].wait(WAIT)
        started[i].set()

    threads = [threading.Thread(target=read, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    return events


def test_greedy_replies_of_three_concurrent_generations_equal_each_one_alone(default_models, alone_replies):
    batched = default_models[3]
    want = [alone_replies[q] for q in QUESTIONS]
    scheduler = Scheduler(slots=batched.concurrent_generations)
    events = concurrently(scheduler, batched, [(q, {}) for q in QUESTIONS])
    assert not any(isinstance(e, QueuedEvent) for run in events for e in run), "three slots: nobody waits"
    assert [run[-1].text for run in events] == want
    assert all(run[-1].reason in ("eos", "max_tokens") for run in events)
    assert batched.batch.widest >= 2
    assert batched.batch.slots == []   # every slot freed


def test_stop_strings_hold_per_slot(default_models, alone_replies):
    batched, single = default_models[3], default_models[1]
    plain = [alone_replies[q] for q in QUESTIONS[:2]]
    # A stop string from the middle of each reply, so each slot stops at its own place.
    stops = [text[len(text) // 2: len(text) // 2 + 4] for text in plain]
    assert all(stop.strip() for stop in stops)
    want = [alone(single, q, stop=[s]) for q, s in zip(QUESTIONS[:2], stops)]
    assert all(w.reason == "stop_string" for w in want)
    events = concurrently(Scheduler(slots=3), batched,
                          [(q, {"stop": [s]}) for q, s in zip(QUESTIONS[:2], stops)])
    for run, w, stop in zip(events, want, stops):
        done = run[-1]
        assert (done.reason, done.stop_string, done.text) == ("stop_string", stop, w.text)
        assert stop not in "".join(e.text for e in run if isinstance(e, TextEvent))


def test_a_cancelled_slot_frees_at_once_and_the_others_continue(default_models, alone_replies):
    """Two slots: A runs (its reader pauses), B is cancelled mid-reply, C takes B's slot and finishes while A
    waits, then A finishes: A and C equal their replies alone."""
    batched = default_models[3]
    scheduler = Scheduler(slots=2)
    work = lambda text: (lambda cancel: batched.generate(chat(batched, text), GenerationParams(**GREEDY), cancel))
    a = scheduler.submit(work(QUESTIONS[0]), "a")
    b = scheduler.submit(work(QUESTIONS[1]), "b")
    a_events = [next(e for e in a if isinstance(e, TextEvent))]   # A is decoding; its reader pauses here
    next(e for e in b if isinstance(e, TextEvent))
    assert b.cancel()
    assert list(b)[-1].reason == "cancelled"
    c = scheduler.submit(work(QUESTIONS[2]), "c")
    c_events = list(c)   # runs to its end while A's reader is paused: A's slot does not hold the step
    assert not any(isinstance(e, QueuedEvent) for e in c_events), "B's place was not given up"
    a_events += list(a)
    assert c_events[-1].text == alone_replies[QUESTIONS[2]]
    assert a_events[-1].text == alone_replies[QUESTIONS[0]]
    assert batched.batch.slots == []


def test_a_generation_admitted_as_another_ends_waits_for_that_slot_instead_of_failing(in_step_models, alone_replies):
    """Three slots, all taken: B ends while A and C decode, so its slot is freed after the step in progress.
    D, which the scheduler admits as B ends, waits for that step and takes B's slot (it failed with "all 3
    generation slots are taken" when it came within that step)."""
    batched = in_step_models[3]
    scheduler = Scheduler(slots=3)
    work = lambda text, **p: (lambda cancel: batched.generate(chat(batched, text),
                                                              GenerationParams(**{**GREEDY, **p}), cancel))
    a = scheduler.submit(work(QUESTIONS[0]), "a")
    b = scheduler.submit(work(QUESTIONS[1], max_new_tokens=3), "b")
    c = scheduler.submit(work(QUESTIONS[2]), "c")
    ended: dict[str, list] = {}
    readers = [threading.Thread(target=lambda n=n, h=h: ended.__setitem__(n, list(h))) for n, h in (("a", a), ("c", c))]
    for reader in readers:
        reader.start()
    assert list(b)[-1].reason == "max_tokens"
    d = list(scheduler.submit(work(QUESTIONS[1]), "d"))
    for reader in readers:
        reader.join(WAIT)
        assert not reader.is_alive()
    assert set(ended) == {"a", "c"}
    assert (d[-1].reason, d[-1].error) in (("eos", None), ("max_tokens", None))
    assert [d[-1].text, ended["a"][-1].text, ended["c"][-1].text] == [alone_replies[q] for q in
                                                                       (QUESTIONS[1], QUESTIONS[0], QUESTIONS[2])]
    assert_every_slot_freed(batched.batch)


@pytest.fixture(scope="module")
def in_step_models(default_model_dir, default_models):
    """The default model sampling inside its step (engine.graph_sampling, eagerly on CPU: the GPU's path), with
    three slots and with one."""
    from engine.runtime import EngineModel

    tokenizer = default_models[1].tokenizer

    def make(slots: int) -> EngineModel:
        model, _ = load_transformer(default_model_dir, CPU, torch.float32, repack_int4=False)
        engine = Engine(model, 512, use_graphs=False, prefill_chunk=512, sample_in_step=True, slots=slots)
        return EngineModel(default_model_dir, engine, tokenizer, default_models[1].eos_token_ids, 512, "test", "")

    made = {n: make(n) for n in (3, 1)}
    yield made
    for model in made.values():
        model.unload()


CHAT_SAMPLER = dict(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15)


def test_sampled_replies_drawn_in_each_slots_own_sampler_equal_each_one_alone(in_step_models):
    """Seeded chat-sampler replies of different lengths, concurrently: each slot's sampler keeps its own
    penalties and draws (also when a slot that ends hands its row to another), so each reply is the one its
    seed gives alone."""
    batched, single = in_step_models[3], in_step_models[1]
    jobs = [(q, dict(CHAT_SAMPLER, seed=11 + i, max_new_tokens=n)) for i, (q, n) in enumerate(zip(QUESTIONS, (16, 40, 32)))]
    assert single.engine.sampling_plan(GenerationParams(**{**GREEDY, **jobs[0][1]})) is not None
    want = [alone(single, q, **p).text for q, p in jobs]
    events = staggered(Scheduler(slots=3), batched, jobs)
    assert [run[-1].text for run in events] == want
    assert batched.batch.widest >= 2


def test_a_slot_sampling_in_the_step_runs_ahead_of_a_paused_reader_by_run_ahead_ids(in_step_models):
    """The driver feeds each id the step picks to the next step itself (engine.batch.RUN_AHEAD): while the
    reader pauses after its second text, the slot keeps stepping until RUN_AHEAD ids wait unread, and no further;
    the reply read afterwards is the one the seed gives alone."""
    from engine.batch import RUN_AHEAD

    batched, single = in_step_models[3], in_step_models[1]
    params = dict(CHAT_SAMPLER, seed=5, max_new_tokens=24)
    want = alone(single, QUESTIONS[0], **params).text
    events = batched.generate(chat(batched, QUESTIONS[0]), GenerationParams(**{**GREEDY, **params}))
    # Two texts read: the reader has handed its first id in (each later one the driver feeds itself).
    texts = [e for _, e in zip(range(2), (e for e in events if isinstance(e, TextEvent)))]
    slot = batched.batch.slots[0]
    deadline = time.monotonic() + WAIT
    while len(slot.picked) < RUN_AHEAD and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(slot.picked) == RUN_AHEAD
    filled = slot.filled
    time.sleep(1.0)   # a full queue: the slot waits for its reader
    assert slot.filled == filled and len(slot.picked) == RUN_AHEAD
    rest = list(events)
    assert "".join(e.text for e in texts + rest if isinstance(e, TextEvent)) == want
    assert isinstance(rest[-1], DoneEvent) and rest[-1].text == want


def test_run_ahead_stops_at_the_end_of_the_cache(in_step_models):
    """A slot that runs ahead of its reader never steps past the last cache position: replies that fill the
    whole 512-token context end there normally (no error from a write beyond the cache), alone and two at once."""
    batched = in_step_models[3]
    params = GenerationParams(**{**GREEDY, **CHAT_SAMPLER, "seed": 3, "max_new_tokens": 100})
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(100, 1000, (n,), generator=g).tolist() for n in (505, 500)]
    for together in (1, 2):
        results = [None] * together
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, collect(batched.generate(Prompt(text="", ids=prompts[i]), params)))) for i in range(together)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
        for (_, done, stats), prompt in zip(results, prompts):
            assert done.error is None, done.error
            assert done.reason in ("max_tokens", "eos") and stats.new_tokens <= 512 - len(prompt)
    assert_every_slot_freed(batched.batch)


def test_the_default_app_keeps_one_generation_at_a_time_on_cpu(default_models):
    single = default_models[1]
    assert single.concurrent_generations == 1 and single.batch is None
    assert "one stream at a time" in single.runtime
    assert "3 streams batched" in default_models[3].runtime


# ---- the scheduler's admission ------------------------------------------------------------------------

def blocking_work(started: list, release: threading.Event, name: str):
    def work(cancel):
        started.append(name)
        assert release.wait(WAIT)
        yield DoneEvent(reason="stop", text=name)
    return work


def test_a_line_with_slots_runs_that_many_at_once_and_an_exclusive_run_alone():
    scheduler = Scheduler(slots=1)
    scheduler.set_slots(2)
    started, release = [], threading.Event()
    handles = [scheduler.submit(blocking_work(started, release, "r1"), "u1"),
               scheduler.submit(blocking_work(started, release, "r2"), "u2"),
               scheduler.submit(blocking_work(started, release, "x"), "lora", exclusive=True),
               scheduler.submit(blocking_work(started, release, "r3"), "u3")]
    assert [h.position for h in handles] == [0, 0, 2, 3]   # the exclusive run waits for both, r3 for it
    results = {}
    threads = [threading.Thread(target=lambda h=h: results.update({h.owner: list(h)})) for h in handles]
    for t in threads:
        t.start()
    assert scheduler.wait_idle(0.5) is False
    assert sorted(started) == ["r1", "r2"]
    release.set()
    for t in threads:
        t.join(WAIT)
    assert started[2:] == ["x", "r3"]
    assert all(run[-1].reason == "stop" for run in results.values())


@needs_cuda
def test_batched_graph_decode_equals_eager_batched_decode_with_eight_slots(tmp_path):
    from engine.batch import BatchedStep

    save_tiny(tmp_path, "qwen2-gqa-tied")
    model, _ = load_transformer(tmp_path, [torch.device("cuda")], torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 96, (3 + 2 * i,), generator=g).tolist() for i in range(8)]
    results = {}
    for graphs in (False, True):
        engine = Engine(model, 64, use_graphs=graphs, prefill_chunk=4, slots=8)
        assert engine.slots == 8
        step = BatchedStep(engine)
        out = []
        with torch.inference_mode():
            for row, prompt in enumerate(prompts):
                engine.prefill_chunk_at(prompt, 0, row)
            positions = [len(p) for p in prompts]
            for i in range(6):
                # Rows 0..7 step together, then only some of them (the others pad), then three rows.
                live = range(8) if i < 3 else (range(0, 8, 2) if i < 5 else range(3))
                rows = 8 if i < 5 else 3
                stepping = {r: (torch.tensor(5 + r + i, device="cuda"), positions[r]) for r in live}
                logits = step(rows, stepping)
                out.append({r: logits[r].float().cpu() for r in live})
                for r in live:
                    positions[r] += 1
        results[graphs] = out
    for eager, graphed in zip(results[False], results[True]):
        for r in eager:
            torch.testing.assert_close(graphed[r], eager[r], atol=2e-2, rtol=2e-2)


@needs_cuda
def test_eight_slots_under_cuda_graphs_give_each_slot_its_single_stream_logits(tmp_path):
    """Nine teacher-forced scripts through eight slots, the batched steps replayed as graphs (row buckets 2, 4
    and 8, padding rows), joining and leaving mid-way: each slot's logits are its eager single-stream ones."""
    save_tiny(tmp_path, "qwen2-gqa-tied")
    model, _ = load_transformer(tmp_path, [torch.device("cuda")], torch.bfloat16)
    scripts = scripts_for(model.args.vocab_size, more=5)
    expected = [reference(model, prompt, forced) for prompt, forced in scripts]
    got = batched_logits(model, 8, scripts, graphs=True)
    for want, have in zip(expected, got):
        assert len(have) == len(want)
        for w, h in zip(want, have):
            torch.testing.assert_close(h.float(), w.float(), atol=3e-2, rtol=3e-2)


def test_a_prompt_the_model_cannot_run_fails_its_own_generation_and_frees_its_slot(default_models):
    """An id outside the vocabulary breaks the prefill in the batch's driver thread: that generation ends with
    the error (not a hang, not a retry loop), its slot is freed, and the batch serves the next one."""
    batched, single = default_models[3], default_models[1]
    vocab = batched.engine.model.args.vocab_size
    done = collect(batched.generate(Prompt(text="", ids=[1, 2, vocab + 5]), GenerationParams(**GREEDY)))[1]
    assert done.reason == "error" and "index" in done.error.lower()
    assert batched.batch.slots == []
    assert alone(batched, QUESTIONS[0]).text == alone(single, QUESTIONS[0]).text
