"""What users type into the Download box: accepted forms, and one-sentence refusals (traversal included)."""
from __future__ import annotations

import pytest

from hub.errors import InvalidRepoSpec
from hub.repo_id import RepoRef, parse_repo_spec


@pytest.mark.parametrize("text, expected", [
    ("TheBloke/Llama-2-7b-Chat-GPTQ", RepoRef("TheBloke", "Llama-2-7b-Chat-GPTQ")),
    ("  TheBloke/Llama-2-7b-Chat-GPTQ:gptq-4bit-32g-actorder_True ",
     RepoRef("TheBloke", "Llama-2-7b-Chat-GPTQ", "gptq-4bit-32g-actorder_True")),
    ("TheBloke/LLongMA-2-7B-GPTQ:gptq-8bit--1g-actorder_True",
     RepoRef("TheBloke", "LLongMA-2-7B-GPTQ", "gptq-8bit--1g-actorder_True")),
    ("https://huggingface.co/TheBloke/Llama-2-7b-Chat-GPTQ", RepoRef("TheBloke", "Llama-2-7b-Chat-GPTQ")),
    ("https://huggingface.co/TheBloke/Llama-2-7b-Chat-GPTQ/", RepoRef("TheBloke", "Llama-2-7b-Chat-GPTQ")),
    ("https://huggingface.co/TheBloke/Llama-2-7b-Chat-GPTQ/tree/gptq-4bit-64g-actorder_True",
     RepoRef("TheBloke", "Llama-2-7b-Chat-GPTQ", "gptq-4bit-64g-actorder_True")),
    ("https://hf.co/TheBloke/Llama-2-7b-Chat-GPTQ/resolve/main/quantize_config.json",
     RepoRef("TheBloke", "Llama-2-7b-Chat-GPTQ", "main", "quantize_config.json")),
    ("https://huggingface.co/TheBloke/Mistral-7B-GGUF/blob/main/sub/mistral.Q4_K_M.gguf?download=true",
     RepoRef("TheBloke", "Mistral-7B-GGUF", "main", "sub/mistral.Q4_K_M.gguf")),
    ("https://huggingface.co/org/repo/tree/feature%2Fnew", RepoRef("org", "repo", "feature/new")),
])
def test_accepted_forms(text, expected):
    assert parse_repo_spec(text) == expected


def test_folder_names_follow_the_branch():
    assert parse_repo_spec("TheBloke/Llama-2-7b-Chat-GPTQ").folder_name == "TheBloke_Llama-2-7b-Chat-GPTQ"
    assert (parse_repo_spec("TheBloke/Llama-2-7b-Chat-GPTQ:gptq-4bit-32g-actorder_True").folder_name
            == "TheBloke_Llama-2-7b-Chat-GPTQ_gptq-4bit-32g-actorder_True")
    assert parse_repo_spec("org/repo:feature/x").folder_name == "org_repo_feature_x"


def test_specific_file_option_overrides_and_is_validated():
    ref = parse_repo_spec("TheBloke/Mistral-7B-GGUF", file="mistral.Q4_K_M.gguf")
    assert ref.file == "mistral.Q4_K_M.gguf"
    with pytest.raises(InvalidRepoSpec):
        parse_repo_spec("TheBloke/Mistral-7B-GGUF", file="../../etc/passwd")


def test_mirror_host_from_hf_endpoint_is_accepted(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8123")
    assert parse_repo_spec("http://127.0.0.1:8123/org/repo/tree/dev") == RepoRef("org", "repo", "dev")


@pytest.mark.parametrize("text", [
    "", "   ", "Llama-2-7b-Chat-GPTQ", "a/b/c", "/name", "owner/", "owner//name",
    "../TheBloke", "TheBloke/..", "../../etc/passwd", "TheBloke/../x", "..:main",
    "TheBloke/Llama..2", "Owner/na--me", "owner/name:", "owner/name:../../x", "owner/name:-rf",
    "owner/name:a..b", "owner/name:/abs", "owner/name:bad branch", "owner/name:x;rm -rf",
    "owner/na me", "owner\\name", "https://evil.example.com/owner/name", "https://huggingface.co/owner",
    "https://huggingface.co/TheBloke/Llama-2-7b-Chat-GPTQ/resolve/main/../../../etc/passwd",
    "https://huggingface.co/TheBloke/Llama-2-7b-Chat-GPTQ/resolve/main/%2E%2E/x",
    "https://huggingface.co/%2E%2E/x", "https://huggingface.co/TheBloke/Llama-2-7b-Chat-GPTQ/commits/main",
])
def test_refused_with_one_sentence(text):
    with pytest.raises(InvalidRepoSpec) as info:
        parse_repo_spec(text)
    message = str(info.value)
    assert message and "\n" not in message and message.rstrip().endswith(".")
