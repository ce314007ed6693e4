"""text-generation-webui's extra samplers in engine/sampling.py (DRY, XTC, mirostat, top-n-sigma, dynamic
temperature, quadratic smoothing): each one's effect on hand-built logits against a small reference written here
from its published description; their declaration reaching presets and the API."""
from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from api.server import ApiConfig, ApiServer
from conftest import free_port
from core.options import OptionError
from engine.sampling import (GenerationParams, Sampler, apply_dry, apply_xtc, dynamic_temperature,
                             sequence_breakers, smooth, truncate)
from prompts.presets import load_presets


def off(**kw) -> GenerationParams:
    return GenerationParams(**{"top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, **kw})


def kept(logits: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(logits.tolist()) if v != float("-inf")}


PROBS = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
LOGITS = PROBS.log()


# --- DRY -------------------------------------------------------------------------------------------------

def dry_reference(ids: list[int], vocab: int, mult: float, base: float, allowed: int,
                  breakers: set[int]) -> list[float]:
    """The published DRY: for every earlier occurrence of the text's suffix, the token that followed it would
    extend a repeat of that suffix's length; penalty mult * base^(len - allowed) when len >= allowed."""
    penalty = [0.0] * vocab
    if ids[-1] in breakers:
        return penalty
    best: dict[int, int] = {}
    for end in range(len(ids) - 1):
        length = 0
        while (length <= end and ids[end - length] == ids[len(ids) - 1 - length]
               and ids[end - length] not in breakers):
            length += 1
        if length:
            best[ids[end + 1]] = max(best.get(ids[end + 1], 0), length)
    for token, length in best.items():
        if length >= allowed:
            penalty[token] = mult * base ** (length - allowed)
    return penalty


def test_dry_penalises_the_token_that_would_extend_a_repeat():
    # 1 2 3 4 ... 1 2 3: a repeat of length 3, which token 4 would extend.
    history = torch.tensor([1, 2, 3, 4, 9, 8, 1, 2, 3])
    logits = torch.zeros(10)
    p = off(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    out = apply_dry(logits, history, p, frozenset())
    assert out[4].item() == pytest.approx(-0.8 * 1.75 ** (3 - 2))
    assert out.tolist()[:4] + out.tolist()[5:] == [0.0] * 9     # nothing else penalised
    ref = dry_reference(history.tolist(), 10, 0.8, 1.75, 2, set())
    assert out.tolist() == pytest.approx([-v for v in ref])


def test_dry_leaves_short_repeats_alone_and_breakers_end_a_match():
    p = off(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=3)
    history = torch.tensor([1, 2, 5, 0, 1, 2])    # repeat of length 2 < allowed 3
    assert torch.equal(apply_dry(torch.zeros(8), history, p, frozenset()), torch.zeros(8))
    # 7 breaks the match: 1 7 2 3 | ... 7 2 3 only matches "2 3" (length 2), not 3.
    history = torch.tensor([1, 7, 2, 3, 4, 6, 7, 2, 3])
    no_breaker = apply_dry(torch.zeros(8), history, off(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2),
                           frozenset())
    with_breaker = apply_dry(torch.zeros(8), history,
                             off(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2), frozenset({7}))
    assert no_breaker[4].item() == pytest.approx(-2.0)    # "7 2 3" matched: 2^(3-2)
    assert with_breaker[4].item() == pytest.approx(-1.0)  # "2 3" only: 2^(2-2)


def test_dry_matches_the_reference_on_random_histories():
    gen = torch.Generator().manual_seed(7)
    for _ in range(50):
        history = torch.randint(0, 4, (30,), generator=gen)
        p = off(dry_multiplier=0.5, dry_base=1.5, dry_allowed_length=2)
        out = apply_dry(torch.zeros(4), history, p, frozenset({3}))
        ref = dry_reference(history.tolist(), 4, 0.5, 1.5, 2, {3})
        assert out.tolist() == pytest.approx([-v for v in ref])


def test_dry_penalty_last_n_limits_the_search():
    history = torch.tensor([1, 2, 3, 4, 9, 8, 1, 2, 3])
    p = off(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2, dry_penalty_last_n=4)
    assert torch.equal(apply_dry(torch.zeros(10), history, p, frozenset()), torch.zeros(10))


def test_sequence_breakers_parse_both_spellings_and_refuse_garbage():
    assert sequence_breakers(GenerationParams().dry_sequence_breakers) == ["\n", ":", '"', "*"]
    assert sequence_breakers('["a", "b"]') == ["a", "b"]     # SillyTavern sends the brackets
    with pytest.raises(OptionError) as exc:
        GenerationParams(dry_sequence_breakers="not json")
    assert exc.value.option == "dry_sequence_breakers"


# --- XTC -------------------------------------------------------------------------------------------------

def test_xtc_removes_top_choices_above_threshold_except_the_least_likely():
    gen = torch.Generator().manual_seed(0)
    # Above 0.15: tokens 0 (0.4), 1 (0.3), 2 (0.2); all but the least likely of them (2) go.
    out = apply_xtc(LOGITS, off(xtc_threshold=0.15, xtc_probability=1.0), gen)
    assert kept(out) == {2, 3, 4}
    # Only one token reaches 0.35: nothing is removed.
    assert kept(apply_xtc(LOGITS, off(xtc_threshold=0.35, xtc_probability=1.0), gen)) == {0, 1, 2, 3, 4}


def test_xtc_applies_with_its_probability():
    gen = torch.Generator().manual_seed(1)
    p = off(xtc_threshold=0.15, xtc_probability=0.3)
    applied = sum(kept(apply_xtc(LOGITS, p, gen)) == {2, 3, 4} for _ in range(2000))
    assert 450 < applied < 750      # 600 expected; binomial sd about 20


# --- top-n-sigma, dynamic temperature, quadratic smoothing ------------------------------------------------

def test_top_n_sigma_keeps_logits_within_n_deviations_of_the_top():
    logits = torch.tensor([5.0, 4.0, 2.0, 0.0, -3.0])
    mean = sum(logits.tolist()) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in logits.tolist()) / 5)
    for n, expected in [(1.0, {0, 1}), (1.2, {0, 1, 2})]:     # sd is about 2.87
        assert kept(truncate(logits, off(top_n_sigma=n))) == expected
        assert expected == {i for i, v in enumerate(logits.tolist()) if v >= 5.0 - n * sd}
    assert kept(truncate(logits, off(top_n_sigma=0.0))) == {0, 1, 2, 3, 4}   # off


def test_dynamic_temperature_follows_normalised_entropy():
    p = off(dynamic_temperature=True, dynatemp_low=0.5, dynatemp_high=2.0, dynatemp_exponent=2.0)
    probs = PROBS.tolist()
    entropy = -sum(q * math.log(q) for q in probs)
    temp = 0.5 + 1.5 * (entropy / math.log(5)) ** 2.0
    assert dynamic_temperature(LOGITS, p).tolist() == pytest.approx((LOGITS / temp).tolist(), rel=1e-5)
    flat = torch.zeros(4)     # maximum entropy: the high temperature
    assert dynamic_temperature(flat, p).tolist() == pytest.approx([0.0] * 4)
    peaked = torch.tensor([0.0, float("-inf"), float("-inf")])   # one token left: the low temperature
    assert dynamic_temperature(peaked, p)[0].item() == 0.0


def test_quadratic_smoothing_bends_logits_around_the_top_one():
    logits = torch.tensor([2.0, 1.0, -1.0, float("-inf")])
    for factor, curve in [(0.3, 1.0), (0.5, 2.0), (1.0, 3.0)]:
        k, s = (3 - curve) / 2, (curve - 1) / 2
        expected = [2.0 - k * factor * (v - 2.0) ** 2 + s * factor * (v - 2.0) ** 3 for v in [2.0, 1.0, -1.0]]
        out = smooth(logits, off(smoothing_factor=factor, smoothing_curve=curve))
        assert out[:3].tolist() == pytest.approx(expected)
        assert out[3].item() == float("-inf")


# --- mirostat --------------------------------------------------------------------------------------------

def test_mirostat_v2_truncates_by_surprise_and_keeps_mu_per_generation():
    p = off(temperature=1.0, seed=5, mirostat_mode=2, mirostat_tau=1.5, mirostat_eta=0.1)
    sampler = Sampler(p)
    assert sampler.mu == 3.0                                   # starts at 2 * tau
    history = torch.tensor([0])
    # mu = 3 bits: only tokens with -log2 p <= 3 (p >= 0.125) may be picked: 0, 1, 2.
    mus = [sampler.mu]
    for _ in range(30):
        token = int(sampler(LOGITS, history))
        assert token in {0, 1, 2} if mus[-1] == 3.0 else True
        mus.append(sampler.mu)
    assert len(set(mus)) > 1                                    # mu learns from each pick
    # Replay mu's update by hand for the first pick: mu -= eta * (surprise in the truncated set - tau).
    first = Sampler(p)
    token = int(first(LOGITS, history))
    truncated = [q for q in PROBS.tolist() if -math.log2(q) <= 3.0]
    surprise = -math.log2(PROBS[token].item() / sum(truncated))
    assert first.mu == pytest.approx(3.0 - 0.1 * (surprise - 1.5))
    assert Sampler(p).mu == 3.0                                 # a new generation starts afresh


def test_mirostat_v1_picks_and_learns():
    p = off(temperature=1.0, seed=3, mirostat_mode=1, mirostat_tau=3.0, mirostat_eta=0.2)
    sampler = Sampler(p)
    logits = -torch.arange(200, dtype=torch.float32) * 0.05
    picks = [int(sampler(logits, torch.tensor([0]))) for _ in range(20)]
    assert all(0 <= t < 200 for t in picks)
    assert sampler.mu != 6.0


def test_all_off_leaves_the_sampled_ids_unchanged():
    """The new samplers' defaults draw exactly what the plain sampler drew (same seed, same ids)."""
    gen = torch.Generator().manual_seed(11)
    rows = torch.randn(20, 50, generator=gen)
    a, b = Sampler(GenerationParams(temperature=0.8, seed=9)), Sampler(GenerationParams(temperature=0.8, seed=9))
    history = torch.tensor([1, 2, 3])
    assert [int(a(r, history)) for r in rows] == [int(b(r, history)) for r in rows]
    assert GenerationParams().dry_multiplier == 0 and GenerationParams().mirostat_mode == 0


# --- declaration: presets and the API --------------------------------------------------------------------

def test_presets_with_the_new_keys_load(tmp_path):
    (tmp_path / "extra.yaml").write_text(
        "temperature: 1.0\ndry_multiplier: 0.8\ndry_base: 1.75\ndry_allowed_length: 2\n"
        "dry_sequence_breakers: '\"\\n\", \":\"'\nxtc_threshold: 0.1\nxtc_probability: 0.5\n"
        "mirostat_mode: 2\nmirostat_tau: 5\nmirostat_eta: 0.1\ntop_n_sigma: 1.0\ndynamic_temperature: true\n"
        "dynatemp_low: 0.5\ndynatemp_high: 1.5\ndynatemp_exponent: 1\nsmoothing_factor: 0.3\n"
        "smoothing_curve: 1\n")
    catalog = load_presets(tmp_path)
    assert catalog.problems == []
    values = catalog.presets["extra"]
    assert values["dry_multiplier"] == 0.8 and values["mirostat_mode"] == 2 and values["dynamic_temperature"]
    params = GenerationParams(**values)
    assert sequence_breakers(params.dry_sequence_breakers) == ["\n", ":"]


@pytest.fixture(scope="module")
def http(loaded_state):
    server = ApiServer(loaded_state, ApiConfig(port=free_port())).start()
    with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=300) as client:
        yield client
    server.stop()


def test_an_api_request_with_dry_streams_and_dry_breaks_a_loop(http):
    body = {"prompt": "1 1 1 1 1 1 1 1 1 1 1 1", "max_tokens": 12, "temperature": 0}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True, "dry_multiplier": 3.0,
                                                      "dry_allowed_length": 1}) as reply:
        assert reply.status_code == 200, reply.read()
        lines = [line for line in reply.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    dry_text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines)
    plain = http.post("/v1/completions", json=body)
    assert plain.status_code == 200, plain.text
    plain_text = plain.json()["choices"][0]["text"]
    # Greedy decoding continues the loop; a strong DRY makes greedy leave it.
    assert plain_text.split() and set(plain_text.split()) == {"1"}, plain_text
    assert dry_text != plain_text


@pytest.mark.parametrize("extra", [
    {"xtc_probability": 0.5, "xtc_threshold": 0.1}, {"mirostat_mode": 2}, {"mirostat_mode": 1},
    {"top_n_sigma": 1.0}, {"dynamic_temperature": True, "dynatemp_low": 0.5, "dynatemp_high": 1.5},
    {"smoothing_factor": 0.3, "smoothing_curve": 2.0}, {"dry_multiplier": 0.8,
                                                        "dry_sequence_breakers": '["\\n", ":"]'},
])
def test_the_api_honours_the_extra_samplers(http, extra):
    reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 4, "temperature": 1.0, "seed": 1, **extra})
    assert reply.status_code == 200, reply.text


def test_the_api_names_a_bad_extra_sampler_field(http):
    reply = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "mirostat_mode": 3})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "mirostat_mode"
    reply = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "dry_sequence_breakers": "x"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "dry_sequence_breakers"
