"""Per-model settings through a real `app.py serve`: re-applied for --model at start, saved from the
Model tab's "Save settings for this model" handler."""
from __future__ import annotations

import pytest
from gradio_client import Client

from app_state import default_registry
from core.options import specs
from loaders.settings_store import SettingsStore
from tests.conftest import start_app
from tests.quant_fixtures import tiny_llama_dir


@pytest.fixture
def tiny_models(tmp_path, default_model_dir):
    models = tmp_path / "models"
    tiny_llama_dir(models / "tiny-chat", vocab_size=49152, tokenizer_from=default_model_dir)
    return models


def test_saved_settings_apply_at_start_and_the_model_tab_saves_new_ones(tmp_path, tiny_models):
    SettingsStore(tiny_models).save("tiny-chat", {"loader": "transformers", "context_length": 100,
                                                  "loader_options": {"runtime": "transformers",
                                                                     "dtype": "bfloat16"}})
    app = start_app(["--models-dir", str(tiny_models), "--model", "tiny-chat"], tmp_path / "app.log")
    try:
        assert "loaded tiny-chat (transformers (cpu, bfloat16))" in app.output()
        client = Client(app.url, verbose=False)
        params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][
            "/save_model_settings"]["parameters"]
        values = [p.get("parameter_default") for p in params]
        values[0], values[1] = "tiny-chat", "transformers"
        context_at = 2 + option_index("transformers", "context_length")   # the loader's own widget
        values[context_at] = 64
        values[-3:] = ["ChatML", "", "Be brief."]
        message, sources = client.predict(*values, api_name="/save_model_settings")
        # Selecting the model again puts the saved values back into the widgets, with their sources.
        selected = client.predict("tiny-chat", api_name="/select_model")
    finally:
        app.stop()
    assert "Saved settings for **tiny-chat**" in message
    assert "| context_length | 64 | saved (config-user.yaml) |" in sources
    saved = SettingsStore(tiny_models).get("tiny-chat")
    assert (saved["context_length"], saved["instruction_template"], saved["system_message"]) == (64, "ChatML",
                                                                                                 "Be brief.")
    assert saved["loader"] == "transformers" and "context_length" not in saved["loader_options"]
    loader, reason, *rest = [value_of(output) for output in selected]
    context = rest[context_at - 2]
    template, preset, system, table = rest[-4:]
    assert loader == "transformers" and "unquantized" in reason
    assert (context, template, preset, system) == (64, "ChatML", "", "Be brief.")
    assert "| instruction_template | ChatML | saved (config-user.yaml) |" in table
    assert f"| loader_options.dtype | {saved['loader_options']['dtype']} | saved (config-user.yaml) |" in table


def option_index(loader: str, option: str) -> int:
    """Where a loader's option widget stands among the Model tab's option widgets (every loader's, in
    registry order, each in its options' declared order)."""
    registry = default_registry()
    offset = 0
    for name in registry.names():
        fields = [spec.name for spec in specs(registry.get(name).options_type)]
        if name == loader:
            return offset + fields.index(option)
        offset += len(fields)
    raise KeyError(loader)


def value_of(output):
    """gradio_client hands back component updates as {"__type__": "update", "value": ...}."""
    return output.get("value") if isinstance(output, dict) and output.get("__type__") == "update" else output
