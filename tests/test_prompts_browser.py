"""The Text Generation tab in a real browser: switch Chat -> Notebook -> Chat, see the prompt sent."""
from __future__ import annotations

import pytest

from tests.browser import browser_page, choose_preset, wait_for_chat


@pytest.mark.browser
def test_switching_modes_and_chatting(running_app, tmp_path):
    from playwright.sync_api import expect

    with browser_page(tmp_path) as (page, shoot):
        page.goto(running_app.url)
        page.click("#tab-chat-button")
        expect(page.locator("#chat-template-info")).to_contain_text("tokenizer chat_template", timeout=30000)
        choose_preset(page, "Deterministic", "0")  # greedy, so the answers are known
        page.locator("#chat-input textarea").fill("What is the capital of France?")
        page.click("#chat-send")
        expect(page.locator("#chat-status")).to_contain_text("tok/s", timeout=120000)
        expect(page.locator("#chatbot")).to_contain_text("Paris", timeout=10000)
        expect(page.locator("#chatbot")).not_to_contain_text("<|im_start|>")
        page.click("#prompt-accordion")
        expect(page.locator("#prompt-view textarea")).to_have_value(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
        expect(page.locator("#prompt-tokens")).to_contain_text("tokens")

        # Two more turns: each reply answers its own question and never writes the next user turn. The third
        # question is typed and sent as soon as the second is taken (the box cleared), while that reply is
        # still coming: it must neither be wiped by the reply's updates nor dropped, but run right after.
        box = page.locator("#chat-input textarea")
        box.fill("What is the capital of Germany?")
        page.click("#chat-send")
        expect(box).to_have_value("", timeout=30000)
        box.fill("What is the capital of Italy?")
        page.click("#chat-send")
        wait_for_chat(page, "() => document.querySelectorAll('#chatbot [data-testid=bot]').length === 3"
                            " && document.querySelector('#chat-status').innerText.includes('tok/s')"
                            " && !document.querySelector('#chat-status').innerText.includes('generating')",
                      app=running_app)
        replies = page.locator("#chatbot [data-testid=bot]").all_inner_texts()
        assert "Berlin" in replies[1] and "Rome" in replies[2], replies
        for reply in replies[1:]:
            for leak in ("<|im_start|>", "<|im_end|>", "user\n", "USER:"):
                assert leak not in reply
        assert page.locator("#prompt-view textarea").input_value().count("<|im_start|>user\n") == 3
        shoot("three-turns")

        page.get_by_label("Notebook").check()
        expect(page.locator("#notebook-text")).to_be_visible()
        expect(page.locator("#chatbot")).to_be_hidden()
        page.locator("#notebook-text textarea").fill("The capital of France is")
        page.click("#notebook-generate")
        # The status still shows the chat's tok/s: wait for the notebook's own continuation to finish.
        wait_for_chat(page, """() => document.querySelector('#notebook-text textarea').value.length
                                   > 'The capital of France is'.length
                               && document.querySelector('#chat-status').innerText.includes('tok/s')""",
                      app=running_app)
        value = page.locator("#notebook-text textarea").input_value()
        assert value.startswith("The capital of France is") and len(value) > len("The capital of France is")

        page.get_by_label("Instruct", exact=True).check()
        expect(page.locator("#chatbot")).to_be_visible()
        expect(page.locator("#chatbot")).to_contain_text("Paris")
        shoot("modes")
