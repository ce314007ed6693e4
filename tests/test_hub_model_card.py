"""Model cards: front matter (prompt_template & co), malformed YAML reported, the branch's Provided-files row."""
from __future__ import annotations

import pytest

from core.front_matter import FrontMatterError, read_front_matter
from hub.model_card import provided_files_row, summarize_card
from hub_fixtures import CARDS_DIR, llama2_chat_readme

LLONGMA = (CARDS_DIR / "LLongMA-2-7B-GPTQ.README.md").read_text()
AIROBOROS_FLATTENED = (CARDS_DIR / "airoboros-l2-7B-gpt4-m2.0-AWQ.README.txt").read_text()


def test_front_matter_of_a_real_thebloke_card():
    front = read_front_matter(LLONGMA)
    # YAML folds the line break inside the quoted scalar `'{prompt}\n'` into one space.
    assert front["prompt_template"] == "{prompt} "
    assert front["model_type"] == "llama"
    assert front["quantized_by"] == "TheBloke"
    assert front["base_model"] == "https://huggingface.co/conceptofmind/LLongMA-2-7b"


def test_provided_files_row_for_a_branch():
    row = provided_files_row(LLONGMA, "gptq-4bit-32g-actorder_True")
    assert row is not None
    assert (row["Bits"], row["GS"], row["Act Order"], row["Size"]) == ("4", "32", "Yes", "4.28 GB")
    assert row["Branch"] == "gptq-4bit-32g-actorder_True"          # the Markdown link is reduced to its text
    assert provided_files_row(LLONGMA, "gptq-8bit--1g-actorder_True")["GS"] == "None"
    assert provided_files_row(LLONGMA, "no-such-branch") is None


def test_llama2_chat_card_gives_its_chat_template_and_branch_rows():
    card = llama2_chat_readme()
    front = read_front_matter(card)
    assert front["prompt_template"].startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant.")
    assert front["prompt_template"].rstrip().endswith("{prompt}[/INST]")
    row = provided_files_row(card, "gptq-4bit-64g-actorder_True")
    assert (row["Bits"], row["GS"], row["Act Order"], row["Size"]) == ("4", "64", "Yes", "4.02 GB")


def test_malformed_front_matter_is_reported_not_a_crash():
    broken = "---\nprompt_template: '{prompt}\nmodel_type: [llama\n---\n# Card\n"
    with pytest.raises(FrontMatterError) as info:
        read_front_matter(broken)
    assert "not valid YAML" in str(info.value)
    summary = summarize_card(broken, "main")
    assert summary.prompt_template is None
    assert summary.problems and "not valid YAML" in summary.problems[0]
    assert "not valid YAML" in summary.as_markdown("main")


@pytest.mark.parametrize("text", ["", "# Just a title\n", "---\nunterminated: front matter\n", "---\n- a list\n---\n"])
def test_cards_without_usable_front_matter(text):
    if text.startswith("---\n- a list"):
        with pytest.raises(FrontMatterError):
            read_front_matter(text)
    else:
        assert read_front_matter(text) == {}


def test_a_card_whose_newlines_were_lost_still_gives_its_known_keys_but_no_table_rows():
    # This copy of the airoboros card was flattened to one line by a renderer: the known front matter keys are
    # picked out one by one (the prompt-template search reads the same), the "Provided files" table is gone.
    front = read_front_matter(AIROBOROS_FLATTENED)
    assert front["prompt_template"].endswith("USER: {prompt} ASSISTANT: ") and front["model_type"] == "llama"
    summary = summarize_card(AIROBOROS_FLATTENED, "main")
    assert summary.prompt_template == front["prompt_template"] and summary.quantized_by == "TheBloke"
    assert summary.branch_row is None and summary.problems == []


def test_summary_markdown_names_template_and_branch():
    text = summarize_card(LLONGMA, "gptq-4bit-128g-actorder_True").as_markdown("gptq-4bit-128g-actorder_True")
    assert "{prompt}" in text and "Bits: 4" in text and "GS: 128" in text and "llama" in text
