"""Quantized linear layers that swap in for nn.Linear (gpt-fast style).

Every layer here is built from a `core.quant_weight.QuantWeight`: the format-neutral form every checkpoint
(GPTQ, AWQ, compressed-tensors, GGUF) is converted to at load.

`Int4Linear` runs 4-bit weights through Hearth's tensor-core kernel on CUDA (engine.int4_mma: decode and
inputs of up to 8 rows read the packed weights directly; longer prompts dequantize them to bf16 in one
pass and use cuBLAS, so one packed copy serves both) and through torch's tinygemm on CPU
(`_weight_int4pack_mm_for_cpu`, bf16 activations, bf16 [G, N, 2] scales-and-zeros, (q - 8) * scale + zero).
Act-order checkpoints have non-contiguous groups; sorting K by group once at load makes them contiguous,
and x is gathered in that order: by the caller where the order can be folded into the layer before
(engine.weights), else by this layer (an index_select before the kernel).
`LowBitLinear` does the same for GPTQ's 2, 3 and 8-bit weights and GGUF's 2, 3, 5, 6 and 8-bit ones on
CUDA (engine.lowbit_mma; both kernels take float offsets too), and
`Int8Linear` keeps 8-bit weights with one scale per output row packed on CPU (torch's int8 weight-only
matmul). Whatever no kernel takes uses `DequantLinear`: the weights dequantized once, with the reason kept
for the runtime line. Every layer names its kernel in `kernel`.
"""
from __future__ import annotations

from core.quant_weight import QuantWeight

import torch
import torch.nn.functional as F
from torch import nn

from engine import int4_mma, lowbit_mma

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
# torch's int8 weight-only CPU kernel reads K in steps of 16: other K crash it or give wrong sums (torch 2.13).
INT8_K_STEP = 16


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


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def kernel_refusal(qw: QuantWeight, device: torch.device) -> str | None:
    """Why no packed kernel takes this weight on `device` (None: one does). CUDA: the tensor-core kernels
    (4-bit engine.int4_mma, 2/3/5/6/8-bit engine.lowbit_mma), with integer zero points (GPTQ, AWQ) or float
    offsets (GGUF). CPU: tinygemm for 4 bits (also with float offsets), torch's int8 kernel for 8 bits with
    one group for all inputs."""
    K, N, gs, bits = qw.in_features, qw.out_features, qw.group_size, qw.bits
    if K % gs or not qw.regular_groups():
        return "act-order groups of unequal size"
    if device.type == "cuda":
        if not int4_mma.supported(device):
            return "the tensor-core kernels need compute capability 8.0+"
        return int4_mma.refusal(K, N, gs) if bits == 4 else lowbit_mma.refusal(K, N, gs, bits)
    if bits == 4:
        if gs not in TINYGEMM_GROUP_SIZES or K % 16 or N % 8:
            return f"tinygemm takes groups of {'/'.join(map(str, TINYGEMM_GROUP_SIZES))}, K % 16 and N % 8 = 0"
        return None
    if bits == 8:
        if gs != K:
            return f"torch's int8 kernel takes one scale per output row, not groups of {gs}"
        return None if K % INT8_K_STEP == 0 else f"torch's int8 kernel takes K % {INT8_K_STEP} = 0"
    return f"no CPU kernel for {bits}-bit weights"


class Int4Linear(nn.Module):
    """y = x @ W^T + b for 4-bit weights: Hearth's tensor-core kernel on CUDA, tinygemm on CPU.
    x: [..., K] any float dtype -> y: [..., N] in x's dtype. Act-order weights not sorted by the caller
    are sorted here, and x is gathered to match (`perm`)."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.group_size = qw.group_size
        self.cpu = device.type == "cpu"
        qw, perm = qw.sorted_by_group()
        # int32: the CUDA kernel gathers x itself through shared memory (on an H100, wo 4096^2 g32, M=1: 1.25
        # TB/s effective against 0.82 with an index_select before the kernel) and reads int32 indices;
        # index_select (prompts, CPU) takes them too.
        self.register_buffer("perm", None if perm is None else perm.to(device, torch.int32), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(device), persistent=False)
        self.kernel = "tinygemm" if self.cpu else "hearth tensor-core"
        if self.cpu:
            self._init_tinygemm(qw)
        else:
            self.packed = int4_mma.pack(qw.q.to(device), qw.scales.to(device), _on(qw.zeros, device),
                                        qw.group_size, offsets=_on(qw.offsets, device))
            self.config = int4_mma.config_for(self.out_features, factored=self.packed.store.factored,
                                              gathers=perm is not None)

    def _init_tinygemm(self, qw: QuantWeight) -> None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.q.t().contiguous().to(torch.int32), 1)
        scales = qw.scales.float()
        # tinygemm computes (q - 8) * scale + zero; ours is q * scale + offset.
        zero = qw.offset() + 8 * scales
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", torch.stack([scales, zero], -1).to(torch.bfloat16).contiguous(),
                             persistent=False)                                            # [G, N, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)                           # [M, K]
        if not self.cpu and x2.shape[0] <= int4_mma.MAX_ROWS:
            y = int4_mma.matmul(x2.contiguous(), self.packed, self.config, self.perm)
        else:
            if self.perm is not None:
                x2 = x2.index_select(1, self.perm)
            if self.cpu:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size,
                                                               self.scales_and_zeros)
            else:
                y = F.linear(x2, int4_mma.dequantize(self.packed))
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class LowBitLinear(nn.Module):
    """y = x @ W^T + b for 2, 3, 5, 6 and 8-bit weights on CUDA through engine.lowbit_mma: up to MAX_ROWS
    rows read the packed weights directly; longer inputs dequantize them into a bf16 scratch for cuBLAS (no
    bf16 copy is kept). Act-order as in Int4Linear."""

    kernel = "hearth tensor-core"

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        qw, perm = qw.sorted_by_group()
        self.register_buffer("perm", None if perm is None else perm.to(device, torch.int32), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(device), persistent=False)
        self.packed = lowbit_mma.pack(qw.q.to(device), qw.scales.to(device), _on(qw.zeros, device), qw.group_size,
                                      qw.bits, offsets=_on(qw.offsets, device))
        self.config = lowbit_mma.config_for(self.out_features, self.packed.width,
                                             factored=self.packed.store.factored)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)                           # [M, K]
        if x2.shape[0] <= lowbit_mma.MAX_ROWS:
            y = lowbit_mma.matmul(x2.contiguous(), self.packed, self.config, self.perm)
        else:
            if self.perm is not None:
                x2 = x2.index_select(1, self.perm)
            y = F.linear(x2, lowbit_mma.dequantize(self.packed))
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """y = x @ W^T + b on CPU for 8-bit weights with one group for all inputs (GPTQ group_size -1), through
    torch's int8 weight-only matmul (`_weight_int8pack_mm`: int8 [N, K], one bf16 scale per output row):
    a quarter of fp32's bytes. It has no zero point, so the int8 values are q - 128 and the rest of the
    zero, s * (128 - z) (or the float offset m + 128 s), is added as sum(x) times it."""

    kernel = "int8 weight-only"

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        scales = qw.scales[0].float()                                                      # [N]
        self.register_buffer("weight_int8", (qw.q.t().to(torch.int16) - 128).to(torch.int8).contiguous(),
                             persistent=False)                                             # [N, K]
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        offset = qw.offset()[0] + 128 * scales                                             # [N] fp32
        self.register_buffer("offset", None if not torch.any(offset) else offset, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)                           # [M, K]
        # bf16 activations: torch's fp32 path of this kernel measured ~3x slower here
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales).float()
        if self.offset is not None:
            y = y + x2.float().sum(-1, keepdim=True) * self.offset
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class DequantLinear(nn.Module):
    """Any bit width, any shape: the weights dequantized once at load into `dtype`, then F.linear. `reason`:
    why no packed kernel took them, shown in the runtime line."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype,
                 reason: str = ""):
        super().__init__()
        self.kernel = f"dequantized ({reason})" if reason else "dequantized"
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.register_buffer("weight", qw.dequantize(dtype).to(device), persistent=False)  # [N, K]
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RescoredHead(nn.Module):
    """The output head on CPU: every logit through torch's int8 weight-only kernel (one scale a row), then the
    `k` best recomputed exactly in fp32, so the greedy pick equals the fp32 head's and the tokens that carry the
    probability mass are exact. int8 rather than bf16: it reads half the bytes, and the head is the largest
    matrix of a small model (SmolLM2-135M's 49152 x 576 took 2.0 ms a token in bf16, 0.9 in int8, on the
    2-core CI machine; decode 59.6 -> 67.9 tok/s). The tail it leaves approximate is off by 0.03 on average
    (bf16: 0.007) against logits of standard deviation 3.2. Widths the int8 kernel cannot take (D % 16) keep
    a bf16 copy (`kind` says which). weight: [V, D] fp32 (shared with the embedding when tied)."""

    def __init__(self, weight: torch.Tensor, k: int = 256):
        super().__init__()
        self.k = min(k, weight.shape[0])
        self.weight = weight
        self.kind = "int8" if weight.shape[1] % INT8_K_STEP == 0 else "bf16"
        if self.kind == "bf16":
            self.register_buffer("weight_bf16", weight.to(torch.bfloat16), persistent=False)
            return
        scales = weight.abs().amax(1).clamp_min(torch.finfo(torch.bfloat16).tiny) / 127
        scales = scales.to(torch.bfloat16)      # the kernel's scale dtype; weights are rounded by what it multiplies
        quantized = torch.empty(weight.shape, dtype=torch.int8)
        for rows in range(0, weight.shape[0], 4096):   # in slices: no fp32 temporary the head's size at load
            piece = slice(rows, rows + 4096)
            quantized[piece] = torch.round(weight[piece] / scales[piece].float()[:, None]).clamp(-127, 127)
        self.register_buffer("weight_int8", quantized, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> logits [B, S, V] fp32
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.kind == "int8":
            logits = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales)
        else:
            logits = F.linear(rows, self.weight_bf16)
        logits = logits.float().reshape(*x.shape[:-1], -1)
        top = logits.topk(self.k, dim=-1).indices                                         # [B, S, k]
        exact = torch.einsum("bsd,bskd->bsk", x.float(), self.weight[top])
        return logits.scatter_(-1, top, exact)


def make_quant_linear(qw: QuantWeight, bias: torch.Tensor | None, device: torch.device,
                      dtype: torch.dtype) -> nn.Module:
    """The fastest layer that computes this weight: a packed kernel where one fits, else dequantized (and
    the layer's `kernel` says why)."""
    reason = kernel_refusal(qw, device)
    if reason is not None:
        return DequantLinear(qw, bias, device, dtype, reason)
    if qw.bits == 4:
        return Int4Linear(qw, bias, device)
    return LowBitLinear(qw, bias, device) if device.type == "cuda" else Int8Linear(qw, bias)
