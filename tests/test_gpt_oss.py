"""gpt-oss on the llama.cpp loader: Hearth's engine does not run it (MXFP4 experts, attention sinks, alternating
sliding window, YaRN RoPE), so detection names llama.cpp and says why, and a tiny random gpt-oss GGUF
(tests/gguf_fixtures.py) loads and generates there, with the harmony chat template from its metadata and its reply
split into thinking (the analysis channel) and reply (the final channel) by prompts.reasoning."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (./run_tests.sh builds it)")

from engine.generation import DoneEvent, TextEvent  # noqa: E402
from prompts.reasoning import splitter_for  # noqa: E402
from tests.conftest import make_state  # noqa: E402
from tests.gguf_fixtures import HARMONY_TOKENS, write_gpt_oss_gguf  # noqa: E402
from tests.test_cli import run_app  # noqa: E402

MODEL = "tiny-gpt-oss"
QUESTION = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"}]
# A random model writes no harmony of its own: this GBNF makes it write what gpt-oss writes, the analysis channel
# then the final one, each marker as its single control token (llama.cpp's `<token>` syntax), words in between.
HARMONY_REPLY = ('root ::= <|channel|> "analysis" <|message|> thought <|end|> <|start|> "assistant" <|channel|> '
                 '"final" <|message|> answer\n'
                 'thought ::= "t" [a-z ]{6,16}\n'
                 'answer ::= "a" [a-z ]{6,16}\n')


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_q4_1) -> Path:
    models = tmp_path_factory.mktemp("gpt-oss") / "models"
    write_gpt_oss_gguf(models / MODEL / f"{MODEL}.gguf", vocab_source=smollm2_q4_1)
    return models


@pytest.fixture(scope="module")
def state(models):
    state = make_state(models)
    state.load_model(MODEL)
    yield state
    state.unload_model()


def test_inspect_names_llamacpp_for_gpt_oss_because_the_engine_does_not_run_it(models):
    result = run_app("inspect", "--model", MODEL, models_dir=models)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["loader"] == "llama.cpp"
    assert info["candidates"][0] == {"loader": "llama.cpp", "score": 0.7, "reason": (
        "GGUF MXFP4_MOE gpt-oss (tiny-gpt-oss.gguf); Hearth's engine cannot run it (architecture 'gpt-oss' is not "
        "one of llama, mistral, qwen2)")}
    assert [c["loader"] for c in info["candidates"]] == ["llama.cpp", "gguf"]
    assert info["template_source"] == "tokenizer chat_template"
    # Its 131072 trained tokens are capped for llama.cpp's KV cache, and the Model tab's value says so.
    assert info["settings"]["context_length"] == {"value": 16384, "source": (
        "model (GGUF metadata: 131072, capped at 16384 for llama.cpp's KV cache; set n_ctx for more)")}


def test_generate_runs_gpt_oss_on_llamacpp_and_names_it(models):
    result = run_app("generate", "--model", MODEL, "--chat", "What is the capital of France?", "--temperature", "0",
                     "--max-new-tokens", "8", models_dir=models)
    assert result.returncode == 0, result.stderr
    assert f"llama.cpp (cpu, {MODEL}.gguf, n_ctx 16384)" in result.stderr   # the cap, not the GGUF's 131072
    assert result.stdout.strip()   # random weights: some text, not a known answer


def test_the_ggufs_harmony_template_renders_the_prompt_with_one_token_a_marker(state):
    model = state.model
    assert model.loader == "llama.cpp"
    assert (state.template_info()["source"], state.template_info()["reason"]) == ("tokenizer chat_template",
                                                                                 "from GGUF metadata")
    history = QUESTION + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    prompt = state.chat_prompt(history)
    assert prompt.text.startswith("<|start|>system<|message|>")
    assert ("<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
            "<|start|>user<|message|>What is the capital of France?<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Paris.<|end|>"
            "<|start|>user<|message|>And Italy?<|end|><|start|>assistant") in prompt.text
    assert prompt.text.endswith("<|end|><|start|>assistant")
    marker_ids = {m: model.tokenizer(m, add_special_tokens=False)["input_ids"] for m in HARMONY_TOKENS}
    assert all(len(ids) == 1 for ids in marker_ids.values()), marker_ids
    assert prompt.ids.count(marker_ids["<|start|>"][0]) == prompt.text.count("<|start|>") == 6
    assert prompt.ids == model.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    # <|end|> closes a message, not the generation (the analysis channel is followed by the final one); <|return|>
    # ends it, and the next user turn is a stop string.
    assert marker_ids["<|end|>"][0] not in model.eos_token_ids and marker_ids["<|return|>"][0] in model.eos_token_ids
    assert "<|end|><|start|>user<|message|>" in prompt.stop and "<|end|>" not in prompt.stop


def test_a_harmony_reply_streams_through_the_splitter_as_thinking_then_reply(state):
    prompt = state.chat_prompt(QUESTION)
    params = state.generation_params(temperature=0.0, max_new_tokens=64)
    # The template's stop strings, as AppState.generate adds them (it takes no grammar; the model does).
    params = dataclasses.replace(params, stop=list(prompt.stop))
    events = list(state.model.generate(prompt, params, grammar=HARMONY_REPLY))
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.reason == "eos", done
    text = done.text
    assert text.startswith("<|channel|>analysis<|message|>t")
    assert "<|end|><|start|>assistant<|channel|>final<|message|>a" in text

    splitter = splitter_for(prompt.text, state.resolve_template().jinja)
    thinking, reply = [], []
    for event in events:
        if isinstance(event, TextEvent):
            think, said = splitter.feed(event.text)
            thinking.append(think)
            reply.append(said)
    think, said = splitter.flush()
    thinking.append(think)
    reply.append(said)
    expected_thinking = text[len("<|channel|>analysis<|message|>"):text.index("<|end|>")].strip()
    expected_reply = text[text.index("final<|message|>") + len("final<|message|>"):]
    assert "".join(thinking) == splitter.thinking == expected_thinking and expected_thinking.startswith("t")
    assert "".join(reply) == splitter.reply == expected_reply and expected_reply.startswith("a")
    assert "<|" not in splitter.thinking + splitter.reply
