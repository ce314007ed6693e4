"""Facts about a model folder that several loaders need: its JSON configs and which weight files it has.

Every reader here turns a broken file into a LoadError naming the file, never a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loaders.base import LoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when the file is absent; LoadError when it is not valid JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path.name} in {path.parent.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path.name} in {path.parent.name} must hold a JSON object")
    return data


def safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())


def pickle_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                  and not p.name.startswith("training_args"))


def gguf_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.glob("*.gguf") if p.is_file())


def require_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise LoadError(f"no model folder at {model_dir}")
