"""engine.llama's decode-step setup on CUDA (issue 21): RoPE's cos and sin gathered from a table that
setup_caches builds (one kernel a step instead of about eight computing them), and no attention mask built
for CUDA decode, which reads none. Both must leave every logit bit-equal. The CPU keeps computing (its
vectorised cos need not round a table's rows as it rounds one position's)."""
from __future__ import annotations

import pytest
import torch

from engine.llama import ModelArgs, Rotary, Transformer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}


def tiny(**kw) -> ModelArgs:
    return ModelArgs(vocab_size=96, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                     intermediate_size=256, max_position_embeddings=64, **kw)


def test_cpu_builds_no_table_and_keeps_its_mask():
    model = Transformer(tiny())
    model.setup_caches(64, torch.float32)
    assert model.rotary.table is None
    cos, sin, mask = model.tables(torch.tensor([5]), 16, torch.zeros(1, 1, 128))[False]
    # additive, made once a step (SDPA would convert a bool mask in every layer): 0 up to position 5, -inf after
    assert mask is not None and mask.shape == (1, 16) and mask.dtype == torch.float32
    assert (mask[0, :6] == 0).all() and (mask[0, 6:] == float("-inf")).all()


@needs_cuda
@pytest.mark.parametrize("rope", [{}, {"rope_type": "linear", "factor": 2.0}, LLAMA3, "partial"])
def test_table_rows_are_bit_equal_to_computed_ones(rope):
    """Every shape of positions forward takes ([S] for one row, [B, S] for engine.batch's rows), both
    dtypes; partial rotary (Phi-4-mini) gives rows of its rotated width."""
    args = ModelArgs(head_dim=64, rope_theta=500000.0, partial_rotary_factor=0.75) if rope == "partial" \
        else ModelArgs(head_dim=64, rope_theta=500000.0, rope_scaling=rope)
    rotary = Rotary(args).cuda()
    positions = [torch.tensor([0]), torch.tensor([4095]), torch.arange(100, 164), torch.tensor([[7], [3000]])]
    for dtype in (torch.bfloat16, torch.float32):
        rotary.table = None
        want = [rotary(p.cuda(), dtype) for p in positions]
        rotary.build_table(4096, dtype)
        assert rotary.table is not None and rotary.table.shape == (4096, 2, rotary.dim)
        for p, (cos, sin) in zip(positions, want):
            got_cos, got_sin = rotary(p.cuda(), dtype)
            assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)


@needs_cuda
def test_position_dependent_frequencies_build_no_table():
    for rope in ({"rope_type": "dynamic", "factor": 2.0},
                 {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
                  "original_max_position_embeddings": 32}):
        rotary = Rotary(ModelArgs(head_dim=64, max_position_embeddings=128, rope_scaling=rope)).cuda()
        rotary.build_table(128, torch.bfloat16)
        assert rotary.table is None


@needs_cuda
@pytest.mark.parametrize("window", [None, 6])
def test_decode_logits_are_bit_equal_with_the_table_and_no_mask(window):
    """A tiny bf16 model on CUDA (the fused RoPE + cache kernel reads the table's interleaved rows): prefill,
    one-row decode steps and two-row steps (engine.batch's [B, 1] positions) give the very same logits with
    the table as computing cos and sin, and the decode steps build no mask."""
    torch.manual_seed(0)
    model = Transformer(tiny(sliding_window=window)).to("cuda", torch.bfloat16)
    model.setup_caches(64, torch.bfloat16, slots=2)
    ids = torch.randint(0, 96, (2, 40), device="cuda")

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = [model(ids[:1, :20], torch.arange(20, device="cuda"), kv_len=20, last_only=True)[:, -1]]
            out += [model(ids[:1, p:p + 1], torch.tensor([p], device="cuda"), kv_len=32)[:, -1]
                    for p in range(20, 30)]
            out += [model(ids[:, p:p + 1], torch.tensor([[p], [p + 3]], device="cuda"), kv_len=64)[:, -1]
                    for p in range(30, 37)]
        return torch.cat(out)

    table = model.rotary.table
    assert table is not None
    with_table = run()
    model.rotary.table = None
    computed = run()
    assert torch.equal(with_table, computed)
    step = model.tables(torch.tensor([25], device="cuda"), 32, torch.zeros(1, 1, 128, device="cuda",
                                                                          dtype=torch.bfloat16))
    assert all(mask is None for _, _, mask in step.values())
