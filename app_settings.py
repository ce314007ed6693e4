"""App-wide settings: settings.yaml defaults, overridden by command-line flags.

Read once in app.py and handed to AppState; nothing reads it behind the user's back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.sampling import GenerationParams
from core.options import OptionError, build
from web.guard import normalize_host, normalize_origin

APP_ROOT = Path(__file__).resolve().parent
DEFAULT_SETTINGS_FILE = APP_ROOT / "settings.yaml"


class SettingsError(ValueError):
    """settings.yaml (or a --settings file) is unreadable; the message names the file and the problem."""


@dataclass
class AppSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: Path = APP_ROOT / "models"
    data_dir: Path = APP_ROOT / "user_data"   # the user's own files Hearth writes: conversations (and their trash)
    model: str | None = None
    allowed_hosts: tuple[str, ...] = ()   # Host names the servers answer besides loopback and `host`
    cors_origins: tuple[str, ...] = ()    # browser origins allowed to use them (web/guard.py)
    generation: GenerationParams = field(default_factory=GenerationParams)
    source: Path | None = None   # the file these came from, for messages


def _entries(where: str, value: Any, normalize) -> tuple[str, ...]:
    """A list setting (or flag): a YAML list or one comma-separated string, each entry checked."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise SettingsError(f"{where} must be a list of strings")
    try:
        return tuple(normalize(item) for item in items if item.strip())
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def _folder(raw: dict[str, Any], key: str, default: str, path: Path, flags: dict[str, Any]) -> Path:
    """A folder setting, absolute: a relative flag is relative to the working directory (as a shell user
    means it), a relative value in the file to the file's own folder."""
    folder = Path(raw.get(key) or default).expanduser()
    if not folder.is_absolute():
        folder = (Path.cwd() if key in flags else path.parent) / folder
    return folder.resolve()


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> AppSettings:
    """settings.yaml (or `path`) with `overrides` (flags; None values mean "not given") on top."""
    path = path or DEFAULT_SETTINGS_FILE
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"{path} must hold a mapping of settings")
    elif path != DEFAULT_SETTINGS_FILE:
        raise SettingsError(f"settings file {path} does not exist")
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw.update(flags)
    known = {f.name for f in dataclasses.fields(AppSettings)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    try:
        generation = build(GenerationParams, raw.get("generation") or {})
    except OptionError as exc:
        raise SettingsError(f"{path}: generation: {exc}") from None
    models_dir = _folder(raw, "models_dir", "models", path, flags)
    data_dir = _folder(raw, "data_dir", "user_data", path, flags)

    def where(key: str) -> str:   # for messages: the flag or the file the value came from
        return "--" + key.replace("_", "-") if key in flags else f"{path}: {key}"

    try:
        port = int(raw.get("port", 7860))
    except (TypeError, ValueError):
        raise SettingsError(f"{path}: port must be a number") from None
    return AppSettings(host=str(raw.get("host", "127.0.0.1")), port=port, models_dir=models_dir, data_dir=data_dir,
                       model=raw.get("model"), generation=generation, source=path,
                       allowed_hosts=_entries(where("allowed_hosts"), raw.get("allowed_hosts"), normalize_host),
                       cors_origins=_entries(where("cors_origins"), raw.get("cors_origins"), normalize_origin))
