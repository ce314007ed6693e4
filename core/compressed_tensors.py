"""llm-compressor's compressed-tensors checkpoints, "pack-quantized" format (W4A16 / W8A16): read the
config's weight scheme and unpack a layer into the QuantWeight every runtime takes.

Layout (the `compressed-tensors` package's PackedQuantizationCompressor): per linear layer P
- `P.weight_packed` int32 [out, ceil(in * bits / 32)]: the signed levels q (-2^(b-1) .. 2^(b-1) - 1) plus
  2^(b-1), packed along the input axis, least significant bits first (value j of a word at bits b*j), the
  last word zero-padded;
- `P.weight_scale` [out, G] (G = 1 for the channel strategy, in / group_size for the group strategy);
- `P.weight_zero_point`, asymmetric schemes only: the signed zero points [out, G], packed the same way but
  along the output axis ([ceil(out * bits / 32), G] int32); older files keep them unpacked as int8;
- `P.weight_g_idx` int32 [in], act-order ("actorder": "group") files only: the group of each input;
- `P.weight_shape` [2]: out, in.
W = (q - z) * scale, with z = 0 for symmetric schemes. Shifting q and z by 2^(b-1) gives the unsigned levels
and zero points of QuantWeight (symmetric: z = 2^(b-1), as GPTQ's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.quant_weight import QuantWeight
from core.errors import LoadError

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
BITS = (4, 8)


@dataclass(frozen=True)
class WeightScheme:
    """The one weight quantization a compressed-tensors config applies to its quantized layers."""
    bits: int
    group_size: int          # -1: one group per output row (the channel strategy)
    sym: bool
    actorder: bool
    ignore: tuple[str, ...]  # layers kept in float (often lm_head), as the config lists them


def weight_scheme(qc: dict, file: str) -> WeightScheme:
    """The scheme of a `quant_method: compressed-tensors` quantization_config; LoadError for what Hearth does
    not read (another format than pack-quantized, activation quantization, floats, mixed schemes)."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise LoadError(f"{file}: compressed-tensors config has no config_groups")
    schemes = set()
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise LoadError(f"{file}: config group {name!r} has no weights scheme")
        fmt = str(group.get("format") or qc.get("format") or "")
        if fmt != "pack-quantized":
            raise LoadError(f"{file}: compressed-tensors format {fmt or 'unnamed'!r} is not supported "
                            "(Hearth reads pack-quantized W4A16/W8A16)")
        if group.get("input_activations"):
            raise LoadError(f"{file}: config group {name!r} quantizes activations too; Hearth reads weight-only "
                            "schemes (W4A16, W8A16)")
        w = group["weights"]
        if str(w.get("type", "int")) != "int" or w.get("num_bits") not in BITS:
            raise LoadError(f"{file}: weights of type {w.get('type')!r} with {w.get('num_bits')} bits are not "
                            f"supported (int, {' or '.join(map(str, BITS))} bits)")
        strategy = str(w.get("strategy", "group"))
        if strategy not in ("group", "channel"):
            raise LoadError(f"{file}: weight strategy {strategy!r} is not supported (group or channel)")
        group_size = -1 if strategy == "channel" else w.get("group_size")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size == 0 or group_size < -1:
            raise LoadError(f"{file}: group_size must be a positive integer, got {group_size!r}")
        actorder = w.get("actorder")
        schemes.add((w["num_bits"], group_size, bool(w.get("symmetric", True)), actorder not in (None, False)))
    if len(schemes) > 1:
        raise LoadError(f"{file}: config groups quantize layers in different ways ({len(schemes)} schemes); "
                        "Hearth reads one weight scheme per model")
    bits, group_size, sym, actorder = schemes.pop()
    return WeightScheme(bits, group_size, sym, actorder, tuple(str(x) for x in qc.get("ignore") or ()))


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [R, C] with 32/bits values a word along dim 1 (value j at bits bits*j) -> uint8 [R, count]."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    values = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)   # [R, C, per]
    return values.reshape(packed.shape[0], packed.shape[1] * per_word)[:, :count].to(torch.uint8)


def read_compressed_weight(tensors: dict[str, torch.Tensor], bits: int, sym: bool, group_size: int
                           ) -> tuple[QuantWeight, torch.Tensor | None]:
    """One pack-quantized layer (tensors by PARTS name, plus "bias" if it has one) as a QuantWeight and bias.
    group_size: the scheme's (-1: the channel strategy, one group of all inputs)."""
    offset = 1 << (bits - 1)
    out_features, in_features = (int(x) for x in tensors["weight_shape"].tolist())
    q = unpack_int32(tensors["weight_packed"], bits, in_features).t().contiguous()              # [in, out]
    scales = tensors["weight_scale"]
    groups = scales.shape[1]
    group_size = in_features if group_size == -1 else group_size   # the last group may be partial
    if groups != -(-in_features // group_size):
        raise ValueError(f"weight_scale has {groups} groups where {in_features} inputs in groups of {group_size} "
                         f"make {-(-in_features // group_size)}")
    zp = tensors.get("weight_zero_point")
    if zp is None or sym:
        zeros = torch.full((groups, out_features), offset, dtype=torch.uint8, device=q.device)
    elif zp.dtype == torch.int32:   # packed along the output axis: unpack the transpose
        zeros = unpack_int32(zp.t().contiguous(), bits, out_features).contiguous()               # [G, out]
    else:   # older files: signed int8 zero points [out, G]
        zeros = (zp.to(torch.int16) + offset).to(torch.uint8).t().contiguous()
    g_idx = tensors.get("weight_g_idx")
    if g_idx is None:
        g_idx = torch.arange(in_features, device=q.device) // group_size
    bias = tensors.get("bias")
    return QuantWeight(q=q, scales=scales.t().contiguous(), g_idx=g_idx.long(), bits=bits, group_size=group_size,
                       zeros=zeros), bias
