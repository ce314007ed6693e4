"""Facts about a model folder that several loaders need: its JSON configs and which weight files it has.

Every reader here turns a broken file into a LoadError naming the file, never a traceback.

One load asks for the same files many times (detection by every loader, the effective settings, the config
check, the loader itself, the template), so AppState runs a load inside `reading_once()`: there each file is
read from disk once and later reads get the same text. Outside it (selecting a model in the UI, a test)
every read goes to disk, so an edited file is always seen. The texts live in a context variable, so loads
in other threads (another browser tab, the API) keep their own.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

from core.errors import LoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# path -> its bytes, or None when absent; set only for the duration of one `reading_once()` block.
_contents: ContextVar[dict[str, bytes | None] | None] = ContextVar("hearth_read_once", default=None)


@contextmanager
def reading_once() -> Iterator[None]:
    """Inside this block, `read_text` reads each file at most once (nested blocks share the outer one's)."""
    if _contents.get() is not None:
        yield
        return
    token = _contents.set({})
    try:
        yield
    finally:
        _contents.reset(token)


def read_text(path: Path, errors: str = "strict") -> str | None:
    """The UTF-8 text of `path`, None when it is not a file. errors: as for bytes.decode ("replace" for
    files read by people, such as a model card)."""
    cache = _contents.get()
    key = str(path)
    if cache is not None and key in cache:
        data = cache[key]
    else:
        data = path.read_bytes() if path.is_file() else None
        if cache is not None:
            cache[key] = data
    return None if data is None else data.decode("utf-8", errors=errors)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when the file is absent; LoadError when it is not valid JSON."""
    try:
        text = read_text(path)
        if text is None:
            return None
        data = json.loads(text)
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
