"""The sizes a model's config.json claims, checked before any layer or cache is built.

A config is a claim: num_hidden_layers, hidden_size and vocab_size decide how many modules are built and
how big, the context length how big the KV cache is. A wrong or hostile number (num_hidden_layers 1e9,
max_position_embeddings 1e12) would otherwise build modules for minutes or ask for terabytes, and end in an
out-of-memory message that blames something the user never set. The safetensors headers say what the
weights really hold (reading them reads no tensor data), so the claims are checked against them, and the
KV cache is sized from the chosen context against the device's memory. Every refusal names the file and
field (or the option) it comes from.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loaders.base import LoadError
from core.folder import read_json
from core.safetensors_index import TensorInfo, tensor_index

# config.json spells each size differently per architecture; the first key present is the one read.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
# The embedding's width where it differs from the hidden size (OPT projects up from it, ALBERT too).
EMBEDDING_WIDTH_KEYS = ("word_embed_proj_dim", "embedding_size")
HEAD_KEYS = ("num_attention_heads", "n_head")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")
SIZE_KEYS = (*LAYER_KEYS, *HIDDEN_KEYS, *EMBEDDING_WIDTH_KEYS, *HEAD_KEYS, *KV_HEAD_KEYS, "vocab_size", "head_dim",
             "intermediate_size")
# model.layers.12.mlp... / transformer.h.3.attn... / blocks.0... -> the layer index
LAYER_TENSOR = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# What a load may take of the device's memory: the rest is for activations, the runtime and everything else.
USABLE_SHARE = 0.9


@dataclass(frozen=True)
class MemoryEstimate:
    """What a load will hold: weights (at the compute dtype) plus the KV cache for `context_length` tokens."""
    device: str                # "cpu" or "cuda"
    context_length: int
    context_source: str        # e.g. "config.json max_position_embeddings" or "the context_length option"
    weights_bytes: int
    kv_cache_bytes: int
    device_bytes: int          # the device's total memory

    def describe(self) -> str:
        return (f"KV cache {self.context_length} tokens ≈ {human_bytes(self.kv_cache_bytes)}, weights ≈ "
                f"{human_bytes(self.weights_bytes)}")

    def as_json(self) -> dict[str, Any]:
        return {"device": self.device, "context_length": self.context_length,
                "context_source": self.context_source, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "device_memory_bytes": self.device_bytes,
                "summary": f"{self.describe()}, of {human_bytes(self.device_bytes)} on {self.device}"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def device_memory(device: str) -> int:
    """Total memory a model can go to: all GPUs together (gpu_split spreads layers over them), or RAM."""
    if device == "cuda":
        return sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def config_sizes(config: dict[str, Any], where: str = "config.json") -> dict[str, tuple[str, int]]:
    """{key: (key, value)} for every size field present; LoadError for one that is not a positive whole number."""
    found = {}
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        # JSON writes 1e9 as a float; a whole float is a size like any other (and is checked as one).
        whole = isinstance(value, int) or (isinstance(value, float) and value == value and value.is_integer())
        if isinstance(value, bool) or not whole or value < 1:
            raise LoadError(f"{where} {key} must be a positive whole number (got {value!r})")
        found[key] = (key, int(value))
    return found


def _first(sizes: dict[str, tuple[str, int]], keys: tuple[str, ...]) -> tuple[str, int] | None:
    return next((sizes[k] for k in keys if k in sizes), None)


def _files(tensors: list[TensorInfo]) -> str:
    names = sorted({t.file.name for t in tensors})
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")


def check_against_weights(config: dict[str, Any], index: dict[str, TensorInfo]) -> dict[str, tuple[str, int]]:
    """The config's sizes, after checking layer count, hidden size and vocab against the tensors the weight
    headers list. Only what the names show is checked: an architecture named differently skips a check."""
    sizes = config_sizes(config)
    layers = _first(sizes, LAYER_KEYS)
    indices = [int(m.group(1)) for name in index if (m := LAYER_TENSOR.search(name))]
    if layers and indices and layers[1] > max(indices) + 1:
        raise LoadError(f"config.json {layers[0]} is {layers[1]} but the weights ({_files(list(index.values()))}) "
                        f"hold {max(indices) + 1} layers: the config does not match the weights")
    embedding = next((t for name, t in index.items() if name.endswith(EMBEDDING_SUFFIXES)
                      and len(t.shape) == 2 and t.dtype in FLOAT_DTYPES), None)
    if embedding is not None:
        rows, width = embedding.shape
        hidden = _first(sizes, (*EMBEDDING_WIDTH_KEYS, *HIDDEN_KEYS))
        if hidden and hidden[1] != width:
            raise LoadError(f"config.json {hidden[0]} is {hidden[1]} but {embedding.name} in {embedding.file.name} "
                            f"is {rows} x {width}: the config does not match the weights")
        if "vocab_size" in sizes and sizes["vocab_size"][1] != rows:
            raise LoadError(f"config.json vocab_size is {sizes['vocab_size'][1]} but {embedding.name} in "
                            f"{embedding.file.name} has {rows} rows: the config does not match the weights")
    return sizes


def kv_bytes_per_token(sizes: dict[str, tuple[str, int]], dtype_bytes: int) -> int:
    """Keys and values of one token over all layers. Without head counts the hidden size stands in for the
    KV width (what multi-head attention stores; grouped-query attention stores less)."""
    layers = _first(sizes, LAYER_KEYS)
    hidden = _first(sizes, HIDDEN_KEYS)
    if not layers or not hidden:
        return 0
    heads = _first(sizes, HEAD_KEYS)
    kv_heads = _first(sizes, KV_HEAD_KEYS) or heads
    if heads and kv_heads:
        head_dim = sizes["head_dim"][1] if "head_dim" in sizes else hidden[1] // heads[1]
        width = kv_heads[1] * head_dim
    else:
        width = hidden[1]
    return 2 * layers[1] * width * dtype_bytes


def weights_bytes(index: dict[str, TensorInfo], dtype_bytes: int) -> int:
    """Weights in memory: float tensors at the compute dtype, packed (integer) tensors as stored."""
    total = 0
    for t in index.values():
        numel = 1
        for d in t.shape:
            numel *= d
        total += numel * (dtype_bytes if t.dtype in FLOAT_DTYPES else DTYPE_BYTES.get(t.dtype, 4))
    return total


def check_model(model_dir: Path, *, context_length: int, context_source: str, device: str,
                dtype: torch.dtype) -> MemoryEstimate:
    """Check model_dir's config.json against its weights and the device's memory before a load builds
    anything; LoadError naming the file and field (or option) otherwise. `context_length` is the context the
    loader will use and `context_source` where it came from. Returns the memory estimate to show."""
    config = read_json(model_dir / "config.json") or {}
    index = tensor_index(model_dir)
    try:
        sizes = check_against_weights(config, index)
    except LoadError as exc:
        raise LoadError(f"{model_dir.name}: {exc}") from None
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return check_fits(model_dir.name, sizes, weights_bytes(index, dtype_bytes), context_length=context_length,
                      context_source=context_source, device=device, dtype=dtype)


def check_fits(name: str, sizes: dict[str, tuple[str, int]], weights: int, *, context_length: int,
               context_source: str, device: str, dtype: torch.dtype) -> MemoryEstimate:
    """The memory estimate of `weights` bytes plus a KV cache of `context_length` tokens for a model of these
    sizes (from config_sizes); LoadError when they do not fit the device, naming what set the context."""
    per_token = kv_bytes_per_token(sizes, torch.empty((), dtype=dtype).element_size())
    estimate = MemoryEstimate(device, context_length, context_source, weights, per_token * context_length,
                              device_memory(device))
    usable = int(estimate.device_bytes * USABLE_SHARE)
    if estimate.weights_bytes > usable:  # the context is not to blame: say so by not naming it
        raise LoadError(f"{name} does not fit this {device}: its weights need "
                        f"{human_bytes(estimate.weights_bytes)} and the {device} has "
                        f"{human_bytes(estimate.device_bytes)}")
    if estimate.weights_bytes + estimate.kv_cache_bytes > usable:
        fits = (usable - estimate.weights_bytes) // per_token
        raise LoadError(f"{name} does not fit this {device}: a KV cache for {context_length} tokens "
                        f"({context_source}) needs {human_bytes(estimate.kv_cache_bytes)} on top of "
                        f"{human_bytes(estimate.weights_bytes)} of weights, and the {device} has "
                        f"{human_bytes(estimate.device_bytes)}; set the context_length option to at most "
                        f"{fits} tokens")
    return estimate


def memory_report(model_dir: Path, context_length: int, context_source: str) -> dict[str, Any]:
    """check_model for the device a load would pick and the dtype the engine computes in there, as JSON (for
    `inspect`, which loads nothing); a refusal becomes "problem", the line a load would end with."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if context_source.startswith("model ("):   # an effective-settings source: "model (config.json ...)"
        context_source = context_source.removeprefix("model (").removesuffix(")")
    try:
        return check_model(model_dir, context_length=context_length, context_source=context_source,
                           device=device, dtype=dtype).as_json()
    except LoadError as exc:
        return {"device": device, "context_length": context_length, "context_source": context_source,
                "problem": str(exc)}
