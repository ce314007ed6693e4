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
from typing import Protocol

from core.errors import LoadError
from engine import lora as engine_lora
from engine.model import Model
from engine.runtime import EngineModel
from loaders.llamacpp_loader import LlamaCppModel
from loaders.lora import LoraInfo, read_weights
from loaders.transformers_loader import TransformersModel

Wanted = list[tuple[LoraInfo, float]]


class Runtime(Protocol):
    def set(self, wanted: Wanted, allow_pickle: bool) -> None: ...


class EngineAdapters:
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
        engine.graphs.clear()   # captured over the old layers: the next decode step captures anew
        self.applied = adapters


class PeftAdapters:
    """transformers' own adapter support (peft underneath): one named adapter per LoRA folder."""

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
        try:
            hf.load_adapter(str(info.folder), adapter_name=info.name, local_files_only=True)
        except (ValueError, RuntimeError, KeyError) as exc:
            if info.name in (getattr(hf, "peft_config", None) or {}):
                hf.delete_adapter(info.name)   # a half-made adapter must not stay in the model
            raise LoadError(f"LoRA {info.name} does not fit {self.model.name}: {str(exc).splitlines()[0]}") from None
        self.loaded.append(info.name)


class LlamaCppAdapters:
    """llama.cpp's adapter API: each GGUF adapter loaded once, the active set and scales given per context."""

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


def runtime_for(model: Model) -> Runtime | None:
    """The adapter support of the runtime that runs `model`; None where there is none (a remote server)."""
    if isinstance(model, EngineModel):
        return EngineAdapters(model)
    if isinstance(model, TransformersModel):
        return PeftAdapters(model)
    if isinstance(model, LlamaCppModel):
        return LlamaCppAdapters(model)
    return None


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
