"""Fused CUDA kernels (Triton) for the small steps between the matmuls of a decoder layer.

Batch-1 decode replays a CUDA graph of the whole step; its tiny elementwise kernels each still cost ~2-3 us
there, about as much as a small GEMV. Eager PyTorch spends seven on RoPE plus the KV-cache write (neg, cat,
three multiply/adds, two index_copy_; three more with Qwen3's and Gemma 3's q/k norms), two on SwiGLU or
GeGLU (act, mul) and two on each residual add followed by an RMSNorm (three with Gemma's norm on attention's
output before the add); these replace them with one each.
Used on CUDA outside torch.compile (which fuses the same steps itself); CPU keeps the plain ops.
"""
from __future__ import annotations

import functools

import torch

from engine.cuda_launch import triton_pdl as pdl


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels apply to activations x: CUDA, half precision, not under torch.compile."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling()


@functools.cache
def _kernels():
    """The Triton kernels (imported late: CPU-only installs have no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rotary_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, cos_s, sin_s, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                            H, H_KV, T, S, cache_b, qw_ptr, kw_ptr, eps, HALF: tl.constexpr, NORM: tl.constexpr,
                            PDL: tl.constexpr):
        # qkv: [B * S, H + 2 H_kv, D]; cos, sin: [B * S, D] rows cos_s / sin_s apart; pos: [B * S]; q: [B * S,
        # H, D]; caches: [B, H_kv, T, D], rows cache_b elements apart (row b: positions s of b * S .. + S - 1);
        # NORM: each q and k head first RMS-normalised with weights qw / kw [D] (Qwen3, Gemma 3)
        if PDL:   # engine.cuda_launch
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        s = tl.program_id(0)
        h = tl.program_id(1)
        row = (s // S).to(tl.int64) * cache_b
        D: tl.constexpr = 2 * HALF
        d = tl.arange(0, HALF)
        head = qkv_ptr + (s * (H + 2 * H_KV) + h).to(tl.int64) * D
        pos = tl.load(pos_ptr + s)
        if h < H + H_KV:
            # HF's rotate-half RoPE: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in fp32
            x1 = tl.load(head + d).to(tl.float32)
            x2 = tl.load(head + HALF + d).to(tl.float32)
            if NORM:   # rounded to the activation dtype between norm and RoPE, as the unfused steps do
                w_ptr = qw_ptr if h < H else kw_ptr
                scale = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
                ty = qkv_ptr.dtype.element_ty
                x1 = (x1 * scale * tl.load(w_ptr + d).to(tl.float32)).to(ty).to(tl.float32)
                x2 = (x2 * scale * tl.load(w_ptr + HALF + d).to(tl.float32)).to(ty).to(tl.float32)
            c1 = tl.load(cos_ptr + s * cos_s + d).to(tl.float32)
            c2 = tl.load(cos_ptr + s * cos_s + HALF + d).to(tl.float32)
            s1 = tl.load(sin_ptr + s * sin_s + d).to(tl.float32)
            s2 = tl.load(sin_ptr + s * sin_s + HALF + d).to(tl.float32)
            if h < H:
                out = q_ptr + (s * H + h).to(tl.int64) * D
            else:
                out = k_cache_ptr + row + ((h - H) * T + pos).to(tl.int64) * D
            tl.store(out + d, (x1 * c1 - x2 * s1).to(out.dtype.element_ty))
            tl.store(out + HALF + d, (x2 * c2 + x1 * s2).to(out.dtype.element_ty))
        else:
            full = tl.arange(0, D)
            tl.store(v_cache_ptr + row + ((h - H - H_KV) * T + pos).to(tl.int64) * D + full, tl.load(head + full))

    @triton.jit
    def act_mul_kernel(gate_up_ptr, out_ptr, HIDDEN, BLOCK: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr):
        # gate_up: [M, 2 * HIDDEN] (gate first) -> out: [M, HIDDEN] = act(gate) * up, act silu or GELU (tanh)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        m = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = i < HIDDEN
        gate = tl.load(gate_up_ptr + m * 2 * HIDDEN + i, mask=ok, other=0).to(tl.float32)
        up = tl.load(gate_up_ptr + m * 2 * HIDDEN + HIDDEN + i, mask=ok, other=0).to(tl.float32)
        if GELU:   # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
            act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
        else:
            act = gate * tl.sigmoid(gate)
        tl.store(out_ptr + m * HIDDEN + i, (act * up).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, order_ptr, pre_w_ptr, h_ptr, out_ptr, D, eps, pre_eps,
                            BLOCK: tl.constexpr, HAS_ORDER: tl.constexpr, PRE: tl.constexpr, PDL: tl.constexpr):
        # one row: h = x + delta (rounded to the activation dtype, as the unfused add would), out = rms_norm(h),
        # written in `order` when given (out[i] = rms_norm(h)[order[i]]: the next matmul's input order).
        # PRE (Gemma's norm on what attention returns): delta is first rms_norm(delta) * pre_w, rounded.
        i = tl.arange(0, BLOCK)
        ok = i < D
        # The weights and the order are the model's, written by no kernel of a step: read before the wait.
        w = tl.load(w_ptr + i, mask=ok, other=0).to(tl.float32)
        if HAS_ORDER:
            j = tl.load(order_ptr + i, mask=ok, other=0)
        if PRE:
            pre_w = tl.load(pre_w_ptr + i, mask=ok, other=0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64) * D
        ty = h_ptr.dtype.element_ty
        delta = tl.load(delta_ptr + row + i, mask=ok, other=0).to(tl.float32)
        if PRE:
            pre_scale = tl.rsqrt(tl.sum(delta * delta, axis=0) / D + pre_eps)
            delta = (delta * pre_scale * pre_w).to(ty).to(tl.float32)
        h = (tl.load(x_ptr + row + i, mask=ok, other=0).to(tl.float32) + delta).to(ty)
        tl.store(h_ptr + row + i, h, mask=ok)
        hf = h.to(tl.float32)
        scale = tl.rsqrt(tl.sum(hf * hf, axis=0) / D + eps)
        y = hf * scale * w
        if HAS_ORDER:
            # permuted through shared memory: a gather of x and delta from global memory by one block (the
            # order scatters every warp's 32 reads over 32 lines) took ~2 us more a norm on an H200
            y = tl.gather(y, j, 0)
        tl.store(out_ptr + row + i, y.to(out_ptr.dtype.element_ty), mask=ok)

    return triton, rotary_cache_kernel, act_mul_kernel, add_rms_norm_kernel


def rotary_into_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int,
                      qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """Rotate q and k by RoPE, write k and v into the caches at input_pos; returns q [B, S, H, D].
    qkv: [B, S, H + 2 H_kv, D] contiguous, D a power of two; input_pos: [S] (B = 1) or [B, S], a row of
    positions per generation (engine.batch); cos, sin: [S, D] or [B, S, D] (or views of them; each row
    contiguous, rows any distance apart: engine.llama.Rotary's table gives cos and sin rows interleaved);
    caches: [B, H_kv, T, D] (rows any distance apart, the rest contiguous). qk_norm: (q weight [D], k weight [D], eps) to RMS-normalise each q and k head
    before RoPE (one kernel instead of a norm each, and the cat that put them back)."""
    triton, kernel, _, _ = _kernels()
    B, S, heads, D = qkv.shape
    q = torch.empty(B, S, n_heads, D, dtype=qkv.dtype, device=qkv.device)
    cos, sin = cos.reshape(B * S, D), sin.reshape(B * S, D)   # views where the rows allow (the table's do)
    qw, kw, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    kernel[(B * S, heads)](qkv, cos, sin, cos.stride(0), sin.stride(0), input_pos.reshape(-1), q, k_cache, v_cache,
                           n_heads, n_kv_heads, k_cache.shape[2], S, k_cache.stride(0), qw, kw, eps, HALF=D // 2,
                           NORM=qk_norm is not None, **pdl(qkv))
    return q


FUSED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def act_mul(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """The gated MLP's act(gate) * up from the fused gate-up projection [..., 2 * hidden] -> [..., hidden]:
    SwiGLU (act "silu") or Gemma's GeGLU ("gelu_pytorch_tanh")."""
    triton, _, kernel, _ = _kernels()
    hidden = gate_up.shape[-1] // 2
    rows = gate_up.numel() // gate_up.shape[-1]
    out = torch.empty(*gate_up.shape[:-1], hidden, dtype=gate_up.dtype, device=gate_up.device)
    kernel[(rows, triton.cdiv(hidden, 1024))](gate_up, out, hidden, BLOCK=1024, GELU=act == "gelu_pytorch_tanh",
                                              **pdl(gate_up))
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 order: torch.Tensor | None = None,
                 pre: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h) * weight) with h = x + delta, over the last dim; x, delta contiguous, same shape.
    order: the norm's output comes in this order of the last dim (h does not). pre: (weight, eps) of a norm
    applied to delta first (h = x + rms_norm(delta) * weight)."""
    triton, _, _, kernel = _kernels()
    D = x.shape[-1]
    h, out = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(D)
    pre_w, pre_eps = pre if pre is not None else (weight, 0.0)
    kernel[(x.numel() // D,)](x, delta, weight, order if order is not None else weight, pre_w, h, out, D, eps,
                              pre_eps, BLOCK=block, HAS_ORDER=order is not None, PRE=pre is not None,
                              num_warps=8 if block >= 4096 else 4, **pdl(x))
    return h, out
