"""Faults while loading and generating: each leaves the app usable, with a clear message and no leak."""
import gc
import json
import shutil

import psutil
import pytest
import torch

from engine.generation import collect
from engine.sampling import GenerationParams
from loaders.base import LoadError
from tests.conftest import DEFAULT_MODEL, make_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def copy_tokenizer(src, dst):
    dst.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)


def test_truncated_weights_give_a_clear_error_and_the_previous_model_is_unloaded(models_dir, default_model_dir):
    broken = models_dir / "truncated-weights"
    copy_tokenizer(default_model_dir, broken)
    shutil.copy(default_model_dir / "config.json", broken / "config.json")
    data = (default_model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])

    state = make_state(models_dir)
    state.load_model(DEFAULT_MODEL)
    with pytest.raises(LoadError, match="truncated-weights"):
        state.load_model("truncated-weights")
    assert state.model is None, "the previous model is unloaded before a load, and nothing half-loaded stays"
    state.load_model(DEFAULT_MODEL)
    text, done, _ = collect(state.generate(state.chat_prompt(
        [{"role": "user", "content": "What is the capital of France?"}]), GenerationParams(temperature=0)))
    assert "Paris" in text


def test_out_of_memory_while_loading_is_reported(models_dir, default_model_dir):
    huge = models_dir / "too-big"
    copy_tokenizer(default_model_dir, huge)
    config = json.loads((default_model_dir / "config.json").read_text())
    # ~4 TB of embeddings: the allocator refuses at once on any machine this runs on.
    config.update(vocab_size=2**22, hidden_size=2**18, num_hidden_layers=1, intermediate_size=8,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=2**18, tie_word_embeddings=True)
    (huge / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    save_file({"unrelated.weight": torch.ones(8)}, huge / "model.safetensors")

    state = make_state(models_dir)
    with pytest.raises(LoadError, match="out of memory loading too-big"):
        # A short context: the embeddings, not the KV cache (checked first, from config.json), are what fail.
        state.load_model("too-big", "transformers", {"runtime": "transformers", "context_length": 256})
    assert state.model is None
    assert psutil.Process().memory_info().rss < 8 * 2**30


def test_exception_mid_generation_ends_the_reply_with_an_error_and_chat_recovers(models_dir, default_model_dir):
    """A real transformers model that breaks after 8 positions (GPT-2 with n_positions=8)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = models_dir / "breaks-at-8"
    copy_tokenizer(default_model_dir, folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=8, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    state = make_state(models_dir)
    state.load_model("breaks-at-8", "transformers", {"context_length": 64})
    prompt = state.raw_prompt("one two three")
    text, done, stats = collect(state.generate(prompt, GenerationParams(temperature=0, max_new_tokens=20)))
    assert done.reason == "error"
    assert "IndexError" in done.error or "index" in done.error.lower()
    assert stats.new_tokens >= 1, "the text generated before the fault is kept"
    # The app recovers: the generation lock is free and a short generation works.
    text, done, _ = collect(state.generate(state.raw_prompt("one"), GenerationParams(temperature=0, max_new_tokens=3)))
    assert done.reason == "max_tokens"


def test_twenty_load_unload_cycles_do_not_grow_memory(models_dir):
    state = make_state(models_dir)
    process = psutil.Process()
    rss = []
    for _ in range(20):
        state.load_model(DEFAULT_MODEL)
        state.unload_model()
        gc.collect()
        rss.append(process.memory_info().rss)
    assert state.model is None
    assert rss[-1] <= rss[0] * 1.10, [f"{r / 2**20:.0f} MiB" for r in rss]
