"""Hearth's own 4-bit kernels for CUDA (Triton): a batch-1 GEMV for decode and a one-pass dequantizer for
prompts, both over one packed layout made at load.

Layout (GPTQ's own): qweight int32 [K/8, N], nibble j (bits 4j..4j+3) of word [w, n] holds the level of
input k = 8w + j for output n, so a warp reads consecutive outputs' words (coalesced 16-byte loads).
scales [G, N] and either one zero point z for the whole matrix (symmetric GPTQ: every group's z is 8) or
per-group offsets m [G, N], so that W[n, k] = s[g, n] * q[k, n] + m[g, n] with m = -z * s. Act-order weights
have K sorted by group at load; the GEMV gathers x through `perm` itself (x is tiny), which saves a separate
gather kernel per linear.

The GEMV works one group at a time and applies the scale once per word row: for the 8 inputs of word row w,
sum_j x_j (s q_j + m) = s * sum_j x_j q_j + m * sum_j x_j. The accumulator keeps the word rows apart and is
reduced once at the end, so the loop does no cross-thread work. Batch-1 decode is bound by reading the
weights, so the grid splits both N and K (up to 16 ways; the partial sums meet through fp32 atomics) so
that every SM has several programs in flight.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemvConfig:
    block_n: int     # outputs per program
    split_k: int     # programs sharing one output's groups (> 1: partial sums meet in a GemvWorkspace)
    num_warps: int
    num_stages: int


class GemvWorkspace:
    """Split-K scratch for one weight: fp32 partial sums [N] and an arrival counter per output block, both
    zero between calls. The last program of a block to arrive writes the bf16 result and zeroes both again,
    so a split-K call needs no memset or cast kernel of its own (each costs as much as a small GEMV)."""

    def __init__(self, n: int, config: GemvConfig, device: torch.device):
        self.sums = torch.zeros(n, dtype=torch.float32, device=device)
        self.arrivals = torch.zeros(-(-n // config.block_n), dtype=torch.int32, device=device)


def pack_columns(q: torch.Tensor) -> torch.Tensor:
    """Levels uint8 [K, N] (0..15, K % 8 == 0) -> int32 [K/8, N], input 8w + j in nibble j of word w."""
    K, N = q.shape
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)[None, :, None]
    words = (q.view(K // 8, 8, N).to(torch.int64) << shifts).sum(1)                     # < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@functools.cache
def _kernels():
    """The Triton kernels (imported late: CPU-only installs have no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["G", "zero"])
    def gemv_kernel(x_ptr, perm_ptr, w_ptr, s_ptr, m_ptr, y_ptr, sums_ptr, arrivals_ptr, N, G, zero,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                    HAS_PERM: tl.constexpr, HAS_OFFSETS: tl.constexpr):
        # x: [K] (any float); w: int32 [K/8, N]; s, m: [G, N]; y: [N] bf16; sums, arrivals: GemvWorkspace
        ROWS: tl.constexpr = GROUP // 8                                                   # word rows a group
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        r = tl.arange(0, ROWS)
        per_split = tl.cdiv(G, SPLIT_K)
        first = tl.program_id(1) * per_split
        last = tl.minimum(first + per_split, G)
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for g in range(first, last):
            w = g * ROWS + r                                                              # [ROWS] word rows
            words = tl.load(w_ptr + w[:, None].to(tl.int64) * N + n[None, :], mask=n_ok[None, :], other=0)
            s = tl.load(s_ptr + g * N + n, mask=n_ok, other=0).to(tl.float32)             # [BN]
            dots = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            x_rows = tl.zeros([ROWS], dtype=tl.float32)
            for j in tl.static_range(8):
                k = w * 8 + j
                if HAS_PERM:
                    k = tl.load(perm_ptr + k)
                xj = tl.load(x_ptr + k).to(tl.float32)                                    # [ROWS]
                # 2^23 + q as a float's bits, minus 2^23: two full-rate ops instead of a quarter-rate I2F
                level = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                dots += level * xj[:, None]
                x_rows += xj
            if HAS_OFFSETS:
                m = tl.load(m_ptr + g * N + n, mask=n_ok, other=0).to(tl.float32)
                acc += s[None, :] * dots + m[None, :] * x_rows[:, None]
            else:
                acc += s[None, :] * (dots - zero * x_rows[:, None])
        y = tl.sum(acc, axis=0)
        if SPLIT_K == 1:
            tl.store(y_ptr + n, y.to(tl.bfloat16), mask=n_ok)
        else:
            tl.atomic_add(sums_ptr + n, y, mask=n_ok, sem="relaxed")
            tl.debug_barrier()  # every thread's partial sum is in before the block counts itself in
            arrived = tl.atomic_add(arrivals_ptr + tl.program_id(0), 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.load(sums_ptr + n, mask=n_ok, other=0, cache_modifier=".cg")
                tl.store(y_ptr + n, total.to(tl.bfloat16), mask=n_ok)
                tl.store(sums_ptr + n, tl.zeros_like(total), mask=n_ok)
                tl.store(arrivals_ptr + tl.program_id(0), 0)

    @triton.jit(do_not_specialize=["G", "zero"])
    def dequant_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, K, G, zero, GROUP: tl.constexpr,
                       HAS_OFFSETS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
        # w: int32 [K/8, N] -> out: bf16 [K, N] (W transposed; cuBLAS takes either orientation)
        w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (w[:, None] < K // 8) & (n[None, :] < N)
        words = tl.load(w_ptr + w[:, None].to(tl.int64) * N + n[None, :], mask=ok, other=0)
        sg = (w[:, None] * 8 // GROUP) * N + n[None, :]                                   # 8 | GROUP: one group a word
        s = tl.load(s_ptr + sg, mask=ok, other=0).to(tl.float32)
        if HAS_OFFSETS:
            m = tl.load(m_ptr + sg, mask=ok, other=0).to(tl.float32)
        else:
            m = -zero * s
        rows = out_ptr + (w[:, None].to(tl.int64) * 8) * N + n[None, :]
        for j in tl.static_range(8):
            q = ((words >> (4 * j)) & 15).to(tl.float32)
            tl.store(rows + j * N, (q * s + m).to(tl.bfloat16), mask=ok)

    return triton, gemv_kernel, dequant_kernel


def default_config(n: int, k: int, group_size: int) -> GemvConfig:
    """Launch shape for an [N, K] weight. From a sweep on an H100 (bench/engine.py --gemv): 64 outputs and
    up to 16 K-splits a program were best or within 3% of it on every 7B/70B shape at g32 and g128."""
    return GemvConfig(block_n=64, split_k=max(1, min(16, k // group_size)), num_warps=4, num_stages=2)


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
              zero: float, perm: torch.Tensor | None, group_size: int, cfg: GemvConfig,
              workspace: GemvWorkspace) -> torch.Tensor:
    """y = x @ W^T for one row. x: [1, K] float on CUDA -> y: [1, N] bf16 (W as in the module docstring).
    workspace: made for this weight and cfg; calls sharing one must not overlap (one stream)."""
    triton, kernel, _ = _kernels()
    N = qweight.shape[1]
    y = torch.empty(N, dtype=torch.bfloat16, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    kernel[grid](x, perm if perm is not None else qweight, qweight, scales,
                 offsets if offsets is not None else scales, y, workspace.sums, workspace.arrivals,
                 N, scales.shape[0], zero,
                 GROUP=group_size, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
                 HAS_PERM=perm is not None, HAS_OFFSETS=offsets is not None,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.view(1, N)


def dequantize_columns(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, zero: float,
                       group_size: int) -> torch.Tensor:
    """W^T bf16 [K, N] from the packed layout, one pass on the GPU (prompts then run through cuBLAS)."""
    triton, _, kernel = _kernels()
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty(K, N, dtype=torch.bfloat16, device=qweight.device)
    grid = (triton.cdiv(K // 8, 16), triton.cdiv(N, 128))
    kernel[grid](qweight, scales, offsets if offsets is not None else scales, out, N, K, scales.shape[0], zero,
                 GROUP=group_size, HAS_OFFSETS=offsets is not None, BLOCK_W=16, BLOCK_N=128)
    return out
