"""engine.fused_ops' RoPE + KV-cache kernel against the unfused ops it replaces: one row of positions (a single
stream's step or prompt) and a row per generation (engine.batch's [B, S] positions, into cache rows 0..B-1);
and its residual add + RMSNorm, in natural order and in an act-order input order, with and without a norm on
the residual branch first. Checked under Triton's interpreter on CPU and compiled on CUDA."""
from __future__ import annotations

import pytest
import torch

from engine import fused_ops
from engine.llama import apply_rotary
from tests.triton_interpreter import InterpreterChecks

CHECKS = InterpreterChecks()
H, H_KV, D, T = 4, 2, 16, 32


def rotary_case(positions: list[list[int]], device: str) -> None:
    """positions: a list of rows (one row: the [S] form; several: the [B, S] form). Asserts q, the cache rows
    written and every other cache entry (still zero, the spare row B too)."""
    torch.manual_seed(0)
    B, S = len(positions), len(positions[0])
    qkv = torch.randn(B, S, H + 2 * H_KV, D, device=device).to(torch.bfloat16)
    pos = torch.tensor(positions, device=device)
    inv = torch.rand(D // 2, device=device)
    angles = pos[..., None].float() * inv
    cos = torch.cat((angles, angles), -1).cos().to(torch.bfloat16)          # [B, S, D]
    sin = torch.cat((angles, angles), -1).sin().to(torch.bfloat16)
    k_cache = torch.zeros(B + 1, H_KV, T, D, device=device, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    single = B == 1
    q = fused_ops.rotary_into_cache(qkv, cos[0] if single else cos, sin[0] if single else sin,
                                    pos[0] if single else pos, k_cache[:B], v_cache[:B], H, H_KV)
    rotated = apply_rotary(qkv[:, :, :H + H_KV].float(), cos[:, :, None].float(), sin[:, :, None].float())
    # within one bf16 step (the fp32 sums' rounding order differs); a wrong position or row is far off
    torch.testing.assert_close(q.float(), rotated[:, :, :H].to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-2)
    expect_k, expect_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for b in range(B):
        for s in range(S):
            expect_k[b, :, positions[b][s]] = rotated[b, s, H:].to(torch.bfloat16)
            expect_v[b, :, positions[b][s]] = qkv[b, s, H + H_KV:]
    torch.testing.assert_close(k_cache.float(), expect_k.float(), rtol=2 ** -7, atol=1e-2)
    assert torch.equal(v_cache, expect_v)


CASES = {"one_row_of_four_positions": [[3, 4, 5, 6]], "three_rows_one_position_each": [[5], [17], [0]],
         "two_rows_two_positions_each": [[9, 10], [30, 31]]}
for _name, _positions in CASES.items():
    CHECKS.check(f"rotary_{_name}", positions=_positions, device="cpu")(rotary_case)


def add_rms_norm_case(rows: int, ordered: bool, pre: bool, device: str) -> None:
    """fused_ops.add_rms_norm against h = x + delta rounded to bf16, rms_norm(h) * w in fp32, then permuted."""
    torch.manual_seed(1)
    D, eps = 320, 1e-5                       # not a power of two: the masked tail is read and not written
    x, delta = (torch.randn(rows, D, device=device).to(torch.bfloat16) for _ in range(2))
    w, pre_w = (torch.rand(D, device=device).to(torch.bfloat16) + 0.5 for _ in range(2))
    order = torch.randperm(D, device=device) if ordered else None
    h, out = fused_ops.add_rms_norm(x, delta, w, eps, order, (pre_w, 1e-6) if pre else None)
    d = delta.float()
    if pre:
        d = (d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-6) * pre_w.float()).to(torch.bfloat16).float()
    expect_h = (x.float() + d).to(torch.bfloat16)
    hf = expect_h.float()
    expect = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    if ordered:
        expect = expect[:, order]
    # a few bf16 steps apart at most: the interpreter's float-to-bf16 conversions (of the normed delta, h and
    # out) do not round to nearest; a wrong order or norm is off by far more
    torch.testing.assert_close(h.float(), expect_h.float(), rtol=2 ** -6, atol=3e-2)
    torch.testing.assert_close(out.float(), expect.to(torch.bfloat16).float(), rtol=2 ** -6, atol=3e-2)


NORM_CASES = {f"rows{rows}_{'ordered' if ordered else 'natural'}{'_pre' if pre else ''}": (rows, ordered, pre)
              for rows in (1, 3) for ordered in (False, True) for pre in (False, True)}
for _name, (_rows, _ordered, _pre) in NORM_CASES.items():
    CHECKS.check(f"add_rms_norm_{_name}", rows=_rows, ordered=_ordered, pre=_pre, device="cpu")(add_rms_norm_case)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return CHECKS.run_child(__file__, tmp_path_factory.mktemp("interpreter"))


@pytest.mark.parametrize("name", list(CHECKS.checks))
def test_kernel_under_the_interpreter(interpreted, name):
    CHECKS.assert_all_ran(interpreted)
    assert interpreted[name] == "ok", interpreted[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_rotary_into_cache_cuda(name):
    rotary_case(CASES[name], "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(NORM_CASES))
def test_add_rms_norm_cuda(name):
    add_rms_norm_case(*NORM_CASES[name], "cuda")


if __name__ == "__main__":
    CHECKS.child_main()
