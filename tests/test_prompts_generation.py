"""Stop strings per template, partial-stop hiding while streaming, truncation, the sandbox, and the default
model chatting over three turns without writing the next user turn."""
from __future__ import annotations

import pytest

from engine.generation import TextEvent
from engine.sampling import GenerationParams
from prompts import chat_session
from prompts.sandbox import TemplateRenderError, render_template
from prompts.stop_strings import derive_stop_strings
from engine.stopping import StopStringFilter
from prompts.library import load_library
from prompts.truncation import fit_messages

STOPS = {
    "Llama-2-Chat": (["</s>"], ["[INST]", "</s>"]),
    "Llama-3": (["<|eot_id|>"], ["<|start_header_id|>user<|end_header_id|>", "<|eot_id|>"]),
    "Mistral": (["</s>"], ["[INST]", "</s>"]),
    "Vicuna-v1.1": (["</s>"], ["USER:", "</s>"]),
    "Airoboros-v2": (["</s>"], ["USER:", "</s>"]),
    "ChatML": (["<|im_end|>"], ["<|im_start|>user", "<|im_end|>"]),
    "Alpaca": (["</s>"], ["### Instruction:", "</s>"]),
    "Orca-Vicuna": (["</s>"], ["USER:", "</s>"]),
    "Raw": (["</s>"], ["</s>"]),
}


@pytest.fixture(scope="module")
def library():
    return load_library()


@pytest.mark.parametrize("name", sorted(STOPS))
def test_stop_strings_derived_from_each_template(library, name):
    eos, expected = STOPS[name]
    assert sorted(derive_stop_strings(library.get(name, "test"), eos)) == sorted(expected)


def test_streaming_never_shows_a_partial_stop_string():
    f = StopStringFilter(["<|im_start|>user", "USER:"])
    shown = [f.push(piece) for piece in ["Paris is", " nice. <|im_", "start|>", "user\nmore"]]
    assert shown == ["Paris is", " nice. ", "", ""]
    assert f.stopped_on == "<|im_start|>user"
    g = StopStringFilter(["USER:"])
    assert [g.push("Hi US"), g.push("A is big")] == ["Hi ", "USA is big"]


def test_truncation_keeps_system_and_newest_turns():
    messages = [{"role": "system", "content": "S"}]
    for i in range(5):
        messages += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "last"})
    count = lambda kept: sum(len(m["content"]) for m in kept) * 10
    fitted = fit_messages(messages, count, budget=130)  # S + two turns + last = 130
    assert fitted.dropped_turns == 3
    assert [m["content"] for m in fitted.messages] == ["S", "u3", "a3", "u4", "a4", "last"]
    assert "3 oldest turns" in fitted.notice()
    alone = fit_messages(messages, count, budget=5)
    assert [m["content"] for m in alone.messages] == ["S", "last"] and not alone.fits


def test_sandbox_refuses_attribute_tricks_and_unbounded_output():
    with pytest.raises(TemplateRenderError):
        render_template("{{ messages.__class__.__mro__ }}", messages=[])
    with pytest.raises(TemplateRenderError):
        render_template("{{ 'x' * 10**9 }}")
    with pytest.raises(TemplateRenderError, match="exceeds"):
        render_template("{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}")
    with pytest.raises(TemplateRenderError, match="no system"):
        render_template("{{ raise_exception('no system role') }}")


def greedy(**kw) -> GenerationParams:
    return GenerationParams(**{"temperature": 0.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 40, **kw})


def test_prompt_truncated_to_context_minus_max_new_tokens(loaded_state):
    long_history = []
    for i in range(40):
        long_history += [{"role": "user", "content": f"Question {i}: " + "word " * 30},
                         {"role": "assistant", "content": "answer " * 30}]
    long_history.append({"role": "user", "content": "Final question?"})
    model = loaded_state.require_model()
    budget_tokens = 1000
    prompt = loaded_state.chat_prompt(long_history, max_new_tokens=model.context_length - budget_tokens)
    full = loaded_state.chat_prompt(long_history)
    assert len(full.ids) > budget_tokens >= len(prompt.ids)
    assert prompt.dropped_turns > 0 and "oldest turn" in prompt.notice
    assert prompt.text.endswith("Final question?<|im_end|>\n<|im_start|>assistant\n")


def test_real_stream_hides_partial_stop_and_template_stops_apply(loaded_state):
    prompt = loaded_state.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert "<|im_start|>user" in prompt.stop and "<|im_end|>" in prompt.stop
    events = list(loaded_state.generate(prompt, greedy(stop=["Paris"])))
    pieces = [e.text for e in events if isinstance(e, TextEvent)]
    assert "".join(pieces) == "The capital of France is "
    assert not any("Par" in p for p in pieces)


def test_default_model_chats_three_turns_without_writing_the_next_user_turn(loaded_state):
    history: list = []
    for question, must in [("What is the capital of France?", "Paris"),
                            ("What is the capital of Germany?", "Berlin"),
                            ("What is the capital of Italy?", "Rome")]:
        for history, status in chat_session.send(loaded_state, history, question, greedy(), "three-turns"):
            pass
        assert status.done and status.error is None
        reply = history[-1]["content"]
        assert must in reply
        for leak in ("<|im_start|>", "<|im_end|>", "user\n", "USER:"):
            assert leak not in reply
    assert [m["role"] for m in history] == ["user", "assistant"] * 3
    assert status.prompt.text.count("<|im_start|>user\n") == 3


def test_notebook_appends_a_continuation_to_raw_text(loaded_state):
    text = "The capital of France is"
    out, status = None, None
    for out, status in chat_session.notebook(loaded_state, text, greedy(max_new_tokens=5), "notebook"):
        pass
    assert out.startswith(text) and len(out) > len(text) and status.done
    assert status.prompt.text == text and status.prompt.template_source == "raw text"


def test_chosen_template_and_bos_handling(loaded_state):
    prompt = loaded_state.chat_prompt([{"role": "user", "content": "Hi"}], template="Alpaca")
    assert prompt.template_name == "Alpaca" and prompt.text.endswith("### Instruction:\nHi\n\n### Response:\n")
    assert "### Instruction:" in prompt.stop
    assert loaded_state.template_info()["source"] == "tokenizer chat_template"
