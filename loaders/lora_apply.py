"""The LoRA adapters applied to one loaded model, on whichever runtime runs it, switched without a reload.

Hearth's engine takes them as low-rank matmuls beside its layers (engine.lora); a transformers model through
peft (its LoRA layers, one named adapter each, scaled per adapter); llama.cpp through its own adapter API
(GGUF adapters). Each runtime gets the whole wanted set at once ([(adapter, weight)]): the same adapters in the
same order only change their weights in place; anything else rebuilds the set. A set that cannot be applied
(an adapter for another model, a pickle not allowed) raises before the model changes, so it keeps serving
with the adapters it had.
"""
from __future__ import annotations

import ctypes
import re
from typing import Protocol

from core.errors import LoadError
from engine import lora as engine_lora
from engine.model import Model
from engine.runtime import EngineModel
from loaders.llamacpp_loader import LlamaCppModel
from loaders.lora import LoraInfo, adapter_shapes, read_weights
from loaders.transformers_loader import TransformersModel

Wanted = list[tuple[LoraInfo, float]]


class Runtime(Protocol):
    kind: str   # the adapter files it applies: "peft" or "gguf"

    def set(self, wanted: Wanted, allow_pickle: bool) -> None: ...

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """{adaptable layer: (inputs, outputs)}, named as the adapters it takes name them."""


class EngineAdapters:
    kind = "peft"

    def __init__(self, model: EngineModel):
        self.model = model
        self.applied: list[tuple[engine_lora.LoraWeights, float]] = []

    def set(self, wanted: Wanted, allow_pickle: bool) -> None:
        engine = self.model.engine
        if [info.name for info, _ in wanted] == [w.name for w, _ in self.applied]:
            self.applied = [(w, weight) for (w, _), (_, weight) in zip(self.applied, wanted)]
            engine_lora.reweight(engine.model, self.applied)   # in place: the captured graphs stay valid
            return
        have = {w.name: w for w, _ in self.applied}
        adapters = [(have.get(info.name) or read_weights(info, allow_pickle), weight) for info, weight in wanted]
        try:
            engine_lora.apply(engine.model, adapters)
        except ValueError as exc:
            raise LoadError(str(exc)) from None
        self.model.drop_graphs()   # captured over the old layers, batched ones too: the next steps capture anew
        self.applied = adapters

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return engine_lora.layer_shapes(self.model.engine.model)


class PeftAdapters:
    """transformers' own adapter support (peft underneath): one named adapter per LoRA folder."""
    kind = "peft"

    def __init__(self, model: TransformersModel):
        self.model = model
        self.loaded: list[str] = []

    def set(self, wanted: Wanted, allow_pickle: bool) -> None:
        from peft.tuners.lora import LoraLayer

        hf = self.model.hf_model
        names = [info.name for info, _ in wanted]
        for info, _ in wanted:
            if info.name not in self.loaded:
                self._load(hf, info, allow_pickle)
        for name in [n for n in self.loaded if n not in names]:
            hf.delete_adapter(name)
            self.loaded.remove(name)
        if names:
            hf.set_adapter(names)
        elif self.loaded == [] and getattr(hf, "_hf_peft_config_loaded", False):
            hf.disable_adapters()
        for module in hf.modules():
            if isinstance(module, LoraLayer):
                for info, weight in wanted:
                    if info.name in module.scaling:
                        module.set_scale(info.name, float(weight))

    def _load(self, hf, info: LoraInfo, allow_pickle: bool) -> None:
        if info.kind != "peft":
            raise LoadError(f"{info.name} is a GGUF adapter: only the llama.cpp loader applies those")
        if info.pickled and not allow_pickle:
            raise LoadError(f"{info.name} only has a pickled adapter_model.bin, which can run code when loaded; "
                            "enable allow_pickle if you trust its source")
        problems = shape_problems(info, self.layer_shapes())
        if problems:   # said in Hearth's words before peft half-builds the adapter and fails in its own
            raise LoadError(f"LoRA {info.name} does not fit {self.model.name}: {problems[0]}")
        try:
            # a local folder, read from disk (transformers 5.23 fails on local_files_only=True: its load config
            # has no such field)
            hf.load_adapter(str(info.folder), adapter_name=info.name)
        except (ValueError, RuntimeError, KeyError) as exc:
            if info.name in (getattr(hf, "peft_config", None) or {}):
                hf.delete_adapter(info.name)   # a half-made adapter must not stay in the model
            raise LoadError(f"LoRA {info.name} does not fit {self.model.name}: {str(exc).splitlines()[0]}") from None
        self.loaded.append(info.name)

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        from torch import nn

        # with adapters loaded, peft keeps the original linear as `<name>.base_layer`
        return {name.removesuffix(".base_layer"): (m.in_features, m.out_features)
                for name, m in self.model.hf_model.named_modules() if isinstance(m, nn.Linear)}


class LlamaCppAdapters:
    """llama.cpp's adapter API: each GGUF adapter loaded once, the active set and scales given per context."""
    kind = "gguf"

    def __init__(self, model: LlamaCppModel):
        self.model = model
        self.handles: dict[str, object] = {}

    def set(self, wanted: Wanted, allow_pickle: bool) -> None:
        import llama_cpp

        llm = self.model.llm
        for info, _ in wanted:
            if info.kind != "gguf":
                raise LoadError(f"{info.name} is a PEFT adapter: llama.cpp applies GGUF adapters only "
                                "(convert it with llama.cpp's convert_lora_to_gguf.py)")
            if info.name not in self.handles:
                problems = shape_problems(info, self.layer_shapes())
                if problems:   # llama.cpp itself says only that it failed (its log has the rest)
                    raise LoadError(f"LoRA {info.name} does not fit {self.model.name}: {problems[0]}")
                handle = llama_cpp.llama_adapter_lora_init(llm.model, str(info.gguf_file).encode())
                if not handle:
                    raise LoadError(f"llama.cpp could not load the adapter {info.gguf_file.name} for {self.model.name}"
                                    " (an adapter for another model?)")
                self.handles[info.name] = handle
        count = len(wanted)
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * count)(*[self.handles[i.name] for i, _ in wanted])
        scales = (ctypes.c_float * count)(*[float(w) for _, w in wanted])
        if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters if count else None, count,
                                             scales if count else None) != 0:
            raise LoadError("llama.cpp refused the adapter set")
        llm.reset()   # the prompt tokens it keeps for reuse were computed under the previous set

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        from gguf import GGUFReader

        # a GGUF weight lists its dimensions fastest first: [inputs, outputs]
        return {t.name: (int(t.shape[0]), int(t.shape[1])) for t in GGUFReader(str(self.model.path)).tensors
                if len(t.shape) == 2}


def runtime_for(model: Model) -> Runtime | None:
    """The adapter support of the runtime that runs `model`; None where there is none (a remote server)."""
    if isinstance(model, EngineModel):
        return EngineAdapters(model)
    if isinstance(model, TransformersModel):
        return PeftAdapters(model)
    if isinstance(model, LlamaCppModel):
        return LlamaCppAdapters(model)
    return None


def _plain(name: str) -> str:
    """A model name compared loosely: its last path part, lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.rstrip("/").rsplit("/", 1)[-1].lower())


def fit_problems(info: LoraInfo, model: Model | None) -> list[str]:
    """Why `info` may not fit the loaded `model` (the Model tab shows them beside the adapter): another
    base model by name, an adapter file its runtime does not take, or layers it lacks or shapes that differ.
    [] when none is seen (or no model is loaded)."""
    if model is None:
        return []
    problems = []
    base = _plain(info.base_model)
    if base and base not in _plain(model.name) and _plain(model.name) not in base:
        problems.append(f"made for {info.base_model}, the loaded model is {model.name}")
    runtime = runtime_for(model)
    if runtime is None:
        return [*problems, f"{model.name} takes no LoRA adapters from Hearth"]
    if info.kind != runtime.kind:
        return [*problems, f"a {info.kind.upper()} adapter: {model.runtime} takes {runtime.kind.upper()} ones"]
    return [*problems, *shape_problems(info, runtime.layer_shapes())]


def shape_problems(info: LoraInfo, layers: dict[str, tuple[int, int]]) -> list[str]:
    """The adapter's layers that `layers` ({name: (inputs, outputs)}) lacks, and those whose shapes differ,
    from its file's header; [] when it fits."""
    missing, wrong = [], []
    for name, (a, b) in adapter_shapes(info).items():
        if name not in layers:
            missing.append(name)
        elif (a[-1], b[0]) != layers[name]:
            wrong.append(f"{name} is {a[-1]} inputs → {b[0]} outputs in the adapter, {layers[name][0]} → "
                         f"{layers[name][1]} in the model")
    problems = []
    if missing:
        problems.append(f"the loaded model has no layer {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
    if wrong:
        problems.append(f"shapes differ: {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    return problems


class LoraSet:
    """The adapters applied to one loaded model and their weights (LoadedModel owns one per model)."""

    def __init__(self, model: Model):
        self.model = model
        self.runtime = runtime_for(model)
        self.applied: dict[str, float] = {}

    def set(self, wanted: Wanted, allow_pickle: bool = False) -> dict[str, float]:
        """Make `wanted` the applied set; returns {name: weight}. LoadError (the model unchanged) when it
        cannot be applied."""
        if self.runtime is None:
            raise LoadError(f"{self.model.name} runs on {self.model.runtime or 'a remote server'}, which takes "
                            "no LoRA adapters from Hearth")
        self.runtime.set(wanted, allow_pickle)
        self.applied = {info.name: float(weight) for info, weight in wanted}
        return dict(self.applied)
