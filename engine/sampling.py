"""Sampler parameters and the sampler itself: one place, used by every backend.

The parameters use text-generation-webui's preset keys so users can drop their preset files in. The sampler
works on a logits row with torch ops only, so it runs unchanged on CPU and on the GPU (where the engine keeps
it on the device and syncs once per token to read the chosen id).
Order of operations follows text-generation-webui / HF: penalties on raw logits, then temperature, then the
truncation samplers (top_k, top_p, typical_p, min_p), then a draw.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from core.options import coerce, option, specs, validate


@dataclass
class GenerationParams:
    max_new_tokens: int = option(512, "Most tokens to generate for one reply.", minimum=1, maximum=32768, step=1,
                                 label="max_new_tokens")
    temperature: float = option(0.7, "Softmax temperature; 0 picks the likeliest token every time (greedy).",
                                minimum=0.0, maximum=5.0, step=0.01)
    top_p: float = option(0.9, "Keep the smallest set of tokens whose probability adds up to top_p (1 = off).",
                          minimum=0.0, maximum=1.0, step=0.01)
    # -1 is vLLM's and OpenAI-compatible clients' spelling of "off"; 0 is text-generation-webui's.
    top_k: int = option(20, "Keep only the k likeliest tokens (0 or -1 = off).", minimum=-1, maximum=1000, step=1)
    min_p: float = option(0.0, "Drop tokens less likely than min_p times the likeliest one (0 = off).",
                          minimum=0.0, maximum=1.0, step=0.01)
    typical_p: float = option(1.0, "Locally typical sampling mass (1 = off).", minimum=0.0, maximum=1.0, step=0.01)
    # Below 1 favours repeats (vLLM and text-generation-webui allow it); 0 would divide by zero.
    repetition_penalty: float = option(1.0, "Divide positive logits (multiply negative) of tokens already seen "
                                            "(1 = off; below 1 favours repeats).", minimum=0.01, maximum=3.0,
                                       step=0.01)
    repetition_penalty_range: int = option(1024, "How many recent tokens the repetition penalty looks at "
                                                 "(0 = all).", minimum=0, maximum=32768, step=1)
    presence_penalty: float = option(0.0, "Subtract this from the logit of every token already seen.",
                                     minimum=-2.0, maximum=2.0, step=0.05)
    frequency_penalty: float = option(0.0, "Subtract this times the count of each token already seen.",
                                      minimum=-2.0, maximum=2.0, step=0.05)
    seed: int = option(-1, "Random seed; -1 draws a fresh one each time.", minimum=-1, maximum=2**63 - 1, step=1)
    stop: list[str] = option([], "Extra strings that end the reply (the template's own are always added).")

    def __post_init__(self) -> None:
        # The bounds above hold however the params were made (presets, flags, widgets, JSON or code): a NaN
        # temperature would otherwise reach softmax and fail every later token.
        validate(self)


@dataclass
class TokenControls(GenerationParams):
    """One API request's token-level controls on top of the samplers. Not options (no widget, preset key or
    flag): they describe one request, not a way the user likes to sample. Plain GenerationParams means all off,
    so the decode loop pays nothing for them unless asked."""
    # Report each sampled token's log-probability and this many alternatives (None: report nothing). The
    # values are the model's own log-softmax, before penalties, temperature and truncation (OpenAI's meaning).
    logprobs: int | None = None
    prompt_logprobs: bool = False     # also score every prompt token (completions' echo)
    score_only: bool = False          # score the prompt and generate nothing (echo with max_tokens 0)
    logit_bias: dict[int, float] = field(default_factory=dict)   # added to raw logits; -inf bans a token
    ban_eos: bool = False             # never pick an end-of-sequence token (text-generation-webui's ban_eos_token)
    skip_special_tokens: bool = False  # leave special tokens (role markers, EOS) out of the text
    temperature_last: bool = False    # truncate before scaling by temperature (text-generation-webui's order)
    grammar: str | None = None        # an llguidance grammar the output must match (engine.grammar)

    def __post_init__(self) -> None:
        # The samplers meet their declaration; the controls are not options (the API checks them).
        for spec in specs(GenerationParams):
            setattr(self, spec.name, coerce(spec, getattr(self, spec.name)))


def _recent(history: torch.Tensor, window: int) -> torch.Tensor:
    return history[-window:] if window > 0 else history


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """Repetition (multiplicative, HF semantics), presence and frequency (additive, OpenAI semantics)."""
    if history.numel() == 0:
        return logits
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = _recent(history, p.repetition_penalty_range).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        # The same window as the repetition penalty (text-generation-webui applies the range to all three).
        window = _recent(history, p.repetition_penalty_range)
        counts = torch.bincount(window, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """Set the logits of tokens the truncation samplers drop to -inf. `logits` is already temperature-scaled."""
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = torch.where(logits < kth, neg_inf, logits)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep a token while the mass before it is < top_p: the smallest set reaching top_p, never empty.
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= p.top_p
        drop_sorted[0] = False
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if p.typical_p < 1.0:
        logp = logits.log_softmax(-1)
        probs = logp.exp()
        entropy = -(probs * torch.nan_to_num(logp, neginf=0.0)).sum()
        surprise_gap = (-logp - entropy).abs()
        order = torch.argsort(surprise_gap)
        mass_before = probs[order].cumsum(-1) - probs[order]
        drop_sorted = mass_before >= p.typical_p
        drop_sorted[0] = False
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    """Picks the next token id from a logits row. Holds the seeded generator for one generation."""

    def __init__(self, params: GenerationParams, device: torch.device | str = "cpu",
                 bias: torch.Tensor | None = None):
        """bias: [V] added to the logits before anything else (logit_bias, token bans), or None."""
        self.params = params
        self.bias = bias
        self.generator = torch.Generator(device=device)
        # secrets, not torch.seed(): drawing a fresh seed must not reseed torch's global generator.
        seed = params.seed if params.seed >= 0 else secrets.randbits(63)
        self.seed = seed
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """logits: [V] (any float dtype), history: [T] long ids of prompt + generated. Returns a 0-d long id."""
        p = self.params
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        logits = apply_penalties(logits, history, p)
        if p.temperature <= 0.0:
            return logits.argmax(-1)
        if isinstance(p, TokenControls) and p.temperature_last:
            logits = truncate(logits, p) / p.temperature
        else:
            logits = truncate(logits / p.temperature, p)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]
