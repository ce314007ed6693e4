"""Characters in a real browser (issue 20, item 3): set your name, import a TavernAI card (a PNG this test
writes), its greeting opens the chat, Chat and Chat-instruct prompts checked in the Prompt view, each mode
keeps its own chat when switching, a bad card is one error line and loses nothing, a reload brings back the
mode of the chat it reopens. One app and one page for all of it, to keep the suite short."""
import json
import time

import pytest

from tests.browser import BOTS, USERS, app_page, send
from tests.conftest import DEFAULT_MODEL
from tests.test_browser_chat_edit import saved_conversations
from tests.test_characters import V1, chara, png

pytestmark = pytest.mark.browser

PROMPT = "document.querySelector('#prompt-view textarea')?.value || ''"


def pick_mode(page, name: str) -> None:
    page.locator("#chat-mode").get_by_label(name, exact=True).check()


def wait_for_chat_text(page, users: list[str], first_bot: str) -> None:
    """Until the chat on screen has exactly these user messages and its first reply starts with `first_bot`."""
    page.wait_for_function(
        f"([users, bot]) => JSON.stringify({USERS}.map(u => u.innerText.trim())) === JSON.stringify(users)"
        f" && ({BOTS}[0]?.innerText || '').trim().startsWith(bot)", arg=[users, first_bot], timeout=60_000)


def wait_for_files(folder, check, what: str) -> list[dict]:
    deadline = time.time() + 60
    while True:
        found = saved_conversations(folder)
        if check(found):
            return found
        assert time.time() < deadline, f"{what}: saved {json.dumps(found)[:2000]}"
        time.sleep(0.2)


def test_card_import_modes_and_their_own_chats(tmp_path, models_dir):
    data = tmp_path / "user_data"
    card = tmp_path / "alice.png"
    card.write_bytes(png(chara(V1)))
    not_a_card = tmp_path / "broken.png"
    not_a_card.write_bytes(b"GIF89a, not a PNG")
    conversations = data / "conversations"
    with app_page(tmp_path, models_dir, DEFAULT_MODEL, greedy=True) as (app, page, shoot):
        page.click("#prompt-accordion")
        # Instruct (the default): the model's template over plain turns, as before characters.
        send(page, app, "What is the capital of France?")
        assert "Paris" in page.evaluate(f"{BOTS}.at(-1).innerText")
        assert "<|im_start|>user\nWhat is the capital of France?" in page.evaluate(PROMPT)

        # Chat: the character controls appear; the built-in Assistant's greeting opens its chat.
        pick_mode(page, "Chat")
        wait_for_chat_text(page, [], "How can I help you today?")
        your_name = page.locator("#your-name").locator("textarea, input").first
        your_name.fill("Sam")
        your_name.press("Enter")
        page.locator("#character-status").get_by_text("your name is Sam").wait_for()
        assert "your_name: Sam" in (data / "chat-profile.yaml").read_text()

        # A card that is no PNG: one error line, nothing imported, the chat on screen untouched.
        page.locator("#character-upload input[type=file]").set_input_files(str(not_a_card))
        page.locator("#character-status").get_by_text("broken.png is not a PNG image").wait_for()
        assert not (data / "characters").exists() or not list((data / "characters").iterdir())
        wait_for_chat_text(page, [], "How can I help you today?")

        # The card: saved as a character, picked, and its greeting (with both names filled in) opens a chat.
        page.locator("#character-upload input[type=file]").set_input_files(str(card))
        page.locator("#character-status").get_by_text("imported Alice as Alice").wait_for()
        wait_for_chat_text(page, [], "Hello Sam, I am Alice. Mind the ferns!")
        assert (data / "characters" / "Alice.yaml").is_file()
        shoot("1-card-imported-greeting")

        send(page, app, "What do you grow?")
        prompt = page.evaluate(PROMPT)
        assert prompt.startswith("Alice's Persona: Alice is a botanist who talks to Sam about ferns.")
        assert prompt.endswith("Alice: Hello Sam, I am Alice. Mind the ferns!\nSam: What do you grow?\nAlice:")
        assert "<|im_start|>" not in prompt
        chat_reply = page.evaluate(f"{BOTS}.at(-1).innerText").strip()
        assert chat_reply and not chat_reply.startswith("Sam:")
        shoot("2-chat-mode-reply")

        # Chat-instruct: its own chat (the greeting again), the command wrapped in the model's template.
        pick_mode(page, "Chat-instruct")
        wait_for_chat_text(page, [], "Hello Sam, I am Alice.")
        send(page, app, "Hi Alice")
        prompt = page.evaluate(PROMPT)
        assert ('<|im_start|>user\nContinue the chat dialogue below. Write a single reply for the character '
                '"Alice".\n\nAlice\'s Persona:') in prompt
        assert "Alice: Hello Sam, I am Alice. Mind the ferns!\nSam: Hi Alice<|im_end|>\n" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        shoot("3-chat-instruct-prompt")

        # Switching shows each mode's own chat and never replaces one with another.
        pick_mode(page, "Instruct")
        wait_for_chat_text(page, ["What is the capital of France?"], "")
        assert "Paris" in page.evaluate(f"{BOTS}.at(-1).innerText")
        pick_mode(page, "Chat")
        wait_for_chat_text(page, ["What do you grow?"], "Hello Sam, I am Alice.")
        assert page.evaluate(f"{BOTS}.at(-1).innerText").strip() == chat_reply
        pick_mode(page, "Chat-instruct")
        wait_for_chat_text(page, ["Hi Alice"], "Hello Sam, I am Alice.")
        shoot("4-modes-keep-their-chats")

        # Every chat is saved with its mode and character.
        def recorded(found):
            return sorted((c["mode"], c["character"], [m["content"] for m in c["messages"] if m["role"] == "user"])
                          for c in found)
        wait_for_files(conversations, lambda found: recorded(found) == [
            ("Chat", "Alice", ["What do you grow?"]), ("Chat", "Assistant", []),
            ("Chat-instruct", "Alice", ["Hi Alice"]), ("Instruct", "", ["What is the capital of France?"])],
            "one chat per mode and character")

        # A reload reopens the chat saved last, in its own mode, with its character picked.
        page.reload()
        wait_for_chat_text(page, ["Hi Alice"], "Hello Sam, I am Alice.")
        page.wait_for_function("() => document.querySelector('#chat-mode input[value=\"Chat-instruct\"]')"
                               "?.checked === true", timeout=60_000)
        assert page.locator("#character input").input_value() == "Alice"
        shoot("5-reloaded")
