"""A real browser (issue 18 item 3, issue 20 item 4): a reasoning model's thinking is a collapsible "Thinking"
part above its reply, with its token count and time; open while it streams, closed when done; saved with the
chat and shown again after a reload; the "Enable thinking" switch is saved for the model and reaches its template.

The default model does not think by itself, so it runs behind a Qwen3-Thinking-style template (written here)
that opens `<think>` in the generation prompt: whatever the real model writes then is thinking, streamed live.
A saved conversation written here holds a finished reply with its thinking."""
import json
import time

import pytest
import yaml

from tests.browser import STATUS, app_page, choose_preset, send, set_slider
from tests.test_reasoning import QWEN3_STYLE

pytestmark = pytest.mark.browser

MODEL = "Thinker"
PROMPT = "document.querySelector('#prompt-view textarea')?.value || ''"
THOUGHTS = "[...document.querySelectorAll('#chatbot .thought-group')]"
SAVED_REPLY = {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 and 2 make 4",
               "reasoning_tokens": 6, "reasoning_seconds": 0.4}


def thinker_folder(models_dir, default_model_dir):
    folder = models_dir / MODEL
    folder.mkdir()
    for path in default_model_dir.iterdir():
        if path.name != "tokenizer_config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3_STYLE}))


def thoughts(page) -> list[dict]:
    """Each Thinking part: its title, the count and time beside it, whether it is open, spinning, and its text."""
    return page.evaluate(f"""() => {THOUGHTS}.map(g => ({{
        title: g.querySelector('.title')?.innerText.split('\\n')[0].trim(),
        log: g.querySelector('.duration')?.innerText || '',
        open: g.querySelector('.title').classList.contains('expanded'),
        pending: !!g.querySelector('.loading-spinner'),
        text: g.innerText}}))""")


def watch(page) -> None:
    """Record, from now on, every Thinking part seen open with a spinner (a short reply may stream for under a
    second)."""
    page.evaluate(f"""() => {{
        window.__openWhileStreaming = [];
        if (window.__observer) return;
        window.__observer = new MutationObserver(() => {{
            for (const g of {THOUGHTS})
                if (g.querySelector('.loading-spinner') && g.querySelector('.title').classList.contains('expanded'))
                    window.__openWhileStreaming.push(g.innerText);
        }});
        window.__observer.observe(document.querySelector('#tab-chat'),
                                  {{subtree: true, childList: true, characterData: true, attributes: true}});
    }}""")


def saved_messages(folder, wanted: int) -> list[dict]:
    """The one saved conversation's messages once it has `wanted` of them (saved just after the last status)."""
    deadline = time.time() + 60
    while True:
        files = list(folder.glob("*.json"))
        messages = json.loads(files[0].read_text())["messages"] if len(files) == 1 else []
        if len(messages) == wanted:
            return messages
        assert time.time() < deadline, f"saved {messages}"
        time.sleep(0.2)


def test_thinking_is_a_collapsible_part_streamed_saved_reloaded_and_switched_off(tmp_path, models_dir,
                                                                                  default_model_dir):
    thinker_folder(models_dir, default_model_dir)
    conversations = tmp_path / "user_data" / "conversations"
    conversations.mkdir(parents=True)
    (conversations / "20261130-000000-abcdef.json").write_text(json.dumps({
        "id": "20261130-000000-abcdef", "title": "Sums", "mode": "Instruct", "created": 1.0, "updated": 2.0,
        "messages": [{"role": "user", "content": "2+2?"}, SAVED_REPLY]}))
    with app_page(tmp_path, models_dir, MODEL) as (app, page, shoot):
        # The saved chat: its reply's thinking is a closed part above the reply, with its count and time.
        page.wait_for_function(f"() => {THOUGHTS}.length === 1")
        [saved] = thoughts(page)
        assert saved["title"] == "Thinking" and saved["log"] == "6 tokens (0.4s)" and not saved["open"]
        assert "2 and 2 make 4" not in saved["text"]   # closed: the thinking itself is not on screen
        bots = page.evaluate("() => [...document.querySelectorAll('#chatbot [data-testid=bot]')]"
                             ".map(b => b.innerText)")
        assert any(b.strip() == "It is 4." for b in bots), bots   # the reply alone, without the thinking
        page.locator("#chatbot .thought-group .title").first.click()
        page.wait_for_function(f"() => {THOUGHTS}[0].innerText.includes('2 and 2 make 4')")
        shoot("1-saved-thinking-opened")

        # A live reply: the template opened <think>, so what the model writes streams as thinking.
        choose_preset(page, "Deterministic", "0")
        set_slider(page, "gen-max_new_tokens", "24")
        watch(page)
        send(page, app, "Is it?")
        page.wait_for_function(f"() => {THOUGHTS}.length === 2 && !{THOUGHTS}[1].querySelector('.loading-spinner')")
        assert page.evaluate("() => window.__openWhileStreaming.length") > 0   # open, spinning, while it streamed
        messages = saved_messages(conversations, 4)
        live = messages[-1]
        assert live["content"] == "" and live["reasoning_content"]   # 24 tokens, never closed: all thinking
        assert "thinking_now" not in live
        streamed = thoughts(page)[1]
        assert streamed["title"] == "Thinking" and not streamed["open"] and not streamed["pending"]
        assert streamed["log"].startswith(f"{live['reasoning_tokens']} tokens ("), streamed
        assert live["reasoning_tokens"] > 0
        page.click("#prompt-accordion")   # the exact prompt: the block opened, earlier thinking not sent back
        page.wait_for_function(f"() => ({PROMPT}).endsWith('<|im_start|>assistant\\n<think>\\n')")
        assert "It is 4." in page.evaluate(f"() => {PROMPT}")
        assert "2 and 2 make 4" not in page.evaluate(f"() => {PROMPT}")
        shoot("2-streamed-thinking-closed")

        # A reload shows both Thinking parts again, with their counts.
        page.reload()
        page.wait_for_function(f"() => {THOUGHTS}.length === 2")
        assert [t["log"] for t in thoughts(page)] == [saved["log"], streamed["log"]]
        assert not any(t["open"] for t in thoughts(page))
        shoot("3-after-reload")

        # The switch: off is saved for this model and the template writes an empty block, so no thinking.
        page.locator("#chat-enable-thinking input").uncheck()
        page.wait_for_function(f"() => {STATUS}.includes('thinking off')")
        saved_settings = yaml.safe_load((models_dir / "config-user.yaml").read_text())
        assert next(v for k, v in saved_settings.items() if k.startswith(MODEL))["enable_thinking"] is False
        send(page, app, "Hi")
        if not page.evaluate(f"() => !!document.querySelector('#prompt-view textarea')"):
            page.click("#prompt-accordion")   # a reload closed it
        page.wait_for_function(f"() => ({PROMPT}).endsWith('<think>\\n\\n</think>\\n\\n')")
        messages = saved_messages(conversations, 6)
        assert messages[-1]["content"] and "reasoning_content" not in messages[-1]
        assert len(thoughts(page)) == 2
        shoot("4-thinking-switched-off")
