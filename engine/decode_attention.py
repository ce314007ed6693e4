"""Decode attention on CUDA (Triton): one new query position per slot against the KV cache, flash-decoding.

Decode reads the whole filled cache every token; at an 8k-token context that is about as many bytes as the
weights of a 4-bit 7B model, so attention has to run near the copy bandwidth. Two things keep it there:
- Grouped heads read in place: each program loads a block of one kv head's keys and values once and scores
  all H / H_kv query heads that share it (the old path copied the cache H / H_kv times with repeat_interleave,
  twice a layer a step).
- Split across the sequence: one program per (slot, kv head) is far too few to fill a GPU at batch 1, so each
  program takes one span of the cache and writes a partial (running max, sum of exponentials, weighted sum of
  values), and the last program of each (slot, kv head) to finish combines them, in the same launch (an
  arrival count per kv head, which that program sets back to 0). A short range (ONE_PASS keys) is read by one
  program with no partials at all. The earlier split kernel plus a second combine kernel stays callable
  (two_kernels) until both are measured inside the engine.

Per-slot positions come as a device tensor and the grid depends only on shapes (slots, heads, the cache
length T given: a graph's bucket), so a captured step replays for any positions within its bucket without a
host read. Only keys 0..pos of each slot are read, never the stale tail of the bucket.
The Triton kernels are built on first use (CPU installs may lack Triton); tests run them on CPU under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from engine.cuda_launch import triton_pdl as pdl

# Programs the fused kernel aims for (about two per SM of a 132-SM H100/H200): on an H200 under CUDA graphs,
# 256 beat 512 at every length from 1k to 8k keys, 7B's 32 kv heads and GQA's 8, 1 and 8 rows (fewer partials
# to combine, as fast a read); 128 left 1-row 32-head reads slower (bench/attention_step.py, issue 21).
TARGET_PROGRAMS = 256
TWO_KERNEL_TARGET = 512   # the two-kernel path's, as it shipped (kept to measure against)
SPLIT_BLOCK = 16   # spans the combine reads at a time (at most)
# The fused kernel's combine holds about this many partial values at a time: with GQA's 4 heads a kv head
# and 64 spans, 4096 took 8 rounds of reads one after another, 16384 four (4 us faster at 4k keys).
COMBINE_ELEMENTS = 16384
# Keys of a slot's range that one program reads alone, in one pass and with no partials: at 128 keys that
# beat two spans and their combine (one more round trip to memory and back); at 300 keys one program's five
# blocks one after another lose to five programs.
ONE_PASS = 128


@functools.cache
def _kernels():
    """The Triton kernels (imported late: CPU-only installs may have no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr,
                     sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, s_pos,
                     H_KV, T, SPAN, N_SPLITS, scale, cap, window,
                     G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK_T: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
        # One program: slot b, kv head kvh, keys [split * SPAN, (split + 1) * SPAN) of that slot's valid range,
        # for the G query heads kvh * G .. kvh * G + G - 1 (repeat_interleave's order). q: [B, H, D];
        # k, v: [B, H_kv, T, D] (strided views of the cache); partials m, l: [B * H, N_SPLITS],
        # acc: [B * H, N_SPLITS, D], all fp32.
        bk = tl.program_id(0)
        split = tl.program_id(1)
        b = bk // H_KV
        kvh = bk % H_KV
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        g_ok = g < G
        d_ok = d < D
        heads = kvh * G + g
        q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)                          # [G_PAD, D_PAD]
        # keys 0..pos, never past the cache given
        length = tl.minimum(tl.load(pos_ptr + b * s_pos).to(tl.int32) + 1, T)
        lo = tl.maximum(length - window, 0)   # the window: keys older than pos - window + 1 are out of reach
        start = tl.maximum(split * SPAN, lo)
        end = tl.minimum(split * SPAN + SPAN, length)
        k_base = k_ptr + b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        # An empty span (past the slot's length, or before its window) runs no iteration: m stays -inf, l 0.
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < end
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + t[:, None].to(tl.int64) * sk_t + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale                 # [G_PAD, BLOCK_T]
            if SOFTCAP:   # Gemma 2: cap * tanh(s / cap), tanh(x) = 1 - 2 / (exp(2x) + 1) (saturates, no NaN)
                s = cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
            s = tl.where(t_ok[None, :], s, float("-inf"))
            # t0 < end, so every row has a finite score here and m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_base + t[:, None].to(tl.int64) * sv_t + d[None, :], mask=kv_mask, other=0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        row = (b * (H_KV * G) + heads).to(tl.int64) * N_SPLITS + split                       # [G_PAD]
        tl.store(m_ptr + row, m_i, mask=g_ok)
        tl.store(l_ptr + row, l_i, mask=g_ok)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, N_SPLITS,
                       D: tl.constexpr, D_PAD: tl.constexpr, SB: tl.constexpr):
        # One program per (slot, query head): out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M the
        # largest m_s. A slot with no keys at all (every m_s -inf) gets zeros rather than NaN.
        bh = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        big_m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        out = tl.zeros([D_PAD], tl.float32)
        for s0 in range(0, N_SPLITS, SB):
            s = s0 + tl.arange(0, SB)
            s_ok = s < N_SPLITS
            m = tl.load(m_ptr + bh * N_SPLITS + s, mask=s_ok, other=float("-inf"))
            l = tl.load(l_ptr + bh * N_SPLITS + s, mask=s_ok, other=0.0)
            a = tl.load(acc_ptr + (bh * N_SPLITS + s)[:, None] * D + d[None, :],
                        mask=s_ok[:, None] & d_ok[None, :], other=0.0)                     # [SB, D_PAD]
            new_m = tl.maximum(big_m, tl.max(m, axis=0))
            safe = tl.where(new_m == float("-inf"), 0.0, new_m)   # exp(-inf - -inf) would be NaN
            alpha = tl.exp(big_m - safe)
            w = tl.exp(m - safe)
            total = total * alpha + tl.sum(l * w, axis=0)
            out = out * alpha + tl.sum(a * w[:, None], axis=0)
            big_m = new_m
        out = out / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + bh * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr, place_ptr,
                         sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, s_pos,
                         H_KV, T, SPAN, N_SPLITS, scale, cap, window,
                         G: tl.constexpr, G_PAD: tl.constexpr, G_COMB: tl.constexpr, D: tl.constexpr,
                         D_PAD: tl.constexpr, BLOCK_T: tl.constexpr, SB: tl.constexpr, ONE_PASS: tl.constexpr,
                         SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, PLACED: tl.constexpr, PDL: tl.constexpr):
        # One program: slot b, kv head kvh, span `split` of the cache (as split_kernel), in one launch with the
        # combine. Only the spans that hold keys of this slot's range run (the grid is sized for the whole
        # bucket, the length is read at run time); the others exit at once. One span: the program writes the
        # output itself. Several: each writes its partial, counts itself in on count[b, kvh], and the one that
        # counts last combines them and sets the count back to 0 for the next launch (or graph replay).
        if PDL:   # engine.cuda_launch
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        bk = tl.program_id(0)
        split = tl.program_id(1)
        b = bk // H_KV
        kvh = bk % H_KV
        length = tl.minimum(tl.load(pos_ptr + b * s_pos).to(tl.int32) + 1, T)
        lo = tl.maximum(length - window, 0)
        # A range of at most ONE_PASS keys is read by program 0 alone in one pass, with no partials: the
        # combine's extra round trips cost more than its few blocks take (measured: bench/attention_step.py).
        one_pass = length - lo <= ONE_PASS
        first = tl.where(one_pass, 0, lo // SPAN)
        # An idle slot (no keys) still gets one program, to write its zeros.
        n_active = tl.where(one_pass, 1, tl.maximum(tl.cdiv(length, SPAN), first + 1) - first)
        start = tl.where(one_pass, lo, tl.maximum(split * SPAN, lo))
        end = tl.where(one_pass, length, tl.minimum(split * SPAN + SPAN, length))
        if split >= first and split < first + n_active:
            g = tl.arange(0, G_PAD)
            d = tl.arange(0, D_PAD)
            g_ok = g < G
            d_ok = d < D
            heads = kvh * G + g
            q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :],
                        mask=g_ok[:, None] & d_ok[None, :], other=0.0)                      # [G_PAD, D_PAD]
            k_base = k_ptr + b.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
            v_base = v_ptr + b.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
            m_i = tl.full([G_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, D_PAD], tl.float32)
            for t0 in range(start, end, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                t_ok = t < end
                kv_mask = t_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + t[:, None].to(tl.int64) * sk_t + d[None, :], mask=kv_mask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale             # [G_PAD, BLOCK_T]
                if SOFTCAP:
                    s = cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))
                s = tl.where(t_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                v = tl.load(v_base + t[:, None].to(tl.int64) * sv_t + d[None, :], mask=kv_mask, other=0.0)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
            head_rows = (b * (H_KV * G) + heads).to(tl.int64)                                   # [G_PAD]
            if n_active == 1:
                out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
                ok = g_ok[:, None] & d_ok[None, :]
                col = heads[:, None] * D + d[None, :]
                if PLACED:   # where the output projection reads (head, d) from (see decode_attention)
                    col = tl.load(place_ptr + col, mask=ok, other=0)
                tl.store(out_ptr + b.to(tl.int64) * (H_KV * G * D) + col, out.to(out_ptr.dtype.element_ty), mask=ok)
            else:
                row = head_rows * N_SPLITS + split
                tl.store(m_ptr + row, m_i, mask=g_ok)
                tl.store(l_ptr + row, l_i, mask=g_ok)
                tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
                # Every thread's partial stored before the count is published (acq_rel: the last program
                # then sees every other program's partials).
                tl.debug_barrier()
                ticket = tl.atomic_add(count_ptr + bk, 1, sem="acq_rel")
                if ticket == n_active - 1:
                    # The combine, for this kv head's G query heads at once, SB spans at a time. The partials
                    # come from other SMs: read through L2 (.cg), never from this SM's L1, which is not coherent.
                    gc = tl.arange(0, G_COMB)
                    gc_ok = gc < G
                    crow = (b * (H_KV * G) + kvh * G + gc).to(tl.int64)                       # [G_COMB]
                    big_m = tl.full([G_COMB], float("-inf"), tl.float32)
                    total = tl.zeros([G_COMB], tl.float32)
                    res = tl.zeros([G_COMB, D_PAD], tl.float32)
                    for s0 in range(first, first + n_active, SB):
                        sp = s0 + tl.arange(0, SB)
                        ok = gc_ok[:, None] & (sp < first + n_active)[None, :]                 # [G_COMB, SB]
                        idx = crow[:, None] * N_SPLITS + sp[None, :]
                        pm = tl.load(m_ptr + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
                        pl = tl.load(l_ptr + idx, mask=ok, other=0.0, cache_modifier=".cg")
                        pa = tl.load(acc_ptr + idx[:, :, None] * D + d[None, None, :],
                                     mask=ok[:, :, None] & d_ok[None, None, :], other=0.0,
                                     cache_modifier=".cg")                                     # [G_COMB, SB, D_PAD]
                        new_m = tl.maximum(big_m, tl.max(pm, axis=1))
                        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
                        alpha = tl.exp(big_m - safe)
                        w = tl.exp(pm - safe[:, None])                                          # [G_COMB, SB]
                        total = total * alpha + tl.sum(pl * w, axis=1)
                        res = res * alpha[:, None] + tl.sum(pa * w[:, :, None], axis=1)
                        big_m = new_m
                    res = res / tl.where(total > 0, total, 1.0)[:, None]
                    ok = gc_ok[:, None] & d_ok[None, :]
                    col = (kvh * G + gc)[:, None] * D + d[None, :]
                    if PLACED:
                        col = tl.load(place_ptr + col, mask=ok, other=0)
                    tl.store(out_ptr + b.to(tl.int64) * (H_KV * G * D) + col, res.to(out_ptr.dtype.element_ty),
                             mask=ok)
                    tl.atomic_xchg(count_ptr + bk, 0, sem="relaxed")

    return triton, split_kernel, combine_kernel, attention_kernel


def default_span(programs: int, T: int, block: int, target: int = TARGET_PROGRAMS) -> int:
    """Keys each split program covers: enough spans that programs x spans reaches `target`, each a whole
    number of `block`-key blocks. Depends on shapes only (one graph per bucket)."""
    wanted = max(1, -(-target // programs))
    blocks = -(-T // block)
    return block * max(1, -(-blocks // wanted))


@functools.cache
def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The fused kernel's arrival counts, n of them on `device`: zero between launches (the last program of
    each kv head sets its count back), so made once and kept (a captured graph keeps their address), shared by
    every layer and graph. Launches on one device run one after another on its stream, so no two ever count
    on the same buffer at once."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scale: float,
                     softcap: float | None = None, window: int | None = None,
                     span: int | None = None, two_kernels: bool | None = None,
                     places: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query position per slot over the KV cache; returns [B, H, D] in q's dtype.

    q: [B, H, D] (last dim contiguous), the queries already rotated; k, v: [B, H_kv, T, D] (last dim
    contiguous, any other strides: views of the static cache, T its bucket), H a multiple of H_kv; query head
    h reads kv head h // (H / H_kv). positions: [B] integer (any stride: an expanded [1] serves every slot),
    on q's device: each slot's query position; it attends to keys 0..pos (pos + 1 of them, at most T), the
    current token's own key already in the cache; -1 (no keys) gives zeros (a slot with nothing to do).
    scale: multiplies q.k (head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5). softcap: Gemma 2's
    cap * tanh(score / cap), applied after the scale. window: sliding window; keys older than
    pos - window + 1 are masked (Mistral, Gemma, Qwen windows). span: keys per split program (default:
    default_span); tests set it to exercise many spans on small caches. two_kernels: the earlier split kernel
    plus combine kernel instead of the one fused launch (None: HEARTH_DECODE_ATTENTION=two_kernels in the
    environment), kept so that bench/attention_step.py and the engine can measure one against the other.
    places: int32 [H * D] on q's device, a permutation: each slot's value (h, d) is written at flat position
    places[h * D + d] of its H * D outputs instead of h * D + d (an act-order output projection's input order,
    made here rather than gathered by that matmul).
    """
    triton, split_kernel, combine_kernel, attention_kernel = _kernels()
    B, H, D = q.shape
    H_kv, T = k.shape[1], k.shape[2]
    if H % H_kv or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or positions.shape != (B,):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, positions "
                         f"{tuple(positions.shape)}: heads must group evenly, last dims be contiguous, one "
                         f"position per slot")
    if two_kernels is None:
        two_kernels = os.environ.get("HEARTH_DECODE_ATTENTION") == "two_kernels"
    G = H // H_kv
    block = 64 if D <= 128 else 32   # keeps a block of keys and values within registers for D up to 256
    # A span given (tests, benchmarks) splits exactly so, short ranges too.
    one_pass = ONE_PASS if span is None else 0
    span = span or default_span(B * H_kv, T, block, TWO_KERNEL_TARGET if two_kernels else TARGET_PROGRAMS)
    n_splits = triton.cdiv(T, span)
    m = torch.empty(B * H, n_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * H, n_splits, D, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    d_pad = max(16, triton.next_power_of_2(D))   # tl.dot's smallest side
    g_pad = max(16, triton.next_power_of_2(G))
    # tl.dot wants at least 16 rows: MHA's single query head a kv head is padded (decode is bound by the
    # cache's bytes, not the multiply-adds). fp32 inputs keep full precision rather than TF32.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
               v.stride(2), positions.stride(0), H_kv, T, span, n_splits, scale, softcap or 1.0, window or T)
    # Triton launches on the current device: layers split across GPUs must launch on their own.
    # No window: T, which masks nothing.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if two_kernels:
            split_kernel[(B * H_kv, n_splits)](
                q, k, v, positions, m, l, acc, *strides,
                G=G, G_PAD=g_pad, D=D, D_PAD=d_pad, BLOCK_T=block, SOFTCAP=softcap is not None,
                PRECISION=precision)
            combine_kernel[(B * H,)](m, l, acc, out, n_splits, D=D, D_PAD=d_pad, SB=SPLIT_BLOCK)
            if places is not None:
                placed = torch.empty_like(out).view(B, H * D)
                placed[:, places.long()] = out.view(B, H * D)
                out = placed.view(B, H, D)
            return out
        # The combine's [heads, spans, D] block of partials: about COMBINE_ELEMENTS values at a time.
        g_comb = triton.next_power_of_2(G)
        sb = max(1, min(SPLIT_BLOCK, COMBINE_ELEMENTS // (g_comb * d_pad)))
        attention_kernel[(B * H_kv, n_splits)](
            q, k, v, positions, m, l, acc, _counters(q.device, B * H_kv), out,
            out if places is None else places, *strides,
            G=G, G_PAD=g_pad, G_COMB=g_comb, D=D, D_PAD=d_pad, BLOCK_T=block, SB=sb, ONE_PASS=one_pass,
            SOFTCAP=softcap is not None, PRECISION=precision, PLACED=places is not None, **pdl(q))
    return out
