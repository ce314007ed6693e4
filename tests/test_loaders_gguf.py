"""GGUF-only folders: detected as gguf, loaded through transformers (runtime transformers), same logits as the
source weights. The engine path: tests/test_gguf_engine.py."""
from __future__ import annotations

import pytest
import torch

from app import inspect_model
from engine.generation import DoneEvent
from tests.conftest import make_state
from tests.quant_fixtures import gguf_from_llama_dir, tiny_llama_dir


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("gguf")
    source = tiny_llama_dir(root / "source", vocab_size=49152, tokenizer_from=default_model_dir)
    gguf_from_llama_dir(source, root / "models" / "tiny-GGUF" / "tiny-chat.F32.gguf")
    return root / "models", source


def test_gguf_only_folder_loads_with_the_source_logits_and_generates(gguf_models):
    from transformers import AutoModelForCausalLM

    models, source = gguf_models
    state = make_state(models)
    model = state.load_model("tiny-GGUF", options={"runtime": "transformers"})
    assert (model.loader, model.context_length) == ("gguf", 256)
    ids = torch.tensor([[1, 5, 9, 300, 1000]])
    with torch.no_grad():
        got = model.hf_model(ids).logits
        want = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    prompt = state.chat_prompt([{"role": "user", "content": "hi"}])      # chat template from GGUF metadata
    events = list(state.generate(prompt, state.generation_params(temperature=0.0, max_new_tokens=3)))
    assert isinstance(events[-1], DoneEvent) and events[-1].error is None
    state.unload_model()


def test_inspect_reports_gguf_facts_and_context(gguf_models):
    models, _ = gguf_models
    report = inspect_model(make_state(models), "tiny-GGUF")
    assert report["loader"] == "gguf" and report["reason"] == "GGUF F32 llama (tiny-chat.F32.gguf); Hearth's engine"
    assert report["gguf"]["context_length"] == 256
    assert report["settings"]["context_length"] == {"value": 256, "source": "model (GGUF metadata)"}


def test_refusing_transformers_for_a_gguf_only_folder(gguf_models):
    from loaders.base import LoadError

    models, _ = gguf_models
    with pytest.raises(LoadError, match="it looks like GGUF F32 llama .*use the gguf loader"):
        make_state(models).load_model("tiny-GGUF", loader="transformers")


def test_damaged_gguf_is_reported_by_name(tmp_path):
    from loaders.base import LoadError

    folder = tmp_path / "models" / "broken-GGUF"
    folder.mkdir(parents=True)
    (folder / "model.Q4_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 10)
    with pytest.raises(LoadError, match="no loader can read broken-GGUF: model.Q4_0.gguf is not a readable GGUF"):
        make_state(tmp_path / "models").load_model("broken-GGUF")
