"""Build an engine Transformer from a model folder's safetensors (fp32/fp16/bf16, GPTQ or AWQ), or from any
other tensor source that names its tensors the Hugging Face way (a GGUF file, repacked by the loader).

The weight format is read per linear layer from its tensor names (`.weight` dense, `.qweight` quantized),
with the quantization settings from the folder's config (core.quant_formats.read_quant_spec); a source
may also hand out a `.weight` that is already a QuantWeight. q/k/v and gate/up are fused into one matrix
each when they are stored alike. Layers can be spread across GPUs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from engine.llama import ModelArgs, Rotary, Transformer
from engine.moe import MoEFeedForward
from engine.quant_linear import (QuantWeight, RescoredHead, exact_int4,
                                 make_quant_linear)
from core.quant_formats import LAYER_PARTS, PACKED_NAMES, QuantSpec, read_quant_spec, read_quant_weight
from core.safetensors_index import CheckpointTensors

Progress = Callable[[float, str], None]


class TensorSource(Protocol):
    """Tensors by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`), each read when asked for.
    `get` gives a dense tensor, or for a quantized `.weight` a QuantWeight, on `device`."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor | QuantWeight: ...


def dense(tensor: torch.Tensor | QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """A tensor the engine keeps dense (embeddings, a tied head) in `dtype`, dequantized if it came quantized."""
    return tensor.dequantize(dtype) if isinstance(tensor, QuantWeight) else tensor.to(dtype)


def layer_devices(n_layers: int, devices: list[torch.device], gpu_split: list[float] | None) -> list[torch.device]:
    """The device of each layer: all on devices[0], or spread in proportion to gpu_split (GB per GPU)."""
    if not gpu_split or len(devices) == 1:
        return [devices[0]] * n_layers
    shares = torch.tensor(gpu_split[: len(devices)], dtype=torch.float64)
    bounds = (shares.cumsum(0) / shares.sum() * n_layers).round().long().tolist()         # end layer per GPU
    return [devices[next(i for i, end in enumerate(bounds) if layer < end)] for layer in range(n_layers)]


class SideBySide(nn.Module):
    """Linears that read the same input, outputs concatenated: y = [l(x) for l in layers] along the last dim."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.parts], dim=-1)


class WeightLoader:
    """Reads linear layers as dense tensors or QuantWeights and makes the matching nn.Module."""

    def __init__(self, ckpt: TensorSource, spec: QuantSpec | None, dtype: torch.dtype, repack_int4: bool):
        self.ckpt, self.spec, self.dtype, self.repack_int4 = ckpt, spec, dtype, repack_int4
        self.kinds: set[str] = set()   # what the linear layers became, for the runtime description

    def has(self, prefix: str) -> bool:
        """Whether the source holds the HF linear layer `prefix` (dense or quantized)."""
        return any(f"{prefix}.{name}" in self.ckpt for name in ("weight",) + PACKED_NAMES)

    def read(self, prefix: str, device: torch.device) -> tuple[torch.Tensor | QuantWeight, torch.Tensor | None]:
        """(weight [N, K] or QuantWeight, bias [N] or None) of the HF linear layer `prefix`."""
        if not any(f"{prefix}.{name}" in self.ckpt for name in PACKED_NAMES):   # dense, or a GGUF QuantWeight
            bias = self.ckpt.get(f"{prefix}.bias", device) if f"{prefix}.bias" in self.ckpt else None
            return self.ckpt.get(f"{prefix}.weight", device), bias
        if self.spec is None:
            raise ValueError(f"{prefix} is quantized but the folder has no quantization config")
        tensors = {part: self.ckpt.get(f"{prefix}.{part}", device) for part in LAYER_PARTS
                   if f"{prefix}.{part}" in self.ckpt}
        return read_quant_weight(tensors, self.spec)

    def parts(self, prefixes: list[str], device: torch.device) -> list[tuple]:
        """The listed HF linears as [(weight, bias)]: one fused matrix (outputs side by side) when they are
        stored alike, else one entry each."""
        parts = [self.read(p, device) for p in prefixes]
        weights = [w for w, _ in parts]
        dense = all(isinstance(w, torch.Tensor) for w in weights)
        # Act-order files may give each matrix its own input order; those cannot share one kernel call.
        quant = all(isinstance(w, QuantWeight) and weights[0].can_concat(w) for w in weights)
        if len(parts) > 1 and (dense or quant):
            parts = [self._fuse(parts, device)]
        return parts

    def linear(self, parts: list[tuple], device: torch.device) -> nn.Module:
        """One module computing `parts` (from `parts`) side by side."""
        modules = [self.module(w, b, device) for w, b in parts]
        return modules[0] if len(modules) == 1 else SideBySide(modules)

    @staticmethod
    def _fuse(parts, device: torch.device):
        weights = [w for w, _ in parts]
        dense = isinstance(weights[0], torch.Tensor)
        weight = torch.cat(weights) if dense else QuantWeight.concat(weights)
        bias = None
        if any(b is not None for _, b in parts):
            bias = torch.cat([b if b is not None else torch.zeros(w.shape[0] if dense else w.out_features,
                                                                  device=device) for w, b in parts])
        return weight, bias

    def module(self, weight: torch.Tensor | QuantWeight, bias: torch.Tensor | None, device: torch.device):
        if isinstance(weight, QuantWeight):
            return self._quant(weight, None if bias is None else bias.to(self.dtype), device, f"{weight.bits}-bit")
        if self.repack_int4 and (qw := exact_int4(weight)) is not None:
            return self._quant(qw, bias, device, "int4 (lossless repack)")
        self.kinds.add(str(self.dtype).removeprefix("torch."))
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        module.weight = nn.Parameter(weight.to(self.dtype), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(self.dtype), requires_grad=False)
        return module

    def _quant(self, qw: QuantWeight, bias, device: torch.device, label: str) -> nn.Module:
        module = make_quant_linear(qw, bias, device, self.dtype)
        self.kinds.add(f"{label} {module.kernel}")   # e.g. "3-bit hearth tensor-core", "8-bit dequantized (why)"
        return module


def sort_inputs(parts: list[tuple]) -> tuple[list[tuple], torch.Tensor | None]:
    """For a single act-order QuantWeight: the parts with K sorted by group, and the input order the layer
    now expects (x[..., order]), for the layer before to produce. Anything else: unchanged, None."""
    if len(parts) != 1 or not isinstance(parts[0][0], QuantWeight) or not parts[0][0].regular_groups():
        return parts, None
    weight, order = parts[0][0].sorted_by_group()
    return [(weight, parts[0][1])], order


def reorder_outputs(parts: list[tuple], order: torch.Tensor) -> list[tuple]:
    """A single weight [N, K] (dense or QuantWeight) and its bias with outputs taken in `order`."""
    (weight, bias), = parts
    weight = weight.outputs_reordered(order) if isinstance(weight, QuantWeight) else weight[order]
    return [(weight, None if bias is None else bias[order])]


def fold_input_orders(layer, qkv: list[tuple], wo: list[tuple], w13: list[tuple] | None, w2: list[tuple] | None
                      ) -> tuple[list, list, list | None, list | None]:
    """Act-order checkpoints quantize each matrix's inputs in their own order. Rather than gather x before
    every matmul (a kernel launch, or slow scattered reads inside one), the order is produced by the step
    before: the attention and MLP norms write their output in wqkv's and w13's order, attention writes its
    output in wo's, and w13's gate and up rows are stored in w2's order, so silu(gate) * up comes out ready
    for w2. An MoE layer passes w13 = w2 = None: its MLP norm feeds the router and every expert, each in its
    own order, so the experts gather x themselves."""
    qkv, layer.attention_norm.out_order = sort_inputs(qkv)
    wo, order = sort_inputs(wo)
    layer.attention.order_output(order)
    if w13 is None:
        return qkv, wo, None, None
    w13, layer.ffn_norm.out_order = sort_inputs(w13)
    if len(w13) == 1:
        w2, order = sort_inputs(w2)
        if order is not None:
            hidden = order.numel()
            w13 = reorder_outputs(w13, torch.cat([order, order + hidden]))
            layer.feed_forward.hidden_order = order
    return qkv, wo, w13, w2


def load_transformer(model_dir: Path, devices: list[torch.device], dtype: torch.dtype,
                     gpu_split: list[float] | None = None, repack_int4: bool = False,
                     progress: Progress | None = None, config: dict | None = None) -> tuple[Transformer, set[str]]:
    """An engine Transformer with the folder's weights on `devices`; also the kinds of linear layers made
    (e.g. {"4-bit tinygemm"}). repack_int4: store float weights that already lie on a 4-bit grid as int4.
    config: config.json's content when the caller has read it already."""
    model_dir = Path(model_dir)
    if config is None:
        config = json.loads((model_dir / "config.json").read_text())
    spec = read_quant_spec(model_dir)
    with CheckpointTensors(model_dir) as ckpt:
        # Only float checkpoints repacked to int4 get the rescored head: their fp32 head would otherwise take
        # as long as all the int4 layers together.
        return build_transformer(config, ckpt, spec, devices, dtype, gpu_split, repack_int4,
                                 rescore_head=repack_int4 and spec is None, progress=progress)


def build_transformer(config: dict, ckpt: TensorSource, spec: QuantSpec | None, devices: list[torch.device],
                      dtype: torch.dtype, gpu_split: list[float] | None = None, repack_int4: bool = False,
                      rescore_head: bool = False, progress: Progress | None = None) -> tuple[Transformer, set[str]]:
    """An engine Transformer for a config.json-style `config` with the tensors of `ckpt` on `devices`, and
    the kinds of linear layers made. spec: how `.qweight` layers are quantized (None when there are none).
    rescore_head: on CPU, when some layers run on tinygemm, compute the dense head through RescoredHead
    (an int8 pass, the best logits redone in fp32). A head the source gives quantized becomes a quantized
    layer like any other."""
    args = ModelArgs.from_config(config)
    loader = WeightLoader(ckpt, spec, dtype, repack_int4)
    per_layer = layer_devices(args.n_layers, devices, gpu_split)
    first, last = per_layer[0], per_layer[-1]
    names = HFNames(args)

    with torch.device("meta"):
        model = Transformer(args)
    # The embedding and norms stay in `dtype` on their layer's device; RoPE tables are rebuilt there.
    model.tok_embeddings.weight = nn.Parameter(dense(ckpt.get("model.embed_tokens.weight", first), dtype),
                                               requires_grad=False)
    for i, layer in enumerate(model.layers):
        if progress:
            progress(0.1 + 0.85 * i / args.n_layers, f"layer {i + 1}/{args.n_layers}")
        dev, p = per_layer[i], f"model.layers.{i}"
        moe = args.is_moe(i)
        qkv, wo, w13, w2 = fold_input_orders(layer, loader.parts(names.qkv(p), dev),
                                             loader.parts([f"{p}.self_attn.o_proj"], dev),
                                             None if moe else loader.parts(names.gate_up(f"{p}.mlp"), dev),
                                             None if moe else loader.parts([f"{p}.mlp.down_proj"], dev))
        layer.attention.wqkv = loader.linear(qkv, dev)
        layer.attention.wo = loader.linear(wo, dev)
        if moe:
            load_moe(layer.feed_forward, loader, names, p, dev)
        else:
            layer.feed_forward.w13, layer.feed_forward.w2 = loader.linear(w13, dev), loader.linear(w2, dev)
        for norm, name in names.norms(layer, p):
            norm.weight = nn.Parameter(norm_weight(ckpt.get(f"{name}.weight", dev), args, dtype), requires_grad=False)
    model.norm.weight = nn.Parameter(norm_weight(ckpt.get("model.norm.weight", last), args, dtype),
                                     requires_grad=False)
    head = None
    if not args.tie_word_embeddings and loader.has("lm_head"):
        head, _ = loader.read("lm_head", last)   # GPTQModel can quantize the head too (lm_head: true)
    if isinstance(head, QuantWeight):
        model.output = loader.module(head, None, last)
    else:
        if head is None:
            head = model.tok_embeddings.weight if last == first else model.tok_embeddings.weight.to(last)
        model.output.weight = nn.Parameter(head.to(dtype), requires_grad=False)
        if rescore_head and any("tinygemm" in kind for kind in loader.kinds):
            model.output = RescoredHead(model.output.weight)
            loader.kinds.add(f"rescored {model.output.kind} head")
    # Built on meta above: the frequency tables need real values.
    model.rotary = Rotary(args).to(first)
    if model.local_rotary is not None:
        model.local_rotary = Rotary(args, args.local_rope_theta, args.local_rope_scaling).to(first)
    return model.eval(), loader.kinds


def norm_weight(stored: torch.Tensor, args: ModelArgs, dtype: torch.dtype) -> torch.Tensor:
    """An RMSNorm's weight as the engine multiplies by it: Gemma stores w - 1, so 1 is added (in fp32, as
    transformers does before multiplying)."""
    return (stored.float() + args.norm_offset).to(dtype) if args.norm_offset else stored.to(dtype)


class HFNames:
    """Where each engine weight sits in a Hugging Face checkpoint of this family."""

    def __init__(self, args: ModelArgs):
        self.args = args

    def qkv(self, p: str) -> list[str]:
        # Phi-3 stores q, k and v as one qkv_proj (in that order), as the engine keeps them.
        if self.args.fused_checkpoint:
            return [f"{p}.self_attn.qkv_proj"]
        return [f"{p}.self_attn.{x}_proj" for x in "qkv"]

    def gate_up(self, mlp: str) -> list[str]:
        return [f"{mlp}.gate_up_proj"] if self.args.fused_checkpoint else [f"{mlp}.gate_proj", f"{mlp}.up_proj"]

    def norms(self, layer, p: str) -> list[tuple[nn.Module, str]]:
        pairs = [(layer.attention_norm, f"{p}.input_layernorm")]
        if self.args.sandwich_norms:   # Gemma: post_attention_layernorm is the norm on attention's output
            pairs += [(layer.post_attention_norm, f"{p}.post_attention_layernorm"),
                      (layer.ffn_norm, f"{p}.pre_feedforward_layernorm"),
                      (layer.post_ffn_norm, f"{p}.post_feedforward_layernorm")]
        else:
            pairs.append((layer.ffn_norm, f"{p}.post_attention_layernorm"))
        if self.args.qk_norm:
            pairs += [(layer.attention.q_norm, f"{p}.self_attn.q_norm"), (layer.attention.k_norm, f"{p}.self_attn.k_norm")]
        return pairs

    def moe(self, p: str) -> tuple[str, list[tuple[list[str], str]]]:
        """(router prefix, [(gate and up prefixes, down prefix)] for each expert)."""
        if self.args.model_type == "mixtral":
            m = f"{p}.block_sparse_moe"
            return f"{m}.gate", [([f"{m}.experts.{e}.w1", f"{m}.experts.{e}.w3"], f"{m}.experts.{e}.w2")
                                 for e in range(self.args.n_experts)]
        m = f"{p}.mlp"
        return f"{m}.gate", [([f"{m}.experts.{e}.gate_proj", f"{m}.experts.{e}.up_proj"], f"{m}.experts.{e}.down_proj")
                             for e in range(self.args.n_experts)]


def load_moe(moe: MoEFeedForward, loader: WeightLoader, names: HFNames, p: str, dev: torch.device) -> None:
    """The router, each expert (dense or quantized, whatever the checkpoint holds) and Qwen2-MoE's shared
    expert. On CUDA the experts are then stacked for the graph-captured decode step (MoEFeedForward.stack_experts)."""
    router, experts = names.moe(p)
    moe.gate = loader.linear(loader.parts([router], dev), dev)
    for expert, (gate_up, down) in zip(moe.experts, experts):
        expert.w13 = loader.linear(loader.parts(gate_up, dev), dev)
        expert.w2 = loader.linear(loader.parts([down], dev), dev)
    if moe.shared_expert is not None:
        shared = moe.shared_expert
        shared.w13 = loader.linear(loader.parts(names.gate_up(f"{p}.mlp.shared_expert"), dev), dev)
        shared.w2 = loader.linear(loader.parts([f"{p}.mlp.shared_expert.down_proj"], dev), dev)
        moe.shared_expert_gate = loader.linear(loader.parts([f"{p}.mlp.shared_expert_gate"], dev), dev)
    if dev.type == "cuda":
        moe.stack_experts()
