"""AppState: what the running app holds (settings, loaders, the loaded model) and the actions on it.

Created once in app.py and passed to ui/ and api/. Every action a user can take lives here, testable without
a browser; ui/ and api/ only translate widgets and HTTP into these calls.
"""
from __future__ import annotations

import gc
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from app_settings import AppSettings
from engine.generation import DoneEvent, GenerationEvent
from engine.sampling import GenerationParams
from loaders.base import Detection, LoaderRegistry, LoadError, Model, Progress, no_progress
from loaders.options import OptionError, build
from loaders.transformers_loader import TransformersLoader
from prompts.chat import Message, Prompt, render_chat, render_chat_continue, render_raw

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _is_model_folder(path: Path) -> bool:
    return (path.is_dir() and not path.name.startswith(".") and bool(MODEL_NAME.match(path.name))
            and (any(path.glob("*.json")) or any(path.glob("*.gguf"))))


def default_registry() -> LoaderRegistry:
    """The built-in loaders, registered the way a plugin would register its own."""
    registry = LoaderRegistry()
    registry.register(TransformersLoader())
    return registry


@dataclass
class AppState:
    settings: AppSettings
    registry: LoaderRegistry = field(default_factory=default_registry)
    model: Model | None = None
    # One load/unload at a time; one generation at a time on the one loaded model.
    model_lock: threading.RLock = field(default_factory=threading.RLock)
    generation_lock: threading.Lock = field(default_factory=threading.Lock)
    # Cancel flags of generations in flight, by the caller's key (a UI session or an API request).
    _cancels: dict[str, threading.Event] = field(default_factory=dict)

    @property
    def models_dir(self) -> Path:
        return self.settings.models_dir

    # ---- models on disk -------------------------------------------------------------------------------
    def list_models(self) -> list[str]:
        """Folders in models/ that hold a model (hidden and partial folders are skipped)."""
        if not self.models_dir.is_dir():
            return []
        return sorted((p.name for p in self.models_dir.iterdir() if _is_model_folder(p)), key=str.lower)

    def model_dir(self, name: str) -> Path:
        """The folder of model `name`; LoadError for names that are not a plain folder name in models/."""
        if not name or not MODEL_NAME.match(name):
            raise LoadError(f"{name!r} is not a valid model name (a folder name inside {self.models_dir})")
        folder = self.models_dir / name
        if not folder.is_dir():
            known = ", ".join(self.list_models()) or "none"
            raise LoadError(f"no model named {name!r} in {self.models_dir} (available: {known})")
        return folder

    def detect(self, name: str) -> list[Detection]:
        return self.registry.detect_all(self.model_dir(name))

    # ---- load / unload --------------------------------------------------------------------------------
    def load_model(self, name: str, loader: str | None = None, options: dict[str, Any] | None = None,
                   progress: Progress = no_progress) -> Model:
        """Load `name` with `loader` (detected when None), unloading the current model first.
        A loader that cannot read the folder is refused with a message naming the one that can."""
        folder = self.model_dir(name)
        detections = self.registry.detect_all(folder)
        if loader is None:
            if not detections:
                raise LoadError(f"no loader can read {name}: it has no config.json with weights, "
                                "quantize_config.json, quant_config.json or *.gguf that Hearth understands")
            loader = detections[0].loader
        chosen = self.registry.get(loader)
        if not any(d.loader == loader for d in detections):
            hint = (f"; it looks like {detections[0].reason}: use the {detections[0].loader} loader"
                    if detections else "")
            raise LoadError(f"the {loader} loader cannot read {name}{hint}")
        try:
            opts = build(chosen.options_type, options or {})
        except OptionError as exc:
            raise LoadError(f"{loader} options: {exc}") from None
        with self.model_lock:
            self.unload_model()
            progress(0.0, f"loading {name} with {loader}")
            self.model = chosen.load(folder, opts, progress)
            return self.model

    def unload_model(self) -> None:
        with self.model_lock:
            if self.model is not None:
                self.model.unload()
                self.model = None
                gc.collect()

    def require_model(self) -> Model:
        model = self.model
        if model is None:
            raise LoadError("no model is loaded: pick one on the Model tab and press Load")
        return model

    # ---- prompts and generation -----------------------------------------------------------------------
    def chat_prompt(self, messages: list[Message]) -> Prompt:
        return render_chat(self.require_model().tokenizer, messages)

    def continue_prompt(self, messages: list[Message]) -> Prompt:
        return render_chat_continue(self.require_model().tokenizer, messages)

    def raw_prompt(self, text: str) -> Prompt:
        return render_raw(self.require_model().tokenizer, text)

    def generation_params(self, **overrides: Any) -> GenerationParams:
        """settings.yaml's generation defaults with `overrides` on top (declared bounds are enforced)."""
        base = {k: v for k, v in vars(self.settings.generation).items()}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return build(GenerationParams, base)

    def generate(self, prompt: Prompt, params: GenerationParams, key: str = "default") -> Iterator[GenerationEvent]:
        """Stream a generation; `stop(key)` ends it within one token. One generation runs at a time."""
        model = self.require_model()
        cancel = threading.Event()
        self._cancels[key] = cancel  # registered before queueing, so Stop also works while waiting
        try:
            with self.generation_lock:
                try:
                    yield from model.generate(prompt.ids, params, cancel)
                except Exception as exc:  # a backend bug must not take the app down; end the reply with it
                    yield DoneEvent(reason="error", text="", error=f"{type(exc).__name__}: {exc}")
        finally:
            cancel.set()
            if self._cancels.get(key) is cancel:
                del self._cancels[key]

    def stop(self, key: str = "default") -> bool:
        """Ask the generation started under `key` to stop; False when none runs."""
        cancel = self._cancels.get(key)
        if cancel is None:
            return False
        cancel.set()
        return True
