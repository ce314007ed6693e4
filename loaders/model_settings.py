"""The effective settings of one model and where each value comes from.

Precedence, per value: saved for this model (config-user.yaml; for sampler values, those saved one by one,
then the preset saved for it) > the model's own metadata (config.json, generation_config.json, its chat
template) > settings.yaml / the loader's declared defaults.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.sampling import GenerationParams
from loaders.base import Detection, LoaderRegistry
from loaders.metadata import ModelMetadata, read_metadata
from core.options import specs
from loaders.settings_store import FILE_NAME, Effective, pick

SAVED = f"saved ({FILE_NAME})"
SETTINGS = "settings.yaml"
LOADER_DEFAULT = "loader default"


def effective_settings(model_dir: Path, saved: dict[str, Any], detections: list[Detection],
                       registry: LoaderRegistry, generation_defaults: GenerationParams,
                       template: tuple[str | None, str], metadata: ModelMetadata | None = None,
                       preset: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """{setting: Effective} with nested dicts for loader_options and sampler. `template`: (name, source) of
    the template the model gets without a saved one; `preset`: (name, sampler values) of the preset saved
    for it. Both come from the prompts package, which the loaders do not import."""
    metadata = metadata or read_metadata(model_dir)
    best = detections[0] if detections else None
    loader = pick((saved.get("loader"), SAVED),
                  (best.loader if best else None, f"detected: {best.reason}" if best else ""))
    gguf = (best.details.get("gguf") or {}) if best else {}
    context = pick((saved.get("context_length"), SAVED),
                   (metadata.context_length, f"model ({metadata.context_source})"),
                   (gguf.get("context_length"), gguf.get("context_source") or "model (GGUF metadata)"),
                   (2048, "fallback (the model states no context length)"))
    result: dict[str, Any] = {"loader": loader, "context_length": context, "loader_options": {}}
    saved_options = saved.get("loader_options") or {}
    if saved.get("loader") not in (None, loader.value):
        saved_options = {}   # options saved for another loader do not carry over
    if loader.value in registry.names():
        for spec in specs(registry.get(loader.value).options_type):
            if spec.name == "context_length":
                result["loader_options"][spec.name] = context
                continue
            result["loader_options"][spec.name] = pick((saved_options.get(spec.name), SAVED),
                                                       (spec.default, LOADER_DEFAULT))
    template_name, template_source = template
    result["instruction_template"] = pick((saved.get("instruction_template"), SAVED), (template_name, template_source))
    result["preset"] = pick((saved.get("preset"), SAVED), (None, f"none ({SETTINGS} generation values)"))
    result["system_message"] = pick((saved.get("system_message"), SAVED),
                                    (None, "none (the template's default)"))
    # Qwen3's thinking switch, for templates that take enable_thinking; unset leaves the template's own default.
    result["enable_thinking"] = pick((saved.get("enable_thinking"), SAVED),
                                     (None, "none (the template's default: on for Qwen3)"))
    saved_sampler = saved.get("sampler") or {}
    defaults = asdict(generation_defaults)
    preset_name, preset_values = preset if preset is not None else ("", {})
    result["sampler"] = {name: pick((saved_sampler.get(name), SAVED),
                                    (preset_values.get(name), f"preset {preset_name} ({SAVED})"),
                                    (metadata.generation.get(name), "model (generation_config.json)"),
                                    (value, SETTINGS))
                         for name, value in defaults.items()}
    return result


def as_json(effective: dict[str, Any]) -> dict[str, Any]:
    """The same structure with each Effective as {"value": ..., "source": ...}."""
    out: dict[str, Any] = {}
    for key, value in effective.items():
        if isinstance(value, Effective):
            out[key] = {"value": value.value, "source": value.source}
        elif isinstance(value, dict):
            out[key] = as_json(value)
        else:
            out[key] = value
    return out


def loader_options_to_apply(effective: dict[str, Any]) -> dict[str, Any]:
    """Loader options worth passing to load(): the saved ones, and the context length when it comes from
    the model's metadata (so rope scaling, e.g. LLongMA-2's linear factor 4, reaches the loader)."""
    options = {}
    for name, eff in effective["loader_options"].items():
        if eff.source == SAVED or (name == "context_length" and eff.source.startswith("model")):
            options[name] = eff.value
    return options


def sampler_values(effective: dict[str, Any]) -> dict[str, Any]:
    return {name: eff.value for name, eff in effective["sampler"].items()}


def with_chosen_options(effective: dict[str, Any] | None, options: Any) -> dict[str, Any] | None:
    """`effective` with the loader options actually used; values that differ are marked as chosen now."""
    if effective is None:
        return None
    used = asdict(options)
    chosen = {name: eff if used.get(name) == eff.value else Effective(used.get(name), "chosen for this load")
              for name, eff in effective["loader_options"].items() if name in used}
    return {**effective, "loader_options": chosen}


def settings_to_save(loader: str | None, loader_options: dict[str, Any], instruction_template: str | None,
                     preset: str | None, system_message: str | None, previous: dict[str, Any],
                     current_context: Effective | None = None) -> dict[str, Any]:
    """The entry "Save settings for this model" writes, from the Model tab's values.

    Blank fields mean "not saved" (the model's metadata or settings.yaml applies). The context length is the
    loader's own context_length option (the one widget for it) and is stored at the top level only; it is
    saved unless it is 0 or simply the model's own value the widget was showing (`current_context`, not
    saved before), so that saving a template does not pin the context. Sampler overrides saved earlier
    (from the API or by hand) and the saved LoRA adapters are kept.
    """
    options = dict(loader_options)
    context = options.pop("context_length", None)
    context = int(context) if context not in (None, "") else None
    if current_context is not None and current_context.source != SAVED and context == current_context.value:
        context = None
    return {
        "loader": loader or None,
        "loader_options": options,
        "context_length": context if context and context > 0 else None,
        "instruction_template": (instruction_template or "").strip() or None,
        "preset": (preset or "").strip() or None,
        "system_message": system_message or None,
        "sampler": previous.get("sampler") or None,
        "enable_thinking": previous.get("enable_thinking"),   # set by the Text Generation tab's switch
        "loras": previous.get("loras") or None,   # saved with the adapters (Model tab's LoRA section, API)
    }


def describe_sources(effective: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(setting, value, source) rows for display, loader options and sampler values flattened."""
    rows = []
    for key, value in effective.items():
        if isinstance(value, Effective):
            rows.append((key, value.value, value.source))
        elif isinstance(value, dict):
            rows.extend((f"{key}.{name}", eff.value, eff.source) for name, eff in value.items())
    return rows
