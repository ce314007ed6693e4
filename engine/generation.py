"""The decode loop every backend shares, and the typed events it yields.

A backend only has to say how to get next-token logits (`Stepper`): `start(prompt_ids)` runs the prompt
and returns the logits for the next position, `step(token_id)` appends one token and returns the next
logits. Sampling, stop strings, EOS, cancellation, text streaming and statistics live here, once. A backend
that can also pick the token inside its own step (engine.runtime under a CUDA graph) hands in a
`StepSampler` for the generations it can sample; the loop then only reads the chosen ids.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, Union

import torch

from engine.sampling import GenerationParams, Sampler, TokenControls, sequence_breaker_ids
from engine.stopping import IncrementalDecoder, StopStringFilter


@dataclass(frozen=True)
class QueuedEvent:
    """The generation waits for the model: `ahead` generations before it; 0 once its turn came after a wait.
    (Yielded by scheduler.RunHandle, which hands the model to one generation at a time.)"""
    ahead: int


@dataclass(frozen=True)
class TextEvent:
    """A piece of generated text, safe to show (never part of a stop string)."""
    text: str


@dataclass(frozen=True)
class TokenEvent:
    """One token's log-probability, yielded only when the params ask for logprobs (TokenControls), before the
    text the token makes. logprob: the model's log-softmax for `token_id` (None for a prompt's first token,
    which nothing predicts); top: the likeliest alternatives as (id, logprob), likeliest first; prompt: a prompt
    token scored for echo, not a generated one. End-of-sequence tokens are not reported (they make no text)."""
    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    prompt: bool = False


@dataclass(frozen=True)
class StatsEvent:
    prompt_tokens: int
    new_tokens: int
    seconds: float
    time_to_first_token: float
    tokens_per_second: float


@dataclass(frozen=True)
class DoneEvent:
    """The end of a generation. reason: eos | stop_string | max_tokens | cancelled | error."""
    reason: str
    text: str
    stop_string: str | None = None
    error: str | None = None
    seed: int | None = None


GenerationEvent = Union[QueuedEvent, TokenEvent, TextEvent, StatsEvent, DoneEvent]


class Stepper(Protocol):
    device: torch.device

    def start(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Run the prompt; return logits [V] for the position after it."""

    def step(self, token_id: torch.Tensor) -> torch.Tensor:
        """Append one token (0-d tensor on `device`); return logits [V] for the next position."""


class StepSampler(Protocol):
    """Sampling inside the backend's decode step, for one generation (its parameters are the backend's to
    check: it offers a StepSampler only for those it samples like engine.sampling.Sampler)."""

    def first(self, logits: torch.Tensor, history: torch.Tensor, seed: int) -> torch.Tensor:
        """Pick the token after the prompt from its logits [V]; history: the prompt's ids [T] on the device.
        Returns a 0-d id on the device, valid until the next `step` (which reads it)."""

    def step(self) -> torch.Tensor:
        """Append the token the last pick chose and pick the next; returns it as `first` does."""


class _Scores:
    """The log-probabilities of one position, taken before the sampler touches the logits. On a GPU they stay
    queued on the device until `event` reads them (after the per-token sync the loop makes anyway)."""

    def __init__(self, logits: torch.Tensor, token: torch.Tensor | int, k: int):
        logp = logits.float().log_softmax(-1)
        self.chosen = logp[token]
        self.top = logp.topk(k) if k > 0 else None

    def event(self, token_id: int, prompt: bool = False) -> TokenEvent:
        top = () if self.top is None else tuple(zip(self.top.indices.tolist(), self.top.values.tolist()))
        return TokenEvent(token_id, float(self.chosen), top, prompt)


def _bias(controls: TokenControls, eos: set[int], logits: torch.Tensor) -> torch.Tensor | None:
    """The [V] row added to every position's logits: logit_bias, and -inf on EOS when it is banned."""
    values = dict(controls.logit_bias)
    if controls.ban_eos:
        values.update({token_id: float("-inf") for token_id in eos})
    if not values:
        return None
    bias = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
    bias[torch.tensor(list(values), dtype=torch.long, device=logits.device)] = torch.tensor(
        list(values.values()), dtype=torch.float32, device=logits.device)
    return bias


def stream(stepper: Stepper, tokenizer, prompt_ids: Sequence[int], params: GenerationParams,
           eos_token_ids: Sequence[int], cancel: threading.Event | None = None,
           context_length: int | None = None,
           step_sampler: StepSampler | None = None) -> Iterator[GenerationEvent]:
    """Generate up to `params.max_new_tokens` tokens, yielding text pieces, then stats, then done. With
    TokenControls params it also honours their logit bias, bans and special-token choice, and yields a
    TokenEvent per token (prompt tokens first, when asked) ahead of its text. step_sampler: the stepper's own
    sampling for these params (None: engine.sampling.Sampler after each step)."""
    controls = params if isinstance(params, TokenControls) else None
    k = (controls.logprobs or 0) if controls is not None else 0
    scoring = controls is not None and controls.logprobs is not None
    score_prompt = scoring and controls.prompt_logprobs
    special = set(tokenizer.all_special_ids) \
        if controls is not None and controls.skip_special_tokens else set()
    t0 = time.perf_counter()
    decoder = IncrementalDecoder(tokenizer)
    stops = StopStringFilter(list(params.stop))
    text_parts: list[str] = []
    max_new = 0 if controls is not None and controls.score_only else params.max_new_tokens
    if context_length:
        max_new = min(max_new, max(context_length - len(prompt_ids), 0))
    eos = set(int(i) for i in eos_token_ids)
    sampler = Sampler(params, device=stepper.device, breakers=sequence_breaker_ids(params, tokenizer))
    history = torch.tensor(list(prompt_ids), dtype=torch.long, device=stepper.device)
    history = torch.cat([history, torch.empty(max_new, dtype=torch.long, device=stepper.device)])
    n_prompt = len(prompt_ids)
    reason, n_new, ttft = "max_tokens", 0, 0.0

    def finish(reason: str, error: str | None = None) -> Iterator[GenerationEvent]:
        tail = stops.flush()
        if tail:
            text_parts.append(tail)
            yield TextEvent(tail)
        elapsed = time.perf_counter() - t0
        decode_time = elapsed - ttft
        tps = (n_new - 1) / decode_time if n_new > 1 and decode_time > 0 else 0.0
        yield StatsEvent(prompt_tokens=n_prompt, new_tokens=n_new, seconds=elapsed,
                         time_to_first_token=ttft, tokens_per_second=tps)
        yield DoneEvent(reason=reason, text="".join(text_parts), stop_string=stops.stopped_on, error=error,
                        seed=sampler.seed)

    if max_new <= 0 and not score_prompt:
        yield from finish("max_tokens")
        return
    try:
        with torch.inference_mode():
            if cancel is not None and cancel.is_set():
                yield from finish("cancelled")
                return
            # On a GPU the next step is queued before the chosen id is read back, so the GPU computes it while
            # Python turns the id into text (only the reply's last queued step is wasted). The id travels
            # through pinned memory and an event, so the read waits for the sampler, not for that step.
            overlap = torch.device(stepper.device).type == "cuda"
            token_host = torch.empty((), dtype=torch.long, pin_memory=True) if overlap else None
            if score_prompt:
                # Feed the prompt one token at a time, so each position's logits score the token that follows.
                yield TokenEvent(int(prompt_ids[0]), None, (), prompt=True)
                logits = stepper.start(list(prompt_ids[:1]))
                for token_id in prompt_ids[1:]:
                    yield _Scores(logits, int(token_id), k).event(int(token_id), prompt=True)
                    logits = stepper.step(torch.tensor(int(token_id), dtype=torch.long, device=stepper.device))
                if max_new <= 0:
                    yield from finish("max_tokens")
                    return
            else:
                logits = stepper.start(prompt_ids)
                if cancel is not None and cancel.is_set():   # Stop pressed while the prompt was processed
                    yield from finish("cancelled")
                    return
            constraint = None
            if controls is not None:
                sampler.bias = _bias(controls, eos, logits)
                if controls.grammar is not None:
                    from engine.grammar import Constraint   # only grammar requests need llguidance loaded
                    constraint = Constraint(tokenizer, sorted(eos), controls.grammar)
            # `ahead`: what the last step left, the logits for the shared sampler or the token the step picked.
            ahead = logits if step_sampler is None else step_sampler.first(logits, history[:n_prompt], sampler.seed)
            advance = stepper.step if step_sampler is None else lambda _token: step_sampler.step()
            while True:
                if step_sampler is None:
                    allowed = ahead if constraint is None else constraint.mask(ahead)
                    token = sampler(allowed, history[: n_prompt + n_new])
                    history[n_prompt + n_new] = token
                else:
                    token = ahead   # the step sampler keeps its own history
                scores = _Scores(ahead, token, k) if scoring else None
                # A token already on the host (engine.batch copies picks out behind their own event) needs no
                # overlap: reading it waits for nothing.
                queued = overlap and token.is_cuda and n_new + 1 < max_new
                if queued:
                    token_host.copy_(token, non_blocking=True)
                    chosen = torch.cuda.Event()
                    chosen.record()
                    ahead = advance(token)
                    chosen.synchronize()
                    token_id = int(token_host)  # the one host sync per token
                else:
                    token_id = int(token)  # the one host sync per token
                if constraint is not None:
                    constraint.accept(token_id)
                if n_new == 0:
                    ttft = time.perf_counter() - t0
                n_new += 1
                if token_id in eos:
                    reason = "eos"
                    break
                if scores is not None:
                    yield scores.event(token_id)
                shown = stops.push("" if token_id in special else decoder.push(token_id))
                if shown:
                    text_parts.append(shown)
                    yield TextEvent(shown)
                if stops.stopped_on is not None:
                    reason = "stop_string"
                    break
                if n_new >= max_new:
                    reason = "max_tokens"
                    break
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if not queued:
                    ahead = advance(token)
    except torch.OutOfMemoryError:
        yield from finish("error", "out of memory while generating: shorten the prompt or max_new_tokens")
        return
    except Exception as exc:  # the backend broke mid-reply: report it, keep the app and the text so far
        yield from finish("error", f"{type(exc).__name__}: {exc}")
        return
    yield from finish(reason)


def collect(events: Iterator[GenerationEvent]) -> tuple[str, DoneEvent, StatsEvent | None]:
    """Drain a generation; returns (text, done, stats)."""
    stats = None
    done = None
    for ev in events:
        if isinstance(ev, StatsEvent):
            stats = ev
        elif isinstance(ev, DoneEvent):
            done = ev
    assert done is not None, "a generation always ends with a DoneEvent"
    return done.text, done, stats
