"""Per-model saved settings: save, re-apply on load and restart, precedence with sources, broken files."""
from __future__ import annotations

import os

import pytest
import yaml

from loaders.settings_store import FILE_NAME, SettingsStore
from tests.conftest import make_state
from tests.quant_fixtures import tiny_llama_dir


def test_save_get_delete_round_trip_keyed_like_text_generation_webui(tmp_path):
    store = SettingsStore(tmp_path)
    saved = store.save("Llama-2-7b-Chat-GPTQ", {"loader": "gptq", "loader_options": {"cpu_kernel": "int4"},
                                                "context_length": 4096, "instruction_template": "Llama-2-Chat",
                                                "preset": "Deterministic", "system_message": "Be brief.",
                                                "sampler": {"temperature": 0.3}})
    assert saved["context_length"] == 4096
    on_disk = yaml.safe_load((tmp_path / FILE_NAME).read_text())
    assert list(on_disk) == ["Llama-2-7b-Chat-GPTQ$"]
    # A new store (an app restart) reads the same values back.
    assert SettingsStore(tmp_path).get("Llama-2-7b-Chat-GPTQ") == saved
    assert SettingsStore(tmp_path).get("other") == {}
    assert store.delete("Llama-2-7b-Chat-GPTQ") is True
    assert store.get("Llama-2-7b-Chat-GPTQ") == {} and store.delete("Llama-2-7b-Chat-GPTQ") is False
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME]          # no temp files left by the atomic writes
    assert store.problems == []


def test_saving_one_model_keeps_the_others(tmp_path):
    store = SettingsStore(tmp_path)
    store.save("a", {"preset": "Creative"})
    store.save("b", {"preset": "Deterministic"})
    store.save("a", {"context_length": 1024})      # replaces a's entry only
    assert store.get("a") == {"context_length": 1024} and store.get("b") == {"preset": "Deterministic"}


def test_unknown_keys_are_refused_on_save(tmp_path):
    with pytest.raises(ValueError, match="wbits"):
        SettingsStore(tmp_path).save("a", {"wbits": 4})


def test_malformed_file_is_backed_up_reported_and_ignored(tmp_path):
    broken = "a$:\n  preset: [unclosed\n"
    (tmp_path / FILE_NAME).write_text(broken)
    store = SettingsStore(tmp_path)
    assert store.get("a") == {}
    backups = list(tmp_path.glob(f"{FILE_NAME}.bad-*"))
    assert len(backups) == 1 and backups[0].read_text() == broken
    assert len(store.problems) == 1 and "malformed" in store.problems[0] and backups[0].name in store.problems[0]
    store.get("a")                                  # reading again does not pile up backups or messages
    assert len(list(tmp_path.glob(f"{FILE_NAME}.bad-*"))) == 1 and len(store.problems) == 1
    store.save("a", {"preset": "Creative"})        # saving starts a fresh, valid file
    assert SettingsStore(tmp_path).get("a") == {"preset": "Creative"}


def test_wrong_shapes_are_reported_per_entry(tmp_path):
    (tmp_path / FILE_NAME).write_text(yaml.safe_dump({"a$": "not a mapping", "b$": {"sampler": 3, "preset": "x",
                                                                                   "bogus": 1}}))
    store = SettingsStore(tmp_path)
    assert store.get("b") == {"preset": "x"}
    assert any("entry for a" in p for p in store.problems)
    assert any("sampler for b" in p for p in store.problems)
    assert any("'bogus'" in p for p in store.problems)


def test_top_level_list_is_malformed(tmp_path):
    (tmp_path / FILE_NAME).write_text("- a\n- b\n")
    store = SettingsStore(tmp_path)
    assert store.get("a") == {} and "not a mapping" in store.problems[0]


# ---- precedence and re-applying on load -------------------------------------------------------------------

@pytest.fixture
def tiny_models(tmp_path, default_model_dir):
    models = tmp_path / "models"
    tiny_llama_dir(models / "tiny-chat", vocab_size=49152, tokenizer_from=default_model_dir)
    return models


def test_precedence_saved_over_metadata_over_settings_yaml(tiny_models):
    state = make_state(tiny_models)
    effective = state.effective_settings("tiny-chat")
    assert (effective["context_length"].value, effective["context_length"].source) == (
        256, "model (config.json max_position_embeddings)")
    # generation_config.json (copied from the default model) says temperature 0.2; settings.yaml says top_k.
    assert (effective["sampler"]["temperature"].value, effective["sampler"]["temperature"].source) == (
        0.2, "model (generation_config.json)")
    assert effective["sampler"]["top_k"].source == "settings.yaml"
    assert effective["loader_options"]["dtype"].source == "loader default"
    state.save_model_settings("tiny-chat", {"context_length": 128, "sampler": {"temperature": 0.0},
                                            "loader_options": {"dtype": "float32"}, "system_message": "Hi."})
    effective = state.effective_settings("tiny-chat")
    assert (effective["context_length"].value, effective["context_length"].source) == (128, f"saved ({FILE_NAME})")
    assert effective["sampler"]["temperature"].value == 0.0
    assert effective["loader_options"]["dtype"].value == "float32"
    assert effective["system_message"].value == "Hi."
    assert effective["sampler"]["top_p"].source == "model (generation_config.json)"


def test_saved_settings_are_reapplied_on_load_and_after_restart(tiny_models):
    state = make_state(tiny_models)
    state.save_model_settings("tiny-chat", {"loader": "transformers",
                                            "loader_options": {"runtime": "transformers", "dtype": "bfloat16"},
                                            "context_length": 100, "sampler": {"top_k": 3}})
    restarted = make_state(tiny_models)          # a new AppState: nothing carried over in memory
    model = restarted.load_model("tiny-chat")
    assert (model.loader, model.context_length) == ("transformers", 100)
    assert model.runtime == "transformers (cpu, bfloat16)"
    assert restarted.model_settings["loader_options"]["dtype"].source == f"saved ({FILE_NAME})"
    assert restarted.generation_params().top_k == 3
    assert restarted.generation_params(top_k=7).top_k == 7      # a value chosen now still wins
    # Options passed explicitly (the Model tab's widgets) replace the saved ones and say so.
    model = restarted.load_model("tiny-chat", "transformers", {"runtime": "transformers", "dtype": "float32"})
    assert model.runtime == "transformers (cpu, float32)" and model.context_length == 256
    assert restarted.model_settings["loader_options"]["dtype"].source == "chosen for this load"
    restarted.unload_model()
    assert restarted.model_settings is None


def test_a_stale_saved_loader_falls_back_to_detection(tiny_models):
    state = make_state(tiny_models)
    state.save_model_settings("tiny-chat", {"loader": "gptq", "loader_options": {"cpu_kernel": "int4"}})
    model = state.load_model("tiny-chat")
    assert model.loader == "transformers"
    assert any("saved loader gptq cannot read tiny-chat" in p for p in state.settings_store.problems)
    state.unload_model()


def test_malformed_settings_file_does_not_stop_a_load(tiny_models):
    (tiny_models / FILE_NAME).write_text("tiny-chat$: {loader: [\n")
    state = make_state(tiny_models)
    model = state.load_model("tiny-chat")
    assert model.loader == "transformers"
    assert state.settings_store.problems and list(tiny_models.glob(f"{FILE_NAME}.bad-*"))
    state.unload_model()


def test_model_tab_save_entry_drops_blanks_and_keeps_saved_sampler():
    from loaders.model_settings import settings_to_save

    from loaders.model_settings import Effective

    entry = settings_to_save("gptq", {"cpu_kernel": "int4", "context_length": 0}, " ", "", "",
                             {"sampler": {"temperature": 0.1}})
    assert entry == {"loader": "gptq", "loader_options": {"cpu_kernel": "int4"}, "context_length": None,
                     "instruction_template": None, "preset": None, "system_message": None,
                     "sampler": {"temperature": 0.1}, "enable_thinking": None, "loras": None}
    entry = settings_to_save("gptq", {"context_length": 8192.0}, "ChatML", "Deterministic", "Be brief.", {})
    assert (entry["context_length"], entry["instruction_template"], entry["preset"]) == (8192, "ChatML",
                                                                                         "Deterministic")
    # The context option as the model's own metadata filled it in is not pinned; a changed one, or one
    # saved before, is kept.
    own = Effective(4096, "model (config.json max_position_embeddings)")
    assert settings_to_save("gptq", {"context_length": 4096}, "", "", "", {}, own)["context_length"] is None
    assert settings_to_save("gptq", {"context_length": 2048}, "", "", "", {}, own)["context_length"] == 2048
    saved = Effective(4096, "saved (config-user.yaml)")
    assert settings_to_save("gptq", {"context_length": 4096}, "", "", "", {}, saved)["context_length"] == 4096


def test_model_tab_entry_saved_and_shown_with_sources(tiny_models):
    from loaders.model_settings import describe_sources, settings_to_save

    state = make_state(tiny_models)
    state.save_model_settings("tiny-chat", settings_to_save("transformers", {"dtype": "float32", "context_length": 64},
                                                            "ChatML", "", "Be brief.", {}))
    rows = {key: (value, source) for key, value, source in describe_sources(state.effective_settings("tiny-chat"))}
    assert rows["context_length"] == (64, f"saved ({FILE_NAME})")
    assert rows["instruction_template"] == ("ChatML", f"saved ({FILE_NAME})")
    assert rows["loader_options.dtype"] == ("float32", f"saved ({FILE_NAME})")
    assert rows["loader_options.context_length"] == (64, f"saved ({FILE_NAME})")
    assert rows["sampler.top_k"][1] == "settings.yaml"
