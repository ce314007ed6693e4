"""A real browser (issue 20, items 1 and 2): edit a message and get a new reply, reply versions with arrows,
every change saved as it happens, a reload reopens the chat, Remove last gives the text back, the chat keys,
Delete asks first and the trash gives the chat back. One app and one page for all of it, to keep the suite short."""
import json
import time

import pytest

from tests.browser import BOTS, STATUS, USERS, app_page, send, wait_for_new_reply, watch_status
from tests.conftest import DEFAULT_MODEL

pytestmark = pytest.mark.browser


def saved_conversations(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def wait_until_saved(folder, contents: list[list[str]]) -> None:
    """Until the saved conversations' messages are `contents`: the file is written just after the last status."""
    deadline = time.time() + 60
    while True:
        found = [[m["content"] for m in c["messages"]] for c in saved_conversations(folder)]
        if found == contents:
            return
        assert time.time() < deadline, f"saved {found}, expected {contents}"
        time.sleep(0.2)


def test_edit_reload_remove_keys_delete_and_restore(tmp_path, models_dir):
    conversations = tmp_path / "user_data" / "conversations"
    with app_page(tmp_path, models_dir, DEFAULT_MODEL, greedy=True) as (app, page, shoot):
        box = page.locator("#chat-input textarea")
        # Shift+Enter breaks the line; Enter sends.
        box.fill("What is the capital")
        box.press("Shift+Enter")
        box.type("of France?")
        assert box.input_value() == "What is the capital\nof France?"
        assert page.evaluate(f"{USERS}.length") == 0
        box.fill("What is the capital of France?")
        watch_status(page)
        box.press("Enter")
        wait_for_new_reply(page, app)
        first_reply = page.evaluate(f"{BOTS}.at(-1).innerText")
        assert "Paris" in first_reply   # greedy: the preset was applied (not undone by a late refresh)
        wait_until_saved(conversations, [["What is the capital of France?", first_reply.strip()]])
        shoot("1-first-reply")

        # Edit the user message: the reply is generated anew for the edited text, and both are saved.
        watch_status(page)
        page.locator("#chatbot [data-testid=user]").first.hover()
        page.locator("#chatbot button[aria-label=Edit]").first.click()
        page.locator("#chatbot textarea.edit-textarea").fill("What is the capital of Italy?")
        page.locator("#chatbot button[aria-label=Submit]").click()
        wait_for_new_reply(page, app)
        assert page.evaluate(f"{USERS}.map(u => u.innerText.trim())") == ["What is the capital of Italy?"]
        second_reply = page.evaluate(f"{BOTS}.at(-1).innerText").strip()
        assert "Paris" not in second_reply   # the answer to the edited question
        wait_until_saved(conversations, [["What is the capital of Italy?", second_reply]])
        shoot("2-edited-and-regenerated")

        # Ctrl+Enter regenerates (a new status line), Esc asks Stop (nothing is generating now).
        watch_status(page)
        box.press("Control+Enter")
        wait_for_new_reply(page, app)
        assert page.evaluate(f"{USERS}.length") == 1 and box.input_value() == ""
        # The replaced reply is kept: the arrows step through the versions, and the one shown is saved.
        label = page.locator("#chat-version-label")
        label.get_by_text("version 2 of 2").wait_for()
        page.locator("#chat-version-prev").click()
        label.get_by_text("version 1 of 2").wait_for()
        assert page.evaluate(f"{BOTS}.at(-1).innerText").strip() == second_reply
        deadline = time.time() + 60
        while saved_conversations(conversations)[0]["versions"].get("1", {}).get("shown") != 0:
            assert time.time() < deadline, saved_conversations(conversations)
            time.sleep(0.2)
        page.keyboard.press("Escape")
        page.locator("#chat-status").get_by_text("nothing is generating").wait_for()
        # Alt+Enter continues the reply (a new generation, the same single turn).
        watch_status(page)
        box.press("Alt+Enter")
        wait_for_new_reply(page, app)
        assert page.evaluate(f"{USERS}.length") == 1 and page.evaluate(f"{BOTS}.length") == 1
        label.get_by_text("version 3 of 3").wait_for()   # the continued text is one more version

        # A reload reopens the conversation saved last.
        page.reload()
        page.wait_for_function(f"() => {USERS}.map(u => u.innerText.trim()).join() === "
                               "'What is the capital of Italy?'")
        label.get_by_text("version 3 of 3").wait_for()   # the versions came back with the chat
        shoot("3-reloaded")

        # Remove last puts the user's text back in the box, and the shorter chat is saved.
        page.locator("#chat-remove-last").click()
        page.wait_for_function("() => document.querySelector('#chat-input textarea').value === "
                               "'What is the capital of Italy?'")
        assert page.evaluate(f"{USERS}.length") == 0 and label.inner_text().strip() == ""
        wait_until_saved(conversations, [[]])

        # Delete asks first and acts on the chat on screen; the trash gives it back.
        send(page, app, "Say hello.")
        page.get_by_text("Conversations", exact=True).click()
        page.locator("#conversation-folder").get_by_text(str(conversations)).wait_for()   # where chats live
        page.locator("#conversation-delete").click()
        question = page.locator("#conversation-delete-question")
        [on_screen] = saved_conversations(conversations)
        question.get_by_text(f"Move “{on_screen['title']}” to the trash?").wait_for()
        assert saved_conversations(conversations), "deleted before the confirmation"
        shoot("4-delete-asks")
        page.locator("#conversation-delete-yes").click()
        page.wait_for_function(f"() => {USERS}.length === 0")
        # The Conversations panel has its own status line; the chat's keeps the reply's.
        page.locator("#conversation-status").get_by_text("moved the conversation to the trash").wait_for()
        assert "tok/s" in page.evaluate(STATUS)
        assert saved_conversations(conversations) == []
        [trashed] = saved_conversations(conversations / "trash")
        assert trashed["messages"][0]["content"] == "Say hello."
        page.locator("#trash-list input").click()
        page.get_by_role("option", name=on_screen["title"]).click()
        page.locator("#trash-restore").click()
        page.wait_for_function(f"() => {USERS}.map(u => u.innerText.trim()).join() === 'Say hello.'")
        assert len(saved_conversations(conversations)) == 1
        shoot("5-restored")
