"""The loader contract and the registry loaders (built-in or plugin) join through `register`.

A Loader answers two questions about a model folder: "can you read it, how sure are you and why?"
(`detect`) and "give me a runnable Model" (`load`). Detection reads file contents (configs, tensor names),
never folder names. The Model a loader returns keeps the contract in engine.model (a Prompt in, typed
events out, capabilities declared by its class).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from core.errors import LoadError  # the loader contract's error; it lives in core so every layer can raise it
from engine.model import Model

# progress(fraction 0..1, message)
Progress = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    pass


@dataclass(frozen=True)
class Detection:
    loader: str
    score: float          # 0..1; the highest-scoring loader is preselected
    reason: str           # e.g. "GPTQ 4-bit, group 32, act-order, sym (quantize_config.json)"
    details: dict[str, Any] = field(default_factory=dict)


class Loader(Protocol):
    name: str
    description: str
    options_type: type     # a dataclass declared with core.options.option
    # False for loaders that reach their model elsewhere (an OpenAI-compatible endpoint): no folder to pick.
    # Read with getattr(..., True), so loaders that read folders may leave it out.
    uses_model_folder: bool

    def detect(self, model_dir: Path) -> Detection | None: ...

    def load(self, model_dir: Path, options: Any, progress: Progress = no_progress) -> Model: ...


class LoaderRegistry:
    """Loaders by name. Built-ins and plugins join through the same `register` call."""

    def __init__(self) -> None:
        self._loaders: dict[str, Loader] = {}

    def register(self, loader: Loader) -> None:
        if loader.name in self._loaders:
            raise ValueError(f"a loader named {loader.name!r} is already registered")
        self._loaders[loader.name] = loader

    def names(self) -> list[str]:
        return list(self._loaders)

    def get(self, name: str) -> Loader:
        try:
            return self._loaders[name]
        except KeyError:
            raise LoadError(f"unknown loader {name!r}; known loaders: {', '.join(self._loaders)}") from None

    def detect_all(self, model_dir: Path) -> list[Detection]:
        """Every loader's opinion of the folder, best first. Empty when nothing can read it."""
        found = []
        for loader in self._loaders.values():
            try:
                d = loader.detect(model_dir)
            except LoadError:  # a broken file: that loader cannot read the folder; `problems` says why
                continue
            if d is not None and d.score > 0:
                found.append(d)
        return sorted(found, key=lambda d: d.score, reverse=True)

    def problems(self, model_dir: Path) -> list[str]:
        """Why loaders could not read the folder (malformed files), one sentence each, without repeats."""
        found = []
        for loader in self._loaders.values():
            try:
                loader.detect(model_dir)
            except LoadError as exc:
                found.append(str(exc))
        return list(dict.fromkeys(found))

    def best(self, model_dir: Path) -> Detection | None:
        found = self.detect_all(model_dir)
        return found[0] if found else None
