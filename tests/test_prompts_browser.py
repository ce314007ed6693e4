"""The Text Generation tab in a real browser: switch Chat -> Notebook -> Chat, see the prompt sent."""
from __future__ import annotations

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_switching_modes_and_chatting(running_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(running_app.url)
        page.click("#tab-chat-button")
        expect(page.locator("#chat-template-info")).to_contain_text("tokenizer chat_template", timeout=30000)
        page.locator("#preset input").fill("Deterministic")
        page.locator("#preset input").press("Enter")
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

        # Two more turns: each reply answers its own question and never writes the next user turn.
        for turn, (question, answer) in enumerate([("What is the capital of Germany?", "Berlin"),
                                                   ("What is the capital of Italy?", "Rome")], start=2):
            page.locator("#chat-input textarea").fill(question)
            page.click("#chat-send")
            page.wait_for_function(
                "(n) => document.querySelectorAll('#chatbot [data-testid=bot]').length === n"
                " && document.querySelector('#chat-status').innerText.includes('tok/s')"
                " && !document.querySelector('#chat-status').innerText.includes('generating')",
                arg=turn, timeout=120000)
            reply = page.locator("#chatbot [data-testid=bot]").last.inner_text()
            assert answer in reply
            for leak in ("<|im_start|>", "<|im_end|>", "user\n", "USER:"):
                assert leak not in reply
        assert page.locator("#prompt-view textarea").input_value().count("<|im_start|>user\n") == 3
        page.screenshot(path=str(tmp_path / "three-turns.png"), full_page=True)

        page.get_by_label("Notebook").check()
        expect(page.locator("#notebook-text")).to_be_visible()
        expect(page.locator("#chatbot")).to_be_hidden()
        page.locator("#notebook-text textarea").fill("The capital of France is")
        page.click("#notebook-generate")
        # The status still shows the chat's tok/s: wait for the notebook's own continuation to finish.
        page.wait_for_function(
            """() => document.querySelector('#notebook-text textarea').value.length > 'The capital of France is'.length
                  && document.querySelector('#chat-status').innerText.includes('tok/s')""", timeout=120000)
        value = page.locator("#notebook-text textarea").input_value()
        assert value.startswith("The capital of France is") and len(value) > len("The capital of France is")

        page.get_by_label("Chat", exact=True).check()
        expect(page.locator("#chatbot")).to_be_visible()
        expect(page.locator("#chatbot")).to_contain_text("Paris")
        page.screenshot(path=str(tmp_path / "modes.png"), full_page=True)
        browser.close()
