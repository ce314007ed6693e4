"""Seed-like repos for the Hub test server, and pytest fixtures that start it and point Hearth at it.

Test modules import the fixtures by name: `from hub_fixtures import fake_hub, hub_env  # noqa: F401`.
The README cards are the real TheBloke cards kept in tests/data/hub-model-cards/ (copied from
../shared/model-cards/ so the suite runs anywhere). Weights are small random bytes: these repos test
transport, not inference.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from hub_server import HubServer

CARDS_DIR = Path(__file__).parent / "data" / "hub-model-cards"

LLAMA2_CHAT_GPTQ = "TheBloke/Llama-2-7b-Chat-GPTQ"
LLONGMA_GPTQ = "TheBloke/LLongMA-2-7B-GPTQ"
AIROBOROS_AWQ = "TheBloke/airoboros-l2-7B-gpt4-m2.0-AWQ"
GATED_REPO = "meta-llama/Llama-2-7b-chat-hf"
GATED_TOKEN = "hf_hearth_test_token"

# branch -> (bits, group size, act order), as in the Llama-2-7b-Chat-GPTQ card's "Provided files" table
GPTQ_BRANCHES = {
    "main": (4, 128, False),
    "gptq-4bit-32g-actorder_True": (4, 32, True),
    "gptq-4bit-64g-actorder_True": (4, 64, True),
    "gptq-4bit-128g-actorder_True": (4, 128, True),
}

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32000, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16", "rope_theta": 10000.0,
}


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _json(data) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def tokenizer_files(seed: int = 0) -> dict[str, bytes]:
    return {
        "tokenizer.json": _json({"version": "1.0", "model": {"type": "BPE", "vocab": {"<unk>": 0, "<s>": 1,
                                                                                      "</s>": 2}}}),
        "tokenizer_config.json": _json({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                        "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer"}),
        "special_tokens_map.json": _json({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
        "tokenizer.model": random_bytes(4096, seed),
    }


def llama2_chat_readme() -> str:
    """The Llama-2-7b-Chat-GPTQ card as a README.md: we only have its rendered text, so the front matter and
    the "Provided files" Markdown table are rebuilt from what that rendering shows."""
    rendered = (CARDS_DIR / "Llama-2-7b-Chat-GPTQ.zh-rendered.txt").read_text()
    template = rendered.split("提供的模板:Llama-2-Chat", 1)[1].split("要继续对话", 1)[0].strip("\n") + "\n"
    rows = []
    for line in rendered.splitlines():
        m = re.match(r"^(main|gptq-\S+) (\d+) (\S+) (True|False) ([\d.]+ GB) (True|False) (\S+) (.*)$", line)
        if m:
            branch, bits, gs, act, size, exllama, made_with, desc = m.groups()
            link = f"[{branch}](https://huggingface.co/{LLAMA2_CHAT_GPTQ}/tree/{branch})"
            rows.append(f"| {link} | {bits} | {gs} | {'Yes' if act == 'True' else 'No'} | {size} | "
                        f"{'Yes' if exllama == 'True' else 'No'} | {made_with} | {desc} |")
    front = {"base_model": "meta-llama/Llama-2-7b-chat-hf", "inference": False, "license": "llama2",
             "model_creator": "Meta Llama 2", "model_name": "Llama 2 7B Chat", "model_type": "llama",
             "prompt_template": template, "quantized_by": "TheBloke"}
    import yaml
    table = ("| Branch | Bits | GS | Act Order | Size | ExLlama | Made With | Desc |\n"
             "| ------ | ---- | -- | --------- | ---- | ------- | --------- | ---- |\n" + "\n".join(rows) + "\n")
    return (f"---\n{yaml.safe_dump(front, sort_keys=True, allow_unicode=True)}---\n"
            f"# Llama 2 7B Chat - GPTQ\n\n## Provided files and GPTQ parameters\n\n{table}\n{rendered}")


def gptq_branch_files(branch: str, weight_size: int = 256 * 1024) -> dict[str, bytes]:
    bits, group, act = GPTQ_BRANCHES[branch]
    seed = sum(map(ord, branch))
    quantize_config = {"bits": bits, "group_size": group, "damp_percent": 0.01, "desc_act": act,
                       "static_groups": False, "sym": True, "true_sequential": True, "model_name_or_path": None,
                       "model_file_base_name": "model", "quant_method": "gptq"}
    config = {**LLAMA_CONFIG, "quantization_config": {**quantize_config, "checkpoint_format": "gptq"}}
    return {
        "config.json": _json(config),
        "quantize_config.json": _json(quantize_config),
        "generation_config.json": _json({"bos_token_id": 1, "eos_token_id": 2, "do_sample": True,
                                         "temperature": 0.6, "top_p": 0.9}),
        **tokenizer_files(seed),
        "README.md": llama2_chat_readme().encode(),
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "model.safetensors": random_bytes(weight_size, seed),
    }


def add_llama2_chat_gptq(hub: HubServer, weight_size: int = 256 * 1024) -> dict[str, str]:
    """TheBloke/Llama-2-7b-Chat-GPTQ with its four branches; returns branch -> commit sha."""
    return {branch: hub.add_repo(LLAMA2_CHAT_GPTQ, gptq_branch_files(branch, weight_size), branch=branch)
            for branch in GPTQ_BRANCHES}


def add_llongma_gptq(hub: HubServer) -> str:
    files = {"config.json": _json(LLAMA_CONFIG), "README.md": (CARDS_DIR / "LLongMA-2-7B-GPTQ.README.md").read_bytes(),
             "quantize_config.json": _json({"bits": 4, "group_size": 128, "desc_act": False, "sym": True}),
             "model.safetensors": random_bytes(64 * 1024, 7)}
    return hub.add_repo(LLONGMA_GPTQ, files)


def add_airoboros_awq(hub: HubServer) -> str:
    """An AWQ repo as TheBloke published them: quant_config.json, sharded safetensors with an index."""
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {"total_size": 2 * 128 * 1024},
             "weight_map": {"model.embed_tokens.weight": shard_names[0], "lm_head.weight": shard_names[1]}}
    files = {
        "config.json": _json({**LLAMA_CONFIG, "quantization_config": {"quant_method": "awq", "zero_point": True,
                                                                      "group_size": 128, "bits": 4,
                                                                      "version": "gemm"}}),
        "quant_config.json": _json({"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"}),
        "generation_config.json": _json({"bos_token_id": 1, "eos_token_id": 2}),
        **tokenizer_files(3),
        "README.md": (CARDS_DIR / "airoboros-l2-7B-gpt4-m2.0-AWQ.README.txt").read_bytes(),
        "model.safetensors.index.json": _json(index),
        shard_names[0]: random_bytes(128 * 1024, 11),
        shard_names[1]: random_bytes(128 * 1024, 12),
    }
    return hub.add_repo(AIROBOROS_AWQ, files)


def add_gated_repo(hub: HubServer) -> str:
    files = {"config.json": _json(LLAMA_CONFIG), "model.safetensors": random_bytes(32 * 1024, 5)}
    return hub.add_repo(GATED_REPO, files, gated_token=GATED_TOKEN)


def add_seed_repos(hub: HubServer, weight_size: int = 256 * 1024) -> dict[str, str]:
    commits = add_llama2_chat_gptq(hub, weight_size)
    add_llongma_gptq(hub)
    add_airoboros_awq(hub)
    add_gated_repo(hub)
    return commits


def hub_environment(hub_url: str, hf_home: Path) -> dict[str, str]:
    """Environment variables that keep huggingface_hub and gradio on the test server and off the internet."""
    return {"HF_ENDPOINT": hub_url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture
def fake_hub(tmp_path):
    """A running Hub server holding the seed repos."""
    with HubServer(tmp_path / "hub-server") as server:
        add_seed_repos(server)
        yield server


@pytest.fixture
def hub_env(fake_hub, tmp_path, monkeypatch):
    """Point Hearth (and huggingface_hub) at `fake_hub` for this test; no token unless a test sets one."""
    for key, value in hub_environment(fake_hub.url, tmp_path / "hf-home").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # conftest.py sets HF_HUB_OFFLINE=1 for the suite and huggingface_hub reads it once, at import; this
    # test talks to its own server on 127.0.0.1, so switch offline mode off for its duration only.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return fake_hub
