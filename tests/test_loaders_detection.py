"""Picking the loader from a folder's contents, refusing mismatches, and what `inspect` reports."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from loaders.base import LoadError
from tests.conftest import REPO, make_state
from tests.quant_fixtures import quantize_model_dir, tiny_llama_dir, write_gguf_header_only

# Folders laid out like the seed repos and their branches (TheBloke naming), built from one tiny Llama.
SEED_LIKE = {
    "Llama-2-7b-Chat-GPTQ": (dict(method="gptq", bits=4, group_size=128, desc_act=False,
                                  weight_name="model.safetensors"),
                             "gptq", "GPTQ 4-bit, group 128, sym (quantize_config.json)"),
    "Llama-2-7b-Chat-GPTQ_gptq-4bit-32g-actorder_True": (
        dict(method="gptq", bits=4, group_size=32, desc_act=True, weight_name="gptq_model-4bit-32g.safetensors"),
        "gptq", "GPTQ 4-bit, group 32, act-order, sym (quantize_config.json)"),
    "Llama-2-7b-Chat-GPTQ_gptq-8bit--1g-actorder_True": (
        dict(method="gptq", bits=8, group_size=-1, desc_act=True),
        "gptq", "GPTQ 8-bit, no grouping (group -1), act-order, sym (quantize_config.json)"),
    "Llama-2-7b-Chat-GPTQ_gptq-3bit-128g-actorder_False": (
        dict(method="gptq", bits=3, group_size=128, desc_act=False, shards=2),
        "gptq", "GPTQ 3-bit, group 128, sym (quantize_config.json)"),
    "Llama-2-7b-Chat-GPTQ_gptq-4bit--1g-actorder_True": (
        dict(method="gptq", bits=4, group_size=-1, desc_act=True),
        "gptq", "GPTQ 4-bit, no grouping (group -1), act-order, sym (quantize_config.json)"),
    "airoboros-l2-7B-gpt4-m2.0-AWQ": (dict(method="awq", group_size=128, config_in="quant_config.json"),
                                      "awq", "AWQ 4-bit, group 128, GEMM, zero point (quant_config.json)"),
}


@pytest.fixture(scope="module")
def seed_models(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("seed")
    models = root / "models"
    source = tiny_llama_dir(root / "tiny", hidden=256, intermediate=512, vocab_size=49152,
                            tokenizer_from=default_model_dir)
    for name, (kwargs, _, _) in SEED_LIKE.items():
        quantize_model_dir(source, models / name, **kwargs)
    tiny_llama_dir(models / "plain-fp16", vocab_size=49152, tokenizer_from=default_model_dir)
    write_gguf_header_only(models / "SmolLM2-GGUF" / "smollm2-135m-instruct.Q4_1.gguf")
    # LLongMA-2: a Llama-2 base with linear rope scaling factor 4 over 2048 positions, published as GPTQ.
    llongma = tiny_llama_dir(root / "llongma-src", vocab_size=49152, tokenizer_from=default_model_dir,
                             rope_scaling={"type": "linear", "factor": 4.0})
    config = json.loads((llongma / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (llongma / "config.json").write_text(json.dumps(config))
    quantize_model_dir(llongma, models / "LLongMA-2-7B-GPTQ", method="gptq", bits=4, group_size=128)
    return models


@pytest.mark.parametrize("name", list(SEED_LIKE))
def test_detection_names_the_loader_and_its_reason(seed_models, name):
    _, loader, reason = SEED_LIKE[name]
    best = make_state(seed_models).detect(name)[0]
    assert (best.loader, best.reason) == (loader, reason)


def test_plain_and_gguf_only_folders(seed_models):
    state = make_state(seed_models)
    plain = state.detect("plain-fp16")
    assert plain[0].loader == "transformers" and "unquantized" in plain[0].reason
    assert [d.loader for d in plain] == ["transformers"]
    gguf = state.detect("SmolLM2-GGUF")
    assert [d.loader for d in gguf] == ["gguf", "llama.cpp"]   # llama.cpp next: tests/test_llamacpp.py
    assert gguf[0].reason == "GGUF Q4_1 llama (smollm2-135m-instruct.Q4_1.gguf); Hearth's engine"


def test_choosing_transformers_for_gptq_is_refused_naming_gptq(seed_models):
    state = make_state(seed_models)
    with pytest.raises(LoadError) as refused:
        state.load_model("Llama-2-7b-Chat-GPTQ_gptq-4bit-32g-actorder_True", loader="transformers")
    assert str(refused.value) == (
        "the transformers loader cannot read Llama-2-7b-Chat-GPTQ_gptq-4bit-32g-actorder_True; it looks like "
        "GPTQ 4-bit, group 32, act-order, sym (quantize_config.json): use the gptq loader")
    assert state.model is None


def test_choosing_gptq_for_awq_is_refused_naming_awq(seed_models):
    with pytest.raises(LoadError, match="it looks like AWQ 4-bit, group 128.*use the awq loader"):
        make_state(seed_models).load_model("airoboros-l2-7B-gpt4-m2.0-AWQ", loader="gptq")


def test_malformed_quantize_config_is_reported_not_a_traceback(tmp_path, seed_models):
    import shutil

    folder = tmp_path / "models" / "broken-GPTQ"
    shutil.copytree(seed_models / "Llama-2-7b-Chat-GPTQ", folder)
    (folder / "quantize_config.json").write_text('{"bits": 4, "group_size": ')
    with pytest.raises(LoadError, match="quantize_config.json in broken-GPTQ is not valid JSON"):
        make_state(tmp_path / "models").load_model("broken-GPTQ")


def run_app(*args, models_dir):
    return subprocess.run([sys.executable, str(REPO / "app.py"), *args, "--models-dir", str(models_dir)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_inspect_llongma_reports_gptq_and_rope_scaled_context(seed_models):
    result = run_app("inspect", "--model", "LLongMA-2-7B-GPTQ", models_dir=seed_models)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loader"] == "gptq"
    assert report["reason"] == "GPTQ 4-bit, group 128, sym (quantize_config.json)"
    assert report["quantization"]["bits"] == 4 and report["quantization"]["group_size"] == 128
    assert report["context_length"] == 8192
    assert "rope_scaling linear factor 4" in report["context_source"]
    settings = report["settings"]
    assert settings["loader"]["value"] == "gptq" and settings["loader"]["source"].startswith("detected")
    assert settings["loader_options"]["context_length"] == settings["context_length"]
    assert settings["sampler"]["top_k"]["source"] == "settings.yaml"


def test_generate_runs_a_gptq_folder_on_cpu_with_the_rope_scaled_context(seed_models):
    result = run_app("generate", "--model", "LLongMA-2-7B-GPTQ", "--prompt", "Hello", "--max-new-tokens", "4",
                     "--temperature", "0", models_dir=seed_models)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[[1-4] tokens, [0-9.]+ tok/s", result.stderr), result.stderr


def test_loaded_quantized_model_uses_the_rope_scaled_context(seed_models):
    state = make_state(seed_models)
    model = state.load_model("LLongMA-2-7B-GPTQ")
    assert (model.loader, model.context_length) == ("gptq", 8192)
    assert state.model_settings["context_length"].source.startswith("model (config.json")
    state.unload_model()
