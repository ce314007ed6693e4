"""Defaults a model folder implies by itself: context length (with rope scaling), generation defaults, dtype.

These are the "model metadata" layer of the settings precedence (saved > model metadata > settings.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.folder import read_json

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
# generation_config.json keys that map onto Hearth's sampler options (engine.sampling.GenerationParams).
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens",
                   "typical_p": "typical_p"}


@dataclass
class ModelMetadata:
    context_length: int | None = None
    context_source: str = ""                # e.g. "config.json max_position_embeddings 2048 x rope linear 4"
    rope_scaling: dict[str, Any] | None = None
    dtype: str | None = None                # torch_dtype / dtype in config.json
    generation: dict[str, Any] = field(default_factory=dict)   # sampler defaults from generation_config.json
    do_sample: bool | None = None


def rope_factor(config: dict[str, Any]) -> tuple[float, dict | None]:
    """The context multiplier from rope scaling that stretches positions (linear / dynamic / yarn ...).

    LLongMA-2 ships max_position_embeddings 2048 with {"type": "linear", "factor": 4}: it was trained to
    8192 tokens. Newer configs already state the extended max_position_embeddings with
    original_max_position_embeddings beside it; then the factor is already applied.
    """
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") if isinstance(
        config.get("rope_parameters"), dict) and "factor" in config.get("rope_parameters", {}) else None)
    if not isinstance(scaling, dict):
        return 1.0, None
    kind = str(scaling.get("type") or scaling.get("rope_type") or "").lower()
    factor = scaling.get("factor")
    if kind in ("", "default") or not isinstance(factor, (int, float)) or factor <= 1:
        return 1.0, scaling
    if "original_max_position_embeddings" in scaling or "original_max_position_embeddings" in config:
        return 1.0, scaling
    return float(factor), scaling


def context_from_config(config: dict[str, Any]) -> tuple[int | None, str]:
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, float) and value.is_integer():  # JSON's 1e12 is a float; still a claimed size
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            factor, scaling = rope_factor(config)
            if factor > 1:
                kind = scaling.get("type") or scaling.get("rope_type")
                return int(value * factor), f"config.json {key} {value} x rope_scaling {kind} factor {factor:g}"
            return value, f"config.json {key}"
    return None, ""


def context_length_of(config: dict[str, Any], override: int = 0) -> int:
    """The context a loader uses: the user's override, else the config's (rope scaling included), else 2048."""
    return context_choice(config, override)[0]


def context_choice(config: dict[str, Any], override: int = 0) -> tuple[int, str]:
    """(context_length_of, where it came from), so a message about the context names what set it."""
    length, source = context_from_config(config)
    if override and override != length:   # the model's own value passed on as the option is still the model's
        return override, "the context_length option"
    return (length, source) if length else (2048, "Hearth's default, config.json states none")


def read_metadata(model_dir: Path) -> ModelMetadata:
    """What config.json and generation_config.json say; missing files give empty metadata."""
    config = read_json(model_dir / "config.json") or {}
    context, source = context_from_config(config)
    _, scaling = rope_factor(config)
    meta = ModelMetadata(context_length=context, context_source=source, rope_scaling=scaling,
                         dtype=config.get("torch_dtype") or config.get("dtype"))
    gen = read_json(model_dir / "generation_config.json") or {}
    meta.do_sample = gen.get("do_sample") if isinstance(gen.get("do_sample"), bool) else None
    for key, target in GENERATION_KEYS.items():
        value = gen.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            meta.generation[target] = value
    if meta.do_sample is False:
        # Greedy by the model's own default: transformers ignores temperature then, so does Hearth.
        meta.generation["temperature"] = 0.0
    return meta
