"""The format-neutral quantized weight every checkpoint format is read into (GPTQ, AWQ, compressed-tensors,
GGUF) and every quantized layer is built from: integer levels q, scales per group and either integer zero points
z, so W[n, k] = s[g(k), n] * (q[k, n] - z[g(k), n]), or float offsets m, so W = s * q + m."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


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

    def regular_groups(self) -> bool:
        """Whether each group holds group_size input rows (the last may hold fewer), so that sorting K by
        group makes them contiguous. Checkpoints are so; a hand-edited g_idx may not be."""
        K = self.in_features
        return torch.equal(torch.sort(self.g_idx).values, torch.arange(K, device=self.g_idx.device) // self.group_size)

    def sorted_by_group(self) -> tuple["QuantWeight", torch.Tensor | None]:
        """This weight with K reordered so that each group's rows are contiguous, and that order (the layer
        then expects x[..., order]); (self, None) when the groups already are contiguous."""
        contiguous = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
        if torch.equal(self.g_idx, contiguous):
            return self, None
        if not self.regular_groups():
            raise ValueError("act-order groups must each hold exactly group_size rows")
        order = torch.argsort(self.g_idx, stable=True)
        return replace(self, q=self.q[order], g_idx=contiguous), order

    def outputs_reordered(self, order: torch.Tensor) -> "QuantWeight":
        """This weight with its output columns taken in `order` (y[..., order] of the original)."""
        pick = lambda t: None if t is None else t[:, order]
        return replace(self, q=self.q[:, order], scales=self.scales[:, order], zeros=pick(self.zeros),
                       offsets=pick(self.offsets))

    def can_concat(self, other: "QuantWeight") -> bool:
        return (self.bits == other.bits and self.group_size == other.group_size
                and self.in_features == other.in_features and torch.equal(self.g_idx, other.g_idx)
                and (self.zeros is None) == (other.zeros is None))
