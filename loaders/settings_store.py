"""Per-model saved settings in models/config-user.yaml, and which value wins where they meet others.

The file is keyed like text-generation-webui's (`<folder name>$:`), one mapping per model:

    SmolLM2-135M-Instruct$:
      loader: transformers
      loader_options: {dtype: float32}
      context_length: 4096
      instruction_template: ChatML
      preset: Deterministic
      system_message: You are terse.
      sampler: {temperature: 0.2}
      loras: {my-style-lora: 0.8}
      repo: HuggingFaceTB/SmolLM2-135M-Instruct
      branch: main

`repo` and `branch` are written by `save` when the folder was downloaded by Hearth (its hearth-download.json
names them): folder names can be ambiguous (alice_x/model and alice/x_model share one) and a folder can be
deleted and downloaded again from another repo, so an entry saved for one repo is never applied to a folder
that now holds another (it is reported instead). Entries without them (older or hand-written ones, folders
copied in by the user) apply to the folder of that name, as in text-generation-webui.

Writes are atomic and private (core.atomic). A malformed file never stops the app: it is copied to
`config-user.yaml.bad-<timestamp>`, reported through `problems`, and treated as empty.
"""
from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.atomic import write_atomic

FILE_NAME = "config-user.yaml"
# What one model's entry may hold; anything else is reported and ignored, never silently kept.
SAVED_KEYS = ("loader", "loader_options", "context_length", "instruction_template", "preset", "system_message",
              "sampler", "loras", "enable_thinking")
# loras: {adapter folder: weight}, applied again at each load of this model (loaders.lora_apply)
MAPPING_KEYS = ("loader_options", "sampler", "loras")
# Which repo and branch the entry was saved for; kept beside the settings, never handed out as one.
SOURCE_KEYS = ("repo", "branch")
# The record hub/download.py writes into each folder it downloads (hub imports loaders, so not the reverse).
PROVENANCE_FILE = "hearth-download.json"


def entry_key(name: str) -> str:
    """text-generation-webui keys entries by an anchored pattern of the folder name."""
    return f"{name}$"


class SettingsStore:
    """Saved settings by model folder name. `get`, `save`, `delete`; read problems land in `problems`."""

    def __init__(self, models_dir: Path):
        self.path = Path(models_dir) / FILE_NAME
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._backed_up: tuple[float, int] | None = None   # (mtime, size) of the bad file already copied

    # ---- reading ------------------------------------------------------------------------------------
    def report(self, message: str) -> None:
        """Add a problem for the UI / inspect to show (each message once)."""
        if message not in self.problems:
            self.problems.append(message)

    def _backup_bad_file(self, why: str) -> None:
        stat = self.path.stat()
        if self._backed_up == (stat.st_mtime, stat.st_size):
            return
        backup = self.path.with_name(f"{FILE_NAME}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(self.path, backup)
        self._backed_up = (stat.st_mtime, stat.st_size)
        self.report(f"{self.path} is malformed ({why}); kept a copy as {backup.name} and ignored it")

    def _read_all(self) -> dict[str, dict[str, Any]]:
        """Every valid entry, by model name (the `$` stripped)."""
        if not self.path.is_file():
            return {}
        try:
            data = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            self._backup_bad_file(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return {}
        if data is None:
            return {}
        if not isinstance(data, dict):
            self._backup_bad_file("the top level is not a mapping of model names")
            return {}
        entries = {}
        for key, value in data.items():
            name = str(key).removesuffix("$")
            if not isinstance(value, dict):
                self.report(f"{self.path.name}: the entry for {name} is not a mapping; ignored")
                continue
            entries[name] = self._clean(name, value)
        return entries

    def _clean(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        clean = {}
        for key, value in entry.items():
            if key in SOURCE_KEYS:
                if isinstance(value, str):
                    clean[key] = value
                else:
                    self.report(f"{self.path.name}: {key} for {name} must be a string; ignored")
            elif key not in SAVED_KEYS:
                self.report(f"{self.path.name}: unknown key {key!r} for {name}; ignored")
            elif key in MAPPING_KEYS and not isinstance(value, dict):
                self.report(f"{self.path.name}: {key} for {name} must be a mapping; ignored")
            elif key == "enable_thinking" and not isinstance(value, bool):
                self.report(f"{self.path.name}: enable_thinking for {name} must be true or false; ignored")
            elif value is not None:
                clean[key] = value
        return clean

    def source_of(self, name: str) -> dict[str, str]:
        """{"repo", "branch"} that models/<name> was downloaded from; empty when it has no readable record."""
        try:
            record = json.loads((self.path.parent / name / PROVENANCE_FILE).read_text(encoding="utf-8"))
            return {key: str(record[key]) for key in SOURCE_KEYS}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def get(self, name: str) -> dict[str, Any]:
        """The saved settings of model `name` (empty when none were saved, or when they were saved for
        another repo or branch than the folder holds now)."""
        with self._lock:
            entry = dict(self._read_all().get(name, {}))
        saved_for = {key: entry.pop(key) for key in SOURCE_KEYS if key in entry}
        holds = self.source_of(name) if saved_for else {}
        if holds and saved_for != holds:
            self.report(f"{self.path.name}: the settings saved for {name} belong to {_label(saved_for)}, but the "
                        f"folder now holds {_label(holds)}; not applied (save settings again to replace them)")
            return {}
        return entry

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._read_all())

    # ---- writing ------------------------------------------------------------------------------------
    def save(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Replace the saved settings of `name` (None values and empty strings are dropped)."""
        unknown = sorted(set(settings) - set(SAVED_KEYS))
        if unknown:
            raise ValueError(f"cannot save unknown setting(s) {', '.join(unknown)} (known: {', '.join(SAVED_KEYS)})")
        entry = {k: v for k, v in settings.items() if v is not None and v != "" and v != {}}
        source = self.source_of(name)
        with self._lock:
            everything = self._read_all()
            everything[name] = {**entry, **source}
            self._write(everything)
        return entry

    def delete(self, name: str) -> bool:
        with self._lock:
            everything = self._read_all()
            if name not in everything:
                return False
            del everything[name]
            self._write(everything)
            return True

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        data = {entry_key(n): entries[n] for n in sorted(entries)}
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
        write_atomic(self.path, text)


def _label(source: dict[str, str]) -> str:
    repo, branch = source.get("repo", "?"), source.get("branch", "main")
    return repo if branch == "main" else f"{repo}:{branch}"


# ---- precedence -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Effective:
    value: Any
    source: str        # "saved (config-user.yaml)", "model (config.json ...)", "settings.yaml", "loader default"


def pick(*candidates: tuple[Any, str]) -> Effective:
    """The first candidate whose value is not None: callers list them saved > model metadata > defaults."""
    for value, source in candidates:
        if value is not None:
            return Effective(value, source)
    # Nothing set: the last (lowest) layer still says what "nothing" means there.
    return Effective(None, candidates[-1][1] if candidates else "unset")
