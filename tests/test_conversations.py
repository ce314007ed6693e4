"""Saved conversations: one JSON file each, atomic writes, list/open/rename/delete, corrupt files skipped."""
from __future__ import annotations

import pytest

from prompts.conversations import ConversationStore

MESSAGES = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}]


def test_save_list_open_rename_delete_survive_a_new_store(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    conv = store.save_messages(None, MESSAGES, system_message="Be brief.", template="ChatML")
    assert conv.title == "What is the capital of France?"
    reopened = ConversationStore(tmp_path / "conversations")          # as after a restart
    assert [c.id for c in reopened.list()] == [conv.id]
    loaded = reopened.open(conv.id)
    assert (loaded.messages, loaded.system_message, loaded.template) == (MESSAGES, "Be brief.", "ChatML")
    reopened.rename(conv.id, "Geography")
    assert reopened.open(conv.id).title == "Geography"
    second = reopened.save_messages(conv.id, MESSAGES + [{"role": "user", "content": "And Spain?"}])
    assert second.id == conv.id and len(reopened.open(conv.id).messages) == 3
    reopened.delete(conv.id)
    assert reopened.list() == []
    # Deleted means moved to the trash (test_chat_persistence.py): nothing else is left behind.
    assert sorted(p.name for p in (tmp_path / "conversations").iterdir()) == ["trash"]


def test_corrupt_file_is_reported_and_skipped(tmp_path):
    store = ConversationStore(tmp_path)
    good = store.save_messages(None, MESSAGES)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "wrong-shape.json").write_text('{"id": "x", "messages": [{"role": "robot"}]}')
    assert [c.id for c in store.list()] == [good.id]
    assert len(store.problems) == 2 and any("broken.json" in p for p in store.problems)
    with pytest.raises(ValueError, match="corrupt"):
        store.open("broken")
    with pytest.raises(ValueError):
        store.open("../etc/passwd")
