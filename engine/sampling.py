"""Sampler parameters and the sampler itself: one place, used by every backend.

The parameters use text-generation-webui's preset keys so users can drop their preset files in. The sampler
works on a logits row with torch ops only, so it runs unchanged on CPU and on the GPU (where the engine keeps
it on the device and syncs once per token to read the chosen id).
Order of operations follows text-generation-webui / HF: penalties and DRY on raw logits, then temperature (or
dynamic temperature) and quadratic smoothing, then the truncation samplers (top_n_sigma, top_k, top_p, typical_p,
min_p; mirostat replaces them when on), then XTC, then a draw. Every extra sampler is skipped outright when off,
so the default path does exactly the work it always did.
"""
from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field

import torch

from core.options import OptionError, coerce, option, specs, validate

# text-generation-webui's default DRY sequence breakers, in its own syntax (JSON strings without the brackets).
DEFAULT_DRY_BREAKERS = '"\\n", ":", "\\"", "*"'
# Longest repeat DRY measures: beyond it the penalty (base ** length) would overflow to inf, and a repeat that
# long is already penalised hard enough.
DRY_MAX_MATCH = 50


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
    # text-generation-webui's extra samplers, under its preset keys; each default is its "off".
    dry_multiplier: float = option(0.0, "DRY: penalise the token that would extend a repeated sequence by "
                                        "multiplier * base^(length - allowed length) (0 = off).",
                                   minimum=0.0, maximum=5.0, step=0.01)
    dry_base: float = option(1.75, "DRY: how fast the penalty grows with the repeat's length.",
                             minimum=1.0, maximum=4.0, step=0.01)
    dry_allowed_length: int = option(2, "DRY: the longest repeat that goes unpenalised.", minimum=1, maximum=20,
                                     step=1)
    dry_penalty_last_n: int = option(0, "DRY: how many recent tokens it searches for repeats (0 = all).",
                                     minimum=0, maximum=32768, step=1)
    dry_sequence_breakers: str = option(DEFAULT_DRY_BREAKERS, "DRY: quoted strings, comma-separated, that end a "
                                                              "repeat (a match never runs across them).")
    xtc_threshold: float = option(0.1, "XTC: tokens at least this likely count as top choices.",
                                  minimum=0.0, maximum=0.5, step=0.01)
    xtc_probability: float = option(0.0, "XTC: chance per token of removing every top choice but the least "
                                         "likely of them (0 = off).", minimum=0.0, maximum=1.0, step=0.01)
    mirostat_mode: int = option(0, "Mirostat: 0 = off, 1 or 2 = that version (it replaces top_k, top_p, "
                                   "typical_p, min_p, top_n_sigma and XTC).", minimum=0, maximum=2, step=1,
                                choices=[0, 1, 2])
    mirostat_tau: float = option(5.0, "Mirostat: target surprise in bits per token.", minimum=0.0, maximum=10.0,
                                 step=0.01)
    mirostat_eta: float = option(0.1, "Mirostat: learning rate.", minimum=0.0, maximum=1.0, step=0.01)
    top_n_sigma: float = option(0.0, "Keep tokens whose logit is within n standard deviations of the top one "
                                     "(0 or below = off).", minimum=-1.0, maximum=5.0, step=0.01)
    dynamic_temperature: bool = option(False, "Scale the temperature between dynatemp_low and dynatemp_high by "
                                              "the distribution's entropy (replaces temperature).")
    dynatemp_low: float = option(1.0, "Dynamic temperature at zero entropy.", minimum=0.01, maximum=5.0, step=0.01)
    dynatemp_high: float = option(1.0, "Dynamic temperature at maximum entropy.", minimum=0.01, maximum=5.0,
                                  step=0.01)
    dynatemp_exponent: float = option(1.0, "Dynamic temperature: exponent on the normalised entropy.",
                                      minimum=0.01, maximum=5.0, step=0.01)
    smoothing_factor: float = option(0.0, "Quadratic sampling: bend the logits around the top one (0 = off).",
                                     minimum=0.0, maximum=10.0, step=0.01)
    smoothing_curve: float = option(1.0, "Quadratic sampling: above 1 adds a cubic term that cuts the tail "
                                         "harder.", minimum=1.0, maximum=10.0, step=0.01)

    def __post_init__(self) -> None:
        # The bounds above hold however the params were made (presets, flags, widgets, JSON or code): a NaN
        # temperature would otherwise reach softmax and fail every later token.
        validate(self)
        sequence_breakers(self.dry_sequence_breakers)


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
        sequence_breakers(self.dry_sequence_breakers)


def sequence_breakers(text: str) -> list[str]:
    """DRY's breakers from text-generation-webui's syntax: JSON strings separated by commas, with or without the
    brackets (SillyTavern sends them with)."""
    text = text.strip()
    try:
        breakers = json.loads(text if text.startswith("[") else f"[{text}]")
    except ValueError:
        breakers = None
    if not isinstance(breakers, list) or not all(isinstance(b, str) for b in breakers):
        raise OptionError(f'dry_sequence_breakers: {text!r} is not a comma-separated list of quoted strings '
                          f'(like {DEFAULT_DRY_BREAKERS})', "dry_sequence_breakers")
    return breakers


def sequence_breaker_ids(params: GenerationParams, tokenizer) -> frozenset[int]:
    """The token ids that break a DRY match; empty when DRY is off (so its tokenizing costs nothing then).
    Each breaker is encoded after a letter and its last token kept, as text-generation-webui does, so a breaker
    is the token it becomes mid-text, not at the start of one."""
    if params.dry_multiplier <= 0:
        return frozenset()
    return frozenset(tokenizer.encode("a" + b, add_special_tokens=False)[-1]
                     for b in sequence_breakers(params.dry_sequence_breakers) if b)


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


def apply_dry(logits: torch.Tensor, history: torch.Tensor, p: GenerationParams,
              breakers: frozenset[int]) -> torch.Tensor:
    """DRY ("don't repeat yourself"): for each earlier place where the text's last tokens already occurred, the
    token that followed them there would extend the repeat; it loses multiplier * base^(length - allowed_length)
    when the repeat is at least allowed_length long. A breaker token ends a match."""
    window = _recent(history, p.dry_penalty_last_n)
    n = window.numel()
    if n < 2:
        return logits
    # Only the earlier places holding the last token can start a match; finding them on the device keeps the
    # Python loop below to those few.
    ends = (window[:-1] == window[-1]).nonzero().flatten().tolist()
    if not ends:
        return logits
    ids = window.tolist()
    if ids[-1] in breakers:
        return logits
    longest: dict[int, int] = {}
    for end in ends:
        length = 0
        while (length <= end and length < DRY_MAX_MATCH and ids[end - length] == ids[n - 1 - length]
               and ids[end - length] not in breakers):
            length += 1
        if length:
            follower = ids[end + 1]
            longest[follower] = max(longest.get(follower, 0), length)
    penalised = {t: p.dry_multiplier * p.dry_base ** (length - p.dry_allowed_length)
                 for t, length in longest.items() if length >= p.dry_allowed_length}
    if not penalised:
        return logits
    logits = logits.clone()
    logits[torch.tensor(list(penalised), dtype=torch.long, device=logits.device)] -= torch.tensor(
        list(penalised.values()), dtype=logits.dtype, device=logits.device)
    return logits


def dynamic_temperature(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """Divide by a temperature between dynatemp_low and dynatemp_high set by the distribution's entropy,
    normalised by the largest entropy the remaining tokens could have."""
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum()
    max_entropy = torch.isfinite(logits).sum().to(logits.dtype).log()
    normalised = entropy / torch.where(max_entropy > 0, max_entropy, torch.ones_like(max_entropy))
    temp = p.dynatemp_low + (p.dynatemp_high - p.dynatemp_low) * normalised.clamp(0, 1) ** p.dynatemp_exponent
    return logits / temp


def smooth(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """Quadratic sampling: logits become max - k*f*d^2 + s*f*d^3 with d their distance below the top logit,
    k = (3 - curve) / 2 and s = (curve - 1) / 2 (curve 1 is the plain quadratic)."""
    top = logits.max()
    d = logits - top
    k = (3 - p.smoothing_curve) / 2
    s = (p.smoothing_curve - 1) / 2
    bent = top - k * p.smoothing_factor * d * d + s * p.smoothing_factor * d * d * d
    # A dropped token (-inf) stays dropped; the polynomial would turn it into inf - inf = NaN.
    return torch.where(torch.isfinite(logits), bent, logits)


def truncate(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """Set the logits of tokens the truncation samplers drop to -inf. `logits` is already temperature-scaled."""
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if p.top_n_sigma > 0.0:
        finite = torch.isfinite(logits)
        # Population standard deviation of the logits still in play (the published top-nσ).
        spread = logits[finite].std(correction=0)
        logits = torch.where(logits < logits.max() - p.top_n_sigma * spread, neg_inf, logits)
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


def apply_xtc(logits: torch.Tensor, p: GenerationParams, generator: torch.Generator) -> torch.Tensor:
    """XTC ("exclude top choices"): with probability xtc_probability, drop every token at least xtc_threshold
    likely except the least likely of them; nothing happens unless at least two tokens reach the threshold."""
    if torch.rand((), generator=generator, device=generator.device).item() >= p.xtc_probability:
        return logits
    probs = logits.softmax(-1)
    top = probs >= p.xtc_threshold
    if int(top.sum()) < 2:
        return logits
    top[probs.masked_fill(~top, float("inf")).argmin()] = False
    return logits.masked_fill(top, float("-inf"))


class Sampler:
    """Picks the next token id from a logits row. Holds the seeded generator and mirostat's running target
    (mu) for one generation."""

    def __init__(self, params: GenerationParams, device: torch.device | str = "cpu",
                 bias: torch.Tensor | None = None, breakers: frozenset[int] = frozenset()):
        """bias: [V] added to the logits before anything else (logit_bias, token bans), or None.
        breakers: the token ids that end a DRY match (sequence_breaker_ids)."""
        self.params = params
        self.bias = bias
        self.breakers = breakers
        # Mirostat starts at twice its target surprise and learns from each token it picks.
        self.mu = 2 * params.mirostat_tau
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
        if p.dry_multiplier > 0:
            logits = apply_dry(logits, history, p, self.breakers)
        if p.temperature <= 0.0:
            return logits.argmax(-1)
        if isinstance(p, TokenControls) and p.temperature_last:
            logits = self._scale(self._truncate(logits))
        else:
            logits = self._truncate(self._scale(logits))
        if p.mirostat_mode:
            return self._mirostat(logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]

    def _scale(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = dynamic_temperature(logits, p) if p.dynamic_temperature else logits / p.temperature
        return smooth(logits, p) if p.smoothing_factor > 0 else logits

    def _truncate(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.mirostat_mode:   # mirostat does its own truncation (text-generation-webui turns the others off)
            return logits
        logits = truncate(logits, p)
        return apply_xtc(logits, p, self.generator) if p.xtc_probability > 0 else logits

    def _mirostat(self, logits: torch.Tensor) -> torch.Tensor:
        """Mirostat: keep the tokens whose surprise fits the running target mu (v2), or the top k that Zipf's
        law estimates will give surprise mu (v1, as llama.cpp); draw; move mu by eta times the miss."""
        p = self.params
        sorted_logits, order = torch.sort(logits, descending=True)
        logp = sorted_logits.log_softmax(-1)
        if p.mirostat_mode == 2:
            k = max(1, int((-logp / math.log(2) <= self.mu).sum()))
        else:
            m = min(100, logp.shape[-1])
            t = torch.log(torch.arange(2, m + 1, dtype=logp.dtype, device=logp.device) /
                          torch.arange(1, m, dtype=logp.dtype, device=logp.device))
            b = torch.nan_to_num(logp[: m - 1] - logp[1:m], nan=0.0, posinf=0.0)
            s_hat = float((t * b).sum() / (t * t).sum())
            eps = s_hat - 1
            n = logp.shape[-1]
            # A flat or degenerate head (s_hat <= 0, or exactly Zipf's 1) gives no estimate: keep everything.
            try:
                ratio = eps * 2 ** self.mu / (1 - n ** -eps)
                k = int(ratio ** (1 / s_hat)) if s_hat > 0 and ratio > 0 else n
            except (OverflowError, ZeroDivisionError):
                k = n
            k = min(max(k, 1), n)
        kept = sorted_logits[:k].log_softmax(-1)
        pick = torch.multinomial(kept.exp(), 1, generator=self.generator)[0]
        self.mu -= p.mirostat_eta * (-float(kept[pick]) / math.log(2) - p.mirostat_tau)
        return order[pick]
