"""A model's config.json is checked against its weight files and the device's memory before any layer or cache
is built (issue 14, finding 6): impossible sizes are refused at once with a message naming the file and field
(never an option the user did not set), and a load shows its KV cache and weights estimate.

The faulty folders are the real default model with one config.json field changed (the weights are linked)."""
import json
import subprocess
import sys
import time

import pytest

from loaders.base import LoadError
from loaders.config_check import device_memory
from tests.conftest import DEFAULT_MODEL, REPO, make_state

# The default model keeps 30 layers x 3 KV heads x 64 x 2 (K and V) x 4 bytes (fp32 on CPU) a token: 45 KiB.
CPU_KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4
# Far below what building 1e9 layers or allocating terabytes would take; generous for a loaded 2-core machine.
QUICK_SECONDS = 60


def faulty(models_dir, default_model_dir, name: str, **changes):
    """models/<name>: the default model with `changes` made to its config.json."""
    folder = models_dir / name
    folder.mkdir()
    for path in default_model_dir.iterdir():
        if path.name != "config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((default_model_dir / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return name


def refused(state, name: str, *args) -> str:
    started = time.monotonic()
    with pytest.raises(LoadError) as err:
        state.load_model(name, *args)
    assert time.monotonic() - started < QUICK_SECONDS, "refused before building anything"
    assert state.model is None
    return str(err.value)


@pytest.mark.parametrize("runtime", ["auto", "transformers"])
def test_a_layer_count_beyond_the_weights_is_refused_naming_file_and_field(models_dir, default_model_dir, runtime):
    name = faulty(models_dir, default_model_dir, "layers-1e9", num_hidden_layers=1e9)
    message = refused(make_state(models_dir), name, "transformers", {"runtime": runtime})
    assert message == ("layers-1e9: config.json num_hidden_layers is 1000000000 but the weights (model.safetensors) "
                       "hold 30 layers: the config does not match the weights")


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", 1024, "config.json hidden_size is 1024 but model.embed_tokens.weight in model.safetensors is "
                          "49152 x 576"),
    ("vocab_size", 10**6, "config.json vocab_size is 1000000 but model.embed_tokens.weight in model.safetensors "
                          "has 49152 rows"),
    ("num_attention_heads", 0, "config.json num_attention_heads must be a positive whole number (got 0)"),
    ("num_key_value_heads", 2.5, "config.json num_key_value_heads must be a positive whole number (got 2.5)"),
])
def test_sizes_that_do_not_match_the_weights_are_refused(models_dir, default_model_dir, field, value, expected):
    name = faulty(models_dir, default_model_dir, f"bad-{field}", **{field: value})
    assert expected in refused(make_state(models_dir), name, "transformers", {"runtime": "transformers"})


def test_a_context_from_config_json_that_no_memory_holds_names_config_json_not_an_option(models_dir,
                                                                                         default_model_dir):
    """max_position_embeddings 1e12 asked for a 768 TB cache and the error blamed gpu_split."""
    name = faulty(models_dir, default_model_dir, "context-1e12", max_position_embeddings=1e12)
    state = make_state(models_dir)
    # As the UI, the API and the CLI load it: the context comes from the model's metadata.
    message = refused(state, name)
    assert "config.json max_position_embeddings of context-1e12" in message and "1000000000000" in message
    assert "set the context_length option for this model" in message
    # A loader asked directly (no saved or metadata options): the KV cache check names the field.
    message = refused(state, name, "transformers", {"runtime": "auto"})
    assert "a KV cache for 1000000000000 tokens (config.json max_position_embeddings)" in message
    assert "gpu_split" not in message


def test_a_kv_cache_larger_than_the_device_is_refused_naming_what_set_the_context(models_dir, default_model_dir):
    too_long = device_memory("cpu") // CPU_KV_BYTES_PER_TOKEN + 1024   # outgrows this machine's RAM
    name = faulty(models_dir, default_model_dir, "context-beyond-ram", max_position_embeddings=too_long)
    state = make_state(models_dir)
    message = refused(state, name, "transformers", {"device": "cpu"})
    assert f"a KV cache for {too_long} tokens (config.json max_position_embeddings)" in message
    fits = int(message.rsplit("at most ", 1)[1].split()[0])
    assert 8192 < fits < too_long
    if too_long <= 1048576:   # the context_length option's own maximum
        message = refused(state, DEFAULT_MODEL, "transformers", {"context_length": too_long, "device": "cpu"})
        assert f"a KV cache for {too_long} tokens (the context_length option)" in message
    model = state.load_model(name, "transformers", {"context_length": 8192, "device": "cpu"})
    assert model.context_length == 8192
    state.unload_model()


def test_a_load_shows_its_kv_cache_and_weights_estimate(models_dir):
    state = make_state(models_dir)
    model = state.load_model(DEFAULT_MODEL, "transformers", {"context_length": 4096, "device": "cpu"})
    assert model.memory.startswith("KV cache 4096 tokens ≈ 180.0 MiB, weights ≈ "), model.memory  # 4096 x 45 KiB
    state.unload_model()


def test_inspect_shows_the_estimate_and_why_a_load_would_be_refused(models_dir, default_model_dir):
    faulty(models_dir, default_model_dir, "context-1e9", max_position_embeddings=10**9)

    def inspect(name: str) -> dict:
        result = subprocess.run([sys.executable, str(REPO / "app.py"), "inspect", "--model", name,
                                 "--models-dir", str(models_dir)], capture_output=True, text=True, timeout=300,
                                cwd=REPO)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["memory"]

    memory = inspect(DEFAULT_MODEL)
    per_token = CPU_KV_BYTES_PER_TOKEN // (1 if memory["device"] == "cpu" else 2)   # bf16 on a GPU
    assert memory["context_length"] == 8192 and memory["kv_cache_bytes"] == 8192 * per_token
    assert memory["summary"].startswith(f"KV cache 8192 tokens ≈ {8192 * per_token / 2**20:.1f} MiB, weights ≈ ")
    problem = inspect("context-1e9")["problem"]   # 42 TiB of cache
    assert "a KV cache for 1000000000 tokens (config.json max_position_embeddings)" in problem
