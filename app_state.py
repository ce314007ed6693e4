"""AppState: what the running app holds (settings, loaders, the loaded model) and the actions on it.

Created once in app.py and passed to ui/ and api/. Every action a user can take lives here, testable without
a browser; ui/ and api/ only translate widgets and HTTP into these calls.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from app_settings import AppSettings
from engine.generation import DoneEvent, GenerationEvent
from engine.model import Message, Model, Prompt
from engine.sampling import GenerationParams
from loaded_model import LoadedModel
from loaders.awq_loader import AWQLoader
from loaders.base import Detection, LoaderRegistry, LoadError, Progress, no_progress
from core.diagnostics import Diagnostics
from core.folder import reading_once
from hub.default_model import DEFAULT_MODEL_NAME, install_default_model, is_installed
from loaders.gguf_loader import GGUFLoader
from loaders.gptq_loader import GPTQLoader
from loaders.llamacpp_loader import LlamaCppLoader
from loaders.lora import LoraInfo, is_lora_folder, list_loras, read_info
from loaders.model_settings import effective_settings, loader_options_to_apply, with_chosen_options
from core.options import OptionError, build
from loaders.remote_loader import RemoteLoader
from loaders.settings_store import SettingsStore
from loaders.transformers_loader import TransformersLoader
from prompts.conversations import ConversationStore
from prompts.library import ChatTemplate, TemplateLibrary, load_library
from prompts.presets import load_presets
from prompts.stop_strings import merge_stops
from prompts.template_options import NO_OPTIONS, TemplateOptions
from prompts.templates import resolve_template
from scheduler import RunHandle, Scheduler

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")   # \Z: "$" would also match before a final newline
# How long an unload waits for the generations it stopped to let go of the model.
UNLOAD_WAIT_SECONDS = 30.0
# How long a request that needs the model waits for the start-up load (a big model on a busy CPU is slow).
STARTUP_WAIT_SECONDS = 600.0


def _is_model_folder(path: Path) -> bool:
    return (path.is_dir() and not path.name.startswith(".") and bool(MODEL_NAME.match(path.name))
            and (any(path.glob("*.json")) or any(path.glob("*.gguf"))) and not is_lora_folder(path))


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after an unload. glibc keeps them in its arenas otherwise, so
    resident memory would creep up over load/unload cycles although nothing leaks."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def loader_options(loader, values: dict[str, Any] | None, effective: dict[str, Any] | None = None,
                   name: str = ""):
    """A loader's options from loose values; bad values become a LoadError naming the loader, or, for a
    value that is model `name`'s own (`effective` says where from), naming that file and field rather than
    an option the user never set."""
    values = values or {}
    try:
        return build(loader.options_type, values)
    except OptionError as exc:
        origin = ((effective or {}).get("loader_options") or {}).get(exc.option)
        if origin is not None and origin.source.startswith("model (") and origin.value == values.get(exc.option):
            where = origin.source.removeprefix("model (").removesuffix(")")
            raise LoadError(f"the {loader.name} loader cannot use {where} of {name}: {exc}; set the "
                            f"{exc.option} option for this model") from None
        raise LoadError(f"{loader.name} options: {exc}") from None


def load_guarded(load, name: str):
    """Run a loader's load(): whatever it raises becomes one LoadError sentence and the app carries on
    (with no model loaded: the previous one was unloaded before, so memory is free for the next try)."""
    try:
        return load()
    except LoadError:
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise LoadError(f"out of memory loading {name}: {str(exc)[:200]}") from None
    except Exception as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            raise LoadError(f"out of memory loading {name}: {str(exc)[:200]}") from None
        raise LoadError(f"could not load {name}: {type(exc).__name__}: {str(exc)[:300]}") from None
    finally:
        gc.collect()


def default_registry() -> LoaderRegistry:
    """The built-in loaders, registered the way a plugin would register its own."""
    registry = LoaderRegistry()
    registry.register(TransformersLoader())
    registry.register(RemoteLoader())
    registry.register(GPTQLoader())
    registry.register(AWQLoader())
    registry.register(GGUFLoader())
    registry.register(LlamaCppLoader())
    return registry


@dataclass
class StartupLoad:
    """The start-up model's load, running in a thread while the UI already answers: what the UI shows."""
    name: str
    fraction: float = 0.0
    message: str = "starting"
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def line(self) -> str:
        """One line for the Model tab and the chat header: empty once loaded, the reason after a failure."""
        if self.error is not None:
            return f"⚠️ could not load {self.name} at start: {self.error}"
        if self.finished.is_set():
            return ""
        return f"⏳ loading {self.name} at start: {self.fraction:.0%} · {self.message}"


@dataclass
class AppState:
    settings: AppSettings
    registry: LoaderRegistry = field(default_factory=default_registry)
    # The loaded model with its settings and template, resolved once per load; None when none is loaded.
    loaded: LoadedModel | None = None
    # One load/unload at a time.
    model_lock: threading.RLock = field(default_factory=threading.RLock)
    # Generations on the one loaded model, first come first served, as many at once as it runs (one, or a
    # batch: Model.concurrent_generations); each has its own RunHandle.
    generations: Scheduler = field(default_factory=Scheduler)
    # Downloads run side by side; the line only hands each one its handle (and so its own Cancel).
    downloads: Scheduler = field(default_factory=lambda: Scheduler(slots=None))
    # built-in instruction templates (templates/*.yaml), read once per AppState.
    template_library: TemplateLibrary = field(default_factory=load_library)
    # The --model / settings.yaml load that runs after the server is up; None when none was asked for.
    startup: StartupLoad | None = None
    # Problems with the user's files, from every reader: the UI's list and the log read them here.
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    _settings_store: SettingsStore | None = None

    @property
    def model(self) -> Model | None:
        loaded = self.loaded
        return loaded.model if loaded is not None else None

    @property
    def model_settings(self) -> dict[str, Any] | None:
        """The effective settings of the loaded model, {setting: Effective(value, source)}."""
        loaded = self.loaded
        return loaded.settings if loaded is not None else None

    # ---- per-model saved settings --------------------------------------------------
    @property
    def settings_store(self) -> SettingsStore:
        if self._settings_store is None or self._settings_store.path.parent != self.models_dir:
            self._settings_store = SettingsStore(self.models_dir)
        return self._settings_store

    def effective_settings(self, name: str, loader: str | None = None,
                           detections: list[Detection] | None = None) -> dict[str, Any]:
        """Every setting of model `name` with its source: saved > model metadata > settings.yaml.
        `loader` (a choice made now) replaces the saved/detected loader; `detections`: the folder's, when
        the caller has run detection already."""
        folder = self.model_dir(name)
        saved = dict(self.settings_store.get(name))
        if detections is None:
            detections = self.registry.detect_all(folder)
        if loader is not None and loader != saved.get("loader"):
            saved.pop("loader", None)
            saved.pop("loader_options", None)
            detections = [d for d in detections if d.loader == loader] or [
                Detection(loader, 0.0, "chosen for this load")]
        elif saved.get("loader") and not any(d.loader == saved["loader"] for d in detections):
            # The folder changed since the loader was saved (e.g. a new branch): detection wins, with a note.
            self.settings_store.report(f"the saved loader {saved['loader']} cannot read {name} any more; "
                                       "using the detected one")
            saved.pop("loader")
            saved.pop("loader_options", None)
        template = self._template_guess(folder, saved)
        preset = saved.get("preset")
        preset_values = load_presets().presets.get(preset) if preset else None
        if preset and preset_values is None:
            self.settings_store.report(f"the preset {preset!r} saved for {name} is not in presets/; not applied")
        return effective_settings(folder, saved, detections, self.registry, self.settings.generation, template,
                                  preset=(preset, preset_values) if preset_values is not None else None)

    def _template_guess(self, folder: Path, saved: dict[str, Any]) -> tuple[str | None, str]:
        """(name, source) of the template model `folder` gets without a saved choice, for the settings table."""
        try:
            template = resolve_template(folder, self.template_library, {**saved, "instruction_template": None})
        except Exception as exc:  # a broken template file is the prompts package's to report; say so here
            return None, f"no template could be resolved ({exc})"
        return template.name, f"model ({template.reason})"

    def save_model_settings(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """Save `values` (keys of loaders.settings_store.SAVED_KEYS) for model `name`; returns what was saved.
        When `name` is the loaded model, its settings and template are resolved again, so the next
        generation uses what was saved."""
        self.model_dir(name)
        entry = self.settings_store.save(name, values)
        with self.model_lock:
            loaded = self.loaded
            if loaded is not None and loaded.model.model_dir is not None and loaded.name == name:
                with reading_once():
                    effective = self.effective_settings(name, loaded.model.loader)
                # The load's own options stay as they were: they change with the next load, not with a save.
                if loaded.settings is not None:
                    effective = {**effective, "loader_options": loaded.settings["loader_options"]}
                self.loaded = LoadedModel(loaded.model, self.template_library, dict(self.settings_store.get(name)),
                                          effective, loras=loaded.loras)
        return entry

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

    # ---- LoRA adapters ------------------------------------------------------------------------------------
    def list_loras(self) -> list[LoraInfo]:
        return list_loras(self.models_dir)

    def lora_info(self, name: str) -> LoraInfo:
        """The adapter folder `name` in models/; LoadError for anything else."""
        folder = self.models_dir / name
        if not MODEL_NAME.match(name) or not folder.is_dir() or not is_lora_folder(folder):
            known = ", ".join(info.name for info in self.list_loras()) or "none"
            raise LoadError(f"no LoRA adapter named {name!r} in {self.models_dir} (available: {known})")
        return read_info(folder)

    def applied_loras(self) -> dict[str, float]:
        """{adapter: weight} on the loaded model; {} without one."""
        loaded = self.loaded
        return dict(loaded.loras.applied) if loaded is not None else {}

    def set_loras(self, wanted: dict[str, float], allow_pickle: bool = False, save: bool = False) -> dict[str, float]:
        """Make `wanted` ({adapter: weight}) the loaded model's adapters, without reloading it; {} removes them
        all. It waits for the generation in progress to end (never changes a model mid-reply). `save`: also
        remember them for this model, to apply at each load. LoadError, the model unchanged, when they do not
        fit it. Returns what is applied."""
        loaded = self.require_loaded()
        infos = [(self.lora_info(lora), float(weight)) for lora, weight in wanted.items()]
        applied: dict[str, float] = {}

        def work(cancel: threading.Event) -> Iterator[GenerationEvent]:
            applied.update(loaded.loras.set(infos, allow_pickle))
            yield DoneEvent(reason="stop", text="")

        with self.model_lock:
            if self.loaded is not loaded:
                raise LoadError("the model changed meanwhile; apply the adapters again")
            for _ in self.generations.submit(work, "lora", exclusive=True):
                pass
        if save and loaded.model.model_dir is not None:
            entry = dict(self.settings_store.get(loaded.name))
            self.settings_store.save(loaded.name, {**entry, "loras": applied or None})
        return applied

    def detect(self, name: str) -> list[Detection]:
        return self.registry.detect_all(self.model_dir(name))

    # ---- load / unload --------------------------------------------------------------------------------
    def load_model(self, name: str, loader: str | None = None, options: dict[str, Any] | None = None,
                   progress: Progress = no_progress) -> Model:
        """Load `name` with `loader` (detected when None), unloading the current model first.
        A loader that cannot read the folder is refused with a message naming the one that can.
        A loader that needs no folder (uses_model_folder = False, e.g. a remote endpoint) ignores `name`."""
        if not self.needs_model_folder(loader):
            return self._load_without_folder(loader, options, progress)
        folder = self.model_dir(name)
        # Detection, the settings, the loader and the template all read the folder's files: once each.
        with reading_once():
            return self._load_folder(name, folder, loader, options, progress)

    def _load_folder(self, name: str, folder: Path, loader: str | None, options: dict[str, Any] | None,
                     progress: Progress) -> Model:
        detections = self.registry.detect_all(folder)
        # without an explicit choice, the saved loader and options (then metadata) apply.
        effective = self.effective_settings(name, loader, detections) if detections else None
        if effective is not None:
            if loader is None:
                loader = effective["loader"].value
            if options is None:
                options = loader_options_to_apply(effective)
        if loader is None:
            if not detections:
                problems = "; ".join(self.registry.problems(folder))
                raise LoadError(f"no loader can read {name}: " + (problems or
                                "it has no config.json with weights, quantize_config.json, quant_config.json "
                                "or *.gguf that Hearth understands"))
            loader = detections[0].loader
        chosen = self.registry.get(loader)
        if not any(d.loader == loader for d in detections):
            if detections:
                hint = f"; it looks like {detections[0].reason}: use the {detections[0].loader} loader"
            else:
                hint = "".join(f": {p}" for p in self.registry.problems(folder)[:1])
            raise LoadError(f"the {loader} loader cannot read {name}{hint}")
        opts = loader_options(chosen, options, effective, name)
        return self._swap_in(lambda: chosen.load(folder, opts, progress), name, f"loading {name} with {loader}",
                             progress, self.settings_store.get(name), with_chosen_options(effective, opts))

    def needs_model_folder(self, loader: str | None) -> bool:
        """False for loaders that reach their model elsewhere (the remote endpoint): no folder to pick."""
        return loader is None or getattr(self.registry.get(loader), "uses_model_folder", True)

    def _load_without_folder(self, loader: str, options: dict[str, Any] | None, progress: Progress) -> Model:
        """loaders that reach a model elsewhere (an OpenAI-compatible server) take only options."""
        chosen = self.registry.get(loader)
        opts = loader_options(chosen, options)
        return self._swap_in(lambda: chosen.load(None, opts, progress), loader, f"connecting with {loader}",
                             progress, {}, None)

    def _swap_in(self, load, name: str, message: str, progress: Progress, saved: dict[str, Any],
                 settings: dict[str, Any] | None) -> Model:
        """Unload the current model, then load the new one and resolve its template; on failure no model
        stays loaded. `saved`, `settings`: the model's saved and effective settings (None: no folder)."""
        with self.model_lock:
            stopped = self.unload_model()
            if stopped:
                message += f" (stopped {stopped} generation(s) on the previous model first)"
            progress(0.0, message)
            model = load_guarded(load, name)
            try:
                self.loaded = LoadedModel(model, self.template_library, dict(saved), settings)
            except Exception:   # a template that cannot even be resolved: the load must not leak the model
                model.unload()
                raise
            self.generations.set_slots(model.concurrent_generations)
            self._apply_saved_loras(name, saved.get("loras") or {}, progress)
            return model

    def _apply_saved_loras(self, name: str, saved: dict[str, Any], progress: Progress) -> None:
        """The adapters saved for this model, applied again; one that cannot be is reported, the load stands."""
        if not saved:
            return
        try:
            wanted = [(self.lora_info(str(lora)), float(weight)) for lora, weight in saved.items()]
            applied = self.loaded.loras.set(wanted)
            progress(1.0, "LoRA " + ", ".join(f"{k} x{v:g}" for k, v in applied.items()))
        except (LoadError, TypeError, ValueError) as exc:
            self.settings_store.report(f"the LoRA adapters saved for {name} were not applied: {exc}")

    def unload_model(self) -> int:
        """Unload the model. Generations running on it or waiting for it are stopped first (each ends with
        reason "cancelled") and the model is freed once they have let go of it, so nothing keeps generating
        on an "unloaded" model. Returns how many generations were stopped."""
        with self.model_lock:
            model = self.model
            if model is None:
                return 0
            self.loaded = None   # from here generate() refuses new work: no model is loaded
            stopped = self.generations.stop_all()   # those waiting in line leave it at once
            # The decode loop sees its flag within one token; a consumer that stopped reading its handle
            # without closing it would hold the line forever, hence the bound.
            self.generations.wait_idle(UNLOAD_WAIT_SECONDS)
            self.generations.set_slots(1)
            model.unload()
            gc.collect()
            release_freed_memory()
            return stopped

    def load_at_startup(self, name: str, log: Progress = no_progress) -> StartupLoad:
        """Load model `name` in a background thread, so the UI and API answer meanwhile; requests that need
        the model wait for it (`wait_for_startup`). `log` also gets every progress step. A pending
        StartupLoad for `name` already in `startup` (set before the UI was built) is the one that runs."""
        startup = self.startup
        if startup is None or startup.name != name or startup.finished.is_set():
            startup = self.startup = StartupLoad(name)

        def progress(fraction: float, message: str) -> None:
            startup.fraction, startup.message = fraction, message
            log(fraction, message)

        def run() -> None:
            try:
                if name == DEFAULT_MODEL_NAME and not is_installed(self.models_dir):
                    # A first start: the UI is up already; the default model is installed here, its progress shown.
                    install_default_model(self.models_dir, progress)
                self.load_model(name, progress=progress)
            except (LoadError, RuntimeError, OSError) as exc:   # the app carries on: another model can be picked
                startup.error = str(exc)
            finally:
                startup.finished.set()

        threading.Thread(target=run, name="hearth-startup-load", daemon=True).start()
        return startup

    def wait_for_startup(self, timeout: float = STARTUP_WAIT_SECONDS) -> bool:
        """Block until the start-up load (if any) has ended; False when it is still running after `timeout`."""
        startup = self.startup
        return startup is None or startup.finished.wait(timeout)

    def require_model(self) -> Model:
        self.wait_for_startup()
        model = self.model
        if model is None:
            raise LoadError("no model is loaded: pick one on the Model tab and press Load")
        return model

    # ---- prompts and generation -----------------------------------------------------------------------
    # ---- templates: resolution order and source live in prompts/templates.py ----------------
    @property
    def conversations_dir(self) -> Path:
        """Saved conversations live in the data folder (settings data_dir, --data-dir), nowhere else: a
        models folder in a shared place must not share its neighbours' chats."""
        return self.settings.data_dir / "conversations"

    def require_loaded(self) -> LoadedModel:
        self.wait_for_startup()
        loaded = self.loaded
        if loaded is None:
            raise LoadError("no model is loaded: pick one on the Model tab and press Load")
        return loaded

    def saved_model_settings(self, name: str | None = None) -> dict[str, Any]:
        """Per-model saved settings (instruction_template, preset, system_message, sampler overrides) of
        model `name`, or of the loaded model (as resolved at its load or last save: no file is read)."""
        if name is None:
            loaded = self.loaded
            return dict(loaded.saved) if loaded is not None else {}
        return dict(self.settings_store.get(name))

    def resolve_template(self, choice: str | None = None, name: str | None = None) -> ChatTemplate:
        """The chat template of model `name` (read from its folder now), or of the loaded model (resolved at
        its load); `choice` is a template picked in the UI."""
        if name is None:
            return self.require_loaded().template_for(choice)
        return resolve_template(self.model_dir(name), self.template_library, self.saved_model_settings(name),
                                choice)

    def template_info(self, choice: str | None = None) -> dict[str, str]:
        """Which template the loaded model uses and why (for the UI and `inspect`)."""
        return self.require_loaded().template_info(choice)

    def _budget(self, max_new_tokens: int | None) -> int | None:
        """Tokens left for the prompt when `max_new_tokens` are kept for the reply (None: no limit asked)."""
        model = self.require_model()
        if max_new_tokens is None or not model.context_length:
            return None
        return model.context_length - max_new_tokens

    def chat_prompt(self, messages: list[Message], template: str | None = None,
                    max_new_tokens: int | None = None, options: TemplateOptions = NO_OPTIONS) -> Prompt:
        """The prompt for a reply to `messages`, through the resolved template; with max_new_tokens the
        oldest turns are dropped to fit context_length - max_new_tokens. `options`: the tool list and the
        enable_thinking switch the template gets (prompts.template_options.TemplateOptions)."""
        return self.require_loaded().prompt(messages, "chat", self._budget(max_new_tokens), template, options)

    def continue_prompt(self, messages: list[Message], template: str | None = None,
                        max_new_tokens: int | None = None, options: TemplateOptions = NO_OPTIONS) -> Prompt:
        """The prompt that goes on with the last (assistant) message of `messages` (`options` as chat_prompt)."""
        return self.require_loaded().prompt(messages, "continue", self._budget(max_new_tokens), template, options)

    def raw_prompt(self, text: str) -> Prompt:
        """`text` as is (with the tokenizer's BOS where it adds one); ValueError when that makes no tokens,
        since a model needs at least one token to continue from."""
        return self.require_loaded().prompt(text, "raw")

    def generation_params(self, **overrides: Any) -> GenerationParams:
        """The loaded model's sampler values (saved > preset > model metadata > settings.yaml; settings.yaml's
        alone without a model) with `overrides` on top (declared bounds are enforced)."""
        loaded = self.loaded
        base = (loaded.sampler() if loaded is not None else None) or dict(vars(self.settings.generation))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return build(GenerationParams, base)

    def generate(self, prompt: Prompt, params: GenerationParams, key: str = "default") -> RunHandle:
        """Queue a generation for `key` (who asks: a UI session, "api") and return its RunHandle at
        once; iterating it streams the events. One generation runs at a time: while this one waits for the
        model it yields QueuedEvent(ahead) each time the number ahead changes, and QueuedEvent(0) when its
        turn comes after a wait. `handle.cancel()` (or `stop(key)`) ends it within one token, or takes it
        out of the line; closing the handle gives its place up."""
        model = self.require_model()
        if prompt.stop:  # the template's own stop strings on top of the user's
            params = dataclasses.replace(params, stop=merge_stops(params.stop, prompt.stop))

        def work(cancel: threading.Event) -> Iterator[GenerationEvent]:
            if self.model is not model:   # unloaded (or replaced) while this request waited its turn
                yield DoneEvent(reason="cancelled", text="")
                return
            try:
                yield from model.generate(prompt, params, cancel)
            except Exception as exc:  # a backend bug must not take the app down; end the reply with it
                yield DoneEvent(reason="error", text="", error=f"{type(exc).__name__}: {exc}")

        return self.generations.submit(work, key)

    def stop(self, key: str = "default") -> bool:
        """Stop `key`'s oldest generation (the running one, when it has one queued behind it too): Stop in a
        UI session ends the reply it shows, not the next one it queued. False when `key` has none."""
        return self.generations.stop(key)

    def queue_position(self, key: str = "default") -> int | None:
        """0 while `key`'s oldest generation runs, n when n are ahead of it, None when it has none."""
        return self.generations.position(key)

    def file_problems(self) -> list[str]:
        """User files Hearth skipped or partly ignored (malformed presets, templates, saved conversations,
        config-user.yaml), one line each naming the file; the app runs on without them."""
        self.settings_store.names()   # reading config-user.yaml reports (and backs up) a malformed one
        conversations = ConversationStore(self.conversations_dir)
        conversations.list()
        self.diagnostics.report("templates", self.template_library.problems)
        self.diagnostics.report("presets", load_presets().problems)
        self.diagnostics.report("conversations", conversations.problems)
        self.diagnostics.report("", self.settings_store.problems)   # its lines name config-user.yaml already
        return self.diagnostics.problems()
