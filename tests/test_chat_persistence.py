"""Conversations live in a data folder of their own (issue 20, item 1), a deleted one goes to a trash it can come
back from, and the chat edits (remove last, edit a message) the UI saves as they happen."""
from pathlib import Path

import pytest

from app_settings import load_settings
from app_state import AppState
from prompts import chat_session
from prompts.conversations import ConversationStore


def test_conversations_go_to_the_data_folder_not_beside_the_models(tmp_path, monkeypatch):
    # A models folder inside a shared place: its neighbours' chats must not become ours.
    shared = tmp_path / "shared"
    (shared / "conversations").mkdir(parents=True)
    (shared / "conversations" / "20240101-000000-aaaaaa.json").write_text('{"id": "x", "messages": []}')
    settings_file = tmp_path / "hearth" / "settings.yaml"
    settings_file.parent.mkdir()
    settings_file.write_text("models_dir: ../shared/models\n")

    default = load_settings(settings_file, {})
    assert default.data_dir == settings_file.parent / "user_data"
    state = AppState(default)
    assert state.conversations_dir == settings_file.parent / "user_data" / "conversations"
    assert ConversationStore(state.conversations_dir).list() == []

    settings_file.write_text("models_dir: ../shared/models\ndata_dir: chats\n")
    assert load_settings(settings_file, {}).data_dir == settings_file.parent / "chats"
    monkeypatch.chdir(tmp_path)   # a relative --data-dir is relative to where the command runs
    assert load_settings(settings_file, {"data_dir": "mine"}).data_dir == tmp_path / "mine"


def test_delete_moves_to_the_trash_restore_brings_it_back_empty_removes_it(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    kept = store.save(store.new(messages=[{"role": "user", "content": "keep me"}]))
    gone = store.save(store.new(messages=[{"role": "user", "content": "delete me"}]))

    store.delete(gone.id)
    assert [c.id for c in store.list()] == [kept.id]
    assert [c.id for c in store.trashed()] == [gone.id]

    restored = store.restore(gone.id)
    assert restored.messages == [{"role": "user", "content": "delete me"}]
    assert {c.id for c in store.list()} == {kept.id, gone.id}
    assert store.trashed() == []
    with pytest.raises(ValueError, match="not .*in the trash|no conversation"):
        store.restore(gone.id)

    store.delete(gone.id)
    assert store.empty_trash() == 1
    assert store.trashed() == [] and not list((tmp_path / "conversations").rglob(f"{gone.id}.json"))
    assert [c.id for c in store.list()] == [kept.id]


def test_remove_last_gives_the_user_text_back():
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
               {"role": "user", "content": "second, typed with care"}, {"role": "assistant", "content": "two"}]
    shorter, text = chat_session.remove_last(history)
    assert shorter == history[:2]
    assert text == "second, typed with care"
    assert chat_session.remove_last([]) == ([], "")


def test_editing_a_user_message_drops_the_turns_after_it_editing_a_reply_keeps_them():
    history = [{"role": "user", "content": "capital of France?"}, {"role": "assistant", "content": "Paris"},
               {"role": "user", "content": "and Spain?"}, {"role": "assistant", "content": "Madrid"}]
    edited, reply_needed = chat_session.edit(history, 0, "capital of Italy?")
    assert edited == [{"role": "user", "content": "capital of Italy?"}] and reply_needed

    edited, reply_needed = chat_session.edit(history, 1, "Paris, on the Seine")
    assert [m["content"] for m in edited] == ["capital of France?", "Paris, on the Seine", "and Spain?", "Madrid"]
    assert not reply_needed
    assert history[1]["content"] == "Paris"   # the caller's history is left as it was
    with pytest.raises(IndexError):
        chat_session.edit(history, 4, "nothing there")


def test_the_default_data_folder_is_beside_settings_yaml():
    from app_settings import APP_ROOT, DEFAULT_SETTINGS_FILE

    assert load_settings(DEFAULT_SETTINGS_FILE, {}).data_dir == Path(APP_ROOT) / "user_data"


def test_reply_versions_are_kept_browsed_and_saved_with_the_conversation(tmp_path):
    question = {"role": "user", "content": "Name a colour."}
    history = [question, {"role": "assistant", "content": "Blue."}]
    versions = chat_session.remember({}, history)                      # Regenerate keeps the reply it replaces
    regenerated = [question, {"role": "assistant", "content": "Blue."}]   # greedy: the same text again
    versions = chat_session.remember(versions, regenerated, new=True)   # ...and still counts as a version
    regenerated = [question, {"role": "assistant", "content": "Red."}]
    versions = chat_session.remember(versions, regenerated, new=True)
    assert chat_session.version_label(versions, regenerated) == "version 3 of 3"

    back, versions = chat_session.browse(versions, regenerated, -1)
    back, versions = chat_session.browse(versions, back, -1)
    back, versions = chat_session.browse(versions, back, -1)           # stays at the first
    assert back[-1]["content"] == "Blue." and chat_session.version_label(versions, back) == "version 1 of 3"
    forward, versions = chat_session.browse(versions, back, 2)
    assert forward[-1]["content"] == "Red." and chat_session.version_label(versions, forward) == "version 3 of 3"

    store = ConversationStore(tmp_path / "conversations")
    saved = store.save_messages("", forward, versions=versions)
    reopened = ConversationStore(tmp_path / "conversations").open(saved.id)
    assert reopened.versions == versions and reopened.messages[-1]["content"] == "Red."
    # Remove last drops the removed reply's versions; a malformed saved entry is skipped, not fatal.
    assert chat_session.prune(versions, [question]) == {}
    (store.folder / f"{saved.id}.json").write_text(
        (store.folder / f"{saved.id}.json").read_text().replace('"shown": 2', '"shown": 7'))
    assert store.open(saved.id).versions == {}


def test_send_without_a_model_keeps_the_typed_text_in_the_box(tmp_path):
    from gradio_client import Client

    from tests.conftest import free_port, make_state
    from ui.app import build_ui

    state = make_state(tmp_path / "models")   # no model loaded, none loading
    demo = build_ui(state)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, ssr_mode=False,
                quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        outputs = client.predict(text="A long message typed with care", api_name="/send")
        history, box, status = outputs[0], outputs[1], outputs[2]
        assert box == "A long message typed with care"
        assert "no model is loaded" in status
        assert history == []
        assert ConversationStore(state.conversations_dir).list() == []   # nothing half-saved either
    finally:
        demo.close()
