"""A real browser (issue 20, item 5): search finds a saved chat by a word of its text and opens it, Export downloads
the chat on screen in either format and the file parses, Import of a file written the way text-generation-webui
writes its logs shows the turns as a new conversation, and a malformed file is one line that changes nothing.
No model is needed for any of it, so none is loaded."""
import json

import pytest

from prompts.chat_export import parse_chat
from prompts.conversations import ConversationStore
from tests.browser import app_page

pytestmark = pytest.mark.browser

USERS = "[...document.querySelectorAll('#chatbot [data-testid=user]')].map(u => u.innerText.trim())"
BOTS = "[...document.querySelectorAll('#chatbot [data-testid=bot]')].map(b => b.innerText.trim())"
GEOGRAPHY = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Paris is the capital of France."}]
COOKING = [{"role": "user", "content": "How long do I boil an egg?"},
           {"role": "assistant", "content": "About nine minutes for a hard one."}]
# As text-generation-webui's save_history writes it (json.dumps(history, indent=4, ensure_ascii=False)): a
# character's greeting row, two turns, html-escaped "visible" texts, timestamps in metadata.
TGW_LOG = {"internal": [["<|BEGIN-VISIBLE-CHAT|>", "Ahoy! I am Captain Hook."],
                        ["Where is the treasure?", "Buried under the old oak & guarded."],
                        ["Can I have a map?", "Only if you <sign> here."]],
           "visible": [["", "Ahoy! I am Captain Hook."],
                       ["Where is the treasure?", "Buried under the old oak &amp; guarded."],
                       ["Can I have a map?", "Only if you &lt;sign&gt; here."]],
           "metadata": {"assistant_0": {"timestamp": "Nov 30, 2026 09:00"},
                        "user_1": {"timestamp": "Nov 30, 2026 09:01"},
                        "assistant_1": {"timestamp": "Nov 30, 2026 09:01", "model_name": "some-model"},
                        "user_2": {"timestamp": "Nov 30, 2026 09:02"},
                        "assistant_2": {"timestamp": "Nov 30, 2026 09:02", "model_name": "some-model"}}}


def saved(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.json")}


def test_search_opens_export_downloads_import_shows_the_turns(tmp_path, models_dir):
    data = tmp_path / "user_data"
    store = ConversationStore(data / "conversations")
    geography = store.save_messages(None, GEOGRAPHY, system_message="Answer in one sentence.")
    store.rename(store.save_messages(None, COOKING).id, "Kitchen notes")
    with app_page(tmp_path, models_dir) as (app, page, shoot):
        page.get_by_text("Conversations", exact=True).click()
        status = page.locator("#conversation-status")

        # Search: a word of a reply, in other case, finds the chat; clicking the hit opens it.
        page.locator("#chat-search textarea, #chat-search input").first.fill("PARIS")
        page.locator("#chat-search-button").click()
        status.get_by_text("1 chat(s) hold “PARIS”").wait_for()
        hit = page.locator("#chat-search-results label").filter(has_text="Paris is the capital of France.")
        assert hit.count() == 1 and geography.title in hit.inner_text()
        shoot("1-search-found")
        hit.click()
        page.wait_for_function(f"() => {USERS}.join() === 'What is the capital of France?'", timeout=60_000)
        assert page.evaluate(BOTS) == ["Paris is the capital of France."]
        status.get_by_text(f"opened “{geography.title}”").wait_for()
        assert page.locator("#system-message textarea").input_value() == "Answer in one sentence."
        shoot("2-opened-from-search")

        # Export: one click downloads the chat on screen; both formats parse back to it.
        page.locator("#chat-export-format").get_by_text("OpenAI messages JSON").click()
        with page.expect_download(timeout=60_000) as download:
            page.locator("#chat-export").click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        assert path.name == "what-is-the-capital-of-france.messages.json"
        assert json.loads(path.read_text()) == [{"role": "system", "content": "Answer in one sentence."},
                                                *GEOGRAPHY]
        page.locator("#chat-export-format").get_by_text("text-generation-webui chat JSON").click()
        with page.expect_download(timeout=60_000) as download:
            page.locator("#chat-export").click()
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        exported = json.loads(path.read_text())
        assert exported["internal"] == [[m["content"] for m in GEOGRAPHY]]
        assert parse_chat(path.read_bytes()).messages == GEOGRAPHY
        status.get_by_text("the system message is not part of that format").wait_for()
        shoot("3-exported")

        # Import of text-generation-webui's log: a new conversation on screen, the others untouched.
        before = saved(store.folder)
        log = tmp_path / "20261130-09-00-00.json"
        log.write_text(json.dumps(TGW_LOG, indent=4, ensure_ascii=False), encoding="utf-8")
        with page.expect_file_chooser() as chooser:
            page.locator("#chat-import").click()
        chooser.value.set_files(str(log))
        page.wait_for_function(f"() => {USERS}.join('|') === 'Where is the treasure?|Can I have a map?'",
                               timeout=60_000)
        assert page.evaluate(BOTS) == ["Ahoy! I am Captain Hook.", "Buried under the old oak & guarded.",
                                       "Only if you <sign> here."]
        status.get_by_text("imported “Where is the treasure?” from 20261130-09-00-00.json").wait_for()
        # The file had no system message: the one of the chat before is not carried over into it.
        assert page.locator("#system-message textarea").input_value() == ""
        after = saved(store.folder)
        assert {k: v for k, v in after.items() if k in before} == before and len(after) == len(before) + 1
        [new_name] = set(after) - set(before)
        imported = json.loads(after[new_name])
        assert [m["content"] for m in imported["messages"]][1:] == ["Where is the treasure?",
                                                                     "Buried under the old oak & guarded.",
                                                                     "Can I have a map?",
                                                                     "Only if you <sign> here."]
        shoot("4-imported")

        # A malformed file: one line, and nothing changes on screen or on disk.
        broken = tmp_path / "broken.json"
        broken.write_text('{"internal": [["only one"]]}')
        with page.expect_file_chooser() as chooser:
            page.locator("#chat-import").click()
        chooser.value.set_files(str(broken))
        status.get_by_text("⚠️ broken.json: row 0 of \"internal\" is not a [user, reply] pair of texts").wait_for()
        assert page.evaluate(USERS) == ["Where is the treasure?", "Can I have a map?"]
        assert saved(store.folder) == after
        shoot("5-malformed-import")

        # The hit found before opens its chat again (a hit is clickable more than once).
        hit.click()
        page.wait_for_function(f"() => {USERS}.join() === 'What is the capital of France?'", timeout=60_000)
        assert page.locator("#system-message textarea").input_value() == "Answer in one sentence."
        # A word only in a (renamed) title finds that chat; its hit is the title alone.
        page.locator("#chat-search textarea, #chat-search input").first.fill("kitchen")
        page.locator("#chat-search input, #chat-search textarea").first.press("Enter")
        status.get_by_text("1 chat(s) hold “kitchen”").wait_for()
        assert page.locator("#chat-search-results label").all_inner_texts() == ["Kitchen notes"]
        shoot("6-title-hit")
