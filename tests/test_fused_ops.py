"""engine.fused_ops' RoPE + KV-cache kernel against the unfused ops it replaces: one row of positions (a single
stream's step or prompt) and a row per generation (engine.batch's [B, S] positions, into cache rows 0..B-1).
Checked under Triton's interpreter on CPU and compiled on CUDA."""
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


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return CHECKS.run_child(__file__, tmp_path_factory.mktemp("interpreter"))


@pytest.mark.parametrize("name", list(CASES))
def test_rotary_into_cache_under_the_interpreter(interpreted, name):
    CHECKS.assert_all_ran(interpreted)
    assert interpreted[f"rotary_{name}"] == "ok", interpreted[f"rotary_{name}"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_rotary_into_cache_cuda(name):
    rotary_case(CASES[name], "cuda")


if __name__ == "__main__":
    CHECKS.child_main()
