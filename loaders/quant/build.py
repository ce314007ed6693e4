"""Build a transformers model from config.json and fill it from a GPTQ/AWQ checkpoint on CPU.

The model skeleton is created with empty (meta) parameters, each quantized nn.Linear is replaced by the
engine's quantized layer for its checkpoint tensors (engine.quant_linear: "dequantize" = the weights unpacked
once in the compute dtype, exact; "int4" = torch's CPU int4 kernel where it fits, smaller and approximate),
and the remaining fp tensors (embeddings, norms, lm_head) are assigned in place, so peak memory stays near
the size of the finished model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loaders.base import LoadError, Progress, no_progress
from engine.quant_linear import DequantLinear, make_quant_linear
from core.quant_formats import LAYER_PARTS, QuantSpec, read_quant_weight
from core.safetensors_index import CheckpointTensors, quantized_prefixes

KERNELS = ("dequantize", "int4")


def build_hf_skeleton(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The transformers model for config.json with parameters on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for an unusable config
        raise LoadError(f"config.json of {model_dir.name} is not usable: {exc}") from None
    # The quantization is Hearth's business here; transformers must build a plain fp model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Buffers (rotary frequencies) stay real so they need no re-initialisation after loading.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def _swap_module(model: nn.Module, prefix: str, new: nn.Module) -> None:
    parent_name, _, child = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_quantized(model_dir: Path, spec: QuantSpec, dtype: torch.dtype, kernel: str = "dequantize",
                   progress: Progress = no_progress, trust_remote_code: bool = False) -> nn.Module:
    """A ready-to-run (eval) transformers model with every quantized Linear replaced by the engine's layer
    for `kernel` (one of KERNELS)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    model = build_hf_skeleton(model_dir, dtype, trust_remote_code)
    with CheckpointTensors(model_dir) as reader:
        prefixes = quantized_prefixes(reader.index)
        if not prefixes:
            raise LoadError(f"{model_dir.name} says it is {spec.method.upper()} ({spec.source}) but its weight "
                            f"files hold no quantized (.qweight) tensors")
        consumed: set[str] = set()
        for i, prefix in enumerate(prefixes):
            try:
                target = model.get_submodule(prefix)
            except AttributeError:
                raise LoadError(f"{model_dir.name}: the checkpoint has quantized layer {prefix}, which the "
                                f"{type(model).__name__} built from config.json does not have") from None
            if not isinstance(target, nn.Linear):
                raise LoadError(f"{model_dir.name}: {prefix} is quantized but is not a Linear layer")
            names = {p: f"{prefix}.{p}" for p in LAYER_PARTS if f"{prefix}.{p}" in reader.index}
            missing = ({"weight_packed", "weight_scale", "weight_shape"} if "weight_packed" in names
                       else {"qweight", "qzeros", "scales"}) - set(names)
            if missing:
                raise LoadError(f"{model_dir.name}: layer {prefix} lacks {', '.join(sorted(missing))}")
            tensors = {p: reader.get(n) for p, n in names.items()}
            consumed.update(names.values())
            weight, bias = read_quant_weight(tensors, spec)
            if (weight.in_features, weight.out_features) != (target.in_features, target.out_features):
                raise LoadError(f"{model_dir.name}: {prefix} is {weight.in_features}x{weight.out_features} in the "
                                f"checkpoint but {target.in_features}x{target.out_features} in config.json")
            bias = None if bias is None else bias.to(dtype)
            cpu = torch.device("cpu")
            _swap_module(model, prefix, make_quant_linear(weight, bias, cpu, dtype) if kernel == "int4"
                         else DequantLinear(weight, bias, cpu, dtype))
            progress(0.1 + 0.8 * (i + 1) / len(prefixes), f"unpacked {prefix}")
        plain = {name: reader.get(name).to(dtype) if reader.index[name].dtype.startswith(("F", "BF")) else
                 reader.get(name) for name in reader.index if name not in consumed}
    result = model.load_state_dict(plain, strict=False, assign=True)
    if result.unexpected_keys:
        raise LoadError(f"{model_dir.name}: tensors the model does not have: {', '.join(result.unexpected_keys[:5])}")
    model.tie_weights()
    still_empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_empty:
        raise LoadError(f"{model_dir.name}: weights missing from the checkpoint: {', '.join(still_empty[:5])}")
    return model.eval()
