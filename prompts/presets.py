"""Sampler presets: presets/*.yaml with text-generation-webui's keys (temperature, top_p, min_p, ...).

Keys Hearth does not implement (tfs, mirostat_mode, ...) are reported and ignored, so users can drop in the
files they already have. A malformed file is reported and skipped; it never stops the others from loading.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from core.atomic import write_atomic
from core.options import OptionError, coerce, specs
from engine.sampling import GenerationParams

APP_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = APP_ROOT / "presets"
PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,63}$")
# The generation keys a preset may set (max_new_tokens and stop belong to the request, not to a preset).
SAMPLER_KEYS = tuple(f.name for f in fields(GenerationParams) if f.name not in ("max_new_tokens", "stop"))
_SPECS = {s.name: s for s in specs(GenerationParams)}
# The presets Hearth ships in presets/: read-only, so an update of Hearth never meets a user's edit of them.
SHIPPED_PRESETS = ("Creative", "Default", "Deterministic", "min_p")


@dataclass
class PresetCatalog:
    presets: dict[str, dict[str, Any]]    # name -> {key: value} of known sampler keys
    problems: list[str]                   # one line per skipped file or ignored key

    def names(self) -> list[str]:
        return sorted(self.presets, key=str.lower)


def parse_preset(text: str) -> tuple[dict[str, Any], list[str]]:
    """(sampler values, ignored keys); ValueError when the text is not a mapping of valid values."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError("must be a mapping of sampler keys to values")
    values: dict[str, Any] = {}
    ignored = []
    for key, raw in data.items():
        if key not in SAMPLER_KEYS:
            ignored.append(str(key))
            continue
        try:
            values[key] = coerce(_SPECS[key], raw)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
    return values, ignored


def load_presets(folder: Path = PRESETS_DIR) -> PresetCatalog:
    presets: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            values, ignored = parse_preset(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{path.name}: skipped, {exc}")
            continue
        if ignored:
            problems.append(f"{path.name}: ignored keys Hearth does not implement: {', '.join(ignored)}")
        presets[path.stem] = values
    return PresetCatalog(presets, problems)


def save_preset(folder: Path, name: str, values: dict[str, Any]) -> Path:
    """Write presets/<name>.yaml atomically with the sampler keys of `values`; returns its path.

    Saving never replaces a preset: a name already taken (compared case-insensitively, so no case-twins)
    or one of the shipped presets is refused with a message saying so."""
    name = name.strip()
    if not PRESET_NAME.match(name):
        raise ValueError("a preset name uses letters, digits, spaces and . _ + - (at most 64 characters)")
    taken = name.casefold()
    shipped = next((p for p in SHIPPED_PRESETS if p.casefold() == taken), None)
    if shipped:
        raise ValueError(f"{shipped!r} is a preset shipped with Hearth and is read-only; choose another name")
    existing = next((p.stem for p in folder.glob("*.yaml") if p.stem.casefold() == taken), None)
    if existing:
        raise ValueError(f"a preset named {existing!r} already exists; choose another name")
    clean = {k: coerce(_SPECS[k], values[k]) for k in SAMPLER_KEYS if k in values}
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.yaml"
    try:
        write_atomic(target, yaml.safe_dump(clean, sort_keys=False), replace=False)
    except FileExistsError:
        raise ValueError(f"a preset named {name!r} already exists; choose another name") from None
    return target
