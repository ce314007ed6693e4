"""The `gguf` loader: folders holding *.gguf files (llama.cpp format).

Llama, Mistral and Qwen2 GGUFs run on Hearth's engine: every quantized tensor is repacked losslessly into
the engine's QuantWeight (loaders.gguf_repack), which stays packed wherever a kernel takes it (on CPU:
torch's int4 kernel for the 4-bit types; on a GPU: Hearth's kernels) and is dequantized once otherwise, as
the runtime line says layer kind by layer kind. Anything else (another architecture, a tensor
type the repacker does not read) is dequantized by transformers into a float model, with the reason in the
runtime line. A folder may hold several quantizations side by side: each file (a split model counts once,
by its first part) is a choice of the `gguf_file` option, saved per model like every option.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loaders.base import Detection, LoadError, Progress, no_progress
from loaders.engine_choice import RuntimeOptions
from core.folder import require_dir, safetensors_files
from loaders.gguf_checkpoint import engine_refusal, type_counts, unpacked_here
from loaders.gguf_header import model_files, read_model_header, split_parts
from loaders.gguf_repack import BLOCK_TYPES
from core.options import option
from loaders.transformers_loader import TransformersModel

# ggml file types (general.file_type) that people recognise by name.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 20: "IQ4_NL", 30: "IQ4_XS", 32: "BF16", 38: "MXFP4_MOE"}


@dataclass
class GGUFOptions(RuntimeOptions):
    gguf_file: str = option("", "Which model in the folder to load: a .gguf file name (for a split model, its "
                                "-00001-of-0000N part); empty = the first one.")
    dtype: str = option("float32", "transformers only: dtype the GGUF weights are dequantized to.",
                        choices=["float32", "bfloat16", "float16"])
    context_length: int = option(0, "Context length in tokens; 0 = the model's own.", minimum=0, maximum=1048576,
                                 step=256)


def gguf_summary(path: Path) -> dict:
    """What detection and `inspect` report about one GGUF model: architecture, file type, context length,
    tensor types, and which runtime will run it and why (nothing dequantized; the header only)."""
    header = read_model_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    file_type = meta.get("general.file_type")
    refusal = engine_refusal(header)
    unpacked = unpacked_here(header) if refusal is None else []
    return {"architecture": arch,
            "file_type": FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else "unknown",
            "context_length": meta.get(f"{arch}.context_length") if arch else None,
            "tensor_types": type_counts(header),
            "runtime": "transformers" if refusal else "engine",
            "runtime_reason": (f"not on Hearth's engine: {refusal}" if refusal
                               else f"Hearth's engine, its {', '.join(unpacked)} tensors unpacked on this CPU (no "
                                    "packed CPU kernel for them)" if unpacked
                               else "Hearth's engine, quantized tensors repacked losslessly" if any(
                                   t.type_name in BLOCK_TYPES for t in header.tensors) else "Hearth's engine")}


def pick_file(model_dir: Path, choice: str) -> Path:
    """The model file the gguf_file option names (empty: the first); LoadError listing the choices."""
    files = model_files(model_dir)
    if not files:
        raise LoadError(f"{model_dir.name} has no .gguf file")
    if not choice:
        return files[0]
    chosen = model_dir / choice
    if chosen not in files:
        raise LoadError(f"{choice} is not a model in {model_dir.name}; the choices are "
                        f"{', '.join(f.name for f in files)}")
    return chosen


class GGUFLoader:
    name = "gguf"
    description = ("GGUF files (llama.cpp format): Llama, Mistral and Qwen2 on Hearth's engine, quantized layers "
                   "repacked losslessly for its kernels; other architectures dequantized by transformers (CPU).")
    options_type = GGUFOptions

    def detect(self, model_dir: Path) -> Detection | None:
        files = model_files(model_dir)
        if not files:
            return None
        summary = gguf_summary(files[0])   # LoadError for a damaged file: the registry reports it
        # Folders with safetensors as well are better served by their own loader; GGUF-only folders are ours.
        score = 0.2 if safetensors_files(model_dir) else 0.6
        more = f" (+{len(files) - 1} more)" if len(files) > 1 else ""
        return Detection(self.name, score,
                         f"GGUF {summary['file_type']} {summary['architecture'] or 'model'} ({files[0].name}{more}); "
                         f"{summary['runtime_reason']}",
                         {"gguf": {**summary, "file": files[0].name, "files": [f.name for f in files]}})

    def load(self, model_dir: Path, options: GGUFOptions, progress: Progress = no_progress):
        require_dir(model_dir)
        chosen = pick_file(model_dir, options.gguf_file)
        parts = split_parts(chosen)
        progress(0.02, f"reading the header of {chosen.name}")
        refusal = engine_refusal(read_model_header(chosen))
        if refusal is None and options.runtime != "transformers":
            from loaders.gguf_engine import load_gguf_engine

            return load_gguf_engine(model_dir, chosen, options, progress)
        if options.runtime == "engine":
            raise LoadError(f"Hearth's engine cannot run {chosen.name}: {refusal}")
        if len(parts) > 1:
            raise LoadError(f"{chosen.name} is split in {len(parts)} files, which transformers cannot load "
                            f"({refusal or 'runtime transformers was asked for'})")
        return self._load_transformers(model_dir, chosen, options, refusal or "runtime transformers was asked for",
                                       progress)

    def _load_transformers(self, model_dir: Path, chosen: Path, options: GGUFOptions, why: str,
                           progress: Progress):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = getattr(torch, options.dtype)
        progress(0.05, f"reading {chosen.name}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=chosen.name, local_files_only=True)
            progress(0.2, "dequantizing GGUF tensors")
            model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=chosen.name, dtype=dtype,
                                                         local_files_only=True)
        except torch.OutOfMemoryError:
            raise LoadError(f"out of memory loading {chosen.name}") from None
        except Exception as exc:  # transformers' GGUF path raises many types for unsupported files
            raise LoadError(f"transformers could not load {chosen.name}: {exc}") from None
        model.eval()
        progress(1.0, "ready")
        context = options.context_length or getattr(model.config, "max_position_embeddings", None) or 2048
        return TransformersModel(model_dir, model, tokenizer, torch.device("cpu"), dtype, context, loader=self.name,
                                 runtime=f"transformers from GGUF (cpu, {options.dtype}; {why})")
