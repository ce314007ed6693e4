"""The mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE) that takes the place of engine.llama's
FeedForward in MoE layers.

A router picks the top-k experts of each token (softmax over the router logits in fp32, top-k, optionally
renormalised to sum to 1) and the token's output is the weighted sum of those experts' gated MLPs; Qwen2-MoE
adds an always-on shared expert scaled by sigmoid(shared_expert_gate(x)).

Only the chosen experts are computed. Prompts (and everything on CPU) loop over the experts some token chose,
each running on its own rows. A CUDA-graph decode step cannot loop over data-dependent experts, so on CUDA
(`stack_experts`) every weight tensor of the experts is stacked [E, ...] and the decode step copies the k
chosen experts' tensors into k fixed "slot" experts by index_select with the router's ids (no host sync, no
data-dependent shape), then runs the slots: it reads the chosen experts' weights only. Where every expert
runs on the 4-bit tensor-core kernel (engine.int4_mma, natural input order, no bias), the copy is skipped:
the kernel takes the router's ids and reads each chosen expert where it lies, all slots in one launch for
gate/up and one for down (copying 2 Mixtral experts a layer moved twice their bytes again; one launch per
slot and matrix left Qwen3-MoE's 8 small experts bound by launches).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine import int4_mma
from engine.quant_linear import Int4Linear


class MoEFeedForward(nn.Module):
    """make_mlp(args, hidden) -> a gated MLP module of that width (engine.llama.FeedForward)."""

    def __init__(self, args, make_mlp: Callable[..., nn.Module]):
        super().__init__()
        self.top_k, self.norm_topk_prob = args.n_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)                      # the router
        self.experts = nn.ModuleList(make_mlp(args, args.moe_intermediate_size) for _ in range(args.n_experts))
        shared = args.shared_expert_intermediate_size
        self.shared_expert = make_mlp(args, shared) if shared else None
        self.shared_expert_gate = nn.Linear(args.dim, 1, bias=False) if shared else None
        # Set by stack_experts: each expert tensor stacked [E, ...], and top_k slot experts whose tensors are
        # views of `slot_tensors` [k, ...].
        self.stacked: list[torch.Tensor] | None = None
        self.slot_tensors: list[torch.Tensor] | None = None
        self.slots: nn.ModuleList | None = None
        # Set by stack_experts where the experts allow it: w13's and w2's PackedInt4 over the stacked tensors.
        self.in_place: dict[str, int4_mma.PackedInt4] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                                     # [M, D]
        logits = self.gate(x2).float()                                                    # [M, E]
        if self.norm_topk_prob:   # softmax over all, top k, renormalised = softmax over the top k: 2 kernels fewer
            top, ids = logits.topk(self.top_k, dim=-1)                                    # [M, k]
            weights = F.softmax(top, dim=-1)
        else:
            weights, ids = F.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        weights = weights.to(x.dtype)
        if self.stacked is not None and x2.shape[0] == 1:
            out = self._decode_slots(x2, ids[0], weights[0])
        else:
            out = self._by_expert(x2, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return out.view(shape)

    def _by_expert(self, x2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each chosen expert on the rows that chose it, in expert order (as transformers sums them)."""
        out = torch.zeros_like(x2)
        for e in torch.unique(ids).tolist():
            rows, slot = torch.nonzero(ids == e, as_tuple=True)
            y = self._expert(e)(x2[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out

    def _expert(self, e: int) -> nn.Module:
        if self.stacked is None:
            return self.experts[e]
        # Stacked (CUDA): expert e's tensors into slot 0. Prompts only: decode uses _decode_slots.
        for stacked, slot in zip(self.stacked, self.slot_tensors):
            slot[0].copy_(stacked[e])
        return self.slots[0]

    def _decode_slots(self, x2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x2: [1, D]; ids, weights: [k].
        if self.in_place is not None:
            w13, w2 = self.in_place["w13"], self.in_place["w2"]
            config = lambda w: int4_mma.config_for(self.top_k * w.n, experts=True)
            gate_up = int4_mma.expert_matmul(x2.to(torch.bfloat16), w13, ids, config(w13))
            hidden = self.slots[0].activate(gate_up)                                      # [k, F]
            y = int4_mma.expert_matmul(hidden.contiguous(), w2, ids, config(w2))
            return torch.mm(weights[None].to(y.dtype), y).to(x2.dtype)                   # sum of w_j y_j: [1, D]
        # Gather the chosen experts into the slots, then run each slot.
        for stacked, slot in zip(self.stacked, self.slot_tensors):
            torch.index_select(stacked, 0, ids, out=slot)
        out = None
        for j, expert in enumerate(self.slots):
            y = expert(x2) * weights[j]
            out = y if out is None else out + y
        return out

    def stack_experts(self) -> None:
        """Keep the experts as stacked tensors plus top_k slot experts, or one where they are read in place (see
        the module docstring), so the decode step runs without host syncs. ValueError when the experts' tensors differ in form (kernel, shapes)."""
        forms = [tensor_leaves(e) for e in self.experts]
        first = forms[0]
        for e, form in enumerate(forms[1:], 1):
            if [(n, t.shape, t.dtype) for n, _, t in form] != [(n, t.shape, t.dtype) for n, _, t in first] or \
                    structure(self.experts[e]) != structure(self.experts[0]):
                raise ValueError(f"expert {e} is stored in another form than expert 0, so the experts cannot be "
                                 "stacked for the CUDA decode step")
        self.stacked = [torch.stack([form[i][2] for form in forms]) for i in range(len(first))]
        self.in_place = self._in_place(first)
        # Read in place, the decode step needs no slots: one is kept for prompts (_expert).
        n_slots = 1 if self.in_place is not None else self.top_k
        self.slot_tensors = [torch.empty((n_slots, *t.shape[1:]), dtype=t.dtype, device=t.device)
                             for t in self.stacked]
        slots = []
        for j in range(n_slots):
            slot = copy.deepcopy(self.experts[0])
            for (_, (holder, name), _), tensors in zip(tensor_leaves(slot), self.slot_tensors):
                replace_leaf(holder, name, tensors[j])
            slots.append(slot)
        self.slots = nn.ModuleList(slots)
        self.experts = nn.ModuleList()   # their tensors now live in `stacked` only

    def _in_place(self, leaves: list) -> dict[str, int4_mma.PackedInt4] | None:
        """w13's and w2's PackedInt4 with `stacked`'s tensors in place of expert 0's, for int4_mma.expert_matmul;
        None unless both run on that kernel in the natural input order, without bias, with plain scales."""
        stacked_of = {id(t): stacked for (_, _, t), stacked in zip(leaves, self.stacked)}
        expert = self.experts[0]
        out = {}
        for name in ("w13", "w2"):
            layer = getattr(expert, name)
            if not isinstance(layer, Int4Linear) or layer.cpu or layer.perm is not None or layer.bias is not None:
                return None
            p = layer.packed
            if p.store.supers is not None or p.store.offsets is not None:
                return None
            out[name] = dataclasses.replace(
                p, words=stacked_of[id(p.words)],
                store=dataclasses.replace(p.store, scales=stacked_of[id(p.store.scales)]),
                zero_bias=None if p.zero_bias is None else stacked_of[id(p.zero_bias)])
        return out


def tensor_leaves(module: nn.Module) -> list[tuple[str, tuple[object, str], torch.Tensor]]:
    """Every tensor a module computes with, in a fixed order: (path, (holder, attribute), tensor). Holders are
    submodules (parameters, buffers) or dataclasses they keep (a packed kernel's weights and scales)."""
    leaves = []

    def visit(path: str, obj) -> None:
        if isinstance(obj, nn.Module):
            for name, t in list(obj._parameters.items()) + list(obj._buffers.items()):
                if t is not None:
                    leaves.append((f"{path}.{name}", (obj, name), t))
            for name, value in vars(obj).items():
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    visit(f"{path}.{name}", value)
            for name, child in obj._modules.items():
                visit(f"{path}.{name}", child)
        else:
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if isinstance(value, torch.Tensor):
                    leaves.append((f"{path}.{f.name}", (obj, f.name), value))
                elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                    visit(f"{path}.{f.name}", value)

    visit("", module)
    return leaves


def structure(module: nn.Module) -> list:
    """What besides tensors decides how a module computes: classes, and the plain values of its dataclasses
    (e.g. a packed weight's group size or single zero point)."""
    out = []
    for m in module.modules():
        out.append(type(m).__name__)
        for value in vars(m).values():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                out.append(plain_fields(value))
    return out


def plain_fields(obj) -> list:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.append(plain_fields(value))
        elif not isinstance(value, torch.Tensor):
            out.append((f.name, value))
        else:
            out.append((f.name, "tensor"))
    return out


def replace_leaf(holder, name: str, tensor: torch.Tensor) -> None:
    if isinstance(holder, nn.Module):
        if name in holder._parameters:
            holder._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            holder._buffers[name] = tensor
    else:
        setattr(holder, name, tensor)
