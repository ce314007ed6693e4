"""The sampler inside the captured decode step: the shared sampler's penalties, temperature, top_k, top_p,
typical_p, min_p and draw (engine.sampling), written so that a CUDA graph can hold them.

What makes it graph-safe: every op's shape is fixed by the vocabulary and the Plan, never by the data (no
unique(), no boolean indexing, no nonzero()), the parameters are device tensors written before the step, and
nothing is read back to the host but the chosen id, by the caller. The same ops run on CPU, where the tests
compare this sampler with the shared one.

- Penalties: a per-token count buffer of the penalty window, updated in place as each id is appended (the id
  that leaves the window is subtracted), instead of unique()/bincount over the history every token.
- Truncation that needs an order (top_p, typical_p) works on a sorted list of candidates. With top_k on, the
  list is the CANDIDATES (1024) largest logits, from torch.topk: top_k keeps the k largest logits and every
  logit equal to the k-th, k is at most 1000 (the option's bound), and top_p, typical_p and min_p only ever
  drop tokens top_k kept, so every token the shared sampler can keep is among the candidates. The one
  exception is a row in which more than 1024 - k + 1 finite logits tie exactly with the k-th largest: then
  only 1024 of the tied tokens are candidates (the shared sampler's own choice among tied tokens already
  depends on sort order there). Without top_k the list is the whole vocabulary (a full sort, still a fixed
  shape); with neither top_k, top_p nor typical_p nothing is sorted.
- The draw: an exponential race, argmax(p_i / E_i) with E_i ~ Exp(1) independent, picks i with probability
  p_i, the distribution torch.multinomial draws from. E comes from a buffer that the seeded generator refills,
  NOISE_ROWS steps at a time, between steps (outside the graph): the seed decides the ids, and the graph
  holds no generator state of its own. E is read by token id, not by place in the candidate list, so the
  draw does not depend on how a sort orders tied candidates (torch's and the kernels' orders differ).
- On CUDA, plans with a `bound` run engine.sampling_kernel's two Triton kernels instead of these ops (~35
  small kernels, torch.topk over the vocabulary on one row among them: ~0.15 ms of a ~2 ms 7B step on an
  H200, chat sampler). bound: the candidates the kernels keep, a power of two of at least 2 * top_k and at
  most MAX_BOUND (so top_k up to MAX_BOUND / 2); greedy with penalties: 1 (an argmax). Their one difference
  from the ops above: the list holds k - 1 larger values and bound - k + 1 ties with the k-th, so a row with
  more ties than that (45 at top_k 20, bound 64) keeps only those. Plans without top_k (top_p, typical_p or
  min_p over the whole vocabulary) keep the torch ops, as does greedy without penalties (one argmax kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import sampling_kernel
from engine.sampling import GenerationParams, TokenControls

CANDIDATES = 1024
MAX_BOUND = 256     # the kernels' largest candidate list (typical_p compares every pair of it)
NOISE_ROWS = 16     # steps of noise drawn at a time: a [16, V] fp32 buffer (2 MiB at a 32k vocabulary)


def unsupported(params: GenerationParams) -> str | None:
    """Why this generation's sampling cannot run inside the decode step (it then keeps the shared sampler), or
    None when it can."""
    p = params
    if isinstance(p, TokenControls):
        if p.grammar is not None:
            return "a grammar"
        if p.logprobs is not None or p.prompt_logprobs or p.score_only:
            return "logprobs"   # they need the raw logits of every position on the host
        if p.logit_bias or p.ban_eos:
            return "logit_bias"
        if p.temperature_last and p.temperature > 0:
            return "temperature_last"
    if p.dry_multiplier > 0:
        return "DRY"
    if p.temperature <= 0:
        return None   # greedy: the shared sampler takes the argmax before any of the samplers below
    extras = {"mirostat": p.mirostat_mode != 0, "XTC": p.xtc_probability > 0, "top_n_sigma": p.top_n_sigma > 0,
              "dynamic_temperature": p.dynamic_temperature, "smoothing_factor": p.smoothing_factor > 0}
    return next((name for name, on in extras.items() if on), None)


@dataclass(frozen=True)
class Plan:
    """Which ops a generation's step runs: the part of the parameters that shapes a captured graph (one graph
    per plan and cache bucket). The values (temperature, k, p, penalties) are tensors the graph reads."""
    greedy: bool
    penalties: bool
    top_k: bool
    top_p: bool
    typical_p: bool
    min_p: bool
    candidates: int   # length of the sorted candidate list; 0: no sort, the whole vocabulary in id order
    bound: int = 0    # candidates the CUDA kernels keep (1: greedy's argmax); 0: the torch ops everywhere

    @staticmethod
    def of(params: GenerationParams, vocab: int) -> "Plan":
        """The plan for params that `unsupported` accepts, over a vocabulary of `vocab` tokens."""
        p = params
        penalties = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        if p.temperature <= 0:
            return Plan(True, penalties, False, False, False, False, 0, 1 if penalties else 0)
        top_k = 0 < p.top_k < vocab
        top_p, typical_p = p.top_p < 1.0, p.typical_p < 1.0
        if top_k and p.top_k <= CANDIDATES:
            candidates = min(CANDIDATES, vocab)
        else:
            candidates = vocab if top_k or top_p or typical_p else 0
        # Twice k: ties with the k-th beyond the list are that much rarer; a few bounds, so a few graphs.
        bound = max(32, 1 << (2 * p.top_k - 1).bit_length()) if top_k else 0
        bound = bound if bound <= min(MAX_BOUND, vocab) else 0
        return Plan(False, penalties, top_k, top_p, typical_p, p.min_p > 0.0, candidates, bound)


class GraphSampler:
    """One engine's in-step sampler: its buffers keep their addresses from one generation to the next, so the
    graphs captured over them stay valid; `start` loads a generation into them."""

    def __init__(self, vocab: int, capacity: int, device: torch.device, kernels: bool | None = None):
        """vocab: logits per row; capacity: the most ids a history holds (the context length); kernels: pick
        with engine.sampling_kernel where the plan has a bound (None: on CUDA; tests set it under Triton's
        interpreter)."""
        self.vocab, self.capacity, self.device = vocab, capacity, device
        self.kernels = device.type == "cuda" if kernels is None else kernels
        scalar = lambda value, dtype=torch.float32: torch.full((), value, dtype=dtype, device=device)
        self.history = torch.zeros(capacity, dtype=torch.long, device=device)
        self.length = scalar(0, torch.long)             # ids in history
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)   # of each id in the window
        self.window = scalar(capacity + 1, torch.long)  # penalty window; beyond capacity: the whole history
        self.repetition = scalar(1.0)
        self.presence = scalar(0.0)
        self.frequency = scalar(0.0)
        self.temperature = scalar(1.0)
        self.top_k = scalar(1, torch.long)
        self.top_p = scalar(1.0)
        self.typical_p = scalar(1.0)
        self.min_p = scalar(0.0)
        self.noise = torch.ones(NOISE_ROWS, vocab, dtype=torch.float32, device=device)
        self.row = scalar(0, torch.long)                # the noise row the next pick reads
        self.one = torch.ones(1, device=device)
        self.first = torch.zeros(1, dtype=torch.long, device=device)   # index 0: `x[0] = v` would copy v in
        self.generator = torch.Generator(device=device)
        self.picks = 0                                  # picks queued since `start` (host side)

    def start(self, params: GenerationParams, plan: Plan, history: torch.Tensor, seed: int) -> None:
        """Load one generation: its parameters and their plan, its history so far ([T] ids on the device) and
        its seed."""
        p = params
        for buffer, value in ((self.repetition, p.repetition_penalty), (self.presence, p.presence_penalty),
                              (self.frequency, p.frequency_penalty), (self.temperature, p.temperature),
                              (self.top_k, p.top_k), (self.top_p, p.top_p), (self.typical_p, p.typical_p),
                              (self.min_p, p.min_p)):
            buffer.fill_(value)
        window = p.repetition_penalty_range
        self.window.fill_(window if window > 0 else self.capacity + 1)
        self.counts.zero_()
        if plan.penalties:   # the history and counts serve the penalties only
            n = history.numel()
            self.history[:n].copy_(history)
            self.length.fill_(n)
            recent = history[-window:] if window > 0 else history
            self.counts.index_add_(0, recent, torch.ones(recent.numel(), device=self.device))
        self.generator.manual_seed(seed)
        self.picks = 0

    def before_pick(self, plan: Plan) -> None:
        """Host side, before each pick (eager or replayed): refill the noise when its rows are used up. Queued
        on the stream like the step, so it needs no sync."""
        if not plan.greedy and self.picks % NOISE_ROWS == 0:
            # A draw of exactly 0 would turn p / E into inf or NaN (argmax takes NaN as the largest).
            self.noise.exponential_(generator=self.generator).clamp_(min=torch.finfo(torch.float32).tiny)
            self.row.zero_()
        self.picks += 1

    def load(self, other: "GraphSampler") -> None:
        """Take over `other`'s generation mid-way (engine.batch moves a generation to another slot): its
        parameters, history, counts, noise and generator, copied into this sampler's own buffers."""
        for mine, theirs in zip(self._buffers(), other._buffers()):
            mine.copy_(theirs)
        self.generator.set_state(other.generator.get_state())
        self.picks = other.picks

    def _buffers(self) -> list[torch.Tensor]:
        return [self.history, self.length, self.counts, self.window, self.repetition, self.presence,
                self.frequency, self.temperature, self.top_k, self.top_p, self.typical_p, self.min_p, self.noise,
                self.row]

    def state(self) -> list[torch.Tensor]:
        """The buffers a pick changes (a graph capture's warm-up runs restore them)."""
        return [self.history, self.length, self.counts, self.row]

    def pick(self, logits: torch.Tensor, plan: Plan) -> torch.Tensor:
        """logits: [V] for the next position. Appends the chosen id to the history and returns it (0-d long).
        Graph-safe."""
        if plan.bound and self.kernels:
            return sampling_kernel.pick(logits, self, plan)
        probs, ids = self.distribution(logits, plan)
        if plan.greedy:
            chosen = probs.argmax(-1)   # greedy: `distribution` returned the penalised logits
        else:
            noise = self.noise.index_select(0, self.row.view(1))[0]
            if ids is not None:
                noise = noise.gather(0, ids)
            chosen = (probs / noise).argmax(-1)
            if ids is not None:
                chosen = ids.gather(0, chosen.view(1))[0]
            self.row.add_(1)
        self._append(chosen, plan)
        return chosen

    def distribution(self, logits: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shared sampler's transforms, in its order. Returns (probs [K], ids [K]) over the candidates (ids
        None: the whole vocabulary, in id order); greedy: (penalised logits [V], None)."""
        x = logits.float()
        if plan.penalties:
            seen = self.counts > 0
            x = torch.where(seen, torch.where(x > 0, x / self.repetition, x * self.repetition), x)
            x = x - (self.frequency * self.counts + self.presence * seen.to(x.dtype))
        if plan.greedy:
            return x, None
        x = x / self.temperature
        ids = None
        if plan.candidates:
            x, ids = torch.sort(x, descending=True) if plan.candidates == self.vocab \
                else torch.topk(x, plan.candidates)
        neg_inf = float("-inf")
        if plan.top_k:
            kth = x.gather(0, (self.top_k - 1).view(1))
            x = x.masked_fill(x < kth, neg_inf)
        if plan.top_p:
            probs = x.softmax(-1)
            # Keep a token while the mass before it is < top_p; the first always stays.
            drop = (probs.cumsum(-1) - probs >= self.top_p).index_fill(0, self.first, False)
            x = x.masked_fill(drop, neg_inf)
        if plan.typical_p:
            logp = x.log_softmax(-1)
            probs = logp.exp()
            entropy = -(probs * torch.nan_to_num(logp, neginf=0.0)).sum()
            order = torch.argsort((-logp - entropy).abs())
            in_order = probs.gather(0, order)
            drop_in_order = (in_order.cumsum(-1) - in_order >= self.typical_p).index_fill(0, self.first, False)
            x = x.masked_fill(drop_in_order.scatter(0, order, drop_in_order), neg_inf)
        if plan.min_p:
            probs = x.softmax(-1)
            x = x.masked_fill(probs < self.min_p * probs.max(), neg_inf)
        return x.softmax(-1), ids

    def _append(self, token: torch.Tensor, plan: Plan) -> None:
        """Count `token` into the penalty window and drop the id that leaves it; fixed shapes only."""
        if not plan.penalties:
            return
        leaving = (self.length - self.window).clamp(min=0).view(1)
        left = (self.length >= self.window).to(torch.float32).view(1)
        self.counts.index_add_(0, self.history.index_select(0, leaving), -left)
        self.counts.index_add_(0, token.view(1), self.one)
        self.history.index_copy_(0, self.length.view(1), token.view(1))
        self.length.add_(1)
