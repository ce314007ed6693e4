"""Issue 9 item 2 gaps not covered by test_security.py / test_hub_*.py / test_cli.py: pickled weights and
model-shipped Python code never run without a per-model opt-in, and the files Hearth writes for the user
(saved settings, conversations) are private to the user and leave no temp files behind."""
from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loaders.base import LoadError
from prompts.conversations import ConversationStore
from quant_fixtures import tiny_llama_dir
from tests.conftest import make_state

# Imported by transformers only if it runs the model's own code: the marker file proves it ran.
SHIPPED_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("the model's Python code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class ShippedConfig(LlamaConfig):
    model_type = "llama"
class ShippedModel(LlamaForCausalLM):
    config_class = ShippedConfig
'''


@pytest.fixture
def pickle_only_model(tmp_path, default_model_dir):
    models = tmp_path / "models"
    folder = tiny_llama_dir(models / "tiny-pickle", vocab_size=49152, tokenizer_from=default_model_dir)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return models


def test_pickled_weights_are_refused_until_this_model_opts_in(pickle_only_model):
    state = make_state(pickle_only_model)
    with pytest.raises(LoadError, match="only has pickled weights.*enable allow_pickle"):
        state.load_model("tiny-pickle")
    assert state.model is None
    # The opt-in is per model, saved in config-user.yaml: the next load reads the pickle.
    state.save_model_settings("tiny-pickle", {"loader": "transformers",
                                              "loader_options": {"allow_pickle": True, "runtime": "transformers"}})
    model = state.load_model("tiny-pickle")
    assert model.name == "tiny-pickle"
    state.unload_model()


def test_model_shipped_code_runs_only_with_trust_remote_code(tmp_path, default_model_dir):
    models = tmp_path / "models"
    folder = tiny_llama_dir(models / "tiny-remote-code", vocab_size=49152, tokenizer_from=default_model_dir)
    marker = tmp_path / "shipped-code-ran"
    (folder / "shipped.py").write_text(SHIPPED_CODE.format(marker=str(marker)))
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace(
        '"model_type": "llama"',
        '"model_type": "llama", "auto_map": {"AutoConfig": "shipped.ShippedConfig", '
        '"AutoModelForCausalLM": "shipped.ShippedModel"}', 1))
    assert '"auto_map"' in (folder / "config.json").read_text()

    state = make_state(models)
    for runtime in ("transformers", "auto"):
        # Without the opt-in the folder loads as the standard architecture its config names.
        model = state.load_model("tiny-remote-code", "transformers", {"runtime": runtime})
        assert model.name == "tiny-remote-code"
        state.unload_model()
        assert not marker.exists(), f"the model's own code ran without trust_remote_code (runtime {runtime})"

    # The same folder with the per-model opt-in does run it: the marker above can tell.
    from transformers.utils import HF_MODULES_CACHE
    copied_code = Path(HF_MODULES_CACHE) / "transformers_modules" / "tiny_hyphen_remote_hyphen_code"
    try:
        state.load_model("tiny-remote-code", "transformers", {"trust_remote_code": True, "runtime": "transformers"})
    except LoadError:
        pass   # whether the shipped classes then work is not the point: that they ran is
    finally:
        state.unload_model()
        shutil.rmtree(copied_code, ignore_errors=True)   # transformers copies the code to its cache
    assert marker.exists()


def private(path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_saved_settings_and_conversations_are_private_and_written_whole(tmp_path, default_model_dir):
    models = tmp_path / "models"
    tiny_llama_dir(models / "tiny-chat", vocab_size=49152, tokenizer_from=default_model_dir)
    state = make_state(models)
    state.save_model_settings("tiny-chat", {"context_length": 128, "system_message": "private notes"})
    settings_file = models / "config-user.yaml"
    assert private(settings_file), oct(settings_file.stat().st_mode)

    store = ConversationStore(tmp_path / "conversations")
    conv = store.save(store.new(messages=[{"role": "user", "content": "something personal"}]))
    conv_file = store.folder / f"{conv.id}.json"
    assert private(conv_file), oct(conv_file.stat().st_mode)
    store.rename(conv.id, "renamed")   # a rewrite keeps it private too
    assert private(conv_file)
    # Written through a temp file and os.replace: nothing half-written or temporary is left beside them.
    assert [p.name for p in store.folder.iterdir()] == [conv_file.name]
    assert sorted(p.name for p in models.iterdir() if p.is_file()) == ["config-user.yaml"]
