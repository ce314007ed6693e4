"""A real browser: open Hearth, load the default model on the Model tab, chat, watch the reply stream."""
import pytest

from tests.browser import app_page, choose_preset, open_tab, send
from tests.conftest import DEFAULT_MODEL

pytestmark = pytest.mark.browser


def test_load_and_chat_in_the_browser(tmp_path, models_dir):
    with app_page(tmp_path, models_dir) as (app, page, shoot):   # no model loaded at start
        open_tab(page, "tab-model")
        page.locator("#model-select input").click()
        page.get_by_role("option", name=DEFAULT_MODEL).click()
        reason = page.locator("#loader-reason")
        reason.get_by_text("picked").wait_for()
        assert "transformers" in reason.inner_text()
        shoot("1-model-selected")
        page.locator("#model-load").click()
        page.locator("#model-status").get_by_text(f"Loaded {DEFAULT_MODEL}").wait_for(timeout=120_000)
        shoot("2-model-loaded")

        open_tab(page, "tab-chat")
        choose_preset(page, "Deterministic", "0")  # greedy, so the answers are known
        # Record every distinct text the reply bubble shows, to see it stream rather than appear at once.
        page.evaluate("""() => {
            window.__replyTexts = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
                const text = bots.length ? bots[bots.length - 1].innerText : '';
                if (text && window.__replyTexts[window.__replyTexts.length - 1] !== text)
                    window.__replyTexts.push(text);
            }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
        }""")
        assert "Paris" in send(page, app, "What is the capital of France?")
        texts = page.evaluate("window.__replyTexts")
        assert len(texts) > 1, f"the reply did not stream: {texts}"
        status = page.locator("#chat-status").inner_text()
        assert "tok/s" in status
        shoot("3-chat-reply")
