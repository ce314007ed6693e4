"""A LoRA's low-rank product for decode on CUDA (Triton), computed beside the base layer.

At decode a few rows (<= 8) go through each adapted layer and the product is tiny ([rows, K] x [K, R], then
[rows, R] x [R, N], R the stacked ranks). torch runs it as two cuBLAS calls on slow split-K paths, after
the base layer: +11 us a layer on an H200 inside the captured step, +70% on a 7B 4-bit decode. Its time is
latency (a few dependent memory round trips), not bytes, so it is taken off the base layer's path:
- `low_rank_delta`: d = (x @ A^T) @ B^T in fp32, in two short kernels on a side stream, while the base layer
  runs on the main one (both only read x). The first splits u = x @ A^T along K (a program a span of inputs,
  so A is read by many SMs at once) into fp32 partials; the second gives each program BLOCK_N outputs: it
  issues its loads of B first, then sums the partials (all loads in flight together).
- `add_delta`: y + d on the main stream once both are done (one small elementwise kernel), into a new tensor
  (y may be a base layer's buffer).
Measured on an H200 (bench/lora_step.py, a rank-16 adapter on the 7B 4-bit model's 128 adapted layers), extra
time a layer in the captured step: torch's matmuls 11.2 us; the two kernels after the base layer (the second
adding y itself) 7.5 us; the first beside the base layer and the second after it 4.9 us; this 2.6 us (the
side branch and its join alone 1.3 us: the rest is the add, the one step after the base layer).
Also measured and dropped: one kernel whose every program recomputes u (one SM streaming all of A: slower
than cuBLAS), one that shares the partials between its programs through flags in memory (a ticket, then a
release and acquire polls per split: more round trips than a second launch, which costs ~0.8 us), a
high-priority side stream (no gain), and other spans (K_SPAN 512-4096, BLOCK_N 64-256: none faster; the
add's ADD_BLOCK 256-2048 all alike, 4096 slower).
Grids depend only on shapes, and A and B are read through their addresses, so a captured graph replays after
an in-place rewrite of A (a new weight). The kernels are built on first use (CPU installs may lack Triton);
tests run them on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import functools

import torch

MAX_ROWS = 8       # decode (batched up to 8 slots); longer inputs (prefill) keep torch's matmuls
M_PAD = 16         # rows padded to tl.dot's smallest side
MAX_RANK = 256     # stacked ranks the kernels' tiles hold; more keep torch's matmuls
BLOCK_N = 128      # outputs a program of the second kernel writes (B tiles of at most 16 KB below)
ADD_BLOCK = 512    # outputs a program of the add writes: many small programs (4096 measured 0.6 us slower a layer)


def usable(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the kernels take activations x [..., K] with A [R, K]: CUDA, half precision (the torch path
    keeps fp32 exact), at most MAX_ROWS rows and MAX_RANK ranks, not under torch.compile."""
    rows = x.numel() // x.shape[-1]
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == a.dtype
            and 0 < rows <= MAX_ROWS and a.shape[0] <= MAX_RANK and not torch.compiler.is_compiling())


def k_span(r_pad: int) -> int:
    """Inputs a program of the first kernel covers: 1024 at rank 16 (fewer, longer programs measured faster),
    512 from rank 32 on (A tiles of at most 32 KB)."""
    return max(512, min(1024, 16384 // r_pad))


@functools.cache
def _kernels():
    """The Triton kernels (imported late: CPU-only installs may have no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def input_kernel(x_ptr, a_ptr, part_ptr, M, K, R, sx,
                     K_SPAN: tl.constexpr, M_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
        # x: [M, K] rows sx apart; A: [R, K]; part: [SPLITS, M_PAD, R_PAD] fp32, rows >= M left unwritten.
        # Program s: part[s] = x[:, span] @ A[:, span]^T over inputs [s * K_SPAN, (s + 1) * K_SPAN).
        s = tl.program_id(0)
        rows = tl.arange(0, M_PAD)
        ranks = tl.arange(0, R_PAD)
        m_ok = rows < M
        k_hi = tl.minimum(s * K_SPAN + K_SPAN, K)
        u = tl.zeros([M_PAD, R_PAD], tl.float32)
        for k0 in range(s * K_SPAN, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            xk = tl.load(x_ptr + rows[:, None] * sx + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            ak = tl.load(a_ptr + ranks[:, None] * K + k[None, :], mask=(ranks < R)[:, None] & k_ok[None, :],
                         other=0.0)
            u += tl.dot(xk, tl.trans(ak))                                                  # [M_PAD, R_PAD]
        tl.store(part_ptr + s * (M_PAD * R_PAD) + rows[:, None] * R_PAD + ranks[None, :], u, mask=m_ok[:, None])

    @triton.jit
    def delta_kernel(part_ptr, b_ptr, d_ptr, M, N, R,
                     SPLITS: tl.constexpr, M_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        # B: [N, R]; d: [M, N] fp32. Program: d[:, n] = u @ B[n]^T for n in [pid * BLOCK_N, + BLOCK_N), u the
        # sum of the partials, rounded to B's dtype first as torch's path rounds x @ A^T.
        rows = tl.arange(0, M_PAD)
        ranks = tl.arange(0, R_PAD)
        m_ok = rows < M
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        bn = tl.load(b_ptr + n[:, None] * R + ranks[None, :], mask=n_ok[:, None] & (ranks < R)[None, :],
                     other=0.0)                                                            # [BLOCK_N, R_PAD]
        u = tl.zeros([M_PAD, R_PAD], tl.float32)
        for s in tl.static_range(SPLITS):   # unrolled: every partial's load issued at once
            u += tl.load(part_ptr + s * (M_PAD * R_PAD) + rows[:, None] * R_PAD + ranks[None, :],
                         mask=m_ok[:, None], other=0.0)
        d = tl.dot(u.to(b_ptr.dtype.element_ty), tl.trans(bn))                             # [M_PAD, BLOCK_N]
        tl.store(d_ptr + rows[:, None] * N + n[None, :], d, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def add_kernel(y_ptr, d_ptr, out_ptr, N, sy, so, BLOCK: tl.constexpr):
        # out[m] = y[m] + d[m] in fp32, rounded once (d: fp32 [M, N] contiguous; y, out rows sy, so apart)
        m = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        y = tl.load(y_ptr + m * sy + n, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + m * N + n, mask=ok, other=0.0)
        tl.store(out_ptr + m * so + n, (y + d).to(out_ptr.dtype.element_ty), mask=ok)

    return triton, input_kernel, delta_kernel, add_kernel


def low_rank_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """(x @ a^T) @ b^T in fp32 [rows, N]. x: [..., K]; a: [R, K] and b: [N, R] contiguous; one half dtype
    (see usable). stream: both kernels run there, after the current stream's work so far; the result is
    allocated on the current stream, which must wait for `stream` before reading or freeing it."""
    triton, input_kernel, delta_kernel, _ = _kernels()
    K, N, R = x.shape[-1], b.shape[0], a.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    r_pad = max(16, triton.next_power_of_2(R))   # tl.dot's smallest side
    span = k_span(r_pad)
    splits = triton.cdiv(K, span)
    # One allocation for d and the partials, d a view of it: the partials are written and read on `stream`
    # only, and live as long as the caller holds d (until its wait for `stream`); freed earlier, the current
    # stream could reuse them while `stream` still writes them.
    buffer = torch.empty(M * N + splits * M_PAD * r_pad, dtype=torch.float32, device=x.device)
    d = buffer[:M * N].view(M, N)
    part = buffer[M * N:].view(splits, M_PAD, r_pad)
    block_n = min(BLOCK_N, 8192 // r_pad)
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(x.device))
    # Triton launches on the current device: layers split across GPUs must launch on their own.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext(), \
            torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        input_kernel[(splits,)](x2, a, part, M, K, R, x2.stride(0), K_SPAN=span, M_PAD=M_PAD, R_PAD=r_pad,
                                BLOCK_K=min(span, 8192 // r_pad))   # A tiles of 16 KB
        delta_kernel[(triton.cdiv(N, block_n),)](part, b, d, M, N, R, SPLITS=splits, M_PAD=M_PAD, R_PAD=r_pad,
                                                 BLOCK_N=block_n)
    return d


def add_delta(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """y + d as a new tensor shaped like y, added in fp32 and rounded once. y: [..., N]; d: low_rank_delta's
    fp32 [rows, N] for the same rows."""
    triton, _, _, add_kernel = _kernels()
    N = y.shape[-1]
    y2 = y.reshape(-1, N)
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    out = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        add_kernel[(y2.shape[0], triton.cdiv(N, ADD_BLOCK))](y2, d, out, N, y2.stride(0), out.stride(0),
                                                             BLOCK=ADD_BLOCK)
    return out.reshape(y.shape)
