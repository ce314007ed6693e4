"""GPTQ and AWQ checkpoint layouts: unpack the int32 words into a QuantWeight, and read the quantization config.

Device-agnostic torch only (the GPU engine imports these too). Layout facts: ../shared/FORMATS.md.
Shapes: `in` = in_features (K), `out` = out_features (N), `G` = number of groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from core import compressed_tensors
from core.errors import LoadError
from core.folder import read_json
from core.quant_weight import QuantWeight

GPTQ_BITS = (2, 3, 4, 8)
# A quantized layer's tensors: GPTQ/AWQ (AWQ: no g_idx), then compressed-tensors' pack-quantized ones.
LAYER_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias") + compressed_tensors.PARTS
PACKED_NAMES = ("qweight", "weight_packed")   # the tensor that marks a layer as quantized, by format
# AWQ GEMM stores output column 8c + [0,2,4,6,1,3,5,7][i] in nibble i; reading nibbles in this order
# puts the columns back in sequence.
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 -> uint8 [R * 32 / bits, C].

    Values are packed least significant bits first into one continuous bit stream per column: value j
    at stream bits bits*j .. bits*j+bits-1. For 2/4/8 bits no value crosses a word (one word = one block
    of 32/bits values); for 3 bits every 3 words form a 96-bit block of 32 values, and values 10 and 21
    straddle two words.
    """
    rows, cols = packed.shape
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # No value crosses a word: one vectorised shift per position. An arithmetic shift of a negative
        # word drags copies of bit 31 in from the left, but the mask removes them.
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, -1, 1)
        return ((packed.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(-1, cols)
    block_words = bits // math.gcd(bits, 32)
    per_block = 32 * block_words // bits
    if rows % block_words:
        raise ValueError(f"{rows} packed rows is not a multiple of {block_words} words for {bits}-bit values")
    # Widen to int64 and drop the sign so right shifts never bring in copies of bit 31.
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(rows // block_words, block_words, cols)
    out = torch.empty(rows // block_words, per_block, cols, dtype=torch.uint8, device=packed.device)
    for j in range(per_block):
        word, offset = divmod(bits * j, 32)
        value = words[:, word] >> offset
        if offset + bits > 32:  # straddles into the next word
            value = value | (words[:, word + 1] << (32 - offset))
        out[:, j] = (value & mask).to(torch.uint8)
    return out.view(-1, cols)


def _check_bits(bits: int) -> None:
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ bits must be one of {GPTQ_BITS}, got {bits}")


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, v1: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ tensors -> (q uint8 [in, out], zeros uint8 [G, out]).

    qweight: int32 [in*bits/32, out] packed along K; qzeros: int32 [G, out*bits/32] packed along N.
    v1 (checkpoint_format "gptq" or absent) stores zero-1, so the true zero is (stored + 1) & mask; the
    v1 packer's z == 0 wrap-around (0xffffffff words) decodes back to 0 the same way.
    """
    _check_bits(bits)
    q = _unpack_rows(qweight, bits)
    zeros = _unpack_rows(qzeros.t().contiguous(), bits).t().contiguous()
    if v1:
        zeros = ((zeros.to(torch.int16) + 1) & ((1 << bits) - 1)).to(torch.uint8)
    return q, zeros


def _unpack_awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with 8 interleaved nibbles per word -> uint8 [R, C*8] in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    nibbles = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 15   # [R, C, 8]
    order = torch.tensor(AWQ_UNPACK_ORDER, device=packed.device)
    return nibbles[..., order].reshape(packed.shape[0], -1).to(torch.uint8)


def _unpack_sequential_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C], nibble i of word c = column 8c+i -> uint8 [R, C*8]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    nibbles = ((packed.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 15
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, version: str = "gemm", groups: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ tensors -> (q uint8 [in, out], zeros uint8 [G, out]). 4-bit only.

    GEMM: qweight int32 [in, out/8], qzeros int32 [G, out/8], both interleaved ([0,4,1,5,2,6,3,7]).
    GEMV: qweight int32 [out, in/8], qzeros int32 [out, padded G/8], both sequential along the packed axis;
    pass `groups` to drop GEMV's zero padding (its scales are [out, padded G] and need the same slice).
    """
    version = version.lower()
    if version == "gemm":
        return _unpack_awq_columns(qweight), _unpack_awq_columns(qzeros)
    if version == "gemv":
        q = _unpack_sequential_nibbles(qweight).t().contiguous()
        zeros = _unpack_sequential_nibbles(qzeros).t()
        if groups is not None:
            zeros = zeros[:groups]
        return q, zeros.contiguous()
    raise ValueError(f"unknown AWQ version {version!r} (expected gemm or gemv)")


def default_g_idx(in_features: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Group of each input row without act-order: row i belongs to group i // group_size."""
    group_size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // group_size


def read_quant_weight(tensors: dict[str, torch.Tensor], spec: "QuantSpec") -> tuple[QuantWeight, torch.Tensor | None]:
    """One layer of a GPTQ or AWQ checkpoint as the format-neutral QuantWeight that every runtime takes,
    and its bias. tensors: by LAYER_PARTS name (without the layer's prefix), those the file has. The bias is None when absent or all zeros (AutoGPTQ writes zeros)."""
    if "weight_packed" in tensors:
        return compressed_tensors.read_compressed_weight(tensors, spec.bits, spec.sym, spec.group_size)
    bias = tensors.get("bias")
    if bias is not None and not torch.any(bias):
        bias = None
    scales = tensors["scales"]
    if spec.method == "gptq":
        q, zeros = unpack_gptq(tensors["qweight"], tensors["qzeros"], spec.bits, spec.v1)
        group_size = spec.group_size_for(q.shape[0])
        g_idx = tensors.get("g_idx")
        g_idx = default_g_idx(q.shape[0], group_size, q.device) if g_idx is None else g_idx
        zeros = zeros[: scales.shape[0]]   # the packed zeros may carry padding columns' worth of rows
        bits = spec.bits
    else:
        if spec.awq_version == "gemv":
            # GEMV stores [out, in/8] and pads the group axis of qzeros and scales.
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
        g_idx, bits = default_g_idx(q.shape[0], group_size, q.device), 4
    return QuantWeight(q=q, scales=scales, g_idx=g_idx.long(), bits=bits, group_size=group_size, zeros=zeros), bias


@dataclass(frozen=True)
class QuantSpec:
    """How a folder's weights are quantized, read from its config file(s).

    group_size is as written (-1 = one group spanning all inputs); `group_size_for(in_features)` gives the
    effective size of a layer.
    """
    method: str                         # "gptq" | "awq"
    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    # GPTQ: "gptq" (v1, zero-1 stored) | "gptq_v2" | "compressed-tensors" (llm-compressor's pack-quantized)
    checkpoint_format: str = "gptq"
    awq_version: str = "gemm"           # AWQ: "gemm" | "gemv"
    zero_point: bool = True             # AWQ: asymmetric with stored zeros
    source: str = ""                    # the file the spec came from
    # Modules the config keeps in float (AWQ's modules_to_not_convert, compressed-tensors' ignore); their
    # tensors are plain .weight ones, which is how every reader tells them apart.
    keep_float: tuple[str, ...] = ()

    @property
    def v1(self) -> bool:
        return self.method == "gptq" and self.checkpoint_format != "gptq_v2"

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size in (-1, 0) else self.group_size

    def describe(self) -> str:
        """e.g. "GPTQ 4-bit, group 32, act-order, sym (quantize_config.json)"."""
        group = "no grouping (group -1)" if self.group_size in (-1, 0) else f"group {self.group_size}"
        parts = [f"{self.method.upper()} {self.bits}-bit", group]
        if self.checkpoint_format == "compressed-tensors":
            channel = "per channel" if self.group_size in (-1, 0) else group
            parts = [f"compressed-tensors pack-quantized W{self.bits}A16", channel]
            if self.desc_act:
                parts.append("act-order")
            parts.append("sym" if self.sym else "asym")
        elif self.method == "gptq":
            if self.desc_act:
                parts.append("act-order")
            parts.append("sym" if self.sym else "asym")
            if self.checkpoint_format == "gptq_v2":
                parts.append("gptq_v2")
        else:
            parts.append(self.awq_version.upper())
            if self.zero_point:
                parts.append("zero point")
        if self.keep_float:
            parts.append(f"{', '.join(self.keep_float)} kept in float")
        return ", ".join(parts) + (f" ({self.source})" if self.source else "")


def _as_int(value, name: str, file: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise LoadError(f"{file}: {name} must be an integer, got {value!r}")
    return int(value)


def _gptq_spec(cfg: dict, file: str) -> QuantSpec:
    bits = _as_int(cfg.get("bits", 4), "bits", file)
    if bits not in GPTQ_BITS:
        raise LoadError(f"{file}: GPTQ bits {bits} is not supported (Hearth reads {GPTQ_BITS})")
    group_size = _as_int(cfg.get("group_size", -1) if cfg.get("group_size") is not None else -1,
                         "group_size", file)
    if group_size == 0 or group_size < -1:
        raise LoadError(f"{file}: group_size must be -1 or positive, got {group_size}")
    fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise LoadError(f"{file}: checkpoint_format {fmt!r} is not supported (Hearth reads gptq and gptq_v2)")
    return QuantSpec("gptq", bits, group_size, desc_act=bool(cfg.get("desc_act", False)),
                     sym=bool(cfg.get("sym", True)), checkpoint_format=fmt, source=file)


def _awq_spec(cfg: dict, file: str) -> QuantSpec:
    bits = _as_int(cfg.get("bits", cfg.get("w_bit", 4)), "bits", file)
    if bits != 4:
        raise LoadError(f"{file}: AWQ {bits}-bit is not supported (AWQ checkpoints are 4-bit)")
    group_size = _as_int(cfg.get("group_size", cfg.get("q_group_size", 128)), "group_size", file)
    if group_size == 0 or group_size < -1:
        raise LoadError(f"{file}: group_size must be -1 or positive, got {group_size}")
    version = str(cfg.get("version", "gemm")).lower()
    if version not in ("gemm", "gemv"):
        raise LoadError(f"{file}: AWQ version {version!r} is not supported (Hearth reads GEMM and GEMV)")
    return QuantSpec("awq", bits, group_size, sym=False, awq_version=version,
                     zero_point=bool(cfg.get("zero_point", True)), source=file,
                     keep_float=_names(cfg.get("modules_to_not_convert"), "modules_to_not_convert", file))


def _names(value, name: str, file: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise LoadError(f"{file}: {name} must be a list of module names, got {value!r}")
    return tuple(value)


def _compressed_spec(cfg: dict, file: str) -> QuantSpec:
    scheme = compressed_tensors.weight_scheme(cfg, file)
    return QuantSpec("gptq", scheme.bits, scheme.group_size, desc_act=scheme.actorder, sym=scheme.sym,
                     checkpoint_format="compressed-tensors", source=file,
                     keep_float=_names(list(scheme.ignore), "ignore", file))


def read_quant_spec(model_dir: Path) -> QuantSpec | None:
    """The folder's quantization, or None when it is not GPTQ/AWQ-quantized.

    Looks in quantize_config.json (AutoGPTQ), config.json `quantization_config` (newer repos, both
    methods) and quant_config.json (older AWQ repos), in that order. LoadError names a malformed file or an
    unsupported method.
    """
    model_dir = Path(model_dir)
    quantize_config = read_json(model_dir / "quantize_config.json")
    if quantize_config is not None:
        method = str(quantize_config.get("quant_method", "gptq")).lower()
        if method == "awq":
            return _awq_spec(quantize_config, "quantize_config.json")
        if method != "gptq":
            raise LoadError(f"quantize_config.json: quant_method {method!r} is not supported (gptq or awq)")
        return _gptq_spec(quantize_config, "quantize_config.json")
    config = read_json(model_dir / "config.json") or {}
    qc = config.get("quantization_config")
    if qc is not None:
        if not isinstance(qc, dict):
            raise LoadError("config.json: quantization_config must be a JSON object")
        method = str(qc.get("quant_method", "")).lower()
        if method == "gptq":
            return _gptq_spec(qc, "config.json quantization_config")
        if method == "awq":
            return _awq_spec(qc, "config.json quantization_config")
        if method == "compressed-tensors":
            return _compressed_spec(qc, "config.json quantization_config")
        raise LoadError(f"config.json: quantization method {method or 'unnamed'!r} is not supported "
                        "(Hearth reads gptq, awq and compressed-tensors)")
    quant_config = read_json(model_dir / "quant_config.json")
    if quant_config is not None:
        return _awq_spec(quant_config, "quant_config.json")
    return None

