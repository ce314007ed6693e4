"""A GGUF model as the engine's tensor source: an HF-style config from its metadata, its tensors under the
Hugging Face names the engine reads, quantized ones repacked into QuantWeights (loaders.gguf_repack).

Tensor data is read with the `gguf` package's GGUFReader (memory-mapped), one reader per file of a split
model. llama.cpp's converter permutes the rows of Llama q and k weights so that RoPE pairs sit side by side
(its interleaved rotation); the engine rotates halves like transformers, so those rows are put back.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from core.quant_weight import QuantWeight
from engine.quant_linear import TINYGEMM_GROUP_SIZES
from loaders.base import LoadError
from loaders.gguf_header import GGUFHeader, read_model_header, split_parts
from loaders.gguf_repack import BLOCK_TYPES, ENGINE_TYPES, FLOAT_TYPES, repack

# GGUF tensor name -> HF name; {i} is the layer.
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
                "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
                "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
                "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
# Architectures whose q/k rows llama.cpp's converter permutes (its LlamaModel and subclasses).
PERMUTED_ARCHITECTURES = ("llama", "mistral")
# The GGUF architectures hf_config and the tensor names above map onto the engine. The engine runs more
# families from config.json; their GGUF metadata and tensors (q/k norms, Gemma's stored 1 + w norms, experts)
# are not mapped yet.
GGUF_ENGINE_ARCHITECTURES = ("llama", "mistral", "qwen2")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when the engine has no place for it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.match(gguf_name)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}"
    return None


def hf_config(metadata: dict, tensor_names: set[str]) -> dict:
    """A config.json-style dict (what engine.llama.ModelArgs reads) from GGUF metadata."""
    arch = metadata.get("general.architecture")

    def key(name, default=None):
        return metadata.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    config = {"model_type": arch, "hidden_size": key("embedding_length"), "num_hidden_layers": key("block_count"),
              "intermediate_size": key("feed_forward_length"), "num_attention_heads": heads,
              "num_key_value_heads": key("attention.head_count_kv", heads),
              "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
              "rope_theta": key("rope.freq_base", 10000.0), "max_position_embeddings": key("context_length", 2048),
              "vocab_size": key("vocab_size") or metadata.get("tokenizer.ggml.tokens"),
              "tie_word_embeddings": "output.weight" not in tensor_names, "hidden_act": "silu"}
    if key("attention.key_length"):
        config["head_dim"] = key("attention.key_length")
    rope_type, factor = key("rope.scaling.type"), key("rope.scaling.factor")
    if rope_type not in (None, "none") and factor:
        config["rope_scaling"] = {"rope_type": rope_type, "factor": factor}
        if key("rope.scaling.original_context_length"):
            config["rope_scaling"]["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    for name in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{name}" in metadata:
            config[name] = metadata[f"tokenizer.ggml.{name}"]
    return config


def engine_refusal(header: GGUFHeader) -> str | None:
    """Why Hearth's engine cannot run the model in this GGUF header, or None when it can."""
    arch = header.metadata.get("general.architecture")
    if arch not in GGUF_ENGINE_ARCHITECTURES:
        return f"architecture {arch!r} is not one of {', '.join(GGUF_ENGINE_ARCHITECTURES)}"
    unknown = [t.name for t in header.tensors if hf_name(t.name) is None]
    if unknown:
        return f"tensor {unknown[0]} has no place in the engine's Llama layers" + (
            f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
    types = sorted({t.type_name for t in header.tensors} - ENGINE_TYPES)
    if types:
        return f"tensor type {', '.join(types)} is not repacked for the engine"
    rope = header.metadata.get(f"{arch}.rope.scaling.type")
    if rope not in (None, "none", "linear"):
        return f"RoPE scaling {rope!r} is not implemented"
    return None


def unpacked_here(header: GGUFHeader) -> list[str]:
    """The quantized types of this GGUF's layer weights (blk.*) that Hearth's engine would dequantize on this
    machine: none where CUDA runs it (a kernel for every type); on a CPU all but 4-bit levels in tinygemm's group
    sizes (Q4_0, Q4_1, Q4_K). The embedding and the head are left out: the engine keeps those in floats on a CPU
    whatever their type."""
    if torch.cuda.is_available():
        return []

    def packed_on_cpu(name: str) -> bool:
        kind = BLOCK_TYPES[name]
        return kind.bits == 4 and kind.group in TINYGEMM_GROUP_SIZES
    return sorted({t.type_name for t in header.tensors if t.name.startswith("blk.") and t.type_name in BLOCK_TYPES
                   and not packed_on_cpu(t.type_name)})


def type_counts(header: GGUFHeader) -> dict[str, int]:
    """How many tensors of each ggml type, most common first (e.g. {"Q4_K": 193, "F32": 65, "Q6_K": 33})."""
    return dict(Counter(t.type_name for t in header.tensors).most_common())


class GGUFCheckpoint:
    """One GGUF model (one file, or every part of a split one) as an engine TensorSource (engine.weights)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.parts = split_parts(path)
        self.header = read_model_header(path)
        self.config = hf_config(self.header.metadata, {t.name for t in self.header.tensors})
        self._tensors = {}
        for part in self.parts:
            try:
                reader = GGUFReader(part)
            except (OSError, ValueError) as exc:
                raise LoadError(f"{part.name} is not a readable GGUF file ({exc})") from None
            for tensor in reader.tensors:
                name = hf_name(tensor.name)
                if name is not None:
                    self._tensors[name] = tensor
        self.permuted = self.config["model_type"] in PERMUTED_ARCHITECTURES

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor | QuantWeight:
        tensor = self._tensors[name]
        kind = tensor.tensor_type.name
        raw = torch.from_numpy(np.array(tensor.data))      # a copy: the reader's memory map is read-only
        if kind in BLOCK_TYPES:
            weight = repack(raw.to(device), kind, int(tensor.shape[0]))
        else:
            # ggml's shape lists the contiguous axis first; numpy's data is already [rows, columns].
            shape = tuple(int(n) for n in reversed(tensor.shape))
            weight = raw.view(FLOAT_TYPES[kind]).reshape(shape).to(device)
        return self._unpermute(name, weight)

    def _unpermute(self, name: str, weight):
        """q/k rows (and biases) back in Hugging Face order: llama.cpp stores, per head, the pairs
        (i, i + head_dim/2) next to each other."""
        if not self.permuted or not name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            return weight
        heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
        rows = weight.out_features if isinstance(weight, QuantWeight) else weight.shape[0]
        order = torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)
        if isinstance(weight, QuantWeight):
            return weight.outputs_reordered(order.to(weight.q.device))
        return weight[order.to(weight.device)]

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._tensors.clear()     # drops the readers' memory maps once the tensors are copied out
