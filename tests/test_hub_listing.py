"""Listing through huggingface_hub against the test Hub: refs, recursive trees, selection rules, errors."""
from __future__ import annotations

import pytest

from hub.errors import ChoiceNeeded, EntryNotFound, GatedRepo, RepoNotFound, RevisionNotFound, UnsafePath
from hub.listing import list_branches, list_files, select_files
from hub.repo_id import parse_repo_spec
from hub_fixtures import AIROBOROS_AWQ, GATED_REPO, GATED_TOKEN, GPTQ_BRANCHES, LLAMA2_CHAT_GPTQ, random_bytes


def paths(selection):
    return sorted(f.path for f in selection.files)


def test_branches_main_first(hub_env):
    assert list_branches(parse_repo_spec(LLAMA2_CHAT_GPTQ)) == [
        "main", "gptq-4bit-128g-actorder_True", "gptq-4bit-32g-actorder_True", "gptq-4bit-64g-actorder_True"]
    assert set(list_branches(parse_repo_spec(LLAMA2_CHAT_GPTQ))) == set(GPTQ_BRANCHES)


def test_listing_has_sizes_lfs_sha256_and_the_branch_commit(hub_env):
    commits = {b: hub_env.repos[LLAMA2_CHAT_GPTQ].branches[b] for b in GPTQ_BRANCHES}
    listing = list_files(parse_repo_spec(f"{LLAMA2_CHAT_GPTQ}:gptq-4bit-32g-actorder_True"))
    assert listing.commit == commits["gptq-4bit-32g-actorder_True"] != commits["main"]
    by_path = {f.path: f for f in listing.files}
    weights = by_path["model.safetensors"]
    blob = hub_env.repos[LLAMA2_CHAT_GPTQ].commits[listing.commit]["model.safetensors"]
    assert weights.is_lfs and weights.sha256 == blob.sha256 and weights.size == blob.size == 256 * 1024
    config = by_path["quantize_config.json"]
    assert not config.is_lfs and config.git_oid == hub_env.repos[LLAMA2_CHAT_GPTQ].commits[listing.commit][
        "quantize_config.json"].git_sha1


def test_recursive_listing_reaches_every_subfolder(hub_env):
    hub_env.add_repo("org/nested", {
        "config.json": b"{}", "text_encoder/config.json": b"{}",
        "a/b/c/model.safetensors": random_bytes(1000, 1), "a/b/tokenizer/tokenizer.json": b"{}",
    })
    listing = list_files(parse_repo_spec("org/nested"))
    assert sorted(f.path for f in listing.files) == [
        "a/b/c/model.safetensors", "a/b/tokenizer/tokenizer.json", "config.json", "text_encoder/config.json"]
    assert paths(select_files(listing)) == sorted(f.path for f in listing.files)


def test_safetensors_preferred_and_small_files_always_kept(hub_env):
    hub_env.add_repo("org/both-formats", {
        "config.json": b"{}", "generation_config.json": b"{}", "tokenizer.model": random_bytes(500, 2),
        "tokenizer_config.json": b"{}", "chat_template.jinja": b"{{ messages }}", "README.md": b"# card",
        "merges.txt": b"a b", "LICENSE": b"license", ".gitattributes": b"*.bin lfs",
        "model.safetensors": random_bytes(2000, 3), "model.safetensors.index.json": b"{}",
        "pytorch_model.bin": random_bytes(2000, 4), "pytorch_model.bin.index.json": b"{}",
        "consolidated.pt": random_bytes(100, 5), "onnx/model.onnx": random_bytes(100, 6), "logo.png": b"\x89PNG",
        "sub/config.json": b"{}", "hearth-download.json": b"{}",
    })
    selection = select_files(list_files(parse_repo_spec("org/both-formats")))
    assert paths(selection) == sorted([
        "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
        "README.md", "merges.txt", "LICENSE", "model.safetensors", "model.safetensors.index.json",
        "sub/config.json"])
    assert selection.skipped["pytorch_model.bin"] == "safetensors weights are preferred"
    assert {"consolidated.pt", "pytorch_model.bin.index.json", ".gitattributes", "logo.png", "onnx/model.onnx",
            "hearth-download.json"} <= set(selection.skipped)


def test_pickle_weights_taken_when_there_is_no_safetensors(hub_env):
    hub_env.add_repo("org/old-style", {"config.json": b"{}", "pytorch_model.bin": random_bytes(100, 1)})
    assert paths(select_files(list_files(parse_repo_spec("org/old-style")))) == ["config.json", "pytorch_model.bin"]


def test_awq_repo_takes_every_shard_and_quant_config(hub_env):
    selection = select_files(list_files(parse_repo_spec(AIROBOROS_AWQ)))
    assert {"quant_config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "tokenizer.model"} <= set(paths(selection))


def test_several_gguf_files_ask_which_one(hub_env):
    hub_env.add_repo("TheBloke/Mistral-7B-GGUF", {
        "config.json": b"{}", "README.md": b"# card",
        "mistral.Q4_K_M.gguf": random_bytes(300, 1), "mistral.Q8_0.gguf": random_bytes(300, 2)})
    listing = list_files(parse_repo_spec("TheBloke/Mistral-7B-GGUF"))
    with pytest.raises(ChoiceNeeded) as info:
        select_files(listing)
    assert info.value.choices == ["mistral.Q4_K_M.gguf", "mistral.Q8_0.gguf"]
    assert "pick one" in str(info.value)
    assert paths(select_files(listing, specific_file="mistral.Q8_0.gguf")) == ["mistral.Q8_0.gguf"]


def test_a_single_gguf_is_the_model(hub_env):
    hub_env.add_repo("org/one-gguf", {"README.md": b"# card", "m.Q4_0.gguf": random_bytes(300, 1),
                                      "pytorch_model.bin": random_bytes(300, 2)})
    selection = select_files(list_files(parse_repo_spec("org/one-gguf")))
    assert paths(selection) == ["README.md", "m.Q4_0.gguf"]


def test_specific_file_from_a_resolve_url(hub_env):
    ref = parse_repo_spec(f"https://huggingface.co/{LLAMA2_CHAT_GPTQ}/resolve/gptq-4bit-64g-actorder_True/"
                          f"quantize_config.json")
    assert paths(select_files(list_files(ref))) == ["quantize_config.json"]


def test_repo_not_found(hub_env):
    with pytest.raises(RepoNotFound) as info:
        list_files(parse_repo_spec("TheBloke/No-Such-Model-GPTQ"))
    assert "TheBloke/No-Such-Model-GPTQ" in str(info.value)


def test_branch_not_found(hub_env):
    with pytest.raises(RevisionNotFound) as info:
        list_files(parse_repo_spec(f"{LLAMA2_CHAT_GPTQ}:gptq-3bit-7g-actorder_Maybe"))
    assert "gptq-3bit-7g-actorder_Maybe" in str(info.value) and "List branches" in str(info.value)


def test_file_not_found(hub_env):
    listing = list_files(parse_repo_spec(LLAMA2_CHAT_GPTQ, file="model.Q4_K_M.gguf"))
    with pytest.raises(EntryNotFound) as info:
        select_files(listing)
    assert "model.Q4_K_M.gguf" in str(info.value)


def test_gated_repo_says_how_to_set_a_token(hub_env, monkeypatch):
    for call in (list_branches, list_files):
        with pytest.raises(GatedRepo) as info:
            call(parse_repo_spec(GATED_REPO))
        assert "HF_TOKEN" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    assert "model.safetensors" in [f.path for f in list_files(parse_repo_spec(GATED_REPO)).files]


@pytest.mark.parametrize("evil_name", ["../../escape.txt", "sub/../../escape.txt", "/etc/escape.txt",
                                       "sub//x.json", "..\\escape.txt"])
def test_server_supplied_names_that_escape_are_refused(hub_env, evil_name, tmp_path):
    hub_env.add_repo("evil/repo", {"config.json": b"{}", evil_name: b"pwned"})
    with pytest.raises(UnsafePath) as info:
        list_files(parse_repo_spec("evil/repo"))
    assert repr(evil_name) in str(info.value)
