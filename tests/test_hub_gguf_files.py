"""GGUF repos' file lists by quant type (hub/gguf_files.py): the type read from the file name, split sets counted
once with all their bytes, the groups in the cards' order with their quality notes."""
from __future__ import annotations

import pytest

from hub.gguf_files import QUANT_NOTES, UNKNOWN, group_by_quant, quant_type
from hub.listing import RemoteFile


def remote(path: str, size: int) -> RemoteFile:
    return RemoteFile(path=path, size=size, git_oid=None, sha256="0" * 64)


@pytest.mark.parametrize("name, quant", [
    ("llama-2-7b-chat.Q4_K_M.gguf", "Q4_K_M"),          # TheBloke
    ("Qwen3-8B-UD-IQ4_XS.gguf", "IQ4_XS"),              # unsloth
    ("gemma-3-12b-it-Q5_K_L.gguf", "Q5_K_L"),           # bartowski
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),        # the default model
    ("model-q8_0.gguf", "Q8_0"),                        # lower case
    ("phi-4-fp16.gguf", "F16"),                         # an alias
    ("Llama-3.1-70B-Instruct-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),   # a split part
    ("sub/dir/model.BF16.gguf", "BF16"),
    ("mistral.Q2_K.gguf", "Q2_K"),
    ("model.gguf", UNKNOWN),
    ("q4_0-notes.txt.Q4_K_S.gguf", "Q4_K_S"),           # the last type in the name is the file's
    ("xQ4_0y.gguf", UNKNOWN),                           # only whole words count
])
def test_the_quant_type_comes_from_the_file_name(name, quant):
    assert quant_type(name) == quant


def test_files_group_by_type_smallest_type_first_with_the_cards_notes_and_split_sets_count_once():
    files = [remote("README.md", 10), remote("config.json", 5),
             remote("m.Q8_0.gguf", 800), remote("m.Q4_K_M.gguf", 450), remote("m.Q2_K.gguf", 300),
             remote("m-imatrix.Q4_K_M.gguf", 440), remote("m.gguf", 100),
             remote("big/m.Q6_K-00002-of-00002.gguf", 200), remote("big/m.Q6_K-00001-of-00002.gguf", 500)]
    groups = group_by_quant(files)
    assert [g.quant for g in groups] == ["Q2_K", "Q4_K_M", "Q6_K", "Q8_0", UNKNOWN]
    q4 = groups[1]
    assert (q4.bits, q4.note) == ("4", "medium, balanced quality - recommended")
    assert [(m.path, m.size) for m in q4.models] == [("m-imatrix.Q4_K_M.gguf", 440), ("m.Q4_K_M.gguf", 450)]
    split = groups[2].models
    assert [(m.path, m.size, m.parts) for m in split] == [("big/m.Q6_K-00001-of-00002.gguf", 700, 2)]
    assert groups[0].note.startswith("smallest, significant quality loss")
    assert groups[-1].bits == "" and "does not say" in groups[-1].note
    assert all(note for _, note in QUANT_NOTES.values())


def test_a_repo_without_gguf_files_has_no_groups():
    assert group_by_quant([remote("model.safetensors", 10), remote("config.json", 1)]) == []
