"""Several generations in one decode step: the slots, the thread that steps them, and each generation's
Stepper over its slot.

Decode reads every weight once per step whatever the number of rows (the int4 kernel takes up to 8), so
concurrent generations cost little more than one when they share the step. A `Batch` owns the engine for
that: up to `engine.slots` generations each hold a slot, a row of the KV cache with its own position. One
driver thread runs the model; each generation's own thread runs engine.generation.stream over a
`SlotStepper`, which hands the driver the slot's next token and waits for the logits of its row. Stop
strings, cancellation and statistics stay in each generation's stream, so every slot keeps its own. So does
sampling: where the engine samples inside its step (engine.graph_sampling), each slot has a GraphSampler of
its own, the driver picks each slot's token after the step, and the host reads back only the ids; other
parameters keep the shared sampler in the generation's thread.

Rows stay compact (the slots in use are rows 0..n-1): a slot that ends hands its row to the last slot, whose
filled part of the cache moves over. A step then always covers rows 0..n-1, and one slot alone runs the
engine's single-stream step (the same graph) in row 0.

The driver's turns: a newcomer's prompt runs one prefill chunk at a time, alternating with decode steps of
the running slots, so they stall by one chunk at most. Newcomers that wait together (in rows that follow one
another) share a chunk's forward pass, which reads the weights once for all of their prompts. A decode step
waits until every decoding slot has handed its token in, but not longer than STRAGGLER_WAIT seconds after the
first: a slot whose reader paused misses steps rather than stalling the others (its position does not move;
rows not stepping are padding), and steps stop waiting for it until it hands a token in again.

A slot that samples in the step runs ahead of its reader: the id a step picks is already on the device, so the
driver feeds it to the next step itself and queues it for the reader, up to RUN_AHEAD ids unread. The GPU then
never waits for the readers' host work (detokenizing, stop strings, streaming), which 8 readers do one at a
time under Python's lock; a reader that stops leaves at most RUN_AHEAD - 1 steps' picks unread. The driver
also copies each step's ids to the host behind an event of their own, so a reader waits for its step only,
not for the steps queued after it (a sync on the stream would), and each slot goes through the driver, even
alone: its thread's host work then overlaps the next step.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from engine.generation import GenerationEvent, stream
from engine.graph_sampling import GraphSampler, Plan
from engine.sampling import GenerationParams

STRAGGLER_WAIT = 0.05
RUN_AHEAD = 3             # picked ids a slot's driver may queue ahead of its reader
ROW_BUCKETS = (2, 4, 8)   # rows of a captured batched step: a batch is rounded up to one (padding rows ignored)


@dataclass(frozen=True)
class Pick:
    """An id a step picked for a slot, on the host once `ready` has happened (None: at once, on CPU)."""
    on_host: torch.Tensor     # 0-d, CPU
    ready: torch.cuda.Event | None

    def take(self) -> torch.Tensor:
        """The id on the host, after its step (and only it) has finished."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.on_host


@dataclass(eq=False)
class Slot:
    row: int
    cancel: threading.Event | None
    pending: list[int]                  # prompt ids not prefilled yet
    filled: int = 0                     # cache positions written (the next token goes at this position)
    token: torch.Tensor | None = None   # handed in (0-d, on the device), waiting for a step
    since: float = 0.0                  # when it was handed in
    result: torch.Tensor | None = None  # logits [V] (no plan), waiting to be taken
    plan: Plan | None = None            # how its GraphSampler picks; None: the shared sampler, from logits
    picked: deque = field(default_factory=deque)   # with a plan: Picks not yet taken by the reader
    unfed: torch.Tensor | None = None   # with a plan: the last id picked, not yet a step's input (queue full)
    error: BaseException | None = None
    left: bool = False
    lagging: bool = False               # missed a step for want of its token: steps no longer wait for it


class BatchedStep:
    """The decode step over rows 0..n-1 of the cache, each at its own position: eagerly, or by replaying a
    graph captured per (cache bucket, row bucket)."""

    def __init__(self, engine):
        self.engine = engine
        device = engine.device
        # Static inputs the graphs read. A padding row writes its K/V at the cache's last position, which no
        # live row reads before writing it itself (a row attends only up to its own position).
        self.tokens = torch.zeros((engine.slots, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((engine.slots, 1), dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, rows: int, stepping: dict[int, tuple[torch.Tensor, int]]) -> torch.Tensor:
        """stepping: {row: (token 0-d on the device, its position)} for the rows that advance, all below
        `rows`. Returns fp32 logits [rows, V] (a fresh tensor: graphs' outputs are copied out)."""
        engine = self.engine
        n = next(b for b in ROW_BUCKETS + (engine.slots,) if b >= rows) if engine.use_graphs else rows
        n = min(n, engine.slots)
        # Row by row, with device copies and fills of host numbers: a tensor made from a host list would be
        # copied from pageable memory, which waits for the GPU to finish the queued steps.
        self.positions[:n].fill_(engine.max_seq_len - 1)
        for row, (token, pos) in stepping.items():
            self.tokens[row].copy_(token.view(1))
            self.positions[row].fill_(pos)
        kv_len = max(pos for _, pos in stepping.values()) + 1
        if not engine.use_graphs:
            return engine.model(self.tokens[:n], self.positions[:n], kv_len=kv_len)[:rows, -1]
        key = (engine.bucket(kv_len), n)
        if key not in self.graphs:
            self.graphs[key] = engine.capture(
                lambda: engine.model(self.tokens[:n], self.positions[:n], kv_len=key[0]))
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:rows, -1].clone()


@dataclass(eq=False)
class Batch:
    """The slots of one engine and the driver thread that steps them (started with the first slot)."""
    engine: object
    slots: list[Slot] = field(default_factory=list)   # index == row
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False
    widest: int = 0   # the most slots one decode step has advanced so far (reported by bench/engine.py)
    widest_prefill: int = 0   # the most prompts one prefill pass has taken so far (likewise)
    busy: bool = False   # a step or chunk is running (in the driver, or inline in a lone slot's thread)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.step = BatchedStep(self.engine)
        # One in-step sampler per row, row 0's the engine's own (its single-stream step picks with it).
        sampler = self.engine.sampler
        self.samplers = None if sampler is None else [sampler] + [
            GraphSampler(sampler.vocab, sampler.capacity, sampler.device) for _ in range(self.engine.slots - 1)]

    def stream(self, tokenizer, prompt_ids: Sequence[int], params: GenerationParams, eos_token_ids: Sequence[int],
               cancel: threading.Event | None, context_length: int | None) -> Iterator[GenerationEvent]:
        """One generation's events (engine.generation.stream) over a slot of this batch; the slot is freed
        as soon as the generation ends, however it ends (closing the iterator too)."""
        stepper = SlotStepper(self, cancel)
        try:
            yield from stream(stepper, tokenizer, prompt_ids, params, eos_token_ids, cancel, context_length,
                              stepper.sampling(params))
        finally:
            stepper.leave()

    def close(self) -> None:
        """End the driver (after the step in progress) and wait for it; generations still waiting on it fail
        with an error."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ---- called from generation threads ---------------------------------------------------------------
    def join(self, prompt_ids: Sequence[int], cancel: threading.Event | None) -> tuple[Slot, torch.Tensor]:
        """Take a slot for a prompt; returns it with the logits after the prompt once it is prefilled."""
        with self.cond:
            # A generation that ended leaves its slot to be freed after the step in progress, and the scheduler
            # may have admitted this one in its place already: wait for that step, not fail.
            while not self.closed and len(self.slots) >= self.engine.slots and any(s.left for s in self.slots):
                if self.busy:
                    self.cond.wait()
                else:
                    self._free_left()
            if self.closed:
                raise RuntimeError("the model was unloaded")
            if len(self.slots) >= self.engine.slots:   # the scheduler admits no more than there are slots
                raise RuntimeError(f"all {self.engine.slots} generation slots are taken")
            slot = Slot(row=len(self.slots), cancel=cancel, pending=list(prompt_ids))
            self.slots.append(slot)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drive, name="hearth-batch", daemon=True)
                self._thread.start()
            self.cond.notify_all()
            return slot, self._result(slot)

    def first_pick(self, slot: Slot, params: GenerationParams, plan: Plan, logits: torch.Tensor,
                   history: torch.Tensor, seed: int) -> torch.Tensor:
        """Load a prefilled slot's generation into its row's sampler and pick its first token from `logits`;
        from then on each step picks for it (`advance` returns ids)."""
        with self.cond:   # the driver moves rows under the lock only, and never picks for a slot not stepping
            sampler = self.samplers[slot.row]
            sampler.start(params, plan, history, seed)
            sampler.before_pick(plan)
            slot.plan = plan
            return sampler.pick(logits, plan)

    def advance(self, slot: Slot, token: torch.Tensor) -> torch.Tensor:
        """Hand in the slot's next token; returns what the step after it gives the slot: logits [V], or with
        a plan the next picked id, on the host (the driver has then fed `token`, the id picked before, in
        already)."""
        with self.cond:
            if slot.plan is not None:
                if not (slot.picked or slot.token is not None or slot.unfed is not None):   # the first pick
                    slot.token, slot.since, slot.lagging = token, time.monotonic(), False
                    self.cond.notify_all()
                pick = self._next_picked(slot)
            else:
                pick = None
                slot.token, slot.since, slot.lagging = token, time.monotonic(), False
                if len(self.slots) > 1 or self.busy or self.closed:
                    self.cond.notify_all()
                    return self._result(slot)
                self.busy = True
        if pick is not None:
            return pick.take()   # outside the lock: the driver goes on meanwhile
        # Alone and without a plan, with nothing else to run: the step runs in this thread, without waking the
        # driver and back (two thread switches a token, which single-stream decode would feel).
        try:
            self._decode([slot])
        except BaseException:
            slot.token = None
            raise
        finally:
            with self.cond:
                self.busy = False
                self.cond.notify_all()
        with self.cond:
            return self._result(slot)

    def leave(self, slot: Slot) -> None:
        """Free the slot now; while a step runs, the driver frees it right after that step."""
        with self.cond:
            slot.left = True
            if not self.busy:
                self._free_left()
            self.cond.notify_all()

    def _result(self, slot: Slot) -> torch.Tensor:
        self.cond.wait_for(lambda: slot.result is not None or slot.error is not None or self.closed)
        if slot.error is not None:
            raise slot.error
        if slot.result is None:
            raise RuntimeError("the model was unloaded")
        result, slot.result = slot.result, None
        return result

    def _next_picked(self, slot: Slot) -> Pick:
        """Under the lock: the oldest pick queued for the slot's reader; a pick held back for want of room goes
        to the next step."""
        self.cond.wait_for(lambda: slot.picked or slot.error is not None or self.closed)
        if slot.error is not None:
            raise slot.error
        if not slot.picked:
            raise RuntimeError("the model was unloaded")
        if slot.unfed is not None and self._room(slot):
            slot.token, slot.since, slot.lagging, slot.unfed = slot.unfed, time.monotonic(), False, None
            self.cond.notify_all()
        return slot.picked.popleft()

    # ---- the driver thread ----------------------------------------------------------------------------
    def _drive(self) -> None:
        last_was_decode = False
        with torch.inference_mode():
            while True:
                with self.cond:
                    job = self._next_job(last_was_decode)
                    if job is None:
                        return
                    self.busy = True
                try:
                    kind, slots = job
                    if kind == "prefill":
                        self._prefill(slots)
                        last_was_decode = False
                    else:
                        self._decode(slots)
                        last_was_decode = True
                except Exception as exc:   # e.g. out of memory: those slots' generations end with it
                    with self.cond:
                        for slot in slots:
                            # freed now: a prompt that failed must not be retried chunk after chunk
                            slot.error, slot.token, slot.left = exc, None, True
                finally:
                    with self.cond:
                        self.busy = False
                        self.cond.notify_all()

    def _next_job(self, last_was_decode: bool) -> tuple[str, list[Slot]] | None:
        """Under the lock: wait for work; ("prefill", newcomers) to prefill a chunk of each, or ("decode",
        slots) to step; None once closed."""
        while not self.closed:
            if self.busy:   # a lone slot steps in its own thread: rows must not move meanwhile
                self.cond.wait()
                continue
            self._free_left()
            newcomers = self._newcomers()
            newcomer = newcomers[0] if newcomers else None
            decoding = [s for s in self.slots if not s.pending and s.filled]
            ready = [s for s in decoding if s.token is not None]
            awaited = [s for s in decoding if s.token is None and not s.lagging]
            if ready and not awaited and not (newcomer is not None and last_was_decode):
                return "decode", ready
            if newcomer is not None:
                return "prefill", newcomers
            waited = time.monotonic() - min((s.since for s in ready), default=time.monotonic())
            if ready and waited >= STRAGGLER_WAIT:
                for slot in awaited:   # a reader that paused costs the others one wait, not one a step
                    slot.lagging = True
                return "decode", ready
            self.cond.wait(STRAGGLER_WAIT - waited if ready else None)
        for slot in self.slots:
            slot.error = RuntimeError("the model was unloaded")
        self.cond.notify_all()
        return None

    def _free_left(self) -> None:
        """Under the lock, no step running: give up the rows of slots that ended; the last slot moves into each
        freed row."""
        while True:
            while self.slots and self.slots[-1].left:
                self.slots.pop()
            hole = next((s for s in self.slots if s.left), None)
            if hole is None:
                return
            last = self.slots.pop()
            self._move(last, hole.row)
            self.slots[hole.row] = last

    def _move(self, slot: Slot, row: int) -> None:
        filled = slot.filled
        for layer in self.engine.model.layers:
            cache = layer.attention.kv_cache
            cache.k_all[row, :, :filled].copy_(cache.k_all[slot.row, :, :filled])
            cache.v_all[row, :, :filled].copy_(cache.v_all[slot.row, :, :filled])
        if slot.plan is not None:
            self.samplers[row].load(self.samplers[slot.row])
        slot.row = row

    def _newcomers(self) -> list[Slot]:
        """Under the lock: the slots whose prompts are not all in, from the first of them on while their rows
        follow one another (one forward pass takes a run of rows)."""
        first = next((row for row, s in enumerate(self.slots) if s.pending), None)
        if first is None:
            return []
        run = []
        for slot in self.slots[first:]:
            if not slot.pending:
                break
            run.append(slot)
        return run

    def _prefill(self, slots: list[Slot]) -> None:
        """A chunk of each newcomer's prompt, all in one forward pass (engine.Engine.prefill_rows); together they
        take at most the engine's prefill chunk of positions, as one newcomer alone does. Where the shared pass
        fails (a prompt the model cannot run, too little memory for all of them), each runs alone, so only the
        newcomer that cannot run ends with the error."""
        try:
            self._prefill_pass(slots)
            return
        except Exception:
            if len(slots) == 1:
                raise   # the driver ends this slot's generation with it
        for slot in slots:   # each alone: the failure stays with the one that fails alone
            try:
                self._prefill_pass([slot])
            except Exception as exc:
                with self.cond:
                    slot.error, slot.token, slot.left = exc, None, True
                    self.cond.notify_all()

    def _prefill_pass(self, slots: list[Slot]) -> None:
        size = max(1, self.engine.prefill_chunk // len(slots))
        chunks = [(slot.pending[:size], slot.filled) for slot in slots]
        logits = self.engine.prefill_rows(chunks, slots[0].row)
        with self.cond:
            self.widest_prefill = max(self.widest_prefill, len(slots))
            for slot, (ids, _), after in zip(slots, chunks, logits):
                slot.filled += len(ids)
                del slot.pending[:len(ids)]
                if slot.cancel is not None and slot.cancel.is_set():
                    slot.pending.clear()   # Stop during the prompt: the stream sees the flag and ends the reply
                if not slot.pending:
                    slot.result = after
            self.cond.notify_all()

    def _decode(self, ready: list[Slot]) -> None:
        engine = self.engine
        if len(self.slots) == 1:   # alone: exactly the single-stream step, in row 0
            (slot,) = ready
            if slot.plan is not None:
                engine.token.copy_(slot.token.view(1, 1))
                # a copy: the token buffer is the next step's input, and the reader may take this id later
                results = [engine.decode_and_pick(slot.filled, slot.plan).clone()]
            else:
                results = [engine.decode(slot.token, slot.filled).clone()]
        else:
            logits = self.step(len(self.slots), {s.row: (s.token, s.filled) for s in ready})
            results = [logits[s.row] if s.plan is None else self._pick(s, logits[s.row]) for s in ready]
        picks = self._to_host([r for s, r in zip(ready, results) if s.plan is not None])
        with self.cond:
            self.widest = max(self.widest, len(ready))
            now = time.monotonic()
            for slot, result in zip(ready, results):
                slot.token = None
                slot.filled += 1
                if slot.plan is None:
                    slot.result = result
                    continue
                slot.picked.append(picks.pop(0))   # and, room permitting, the next step's input: see RUN_AHEAD
                if len(slot.picked) < RUN_AHEAD and self._room(slot):
                    slot.token, slot.since = result, now
                else:
                    slot.unfed = result
            self.cond.notify_all()

    def _room(self, slot: Slot) -> bool:
        """Whether another step of the slot picks a token the context can hold: the step at position p picks
        the token at p + 1, which must be below max_seq_len (the cache and the in-step sampler's history hold
        that many). A reader asks for no token past the context; a slot running ahead of it would step on, and
        the failing step would end every generation in it."""
        return slot.filled + 1 < self.engine.max_seq_len

    @staticmethod
    def _to_host(ids: list[torch.Tensor]) -> list[Pick]:
        """The step's picked ids (0-d, on the device) as Picks: one copy to pinned memory for all of them and
        an event after it (CPU: the ids themselves)."""
        if not ids or not ids[0].is_cuda:
            return [Pick(i, None) for i in ids]
        host = torch.empty(len(ids), dtype=torch.long, pin_memory=True)
        host.copy_(torch.stack(ids), non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return [Pick(host[n], ready) for n in range(len(ids))]

    def _pick(self, slot: Slot, logits: torch.Tensor) -> torch.Tensor:
        """The slot's next id from its row's logits, by its own sampler (eagerly, after the batched step)."""
        sampler = self.samplers[slot.row]
        sampler.before_pick(slot.plan)
        return sampler.pick(logits, slot.plan)


class SlotStepper:
    """engine.generation.Stepper over one slot of a Batch; the slot is taken at `start`."""

    def __init__(self, batch: Batch, cancel: threading.Event | None):
        self.batch, self.cancel = batch, cancel
        self.device = batch.engine.device
        self.slot: Slot | None = None

    def start(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        limit = self.batch.engine.max_seq_len
        if not prompt_ids:
            raise ValueError("the prompt is empty: the model needs at least one token to continue from")
        if len(prompt_ids) >= limit:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) does not fit the context ({limit} tokens)")
        self.slot, logits = self.batch.join(prompt_ids, self.cancel)
        return logits

    def step(self, token_id: torch.Tensor) -> torch.Tensor:
        return self.batch.advance(self.slot, token_id)

    def sampling(self, params: GenerationParams) -> "SlotSampling | None":
        """This generation's sampling by its slot's GraphSampler (engine.generation.StepSampler), or None when
        the shared sampler takes it."""
        plan = self.batch.engine.sampling_plan(params)
        return None if plan is None else SlotSampling(self, params, plan)

    def leave(self) -> None:
        if self.slot is not None:
            self.batch.leave(self.slot)


class SlotSampling:
    """engine.generation.StepSampler over a SlotStepper: the slot's GraphSampler picks each token."""

    def __init__(self, stepper: SlotStepper, params: GenerationParams, plan: Plan):
        self.stepper, self.params, self.plan = stepper, params, plan
        self.last: torch.Tensor | None = None   # the id picked last, which the next step appends

    def first(self, logits: torch.Tensor, history: torch.Tensor, seed: int) -> torch.Tensor:
        stepper = self.stepper
        self.last = stepper.batch.first_pick(stepper.slot, self.params, self.plan, logits, history, seed)
        return self.last

    def step(self) -> torch.Tensor:
        self.last = self.stepper.batch.advance(self.stepper.slot, self.last)
        return self.last
