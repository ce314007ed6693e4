"""GGUF quantized tensors -> the engine's format-neutral QuantWeight, losslessly.

Every GGUF type Hearth's engine takes is, per block, integer levels with one scale per group of 16 or 32
inputs and either a constant integer zero point or a float offset:

| type | levels | group | W = |
|---|---|---|---|
| Q4_0, Q5_0 | 4 / 5 bits | 32 | d * (q - 8 / 16) |
| Q4_1, Q5_1 | 4 / 5 bits | 32 | d * q + m |
| Q8_0 | int8 as 8-bit levels q + 128 | 32 | d * (q - 128) |
| Q2_K | 2 bits | 16 | (d * sc) * q - dmin * m |
| Q3_K | 3 bits | 16 | (d * (sc - 32)) * (q - 4) |
| Q4_K, Q5_K | 4 / 5 bits | 32 | (d * sc) * q - dmin * m |
| Q6_K | 6 bits | 16 | (d * sc) * (q - 32) |
| IQ4_NL, IQ4_XS | the 16-entry table's int8 value + 128, as 8-bit levels | 32 | d' * (v - 128) |

The K-quants' sub-block scales are folded into one fp32 scale (and offset) per group. A fp16 value times a
6-bit or int8 integer needs at most 19 significant bits, so those products are exact in fp32, and
QuantWeight.dequantize then does the same fp32 operations in the same order as the `gguf` package's own
dequantize: the results are equal bit for bit (tests/test_gguf_engine.py checks every type). The IQ4 types
are non-linear (a lookup table), so they become 8-bit levels holding the table's values exactly: 8 bits of
storage for 4 bits of information, but exact and on the 8-bit kernels.

The unpacking is plain torch, so it runs on whatever device the raw blocks are on (a GPU repacks a 7B
model in well under a second). Bit layouts: the `gguf` package's quants.py, which these mirror.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from core.quant_weight import QuantWeight

QK_K = 256                          # values in a K-quant super-block
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Unpacked:
    """One tensor's blocks decoded: levels [B, block] uint8, scales [B, groups per block] fp32, and either a
    constant zero point or offsets [B, groups per block] fp32."""
    levels: torch.Tensor
    scales: torch.Tensor
    zero: int | None = None
    offsets: torch.Tensor | None = None


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as fp32 [B, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[B, ..., n] bytes -> [B, ..., 2n]: the n low nibbles, then the n high ones (ggml's order).
    (torch.stack: torch.cat of narrow uint8 rows measured several times slower on CPU.)"""
    return torch.stack([qs & 15, qs >> 4], dim=-2).flatten(-2)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """[B, 4] little-endian bytes of a 32-bit mask -> [B, count] bits, bit j of the word at j."""
    word = sum(packed[:, i].long() << (8 * i) for i in range(4))
    return ((word[:, None] >> torch.arange(count, device=packed.device)) & 1).to(torch.uint8)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit mins -> two [B, 8] float32."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc.float(), mn.float()


def _q4_0(b):
    return Unpacked(_nibbles(b[:, 2:18]), _f16(b, 0), zero=8)


def _q4_1(b):
    return Unpacked(_nibbles(b[:, 4:20]), _f16(b, 0), offsets=_f16(b, 2))


def _q5_0(b):
    return Unpacked(_nibbles(b[:, 6:22]) | (_bits(b[:, 2:6], 32) << 4), _f16(b, 0), zero=16)


def _q5_1(b):
    return Unpacked(_nibbles(b[:, 8:24]) | (_bits(b[:, 4:8], 32) << 4), _f16(b, 0), offsets=_f16(b, 2))


def _q8_0(b):
    levels = (b[:, 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return Unpacked(levels, _f16(b, 0), zero=128)


def _q2_k(b):
    scales, qs = b[:, 0:16], b[:, 16:80]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    levels = (qs.reshape(-1, 2, 1, 32) >> shifts) & 3                                     # [B, 2, 4, 32]
    return Unpacked(levels.reshape(-1, QK_K), _f16(b, 80) * (scales & 15).float(),
                    offsets=-(_f16(b, 82) * (scales >> 4).float()))


def _q3_k(b):
    hmask, qs, packed = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    low = packed[:, 0:8].reshape(-1, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 2, 1)
    high = packed[:, 8:12].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                             device=b.device).view(1, 4, 1)
    sc = ((low.reshape(-1, 16) & 15) | ((high.reshape(-1, 16) & 3) << 4)).float() - 32
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    ql = ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)
    hbit = ((hmask.reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1)
    # ggml subtracts 4 where the high bit is clear: q = ql - 4 * (1 - h) = (ql + 4h) - 4.
    return Unpacked(ql | (hbit.reshape(-1, QK_K) << 2), _f16(b, 108) * sc, zero=4)


def _q4_k(b):
    sc, mn = _k_scale_min(b[:, 4:16])
    levels = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, QK_K)
    return Unpacked(levels, _f16(b, 0) * sc, offsets=-(_f16(b, 2) * mn))


def _q5_k(b):
    sc, mn = _k_scale_min(b[:, 4:16])
    low = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, QK_K)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1
    return Unpacked(low | (high.reshape(-1, QK_K) << 4), _f16(b, 0) * sc, offsets=-(_f16(b, 2) * mn))


def _q6_k(b):
    ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    low = _nibbles(ql.reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)                         # halves of 128 values
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    high = (qh.reshape(-1, 2, 1, 32) >> shifts) & 3
    levels = (low | (high << 4)).reshape(-1, QK_K)
    return Unpacked(levels, _f16(b, 208) * sc.contiguous().view(torch.int8).float(), zero=32)


def _iq4_levels(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_VALUES, dtype=torch.int16, device=codes.device) + 128
    return table[codes.long()].to(torch.uint8)


def _iq4_nl(b):
    return Unpacked(_iq4_levels(_nibbles(b[:, 2:18])), _f16(b, 0), zero=128)


def _iq4_xs(b):
    high = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF                     # [B, 1] uint16
    high = (high >> (2 * torch.arange(8, device=b.device))) & 3                          # [B, 8]
    low = (b[:, 4:8].reshape(-1, 4, 1) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device)).reshape(-1, 8) & 15
    sc = (low.int() | (high << 4)).float() - 32
    codes = _nibbles(b[:, 8:136].reshape(-1, 8, 16)).reshape(-1, QK_K)
    return Unpacked(_iq4_levels(codes), _f16(b, 0) * sc, zero=128)


@dataclass(frozen=True)
class BlockType:
    block: int                      # values per block
    size: int                       # bytes per block
    bits: int                       # QuantWeight bits the levels need
    group: int                      # inputs per scale
    unpack: Callable[[torch.Tensor], Unpacked]


BLOCK_TYPES: dict[str, BlockType] = {
    "Q4_0": BlockType(32, 18, 4, 32, _q4_0),
    "Q4_1": BlockType(32, 20, 4, 32, _q4_1),
    "Q5_0": BlockType(32, 22, 5, 32, _q5_0),
    "Q5_1": BlockType(32, 24, 5, 32, _q5_1),
    "Q8_0": BlockType(32, 34, 8, 32, _q8_0),
    "Q2_K": BlockType(QK_K, 84, 2, 16, _q2_k),
    "Q3_K": BlockType(QK_K, 110, 3, 16, _q3_k),
    "Q4_K": BlockType(QK_K, 144, 4, 32, _q4_k),
    "Q5_K": BlockType(QK_K, 176, 5, 32, _q5_k),
    "Q6_K": BlockType(QK_K, 210, 6, 16, _q6_k),
    "IQ4_NL": BlockType(32, 18, 8, 32, _iq4_nl),
    "IQ4_XS": BlockType(QK_K, 136, 8, 32, _iq4_xs),
}
ENGINE_TYPES = frozenset(BLOCK_TYPES) | frozenset(FLOAT_TYPES)


def repack(raw: torch.Tensor, type_name: str, in_features: int) -> QuantWeight:
    """A GGUF weight's raw bytes [N, bytes per row] (rows = outputs, blocks along the K inputs) -> QuantWeight
    with q [K, N], scales/zeros/offsets [K / group, N], on raw's device."""
    kind = BLOCK_TYPES[type_name]
    rows = raw.shape[0]
    if in_features % kind.block or raw.numel() != rows * in_features // kind.block * kind.size:
        raise ValueError(f"{type_name} tensor of {rows} x {in_features} values does not fill its blocks")
    u = kind.unpack(raw.reshape(-1, kind.size))
    groups = in_features // kind.group
    q = u.levels.reshape(rows, in_features).t().contiguous()                              # [K, N]
    scales = u.scales.reshape(rows, groups).t().contiguous()                              # [G, N]
    zeros = offsets = None
    if u.offsets is not None:
        offsets = u.offsets.reshape(rows, groups).t().contiguous()
    else:
        zeros = torch.full_like(scales, u.zero, dtype=torch.uint8)
    g_idx = torch.arange(in_features, device=raw.device) // kind.group
    return QuantWeight(q=q, scales=scales, g_idx=g_idx, bits=kind.bits, group_size=kind.group, zeros=zeros,
                       offsets=offsets)
