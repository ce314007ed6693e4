"""One load resolves a model once (LoadedModel): its files are read once per load, detection runs once, and
prompts, templates and sampler values come from what the load resolved, not from files read per message."""
from __future__ import annotations

import builtins
import contextlib
import io
from pathlib import Path

import pytest

from conftest import DEFAULT_MODEL, make_state
from loaders.base import Detection


@contextlib.contextmanager
def opened_files():
    """Every path opened (by us or by transformers) inside the block, in order. Only the built-in open is
    wrapped, and it still opens the file: the files are real, nothing is faked."""
    seen: list[Path] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            seen.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    builtins.open, io.open = spy, spy   # pathlib opens through io.open
    try:
        yield seen
    finally:
        builtins.open, io.open = real_open, real_open


class CountingLoader:
    """A plugin loader that reads nothing and claims nothing; it counts how often detection asks it."""
    name = "counting"
    description = "counts detect calls"
    options_type = object

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, model_dir: Path) -> Detection | None:
        self.calls += 1
        return None

    def load(self, model_dir, options, progress=None):
        raise AssertionError("never chosen")


def test_one_load_of_the_default_model_reads_config_json_once_and_detects_once(models_dir, default_model_dir):
    state = make_state(models_dir)
    counting = CountingLoader()
    state.registry.register(counting)
    with opened_files() as seen:
        state.load_model(DEFAULT_MODEL)
    try:
        config = (default_model_dir / "config.json").resolve()
        assert seen.count(config) == 1, f"config.json was opened {seen.count(config)} times"
        assert counting.calls == 1
        # Hearth's own reads of tokenizer_config.json (its chat template) happen once too; transformers'
        # tokenizer reads it itself, which is the remainder.
        ours = state.loaded.template.reason
        assert ours == "from tokenizer_config.json"
    finally:
        state.unload_model()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, default_model_dir):
    models = tmp_path_factory.mktemp("loaded") / "models"
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default_model_dir, target_is_directory=True)
    state = make_state(models)
    state.load_model(DEFAULT_MODEL)
    yield state
    state.unload_model()


def test_a_chat_message_reads_no_file(loaded):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with opened_files() as seen:
        chat = loaded.chat_prompt(messages, max_new_tokens=64)
        loaded.continue_prompt(messages + [{"role": "assistant", "content": "The capital"}])
        loaded.raw_prompt("Once upon a time")
        loaded.chat_prompt(messages, template="ChatML")
        info = loaded.template_info()
        loaded.generation_params(max_new_tokens=8)
    assert seen == []
    assert chat.messages == tuple(messages) and chat.ids and info["source"] == "tokenizer chat_template"


def test_saving_settings_for_the_loaded_model_applies_to_the_next_prompt_and_generation(loaded):
    assert loaded.generation_params().temperature == 0.2            # generation_config.json
    loaded.save_model_settings(DEFAULT_MODEL, {"instruction_template": "Alpaca", "system_message": "Be terse.",
                                               "preset": "Deterministic"})
    try:
        prompt = loaded.chat_prompt([{"role": "user", "content": "Hi"}])
        assert (prompt.template_name, prompt.template_source) == ("Alpaca", "saved choice")
        assert loaded.template_info()["system_message"] == "Be terse."
        # The saved preset is one of the values the next generation uses, and the settings say so.
        assert loaded.generation_params().temperature == 0.0
        source = loaded.model_settings["sampler"]["temperature"].source
        assert source.startswith("preset Deterministic"), source
        assert loaded.effective_settings(DEFAULT_MODEL)["sampler"]["temperature"].source == source
    finally:
        loaded.save_model_settings(DEFAULT_MODEL, {})
    assert loaded.chat_prompt([{"role": "user", "content": "Hi"}]).template_source == "tokenizer chat_template"
    assert loaded.generation_params().temperature == 0.2
