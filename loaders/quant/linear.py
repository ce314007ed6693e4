"""Hearth's quantized Linear for CPU, and the layer-level container the GPU engine consumes too.

`QuantizedWeight` is one layer's checkpoint, unpacked to plain integers (q [in, out], zeros [G, out],
scales [G, out], g_idx [in]) whatever the file format. `QuantLinear` runs it on CPU either
- "dequantize": W [out, in] built once at load in the compute dtype (exact; memory = the dequantized size), or
- "int4": torch's CPU tinygemm (`_weight_int4pack_mm_for_cpu`) on 4-bit, group 32/64/128/256 layers
  (half a byte per weight); act-order is handled by sorting K once and gathering x's columns at run time.
A GPU engine swaps QuantLinear out by building its own module from the same QuantizedWeight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loaders.quant.formats import QuantSpec, default_g_idx, dequantize, unpack_awq, unpack_gptq

INT4_GROUP_SIZES = (32, 64, 128, 256)
KERNELS = ("dequantize", "int4")


@dataclass
class QuantizedWeight:
    q: torch.Tensor          # uint8 [in, out]
    zeros: torch.Tensor      # uint8 [G, out]
    scales: torch.Tensor     # fp16 [G, out]
    g_idx: torch.Tensor      # int32 [in]
    bits: int
    group_size: int          # effective (in_features when the checkpoint says -1)
    bias: torch.Tensor | None = None   # [out]; None when absent or all zeros (AutoGPTQ writes zeros)

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]

    @property
    def act_order(self) -> bool:
        """True when g_idx is not the plain i // group_size (desc_act checkpoints)."""
        return not torch.equal(self.g_idx, default_g_idx(self.in_features, self.group_size, self.g_idx.device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.zeros, self.scales, self.g_idx, dtype=dtype)

    @classmethod
    def from_gptq(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> "QuantizedWeight":
        """tensors: qweight, qzeros, scales and optionally g_idx and bias of one layer (no prefix)."""
        q, zeros = unpack_gptq(tensors["qweight"], tensors["qzeros"], spec.bits, spec.v1)
        in_features = q.shape[0]
        group_size = spec.group_size_for(in_features)
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = default_g_idx(in_features, group_size)
        return cls(q, zeros[: tensors["scales"].shape[0]], tensors["scales"], g_idx.to(torch.int32), spec.bits,
                   group_size, _useful_bias(tensors.get("bias")))

    @classmethod
    def from_awq(cls, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> "QuantizedWeight":
        scales = tensors["scales"]
        if spec.awq_version == "gemv":
            # GEMV stores scales as [out, padded G]; its qweight is [out, in/8].
            in_features = tensors["qweight"].shape[1] * 8
            group_size = spec.group_size_for(in_features)
            groups = -(-in_features // group_size)
            q, zeros = unpack_awq(tensors["qweight"], tensors["qzeros"], "gemv", groups)
            scales = scales[:, :groups].t().contiguous()
        else:
            q, zeros = unpack_awq(tensors["qweight"], tensors["qzeros"], "gemm")
            group_size = spec.group_size_for(q.shape[0])
        if not spec.zero_point:
            zeros = torch.full_like(zeros, 8)
        return cls(q, zeros, scales, default_g_idx(q.shape[0], group_size), 4, group_size,
                   _useful_bias(tensors.get("bias")))


def _useful_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    if bias is None or not torch.any(bias):
        return None
    return bias


def int4_kernel_applies(weight: QuantizedWeight) -> bool:
    return (weight.bits == 4 and weight.group_size in INT4_GROUP_SIZES
            and weight.in_features % weight.group_size == 0 and weight.out_features % 8 == 0)


class QuantLinear(nn.Module):
    """y = x W^T + b for a quantized W; see the module docstring for the two CPU kernels."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype = torch.float32, kernel: str = "dequantize"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bits = weight.bits
        self.group_size = weight.group_size
        self.compute_dtype = dtype
        self.kernel = kernel if kernel == "dequantize" or int4_kernel_applies(weight) else "dequantize"
        self.bias = None if weight.bias is None else nn.Parameter(weight.bias.to(dtype), requires_grad=False)
        if self.kernel == "dequantize":
            self.register_buffer("weight", weight.dequantize(dtype))        # [out, in]
            self.perm = None
        else:
            self._pack_int4(weight)

    def _pack_int4(self, weight: QuantizedWeight) -> None:
        # Sort K by group so every group is contiguous, as tinygemm requires; x is gathered the same way.
        perm = torch.argsort(weight.g_idx, stable=True) if weight.act_order else None
        q = weight.q if perm is None else weight.q[perm]                    # [in, out]
        scales = weight.scales.float()                                      # [G, out]
        # tinygemm computes (q - 8) * scale + zero; an integer zero z becomes zero = (8 - z) * scale.
        offsets = (8 - weight.zeros.float()) * scales
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.t().contiguous().to(torch.int32), 1))
        self.register_buffer("scales_and_zeros", torch.stack([scales, offsets], dim=-1).to(torch.bfloat16))
        self.perm = perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x: [..., in]
        if self.kernel == "dequantize":
            return nn.functional.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group_size,
                                                       self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}")
