"""Quantized linear layers that swap in for nn.Linear (gpt-fast style).

`QuantWeight` is the format-neutral form every checkpoint is converted to at load: integer levels q,
scales per group and either integer zero points z (GPTQ of any bits, act-order or not; AWQ), so
W[n, k] = s[g(k), n] * (q[k, n] - z[g(k), n]), or float offsets m (GGUF Q4_1-style), so W = s * q + m.

`Int4Linear` runs 4-bit weights through torch's tinygemm kernel (`_weight_int4pack_mm` on CUDA,
`_weight_int4pack_mm_for_cpu` on CPU), which wants bf16 activations, bf16 [G, N, 2] scales-and-zeros and
computes (q - 8) * scale + zero with contiguous groups along K. Act-order checkpoints have non-contiguous
groups; sorting K by group once at load makes them contiguous, and the forward gathers x in that order.
On CUDA, act-order weights use Hearth's own GEMV instead (engine.int4_gemv): it gathers x itself and keeps
the checkpoint's own fp16 scales (2 bytes a group against tinygemm's 4, which at g32 is 12% of the bytes
read), and its one packed copy also feeds prefill. Measured at M=1 on an H100 it is 2-18% slower than
tinygemm on g128 shapes, so plain-order weights stay on tinygemm.
Shapes tinygemm cannot take (and 2/3/8-bit) use `DequantLinear`: the same weights dequantized once.

tinygemm is built for few rows: measured on an H100 it reaches ~1.7 TB/s at M=1 but only ~30 TFLOP/s at
M=2048, twenty times under cuBLAS. So on CUDA, Int4Linear can keep a second, plain copy of the levels
(`prefill_copy`): for prompts (M >= PREFILL_ROWS) a Triton kernel expands it to bf16 in one pass and cuBLAS
does the matmul. That doubles 4-bit weight memory in exchange for ~15x faster prompt processing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.int4_gemv import GemvWorkspace, default_config, dequantize_columns, int4_gemv, pack_columns

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
PREFILL_ROWS = 64   # from this many rows, dequantize + cuBLAS beats tinygemm


@dataclass
class QuantWeight:
    q: torch.Tensor                      # [K, N] uint8 levels 0 .. 2^bits - 1
    scales: torch.Tensor                 # [G, N] float
    g_idx: torch.Tensor                  # [K] long: the group of each input row
    bits: int
    group_size: int
    zeros: torch.Tensor | None = None    # [G, N] uint8 integer zero points (GPTQ v1's +1 already applied)
    offsets: torch.Tensor | None = None  # [G, N] float, instead of zeros: W = s * q + m

    def offset(self) -> torch.Tensor:
        """m [G, N] float32 with W = s * q + m, whichever way the zero point was given."""
        return self.offsets.float() if self.offsets is not None else -self.zeros.float() * self.scales.float()

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`: the reference every quantized path must match."""
        g = self.g_idx
        if self.zeros is not None:
            w = (self.q.float() - self.zeros[g].float()) * self.scales[g].float()         # [K, N]
        else:
            w = self.q.float() * self.scales[g].float() + self.offsets[g].float()
        return w.t().contiguous().to(dtype)

    @staticmethod
    def concat(parts: list["QuantWeight"]) -> "QuantWeight":
        """Stack along N (q, k, v -> qkv). Only valid when all share input rows, bits and groups."""
        first = parts[0]
        cat = lambda name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts], 1)
        return QuantWeight(q=cat("q"), scales=cat("scales"), g_idx=first.g_idx, bits=first.bits,
                           group_size=first.group_size, zeros=cat("zeros"), offsets=cat("offsets"))

    def can_concat(self, other: "QuantWeight") -> bool:
        return (self.bits == other.bits and self.group_size == other.group_size
                and self.in_features == other.in_features and torch.equal(self.g_idx, other.g_idx)
                and (self.zeros is None) == (other.zeros is None))


def exact_int4(w: torch.Tensor, group_size: int = 32) -> QuantWeight | None:
    """Recognise a float weight [N, K] that already lies on an asymmetric 4-bit grid per group of
    `group_size` inputs (models converted from GGUF Q4_0/Q4_1 do), and return it losslessly as
    levels, scales and offsets (W = s * q + m); None if any group is off its grid."""
    N, K = w.shape
    if K % group_size:
        return None
    g = w.float().reshape(N, K // group_size, group_size)                                 # [N, G, gs]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    q = torch.round((g - lo) / torch.where(step > 0, step, torch.ones_like(step))).clamp_(0, 15)
    if not torch.equal(q * step + lo, g):
        return None
    G = K // group_size
    return QuantWeight(q=q.reshape(N, K).t().to(torch.uint8).contiguous(),
                       scales=step.reshape(N, G).t().contiguous(), g_idx=torch.arange(K) // group_size,
                       bits=4, group_size=group_size, offsets=lo.reshape(N, G).t().contiguous())


def tinygemm_fits(qw: QuantWeight, device: torch.device) -> bool:
    """Whether tinygemm takes this weight: 4-bit, a supported group size, full groups, aligned K and N."""
    K, N = qw.in_features, qw.out_features
    k_align = 16 if device.type == "cpu" else 128  # CUDA packs K in tiles of innerKTiles(8) * 16
    return (qw.bits == 4 and qw.group_size in TINYGEMM_GROUP_SIZES and K % qw.group_size == 0
            and K % k_align == 0 and N % 8 == 0)


def _group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The permutation of K that makes groups contiguous, or None when they already are."""
    K = g_idx.numel()
    if torch.equal(g_idx, torch.arange(K, device=g_idx.device) // group_size):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(K, device=g_idx.device) // group_size):
        raise ValueError("act-order groups must each hold exactly group_size rows")
    return perm


@functools.cache
def _dequant_kernel():
    """The Triton kernel behind dequantize_int4 (imported late: CPU-only installs have no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_int4(packed_ptr, sz_ptr, out_ptr, N, K, group_size,
                     BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        # packed: uint8 [N, K/2], byte j = (q[2j] << 4) | q[2j+1]; sz: bf16 [G, N, 2]; out: bf16 [N, K]
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                       # [BN]
        j = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)                       # [BB] byte index
        mask = (n[:, None] < N) & (j[None, :] < K // 2)
        byte = tl.load(packed_ptr + n[:, None] * (K // 2) + j[None, :], mask=mask, other=0).to(tl.int32)
        sz = sz_ptr + ((2 * j[None, :]) // group_size * N + n[:, None]) * 2          # both k of a byte share g
        scale = tl.load(sz, mask=mask, other=0).to(tl.float32)
        zero = tl.load(sz + 1, mask=mask, other=0).to(tl.float32)
        hi = ((byte >> 4) - 8).to(tl.float32) * scale + zero                         # k = 2j
        lo = ((byte & 15) - 8).to(tl.float32) * scale + zero                         # k = 2j + 1
        w = tl.interleave(hi, lo).to(tl.bfloat16)                                    # [BN, 2 BB]
        k = tl.program_id(1) * 2 * BLOCK_B + tl.arange(0, 2 * BLOCK_B)
        tl.store(out_ptr + n[:, None] * K + k[None, :], w, mask=(n[:, None] < N) & (k[None, :] < K))

    return triton, dequant_int4


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """packed uint8 [N, K/2] + tinygemm scales_and_zeros [G, N, 2] -> W bf16 [N, K], one pass on the GPU."""
    triton, kernel = _dequant_kernel()
    N, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(N, K, dtype=torch.bfloat16, device=packed.device)
    grid = (triton.cdiv(N, 32), triton.cdiv(K // 2, 64))
    kernel[grid](packed, scales_and_zeros, out, N, K, group_size, BLOCK_N=32, BLOCK_B=64)
    return out


class Int4Linear(nn.Module):
    """y = x @ W^T + b through tinygemm, or on CUDA for act-order weights through Hearth's GEMV.
    x: [..., K] any float dtype -> y: [..., N] in x's dtype.
    prefill_copy (CUDA, tinygemm): also keep plain packed levels so that many-row inputs go through cuBLAS."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None, device: torch.device,
                 prefill_copy: bool = False):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.group_size = qw.group_size
        self.cpu = device.type == "cpu"
        perm = _group_order(qw.g_idx, qw.group_size)
        q = qw.q if perm is None else qw.q[perm]                                          # [K, N]
        self.register_buffer("perm", None if perm is None else perm.to(device), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(device), persistent=False)
        self.gemv = not self.cpu and perm is not None
        if self.gemv:
            self._init_gemv(qw, q.to(device), device)
        else:
            self._init_tinygemm(qw, q, device, prefill_copy)

    def _init_tinygemm(self, qw: QuantWeight, q: torch.Tensor, device: torch.device, prefill_copy: bool) -> None:
        q_nk = q.t().contiguous().to(device)                                              # [N, K]
        plain = None  # [N, K/2] two levels a byte, the even k in the high nibble (CUDA only)
        if self.cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_nk.to(torch.int32), 1)
        else:
            plain = (q_nk[:, 0::2] << 4) | q_nk[:, 1::2]   # the layout _convert_weight_to_int4pack expects
            packed = torch.ops.aten._convert_weight_to_int4pack(plain, 8)
        scales = qw.scales.float()
        # tinygemm computes (q - 8) * scale + zero; ours is q * scale + offset.
        zero = qw.offset() + 8 * scales
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales, zero], -1).to(device, torch.bfloat16).contiguous(),
                             persistent=False)                                            # [G, N, 2]
        self.register_buffer("plain", plain if prefill_copy else None, persistent=False)

    def _init_gemv(self, qw: QuantWeight, q: torch.Tensor, device: torch.device) -> None:
        # fp16 scales stay fp16 (GPTQ and AWQ store them so); anything else runs in fp32.
        dtype = torch.float16 if qw.scales.dtype == torch.float16 else torch.float32
        self.register_buffer("qweight", pack_columns(q), persistent=False)                # [K/8, N]
        self.register_buffer("scales", qw.scales.to(device, dtype).contiguous(), persistent=False)
        uniform_zero = qw.zeros is not None and bool((qw.zeros == qw.zeros.flatten()[0]).all())
        self.zero = float(qw.zeros.flatten()[0]) if uniform_zero else 0.0   # symmetric GPTQ: 8 everywhere
        self.register_buffer("offsets", None if uniform_zero else qw.offset().to(device).contiguous(),
                             persistent=False)                                            # [G, N] fp32
        self.gemv_config = default_config(self.out_features, self.in_features, self.group_size)
        self.workspace = GemvWorkspace(self.out_features, self.gemv_config, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)                           # [M, K]
        if self.gemv:
            y = self._gemv_forward(x2)
        else:
            y = self._tinygemm_forward(x2)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _gemv_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] == 1:
            return int4_gemv(x2, self.qweight, self.scales, self.offsets, self.zero, self.perm, self.group_size,
                             self.gemv_config, self.workspace)
        w_t = dequantize_columns(self.qweight, self.scales, self.offsets, self.zero, self.group_size)  # [K, N]
        return x2.index_select(1, self.perm) @ w_t

    def _tinygemm_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.plain is not None and x2.shape[0] >= PREFILL_ROWS:
            return F.linear(x2, dequantize_int4(self.plain, self.scales_and_zeros, self.group_size))
        if self.cpu:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)


class DequantLinear(nn.Module):
    """Any bit width, any shape: the weights dequantized once at load into `dtype`, then F.linear."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.register_buffer("weight", qw.dequantize(dtype).to(device), persistent=False)  # [N, K]
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RescoredHead(nn.Module):
    """The output head on CPU: every logit from a bf16 copy of the weights (a third of the fp32 head's time
    there), then the `k` best recomputed exactly in fp32, so the greedy pick equals the fp32 head's while
    sampling sees bf16-accurate tail logits. weight: [V, D] fp32 (shared with the embedding when tied)."""

    def __init__(self, weight: torch.Tensor, k: int = 64):
        super().__init__()
        self.k = k
        self.weight = weight
        self.register_buffer("weight_bf16", weight.to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> logits [B, S, V] fp32
        logits = F.linear(x.to(torch.bfloat16), self.weight_bf16).float()
        top = logits.topk(self.k, dim=-1).indices                                         # [B, S, k]
        exact = torch.einsum("bsd,bskd->bsk", x.float(), self.weight[top])
        return logits.scatter_(-1, top, exact)


def make_quant_linear(qw: QuantWeight, bias: torch.Tensor | None, device: torch.device,
                      dtype: torch.dtype, prefill_copy: bool = False) -> nn.Module:
    """The fastest layer that computes this weight: tinygemm where it fits, else dequantized."""
    if tinygemm_fits(qw, device):
        return Int4Linear(qw, bias, device, prefill_copy)
    return DequantLinear(qw, bias, device, dtype)
