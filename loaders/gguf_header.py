"""A GGUF file's header without its weights: metadata, tensor names and types, and the choice of files.

Walks the key/value and tensor-info sections with struct in a few milliseconds, so detection and the
Model tab never wait on the `gguf` package's full reader (which builds every tokenizer string and takes
seconds per file); loading uses that reader (loaders.gguf_checkpoint). Layout: the GGUF spec in llama.cpp's
docs/gguf.md: magic, version, tensor count, kv count, the kvs, the tensor infos, then the data, aligned.
"""
from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from loaders.base import LoadError

# GGUF metadata value types -> struct format (fixed-size ones); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32
# llama.cpp's gguf-split names the parts of one model `<name>-00001-of-00003.gguf`.
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type_name: str              # ggml type, e.g. "Q4_K", "F32"; "type 42" when the gguf package does not know it
    shape: tuple[int, ...]      # ggml order: shape[0] is the contiguous (input) axis


@dataclass
class GGUFHeader:
    metadata: dict = field(default_factory=dict)   # scalar and string values; arrays as their length
    tensors: list[TensorEntry] = field(default_factory=list)


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def read_header(path: Path, wanted: set[str] | None = None) -> GGUFHeader:
    """The header of one GGUF file. With `wanted`, only those metadata keys, stopping once they are all found
    (tensors are then not read); else every key and every tensor, and the data section is checked to be
    complete. LoadError names the file when it is not a GGUF file, damaged or truncated."""
    header = GGUFHeader()
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            pos = 24

            def string(at: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", buf, at)
                if at + 8 + n > len(buf):
                    raise ValueError("a string runs past the end of the file")
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
                    if item_kind in _SCALARS:
                        return count, at + count * struct.calcsize(_SCALARS[item_kind])
                    for _ in range(count):
                        _, at = value(item_kind, at)
                    return count, at
                raise ValueError(f"unknown GGUF value type {kind}")

            for _ in range(kv_count):
                key, pos = string(pos)
                (kind,) = struct.unpack_from("<I", buf, pos)
                item, pos = value(kind, pos + 4)
                if wanted is None or key in wanted:
                    header.metadata[key] = item
                    if wanted is not None and len(header.metadata) == len(wanted):
                        return header
            if wanted is not None:
                return header
            end = 0
            for _ in range(tensor_count):
                name, pos = string(pos)
                (dims,) = struct.unpack_from("<I", buf, pos)
                shape = struct.unpack_from(f"<{dims}Q", buf, pos + 4)
                type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * dims)
                pos += 4 + 8 * dims + 12
                entry = TensorEntry(name, _type_name(type_id), tuple(shape))
                header.tensors.append(entry)
                end = max(end, offset + tensor_bytes(entry))
            align = int(header.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
            data_start = -(-pos // align) * align
            if data_start + end > len(buf):
                raise ValueError(f"truncated: its tensors need {data_start + end} bytes, the file has {len(buf)}")
    except (OSError, ValueError, struct.error) as exc:
        raise LoadError(f"{path.name} is not a readable GGUF file ({exc})") from None
    return header


def read_model_header(path: Path) -> GGUFHeader:
    """The header of the model `path` starts: its metadata, and the tensors of every part when it is split."""
    parts = split_parts(path)
    header = read_header(parts[0])
    for part in parts[1:]:          # a truncated or damaged part fails here, by name
        header.tensors.extend(read_header(part).tensors)
    return header


def tensor_bytes(entry: TensorEntry) -> int:
    """Bytes of a tensor's data; 0 for a type the gguf package does not know (the engine refuses those)."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[entry.type_name]]
    except KeyError:
        return 0
    count = 1
    for n in entry.shape:
        count *= n
    return count // block * size


def split_parts(path: Path) -> list[Path]:
    """Every file of the model `path` belongs to: the parts of a `-0000k-of-0000n.gguf` set, else [path].
    LoadError when a part is missing."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise LoadError(f"{path.name} is part of a split model whose part(s) {', '.join(missing)} are missing")
    return parts


def model_files(model_dir: Path) -> list[Path]:
    """One entry per model in the folder: each .gguf file, except that a split set is listed once, by its
    first part. TheBloke-style -GGUF repos hold a dozen quantizations side by side."""
    files = sorted(p for p in model_dir.glob("*.gguf") if p.is_file())
    chosen = []
    for p in files:
        m = SPLIT_NAME.match(p.name)
        if m is None or int(m["part"]) == 1:
            chosen.append(p)
    return chosen


def gguf_chat_template(model_dir: Path) -> str | None:
    """The chat template in the metadata of the folder's first GGUF model (the quantizations of one repo
    share it), or None. A damaged file gives None here; the loader reports it."""
    files = model_files(model_dir)
    if not files:
        return None
    try:
        template = read_header(files[0], {"tokenizer.chat_template"}).metadata.get("tokenizer.chat_template")
    except LoadError:
        return None
    return template if isinstance(template, str) and template.strip() else None
