"""Sampler math in engine/sampling.py."""
from __future__ import annotations

import torch

from engine.sampling import GenerationParams, Sampler, apply_penalties, truncate


def kept(logits: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(logits.tolist()) if v != float("-inf")}


def off(**kw) -> GenerationParams:
    return GenerationParams(**{"top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, **kw})


PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()


def test_top_p_keeps_smallest_set_reaching_the_mass():
    assert kept(truncate(LOGITS, off(top_p=0.75))) == {0, 1}      # 0.5 + 0.25 reaches 0.75
    assert kept(truncate(LOGITS, off(top_p=0.76))) == {0, 1, 2}
    assert kept(truncate(LOGITS, off(top_p=0.1))) == {0}          # never empty


def test_min_p_threshold_is_relative_to_the_top_token():
    assert kept(truncate(LOGITS, off(min_p=0.4))) == {0, 1}        # threshold 0.2
    assert kept(truncate(LOGITS, off(min_p=0.25))) == {0, 1, 2}    # threshold 0.125
    assert kept(truncate(LOGITS, off(min_p=0.1))) == {0, 1, 2, 3}  # threshold 0.05 drops 0.03


def test_top_k_and_typical_p():
    assert kept(truncate(LOGITS, off(top_k=3))) == {0, 1, 2}
    entropy = -(PROBS * PROBS.log()).sum()
    closest = int((-PROBS.log() - entropy).abs().argmin())
    assert kept(truncate(LOGITS, off(typical_p=0.01))) == {closest}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits, torch.tensor([0, 1]), off(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_penalty_range_limits_what_counts_as_seen():
    logits = torch.tensor([2.0, 2.0, 2.0])
    out = apply_penalties(logits, torch.tensor([0, 1]), off(repetition_penalty=2.0, repetition_penalty_range=1))
    assert out.tolist() == [2.0, 1.0, 2.0]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(3)
    out = apply_penalties(logits, torch.tensor([0, 0, 1]), off(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [-1.0, -0.75, 0.0]


def test_seeded_sampling_reproduces_and_greedy_picks_argmax():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([], dtype=torch.long)
    sampler = Sampler(off(temperature=1.0, seed=123))
    first = [int(sampler(logits, history)) for _ in range(20)]
    sampler = Sampler(off(temperature=1.0, seed=123))
    assert [int(sampler(logits, history)) for _ in range(20)] == first
    assert int(Sampler(off(temperature=0.0))(logits, history)) == int(logits.argmax())


def test_unseeded_sampler_leaves_torch_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    Sampler(off(seed=-1))
    assert torch.rand(1) == expected
