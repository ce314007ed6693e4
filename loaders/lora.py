"""LoRA adapters on disk: which folders in models/ hold one, what they adapt, and their tensors.

A PEFT adapter folder holds adapter_config.json and adapter_model.safetensors (older ones a pickled
adapter_model.bin, read only when allow_pickle is set, as for models). adapter_config.json names the base
model (base_model_name_or_path), the target modules, the rank r, lora_alpha (with use_rslora: scaling
alpha / sqrt(r) instead of alpha / r; alpha_pattern / rank_pattern per module) and modules_to_save (whole
modules the adapter replaces, such as lm_head). A GGUF adapter is a .gguf whose general.type is "adapter";
llama.cpp applies those itself. Such folders are adapters, not models: the model list leaves them out.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import LoadError
from core.folder import read_json
from engine.lora import LoraWeights
from loaders.gguf_header import read_header

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# peft names every tensor after the wrapped model: base_model.model.<HF module name>.lora_A.weight
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraInfo:
    """One adapter folder, as the Model tab, `inspect` and the API list it."""
    name: str                       # the folder's name in models/
    folder: Path
    kind: str                       # "peft" or "gguf"
    base_model: str = ""            # base_model_name_or_path ("" when the config names none)
    rank: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False
    pickled: bool = False           # only adapter_model.bin: read only with allow_pickle
    gguf_file: Path | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "base_model": self.base_model, "r": self.rank,
                "lora_alpha": self.alpha, "use_rslora": self.use_rslora, "target_modules": self.target_modules,
                "modules_to_save": self.modules_to_save, "pickled": self.pickled}


def gguf_adapter(folder: Path) -> Path | None:
    """The folder's GGUF LoRA file (general.type "adapter"), if it holds one."""
    for path in sorted(folder.glob("*.gguf")):
        try:
            if read_header(path, {"general.type"}).metadata.get("general.type") == "adapter":
                return path
        except LoadError:
            continue
    return None


def is_lora_folder(folder: Path) -> bool:
    """A PEFT adapter (adapter_config.json with its weights) or a GGUF adapter: not a model."""
    if (folder / CONFIG_FILE).is_file():
        return (folder / SAFETENSORS_FILE).is_file() or (folder / PICKLE_FILE).is_file()
    return gguf_adapter(folder) is not None


def read_info(folder: Path) -> LoraInfo:
    """What the adapter in `folder` is and adapts. LoadError when adapter_config.json cannot be read or is
    not a LoRA's."""
    if not (folder / CONFIG_FILE).is_file():
        path = gguf_adapter(folder)
        if path is None:
            raise LoadError(f"{folder.name} holds no LoRA adapter ({CONFIG_FILE} or a GGUF adapter)")
        meta = read_header(path, {"general.base_model.0.name", "adapter.lora.alpha"}).metadata
        return LoraInfo(folder.name, folder, "gguf", base_model=str(meta.get("general.base_model.0.name", "")),
                        alpha=meta.get("adapter.lora.alpha"), gguf_file=path)
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise LoadError(f"{folder.name}/{CONFIG_FILE} is not a JSON object")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise LoadError(f"{folder.name} is a {kind} adapter; Hearth applies LoRA adapters only")
    targets = config.get("target_modules") or []
    return LoraInfo(
        folder.name, folder, "peft", base_model=str(config.get("base_model_name_or_path") or ""),
        rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
        use_rslora=bool(config.get("use_rslora")),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        modules_to_save=list(config.get("modules_to_save") or []),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        pickled=not (folder / SAFETENSORS_FILE).is_file())


def list_loras(models_dir: Path) -> list[LoraInfo]:
    """Every readable adapter folder in models/, by name (unreadable ones are left out)."""
    if not models_dir.is_dir():
        return []
    found = []
    for folder in sorted(models_dir.iterdir(), key=lambda p: p.name.lower()):
        if folder.is_dir() and not folder.name.startswith(".") and is_lora_folder(folder):
            try:
                found.append(read_info(folder))
            except LoadError:
                continue
    return found


def adapter_shapes(info: LoraInfo) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{module: (A's shape [r, K], B's shape [N, r])} from the file's header, without reading the tensors:
    enough to tell whether the adapter fits a model. PEFT modules by Hugging Face name; GGUF ones by the
    GGUF name of the weight they adapt ("blk.0.attn_q.weight"). {} for a pickled file (its shapes are known
    only by unpickling it)."""
    if info.kind == "gguf":
        from gguf import GGUFReader

        found: dict[str, dict[str, tuple[int, ...]]] = {}
        for tensor in GGUFReader(str(info.gguf_file)).tensors:
            base, _, part = tensor.name.rpartition(".lora_")
            if part in ("a", "b"):   # GGUF lists dimensions fastest first: reversed, they read as torch's
                found.setdefault(base, {})[part] = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return {name: (ab["a"], ab["b"]) for name, ab in found.items() if set(ab) == {"a", "b"}}
    if info.pickled:
        return {}
    from safetensors import safe_open

    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(info.folder / SAFETENSORS_FILE), framework="pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", key.removeprefix(PEFT_PREFIX))
            if m:
                pairs.setdefault(m[1], {})[m[2]] = tuple(f.get_slice(key).get_shape())
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items() if set(ab) == {"A", "B"}}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override: a pattern key matches a module name ending in it (as peft matches)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_weights(info: LoraInfo, allow_pickle: bool = False) -> LoraWeights:
    """The adapter's tensors by HF module name, with each module's scaling. LoadError for pickled weights
    without allow_pickle, and for adapter kinds Hearth does not apply (DoRA, LoRA biases, embeddings)."""
    if info.kind != "peft":
        raise LoadError(f"{info.name} is a GGUF adapter: only the llama.cpp loader applies those")
    config = read_json(info.folder / CONFIG_FILE) or {}
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(key):
            raise LoadError(f"{info.name} uses {what} ({key}), which Hearth does not apply")
    if info.pickled:
        if not allow_pickle:
            raise LoadError(f"{info.name} only has a pickled {PICKLE_FILE}, which can run code when loaded; "
                            "enable allow_pickle if you trust its source")
        tensors = torch.load(info.folder / PICKLE_FILE, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file
        tensors = load_file(str(info.folder / SAFETENSORS_FILE))
    alpha_pattern = config.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", name)
        if m:
            pairs.setdefault(m[1], {})[m[2]] = tensor
        elif ".lora_embedding_" in name or ".lora_magnitude" in name:
            raise LoadError(f"{info.name} adapts embeddings or magnitudes ({name}), which Hearth does not apply")
        elif name.endswith(".weight"):   # modules_to_save: the module's own full weight
            saved[name.removesuffix(".weight")] = tensor.float()
        else:
            raise LoadError(f"{info.name}: tensor {key} is not one a LoRA adapter holds")
    layers = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoadError(f"{info.name}: {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"].float(), ab["B"].float()
        rank = a.shape[0]
        alpha = float(_pattern_value(alpha_pattern, module, info.alpha))
        scaling = alpha / math.sqrt(rank) if info.use_rslora else alpha / rank
        layers[module] = (a, b, scaling)
    return LoraWeights(info.name, layers, saved)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """"ADAPTER[:WEIGHT]" (the CLI's --lora) -> (name, weight); weight 1 by default."""
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"--lora {text}: the weight after ':' must be a number") from None
    if not math.isfinite(value):
        raise ValueError(f"--lora {text}: the weight must be a finite number")
    return name, value
