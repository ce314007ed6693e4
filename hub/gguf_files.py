"""The GGUF files of a repo, grouped by quant type, with sizes and a short quality note.

A -GGUF repo (TheBloke's, bartowski's, unsloth's) holds one file per quantization in one branch, and the
quant type is only in the file name (`llama-2-7b-chat.Q4_K_M.gguf`, `Qwen3-8B-UD-IQ4_XS.gguf`). The notes are
what those repos' cards say in their "Provided files" tables ("Use case"), so the Download tab can show the
same guidance before anything is downloaded. Large models come split as `name-00001-of-00003.gguf`: a set is
one model, listed once with the size of all its parts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from hub.listing import RemoteFile

# Quant type -> (bits per weight as the cards give them, the cards' note). Smallest first: the table's order.
QUANT_NOTES: dict[str, tuple[str, str]] = {
    "IQ1_S": ("1", "extremely small, very high quality loss"),
    "IQ1_M": ("1", "extremely small, very high quality loss"),
    "IQ2_XXS": ("2", "very small, very high quality loss"),
    "IQ2_XS": ("2", "very small, high quality loss"),
    "IQ2_S": ("2", "very small, high quality loss"),
    "IQ2_M": ("2", "very small, high quality loss"),
    "Q2_K": ("2", "smallest, significant quality loss - not recommended for most purposes"),
    "Q2_K_L": ("2", "smallest, significant quality loss - not recommended for most purposes"),
    "IQ3_XXS": ("3", "very small, high quality loss"),
    "IQ3_XS": ("3", "very small, high quality loss"),
    "IQ3_S": ("3", "small, high quality loss"),
    "IQ3_M": ("3", "small, substantial quality loss"),
    "Q3_K_S": ("3", "very small, high quality loss"),
    "Q3_K_M": ("3", "very small, high quality loss"),
    "Q3_K_L": ("3", "small, substantial quality loss"),
    "Q3_K_XL": ("3", "small, substantial quality loss"),
    "IQ4_XS": ("4", "small, lower quality loss than Q4_K_S at a similar size"),
    "IQ4_NL": ("4", "small, lower quality loss than Q4_0 at the same size"),
    "Q4_0": ("4", "legacy; small, very high quality loss - prefer using Q3_K_M"),
    "Q4_1": ("4", "legacy; small, higher accuracy than Q4_0, lower than Q5_0"),
    "Q4_K_S": ("4", "small, greater quality loss"),
    "Q4_K_M": ("4", "medium, balanced quality - recommended"),
    "Q4_K_L": ("4", "medium, balanced quality - recommended"),
    "Q4_K_XL": ("4", "medium, balanced quality - recommended"),
    "Q5_0": ("5", "legacy; medium, balanced quality - prefer using Q4_K_M"),
    "Q5_1": ("5", "legacy; medium, low quality loss - prefer using Q5_K_M"),
    "Q5_K_S": ("5", "large, low quality loss - recommended"),
    "Q5_K_M": ("5", "large, very low quality loss - recommended"),
    "Q5_K_L": ("5", "large, very low quality loss - recommended"),
    "Q5_K_XL": ("5", "large, very low quality loss - recommended"),
    "Q6_K": ("6", "very large, extremely low quality loss"),
    "Q6_K_L": ("6", "very large, extremely low quality loss"),
    "Q6_K_XL": ("6", "very large, extremely low quality loss"),
    "Q8_0": ("8", "very large, extremely low quality loss - not recommended"),
    "Q8_K_XL": ("8", "very large, extremely low quality loss - not recommended"),
    "BF16": ("16", "unquantized, as trained; the largest"),
    "F16": ("16", "unquantized (16-bit floats); the largest"),
    "F32": ("32", "unquantized 32-bit floats; twice the size of F16 for no gain"),
}
# File-name spellings of the same types.
ALIASES = {"FP16": "F16", "FP32": "F32"}
# A type as a whole word of the name: `.Q4_K_M.`, `-IQ4_XS-`, `_q8_0` (the longest spelling wins: Q4_K_M, not Q4_K).
_TYPE = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(sorted(list(QUANT_NOTES) + list(ALIASES), key=len, reverse=True))
                   + r")(?![A-Za-z0-9])", re.IGNORECASE)
# llama.cpp's gguf-split part names.
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
UNKNOWN = "other"


@dataclass(frozen=True)
class GgufModel:
    path: str            # the file to download; for a split set its -00001-of-N part
    size: int            # bytes, every part counted
    parts: int           # 1, or the number of parts of a split set
    quant: str           # e.g. "Q4_K_M"; UNKNOWN when the name does not say


@dataclass(frozen=True)
class GgufGroup:
    quant: str
    bits: str            # "" for UNKNOWN
    note: str
    models: list[GgufModel]


def quant_type(file_name: str) -> str:
    """The quant type a GGUF file's name gives (the last one in it, as in `model-Q8_0.Q4_K_M.gguf`), or UNKNOWN."""
    stem = PurePosixPath(file_name).name
    split = _SPLIT.match(stem)
    stem = split["stem"] if split else stem.removesuffix(".gguf").removesuffix(".GGUF")
    found = _TYPE.findall(stem)
    if not found:
        return UNKNOWN
    name = found[-1].upper()
    return ALIASES.get(name, name)


def gguf_models(files: list[RemoteFile]) -> list[GgufModel]:
    """One entry per model among the repo's .gguf files: a split set once (its first part, all parts' bytes)."""
    sets: dict[tuple[str, str], list[RemoteFile]] = {}
    single: list[GgufModel] = []
    for f in files:
        if not f.path.lower().endswith(".gguf"):
            continue
        split = _SPLIT.match(PurePosixPath(f.path).name)
        if split:
            folder = str(PurePosixPath(f.path).parent)
            sets.setdefault((folder, split["stem"] + split["count"]), []).append(f)
        else:
            single.append(GgufModel(f.path, f.size, 1, quant_type(f.path)))
    for parts in sets.values():
        first = min(parts, key=lambda f: f.path)
        single.append(GgufModel(first.path, sum(f.size for f in parts), len(parts), quant_type(first.path)))
    return sorted(single, key=lambda m: m.path)


def group_by_quant(files: list[RemoteFile]) -> list[GgufGroup]:
    """The repo's GGUF models grouped by quant type, smallest type first (the cards' order), unknown names last;
    within a group, smallest file first."""
    groups: dict[str, list[GgufModel]] = {}
    for model in gguf_models(files):
        groups.setdefault(model.quant, []).append(model)
    order = list(QUANT_NOTES) + [UNKNOWN]
    result = []
    for quant in sorted(groups, key=order.index):
        bits, note = QUANT_NOTES.get(quant, ("", "the file name does not say which quant type it holds"))
        result.append(GgufGroup(quant, bits, note, sorted(groups[quant], key=lambda m: (m.size, m.path))))
    return result
