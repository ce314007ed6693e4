"""The `gguf` loader: folders that only hold *.gguf files (llama.cpp format), run by transformers.

transformers dequantizes the GGUF tensors into a normal model at load (`gguf_file=`), so this runs
anything transformers maps from GGUF on CPU in float32; the tokenizer comes from the GGUF metadata too.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from loaders.base import Detection, LoadError, Progress, no_progress
from loaders.folder import gguf_files, require_dir, safetensors_files
from loaders.options import option
from loaders.transformers_loader import TransformersModel

# ggml file types (general.file_type) that people recognise by name.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 32: "BF16"}


@dataclass
class GGUFOptions:
    gguf_file: str = option("", "Which .gguf file in the folder to load; empty = the first one.")
    dtype: str = option("float32", "Dtype the GGUF weights are dequantized to.",
                        choices=["float32", "bfloat16", "float16"])
    context_length: int = option(0, "Context length in tokens; 0 = the model's own.", minimum=0, maximum=1048576,
                                 step=256)


# GGUF metadata value types -> struct format (fixed-size ones); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path, wanted: set[str]) -> dict:
    """The `wanted` metadata keys of a GGUF file, read from its header.

    Walks the key/value section with struct and stops once every wanted key is found, so the tokenizer
    arrays (tens of thousands of strings) are usually never touched; the gguf package's reader parses
    everything and takes seconds per file.
    """
    found: dict = {}
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            version, _tensors, kv_count = struct.unpack_from("<IQQ", buf, 4)
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            pos = 24

            def string(at: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", buf, at)
                return bytes(buf[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

            def value(kind: int, at: int):
                if kind in _SCALARS:
                    fmt = _SCALARS[kind]
                    return struct.unpack_from(fmt, buf, at)[0], at + struct.calcsize(fmt)
                if kind == _STRING:
                    return string(at)
                if kind == _ARRAY:
                    item_kind, count = struct.unpack_from("<IQ", buf, at)
                    at += 12
                    if item_kind in _SCALARS:      # skipped: arrays are never among the wanted keys
                        return None, at + count * struct.calcsize(_SCALARS[item_kind])
                    for _ in range(count):
                        _, at = value(item_kind, at)
                    return None, at
                raise ValueError(f"unknown GGUF value type {kind}")

            for _ in range(kv_count):
                key, pos = string(pos)
                (kind,) = struct.unpack_from("<I", buf, pos)
                item, pos = value(kind, pos + 4)
                if key in wanted:
                    found[key] = item
                    if len(found) == len(wanted):
                        break
    except (OSError, ValueError, struct.error) as exc:
        raise LoadError(f"{path.name} is not a readable GGUF file ({exc})") from None
    return found


def gguf_summary(path: Path) -> dict:
    """Architecture, file type and context length from a GGUF header (nothing dequantized)."""
    meta = read_gguf_metadata(path, {"general.architecture", "general.file_type"})
    arch = meta.get("general.architecture")
    if arch:
        meta.update(read_gguf_metadata(path, {f"{arch}.context_length"}))
    file_type = meta.get("general.file_type")
    return {"architecture": arch,
            "file_type": FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else "unknown",
            "context_length": meta.get(f"{arch}.context_length") if arch else None}


class GGUFLoader:
    name = "gguf"
    description = "GGUF files (llama.cpp format), dequantized by transformers on load (CPU)."
    options_type = GGUFOptions

    def detect(self, model_dir: Path) -> Detection | None:
        files = gguf_files(model_dir)
        if not files:
            return None
        summary = gguf_summary(files[0])   # LoadError for a damaged file: the registry reports it
        # Folders with safetensors as well are better served by their own loader; GGUF-only folders are ours.
        score = 0.2 if safetensors_files(model_dir) else 0.6
        more = f" (+{len(files) - 1} more)" if len(files) > 1 else ""
        return Detection(self.name, score, f"GGUF {summary['file_type']} {summary['architecture'] or 'model'} "
                                           f"({files[0].name}{more})", {"gguf": {**summary, "file": files[0].name}})

    def load(self, model_dir: Path, options: GGUFOptions, progress: Progress = no_progress):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        require_dir(model_dir)
        files = gguf_files(model_dir)
        if options.gguf_file:
            chosen = model_dir / options.gguf_file
            if chosen not in files:
                raise LoadError(f"{options.gguf_file} is not a .gguf file in {model_dir.name}")
        elif files:
            chosen = files[0]
        else:
            raise LoadError(f"{model_dir.name} has no .gguf file")
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
        loaded = TransformersModel(model_dir, model, tokenizer, torch.device("cpu"), dtype, context)
        loaded.loader = self.name
        loaded.runtime = f"transformers from GGUF (cpu, {options.dtype})"
        return loaded
