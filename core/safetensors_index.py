"""Which tensors a folder's safetensors files hold, read from their headers without loading any weights.

Handles single files under any name (model.safetensors, gptq_model-4bit-128g.safetensors), sharded
checkpoints listed in *.safetensors.index.json, and loose shards without an index.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from core.errors import LoadError
from core.folder import read_json, safetensors_files

MAX_HEADER_BYTES = 100 * 1024 * 1024   # the safetensors spec's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype string, e.g. "I32", "F16"
    shape: tuple[int, ...]
    file: Path


def read_header(path: Path) -> dict[str, dict]:
    """The JSON header of one safetensors file (tensor name -> dtype/shape/offsets), without the data."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LoadError(f"{path.name} is too short to be a safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER_BYTES:
                raise LoadError(f"{path.name} has an implausible safetensors header ({size} bytes)")
            header = json.loads(f.read(size))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path.name} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint: those named by an index, else all of them."""
    for index in sorted(model_dir.glob("*.safetensors.index.json")):
        data = read_json(index) or {}
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index.name} has no weight_map")
        files = sorted({model_dir / str(f) for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{model_dir.name} is incomplete: {index.name} lists missing file(s) "
                            f"{', '.join(missing[:3])}")
        return files
    return safetensors_files(model_dir)


def tensor_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint by name, from the headers only."""
    found: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        for name, info in read_header(path).items():
            found[name] = TensorInfo(name, str(info.get("dtype")), tuple(info.get("shape", ())), path)
    return found


class CheckpointTensors:
    """A checkpoint's tensors by name, each read when asked for (files opened on first use, memory-mapped
    by safetensors). A context manager: leaving it closes the files; tensors already read stay valid."""

    def __init__(self, model_dir: Path):
        self.index = tensor_index(Path(model_dir))
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str, device="cpu"):
        from safetensors import safe_open

        info = self.index[name]
        handle = self._open.get(info.file)
        if handle is None:
            handle = self._open[info.file] = safe_open(str(info.file), framework="pt").__enter__()
        return handle.get_tensor(name).to(device)

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def __enter__(self) -> "CheckpointTensors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quantized_prefixes(names: dict[str, TensorInfo] | list[str]) -> list[str]:
    """Layer prefixes that carry packed weights: `.qweight` (GPTQ and AWQ) or `.weight_packed` (compressed-tensors)."""
    return sorted(n.rsplit(".", 1)[0] for n in names if n.endswith((".qweight", ".weight_packed")))
