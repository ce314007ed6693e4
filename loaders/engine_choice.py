"""Which runtime runs a model a loader has read: Hearth's engine or transformers.

Shared by every loader whose folders the engine can run (plain, GPTQ and AWQ), so the choice is declared
once and made the same way everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loaders.base import LoadError, Progress
from core.options import option


@dataclass
class RuntimeOptions:
    runtime: str = option("auto", "What runs the model: auto = Hearth's engine when it supports the architecture "
                                  "(Llama, Mistral, Qwen2/3, Qwen-MoE, Mixtral, Gemma 2/3, Phi-3/4) and the device, else "
                                  "transformers.",
                          choices=["auto", "engine", "transformers"])
    gpu_split: str = option("", "Engine only: GB to use on each GPU, e.g. 20,24, to spread layers over several "
                                "GPUs; empty = one GPU.")
    streams: int = option(0, "Engine on CUDA: generations decoded together, each with its own KV cache; 0 = auto "
                             "(up to 8 while the GPU keeps 2 GiB or a tenth free), 1 = one at a time (the least "
                             "memory).", minimum=0, maximum=8, step=1)


def load_on_engine(loader: str, model_dir: Path, config: dict, options: RuntimeOptions, *, device: str,
                   tokenizer, eos_token_ids: list[int], context_length: int, memory: str, progress: Progress):
    """The model on Hearth's engine, or None when `runtime` is auto and the engine cannot run it (the caller
    then uses transformers). `device` is "cuda" or "cpu"; `memory` is the caller's estimate of the load."""
    from engine.runtime import load_engine_model, unsupported_reason

    if options.runtime == "transformers":
        return None
    reason = unsupported_reason(config)
    if reason:
        if options.runtime == "engine":
            raise LoadError(f"Hearth's engine cannot run {model_dir.name}: {reason}")
        return None
    try:
        return load_engine_model(model_dir, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                                 context_length=context_length, loader=loader, device=device,
                                 gpu_split=options.gpu_split or None, config=config, memory=memory,
                                 progress=progress, slots=options.streams or None)
    except torch.OutOfMemoryError:
        raise LoadError(f"out of memory loading {model_dir.name}; try a smaller model or gpu_split") from None
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"could not load {model_dir.name} into Hearth's engine: {exc}") from None
