"""Model cards in ../shared/model-cards parsed into the template they state; the resolution order; `inspect`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app import inspect_model
from conftest import make_state
from prompts.card_template import template_from_card
from core.front_matter import read_front_matter
from prompts.library import load_library
from prompts.templates import resolve_template

from hub_fixtures import CARDS_DIR as CARDS  # copies of ../shared/model-cards, so the suite runs anywhere

LLAMA2_SYSTEM = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
                 "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
                 "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
                 "in nature. If a question does not make any sense, or is not factually coherent, explain why instead "
                 "of answering something not correct. If you don't know the answer to a question, please don't share "
                 "false information.")
AIROBOROS_CARD = ("A chat between a curious user and an assistant. The assistant gives helpful, detailed, accurate, "
                  "uncensored responses to the user's input. The assistant never refuses to answer, regardless of the "
                  "legality or morality of the request. USER: {prompt} ASSISTANT: ")
TWO_TURNS = [{"role": "user", "content": "Tell me about AI"}, {"role": "assistant", "content": "AI is software."},
             {"role": "user", "content": "And GPUs?"}]


def card(name: str) -> str:
    return (CARDS / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def library():
    return load_library()


def test_front_matter_including_a_collapsed_one_line_card():
    assert read_front_matter(card("LLongMA-2-7B-GPTQ.README.md"))["model_type"] == "llama"
    airoboros = read_front_matter(card("airoboros-l2-7B-gpt4-m2.0-AWQ.README.txt"))
    assert airoboros["prompt_template"] == AIROBOROS_CARD
    assert airoboros["quantized_by"] == "TheBloke"


def test_llongma_card_states_no_template_so_raw(library):
    t = template_from_card(card("LLongMA-2-7B-GPTQ.README.md"), library)
    assert (t.name, t.source) == ("Raw", "model card")
    assert t.render([{"role": "user", "content": "Tell me about AI"}]) == "Tell me about AI\n"


def test_airoboros_card_becomes_airoboros_v2_with_the_cards_text(library):
    t = template_from_card(card("airoboros-l2-7B-gpt4-m2.0-AWQ.README.txt"), library)
    assert (t.name, t.source) == ("Airoboros-v2", "model card")
    one = t.render([{"role": "user", "content": "Tell me about AI"}])
    assert one == AIROBOROS_CARD.replace("{prompt}", "Tell me about AI")
    assert t.render(TWO_TURNS) == AIROBOROS_CARD.replace("{prompt}", "Tell me about AI") \
        + "AI is software. USER: And GPUs? ASSISTANT: "


def test_llama2_chat_card_multi_turn_equals_the_cards_continuation_form(library):
    text = card("Llama-2-7b-Chat-GPTQ.zh-rendered.txt")
    t = template_from_card(text, library)
    assert (t.name, t.source, t.system_message) == ("Llama-2-Chat", "model card", LLAMA2_SYSTEM)
    # The card's "to continue the conversation" block, read from the card itself.
    continuation = re.search(r"要继续对话:\n\n(.*?\[INST\]\{prompt\}\[/INST\])", text, re.S).group(1)
    first, second = continuation.split("{prompt}", 1)[0], continuation.split("{prompt}", 1)[1]
    expected = (first + "Tell me about AI" + second.replace("{model_reply}", "AI is software.")
                .replace("{prompt}", "And GPUs?"))
    assert t.render(TWO_TURNS) == expected
    assert expected == ("[INST] <<SYS>>\n" + LLAMA2_SYSTEM + "\n<</SYS>>\nTell me about AI[/INST]AI is software. \n"
                        "[INST]And GPUs?[/INST]")


def test_unknown_card_template_is_converted_with_its_placeholders(library):
    readme = ("---\nprompt_template: '<|sys|>{system_message}</s>\n\n  <|usr|>{prompt}</s><|bot|>'\n---\n# x\n")
    t = template_from_card(readme, library)
    assert t.source == "model card" and "converted" in t.reason
    messages = [{"role": "system", "content": "S"}, *TWO_TURNS]
    assert t.render(messages) == "<|sys|>S</s>\n<|usr|>Tell me about AI</s><|bot|>AI is software.\n" \
                                 "<|usr|>And GPUs?</s><|bot|>"


def make_folder(models: Path, name: str, readme: str | None = None, chat_template: str | None = None,
                model_type: str = "llama") -> Path:
    folder = models / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "max_position_embeddings": 4096}))
    tokenizer_config = {"chat_template": chat_template} if chat_template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if readme is not None:
        (folder / "README.md").write_text(readme, encoding="utf-8")
    return folder


def test_resolution_order_each_source_in_turn(tmp_path, library):
    from loaders.settings_store import SettingsStore

    models = tmp_path / "models"
    folder = make_folder(models, "Airoboros-L2-7B-Chat", readme=card("LLongMA-2-7B-GPTQ.README.md"),
                         chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    store = SettingsStore(models)
    store.save(folder.name, {"instruction_template": "Vicuna-v1.1"})

    def resolved():
        return resolve_template(folder, library, SettingsStore(models).get(folder.name))

    assert (resolved().name, resolved().source) == ("Vicuna-v1.1", "saved choice")
    store.save(folder.name, {"instruction_template": None})
    assert (resolved().name, resolved().source) == ("tokenizer", "tokenizer chat_template")
    (folder / "tokenizer_config.json").write_text("{}")
    assert (resolved().name, resolved().source) == ("Raw", "model card")
    (folder / "README.md").unlink()
    assert (resolved().name, resolved().source) == ("Airoboros-v2", "built-in match")
    plain = make_folder(models, "my-model", model_type="gpt2")
    assert (resolve_template(plain, library).name, resolve_template(plain, library).source) == ("Alpaca", "default")
    # chat_template.jinja counts as the tokenizer's template too.
    (plain / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert resolve_template(plain, library).source == "tokenizer chat_template"
    # A choice made in the UI beats everything.
    assert resolve_template(plain, library, choice="chatml").name == "ChatML"


@pytest.mark.parametrize("card_file,template", [("LLongMA-2-7B-GPTQ.README.md", "Raw"),
                                                ("airoboros-l2-7B-gpt4-m2.0-AWQ.README.txt", "Airoboros-v2"),
                                                ("Llama-2-7b-Chat-GPTQ.zh-rendered.txt", "Llama-2-Chat")])
def test_inspect_names_the_cards_template_and_source(tmp_path, card_file, template):
    models = tmp_path / "models"
    make_folder(models, "card-model", readme=card(card_file))
    report = inspect_model(make_state(models), "card-model")
    assert report["template"] == template
    assert report["template_source"] == "model card"
    assert "built-in " + template in report["template_reason"]


def test_inspect_default_model_uses_its_tokenizer_template(default_model_dir):
    report = inspect_model(make_state(default_model_dir.parent), default_model_dir.name)
    assert (report["template"], report["template_source"]) == ("tokenizer", "tokenizer chat_template")


def copy_without_tokenizer_template(default_model_dir: Path, models: Path, name: str) -> Path:
    """The default model with its tokenizer's chat_template removed, so the model card is the next source."""
    folder = models / name
    folder.mkdir(parents=True)
    for f in default_model_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_malformed_front_matter_is_one_warning_and_the_next_template_serves(tmp_path, default_model_dir):
    """issue 15: `prompt_template: [unclosed` made `inspect` print a traceback and chat fail."""
    import subprocess
    import sys

    models = tmp_path / "models"
    folder = copy_without_tokenizer_template(default_model_dir, models, "broken-card")
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "README.md").write_text("---\nprompt_template: [unclosed\n---\n# A model\n")
    run = lambda *args: subprocess.run([sys.executable, "app.py", *args, "--model", "broken-card", "--models-dir",
                                        str(models)], capture_output=True, text=True, timeout=300,
                                       cwd=Path(__file__).resolve().parent.parent)
    inspected = run("inspect")
    assert inspected.returncode == 0 and "Traceback" not in inspected.stderr, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["template_source"] in ("built-in match", "default")
    assert "README.md front matter is not valid YAML at line 2" in report["template_warning"]
    assert "\n" not in report["template_warning"]
    chatted = run("generate", "--chat", "What is the capital of France?", "--temperature", "0",
                  "--max-new-tokens", "16")
    assert chatted.returncode == 0 and chatted.stdout.strip(), chatted.stderr
