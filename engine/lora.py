"""LoRA adapters on Hearth's engine: low-rank matmuls beside the base layers, never merged into them.

A LoRA adds `scaling * B @ (A @ x)` to a linear layer's output (A: [r, K], B: [N, r]). Here every adapted
engine layer is wrapped by a `LoraLinear` that runs the base layer untouched (fp16 or any quantized kernel)
and adds one stacked low-rank product for all adapters at once: A of every adapter stacked along the rank
axis ([R, K], R = the sum of their ranks), B side by side ([N, R]), each adapter's rows of A multiplied by
its scaling times its weight. So any number of adapters costs two matmuls a layer (at decode on CUDA,
engine.lora_kernel's kernels, run beside the base layer on a side stream), and changing a weight
rewrites those rows in place (`reweight`): the buffers keep their addresses, so a captured CUDA graph keeps
replaying and needs no new capture. Adding or removing adapters changes the buffers' shapes: the caller
drops its graphs then. With weight 0 the product is exactly zero and the output exactly the base's;
removing every adapter puts the original modules back.

The engine fuses Hugging Face's linears (q/k/v into wqkv, gate/up into w13) and, for act-order checkpoints,
reads some inputs in a permuted order (engine.weights.fold_input_orders): each HF-named LoRA is mapped onto
its engine layer's rows, with its A columns and B rows permuted to match, once when applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine import lora_kernel
from engine.llama import Transformer
from engine.moe import tensor_leaves


@dataclass
class LoraWeights:
    """One adapter's tensors by Hugging Face module name, format-neutral (read by loaders.lora).

    layers: {"model.layers.0.self_attn.q_proj": (A [r, K], B [N, r], scaling)}, scaling = alpha / r (or
        alpha / sqrt(r) with rslora), per module (alpha_pattern / rank_pattern applied).
    saved_modules: whole modules the adapter replaces (peft's modules_to_save): {"lm_head": weight [V, D],
        "model.embed_tokens": weight [V, D]}.
    """
    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    saved_modules: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Target:
    """Where an HF linear lives in the engine: module `attr` of `parent`, output rows [start, stop) of it,
    and the orders its input and output are kept in (act-order folding; None: natural order)."""
    parent: nn.Module
    attr: str
    start: int
    stop: int
    in_order: torch.Tensor | None = None
    out_order: torch.Tensor | None = None


class LoraLinear(nn.Module):
    """y = base(x) + (x @ A^T) @ B^T, A's rows pre-scaled per adapter. x: [..., K] -> y: [..., N]."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, owner: torch.Tensor,
                 scaling: torch.Tensor, side: torch.cuda.Stream | None):
        super().__init__()
        self.base = base
        self.a_raw = a                 # [R, K] fp32, unscaled: what `a` is rebuilt from at each new weight
        self.owner = owner             # [R] which adapter (its index in `apply`'s list) each row belongs to
        self.scaling = scaling         # [R] its module's LoRA scaling (alpha / r, or alpha / sqrt(r))
        self.register_buffer("a", torch.zeros(a.shape, dtype=b.dtype, device=a.device), persistent=False)  # [R, K]
        self.register_buffer("b", b, persistent=False)                      # [N, R]
        self.side = side               # the stream decode's low-rank product runs on beside the base layer
                                       # (None on CPU, which never runs the kernels)
        self.kernel = True             # decode on CUDA through engine.lora_kernel; False: torch's matmuls
                                       # (the bench's and the GPU test's comparison)

    def scale(self, weights: torch.Tensor) -> None:
        """Rescale in place: row i of A times its scaling and its adapter's weight (weights: [adapters])."""
        self.a.copy_(self.a_raw * (self.scaling * weights[self.owner])[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and lora_kernel.usable(x, self.a):
            # Decode: the low-rank product on the side stream while the base layer runs (both only read x),
            # then one add once both are done; inside a graph capture this forks and joins two branches.
            d = lora_kernel.low_rank_delta(x, self.a, self.b, self.side)   # held until after the wait
            y = self.base(x)
            torch.cuda.current_stream(x.device).wait_stream(self.side)
            return lora_kernel.add_delta(y, d)
        y = self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        # addmm: the low-rank product and the add in one kernel (decode is launch-bound on a GPU)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), x2 @ self.a.t(), self.b.t())
        return out.reshape(y.shape)


class ReplacedWeight(nn.Module):
    """A module swapped for an adapter's own copy (modules_to_save), blended with the original by weight:
    weight 1 is the adapter's tensor, 0 the original's, each exactly."""

    def __init__(self, base: nn.Module, original: torch.Tensor, saved: torch.Tensor, embedding: bool):
        super().__init__()
        self.base, self.embedding = base, embedding
        self.register_buffer("original", original, persistent=False)
        self.register_buffer("saved", saved.to(original), persistent=False)
        self.register_buffer("weight", saved.to(original).clone(), persistent=False)

    def blend(self, w: float) -> None:
        if w == 1.0:
            self.weight.copy_(self.saved)
        elif w == 0.0:
            self.weight.copy_(self.original)
        else:
            self.weight.copy_(self.original + w * (self.saved - self.original))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:
            return nn.functional.embedding(x, self.weight)
        return nn.functional.linear(x, self.weight)


def targets(model: Transformer) -> dict[str, Target]:
    """Every HF linear name the engine can adapt, mapped onto its engine layer."""
    a = model.args
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    out: dict[str, Target] = {"lm_head": Target(model, "output", 0, a.vocab_size)}
    for i, layer in enumerate(model.layers):
        p, attn = f"model.layers.{i}", layer.attention
        qkv_order = layer.attention_norm.out_order
        if a.fused_checkpoint:
            out[f"{p}.self_attn.qkv_proj"] = Target(attn, "wqkv", 0, q + 2 * kv, qkv_order)
        else:
            for name, (start, stop) in {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}.items():
                out[f"{p}.self_attn.{name}_proj"] = Target(attn, "wqkv", start, stop, qkv_order)
        out[f"{p}.self_attn.o_proj"] = Target(attn, "wo", 0, a.dim, attn.output_order)
        ff = layer.feed_forward
        if a.is_moe(i):
            continue   # experts and routers: not adaptable here (unknown names are refused by `check`)
        h, hidden = ff.hidden, ff.hidden_order
        gate_up = {"gate_up_proj": (0, 2 * h)} if a.fused_checkpoint else {"gate_proj": (0, h), "up_proj": (h, 2 * h)}
        for name, (start, stop) in gate_up.items():
            order = None
            if hidden is not None:   # w13's gate and up rows are each stored in w2's input order
                order = hidden if stop - start == h else torch.cat([hidden, hidden + h])
            out[f"{p}.mlp.{name}"] = Target(ff, "w13", start, stop, layer.ffn_norm.out_order, order)
        out[f"{p}.mlp.down_proj"] = Target(ff, "w2", 0, a.dim, hidden)
    return out


SAVED_MODULES = {"lm_head": ("output", False), "model.embed_tokens": ("tok_embeddings", True)}


def _in_features(module: nn.Module) -> int:
    if isinstance(module, LoraLinear):
        module = module.base
    if hasattr(module, "in_features"):
        return module.in_features
    if hasattr(module, "parts"):   # SideBySide: every part reads the same input
        return _in_features(module.parts[0])
    return module.weight.shape[1]


def layer_shapes(model: Transformer) -> dict[str, tuple[int, int]]:
    """{HF linear name: (inputs, outputs)} for every layer the engine can adapt."""
    return {name: (_in_features(getattr(t.parent, t.attr)), t.stop - t.start) for name, t in targets(model).items()}


def check(model: Transformer, adapter: LoraWeights) -> None:
    """ValueError naming the first module or shape of `adapter` this model does not have."""
    shapes = layer_shapes(model)
    for name, (a, b, _) in adapter.layers.items():
        if name not in shapes:
            raise ValueError(f"LoRA {adapter.name}: the loaded model has no layer {name} that the engine can adapt")
        k, n = shapes[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[1] != k or b.shape[0] != n:
            raise ValueError(f"LoRA {adapter.name}: {name} has A {list(a.shape)} and B {list(b.shape)}, but the "
                             f"loaded model's layer takes {k} inputs and gives {n} outputs (an adapter for "
                             "another model size?)")
    for name, weight in adapter.saved_modules.items():
        if name not in SAVED_MODULES:
            raise ValueError(f"LoRA {adapter.name}: it replaces {name}, which the engine cannot swap")
        want = (model.args.vocab_size, model.args.dim)
        if tuple(weight.shape) != want:
            raise ValueError(f"LoRA {adapter.name}: its {name} is {list(weight.shape)}, the model's {list(want)}")


def remove_all(model: Transformer) -> None:
    """Put every original module back: the model computes exactly what it did before any adapter."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, (LoraLinear, ReplacedWeight)):
                setattr(module, attr, child.base)


def apply(model: Transformer, adapters: list[tuple[LoraWeights, float]]) -> None:
    """Replace whatever adapters the model has with `adapters` ([(weights, weight)]). Each is checked
    first (ValueError, the model unchanged). Callers that captured graphs must drop them."""
    for adapter, _ in adapters:
        check(model, adapter)
    replaced = [name for adapter, _ in adapters for name in adapter.saved_modules]
    if len(replaced) != len(set(replaced)):
        raise ValueError("two adapters replace the same module (modules_to_save); apply one of them")
    remove_all(model)
    found = targets(model)
    sides: dict[torch.device, torch.cuda.Stream] = {}   # one side stream a GPU, shared by its layers
    by_layer: dict[tuple[int, str], list[tuple[int, str, torch.Tensor, torch.Tensor, float]]] = {}
    for index, (adapter, _) in enumerate(adapters):
        for name, (a, b, s) in adapter.layers.items():
            t = found[name]
            by_layer.setdefault((id(t.parent), t.attr), []).append((index, name, a, b, s))
    for entries in by_layer.values():
        t = found[entries[0][1]]
        base = getattr(t.parent, t.attr)
        device = tensor_leaves(base)[0][2].device   # packed CUDA layers keep their tensors in a dataclass
        dtype = model.tok_embeddings.weight.dtype
        n = max(x.stop for x in found.values() if x.parent is t.parent and x.attr == t.attr)
        a_rows, b_cols, owners, scalings = [], [], [], []
        for index, name, a, b, s in entries:
            tt = found[name]
            a = a.float() if tt.in_order is None else a.float()[:, tt.in_order.cpu().long()]
            b = b.float() if tt.out_order is None else b.float()[tt.out_order.cpu().long()]
            full = torch.zeros(n, b.shape[1])
            full[tt.start:tt.stop] = b
            a_rows.append(a)
            b_cols.append(full)
            owners.append(torch.full((a.shape[0],), index, dtype=torch.long))
            scalings.append(torch.full((a.shape[0],), float(s)))
        side = sides.setdefault(device, torch.cuda.Stream(device)) if device.type == "cuda" else None
        wrapped = LoraLinear(base, torch.cat(a_rows).to(device), torch.cat(b_cols, 1).to(device, dtype),
                             torch.cat(owners).to(device), torch.cat(scalings).to(device), side)
        setattr(t.parent, t.attr, wrapped)
    for adapter, _ in adapters:
        for name, weight in adapter.saved_modules.items():
            attr, embedding = SAVED_MODULES[name]
            base = getattr(model, attr)
            original = _dense_weight(model, attr)
            setattr(model, attr, ReplacedWeight(base, original, weight, embedding))
    reweight(model, adapters)


def reweight(model: Transformer, adapters: list[tuple[LoraWeights, float]]) -> None:
    """New weights for the adapters `apply` put in (same ones, same order): in place, graph-safe."""
    weights = torch.tensor([float(w) for _, w in adapters], dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.scale(weights.to(module.a_raw.device))
    for adapter, w in adapters:
        for name in adapter.saved_modules:
            getattr(model, SAVED_MODULES[name][0]).blend(float(w))


def _dense_weight(model: Transformer, attr: str) -> torch.Tensor:
    module = getattr(model, attr)
    weight = getattr(module, "weight", None)
    if weight is None:   # a quantized head: the adapter's copy replaces it, the blend needs the dense original
        raise ValueError(f"the loaded model's {attr} is quantized; an adapter cannot replace it")
    return weight.detach().clone()
