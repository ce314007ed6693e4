"""A GGUF model on Hearth's engine: its packed tensors repacked into QuantWeights, its tokenizer and chat
template from the file's metadata (read by transformers' GGUF tokenizer support, nothing dequantized).

engine.runtime.load_engine_model reads a folder's config.json and safetensors; a GGUF folder has neither,
so this builds the same Engine from the GGUF's own config and tensors (engine.weights.build_transformer).
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.runtime import Engine, EngineModel, parse_gpu_split, unsupported_reason
from engine.weights import build_transformer
from loaders.base import LoadError, Progress
from loaders.config_check import check_fits, config_sizes
from loaders.gguf_checkpoint import GGUFCheckpoint


def load_gguf_tokenizer(model_dir: Path, first_part: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, gguf_file=first_part.name, local_files_only=True)
    except Exception as exc:  # transformers raises many types for tokenizers it cannot rebuild
        raise LoadError(f"could not read the tokenizer in {first_part.name}: {exc}") from None


def load_gguf_engine(model_dir: Path, path: Path, options, progress: Progress) -> EngineModel:
    """The GGUF model `path` (a file, or the first part of a split model) on the engine. options: the gguf
    loader's (runtime, gpu_split, context_length)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress(0.03, f"reading {path.name}")
    with GGUFCheckpoint(path) as ckpt:
        config = ckpt.config
        reason = unsupported_reason(config)
        if reason:
            raise LoadError(f"Hearth's engine cannot run {path.name}: {reason}")
        progress(0.06, "reading the tokenizer")
        tokenizer = load_gguf_tokenizer(model_dir, ckpt.parts[0])
        if device == "cuda":
            try:
                split = parse_gpu_split(options.gpu_split or None)
            except ValueError as exc:
                raise LoadError(str(exc)) from None
            count = len(split) if split else 1
            if count > torch.cuda.device_count():
                raise LoadError(f"gpu_split names {count} GPUs but {torch.cuda.device_count()} are present")
            devices, dtype = [torch.device("cuda", i) for i in range(count)], torch.bfloat16
        else:
            split, devices, dtype = None, [torch.device("cpu")], torch.float32
        context = options.context_length or config["max_position_embeddings"]
        source = "the context_length option" if options.context_length else f"{path.name} context_length"
        # Sized from the metadata before any layer or cache is built; the file's bytes stand in for the
        # weights (the repacked levels are about as large; dequantized widths are larger, so this is a floor).
        estimate = check_fits(path.name, config_sizes(config, f"{path.name} metadata"),
                              sum(p.stat().st_size for p in ckpt.parts), context_length=context,
                              context_source=source, device=device, dtype=dtype)
        try:
            model, kinds = build_transformer(config, ckpt, None, devices, dtype, split,
                                             rescore_head=device == "cpu", progress=progress)
        except torch.OutOfMemoryError:
            raise LoadError(f"out of memory loading {path.name}; try a smaller quantization or gpu_split") from None
        except (ValueError, KeyError) as exc:
            raise LoadError(f"could not load {path.name} into Hearth's engine: {exc}") from None
    graphs = len(devices) == 1 and device == "cuda"
    try:
        engine = Engine(model, context, use_graphs=graphs, prefill_chunk=2048 if device == "cuda" else 512)
    except ValueError as exc:   # the KV cache does not fit
        raise LoadError(f"could not load {path.name} into Hearth's engine: {exc}") from None
    eos = [config["eos_token_id"]] if "eos_token_id" in config else []
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    where = f"cuda x{len(devices)}" if len(devices) > 1 else device
    runtime = f"hearth engine ({where}, GGUF {path.name}, {', '.join(sorted(kinds))}{', CUDA graph' if graphs else ''})"
    progress(1.0, "ready")
    loaded = EngineModel(model_dir, engine, tokenizer, list(dict.fromkeys(eos)), context, "gguf", runtime)
    loaded.memory = estimate.describe()
    return loaded
