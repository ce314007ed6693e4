"""Chats in and out (issue 20, item 5): text-generation-webui's chat JSON and OpenAI messages both ways, malformed
and huge files refused with one line, imports that never replace a chat, automatic titles, search."""
from __future__ import annotations

import json

import pytest

from prompts.chat_export import (MAX_IMPORT_BYTES, MAX_IMPORT_MESSAGES, ChatImportError, export_name, parse_chat,
                                 read_chat_file, to_openai, to_tgw)
from prompts.chat_search import search
from prompts.conversations import TITLE_LENGTH, ConversationStore, title_from

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris <b>of course</b> & “café”."},
        {"role": "user", "content": "And of Italy?\nOne word."},
        {"role": "assistant", "content": "Rome."}]
VERSIONS = {"3": {"texts": ["Milan.", "Rome."], "shown": 1}}


def test_openai_messages_round_trip_with_the_system_message(tmp_path):
    text = to_openai(CHAT, "Be brief.")
    assert json.loads(text) == [{"role": "system", "content": "Be brief."}, *CHAT]
    path = tmp_path / "chat.messages.json"
    path.write_text(text, encoding="utf-8")
    chat = read_chat_file(path)
    assert (chat.messages, chat.system_message, chat.format, chat.notes) == (CHAT, "Be brief.", "openai", [])
    # The request-body shape, content as parts and "developer" (OpenAI's newer system role) read the same.
    body = {"model": "x", "messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "What is the "},
                                                                    {"type": "text", "text": "capital of France?"}]},
                                       *CHAT[1:]]}
    chat = parse_chat(json.dumps(body).encode())
    assert (chat.messages, chat.system_message) == (CHAT, "Be brief.")


def test_tgw_round_trip_keeps_greeting_turns_unanswered_question_and_versions():
    chat = [{"role": "assistant", "content": "Hello, I am your guide."}, *CHAT,
            {"role": "assistant", "content": "Anything else?"}, {"role": "user", "content": "Not yet answered"}]
    versions = {"4": {"texts": ["Milan.", "Rome."], "shown": 1, "reasoning": [{}, {}]}}
    back = parse_chat(to_tgw(chat, versions).encode(), "log.json")
    assert (back.messages, back.versions, back.format, back.system_message) == (chat, versions, "tgw", "")


def test_a_reasoning_models_thinking_round_trips_in_both_formats():
    """OpenAI-style servers name it "reasoning_content"; text-generation-webui keeps it inline in the reply."""
    chat = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."}]
    versions = {"1": {"texts": ["Four.", "4."], "shown": 1,
                      "reasoning": [{"reasoning_content": "Easy."}, {"reasoning_content": "Two and two make four."}]}}
    tgw = to_tgw(chat, versions)
    assert json.loads(tgw)["internal"] == [["2+2?", "<think>\nTwo and two make four.\n</think>\n\n4."]]
    back = parse_chat(tgw)
    assert (back.messages, back.versions) == (chat, versions)
    assert json.loads(to_openai(chat))[1] == chat[1]
    assert parse_chat(to_openai(chat)).messages == chat


def test_tgw_json_is_written_the_way_tgw_writes_it():
    """modules/chat.py save_history: json.dumps(history, indent=4, ensure_ascii=False); "visible" html-escaped;
    reply versions in metadata["assistant_<row>"]."""
    expected = {
        "internal": [[CHAT[0]["content"], CHAT[1]["content"]], [CHAT[2]["content"], "Rome."]],
        "visible": [[CHAT[0]["content"], "Paris &lt;b&gt;of course&lt;/b&gt; &amp; “café”."],
                    ["And of Italy?\nOne word.", "Rome."]],
        "metadata": {"user_0": {"timestamp": ""}, "assistant_0": {"timestamp": ""}, "user_1": {"timestamp": ""},
                     "assistant_1": {"timestamp": "",
                                     "versions": [{"content": "Milan.", "visible_content": "Milan.", "timestamp": ""},
                                                  {"content": "Rome.", "visible_content": "Rome.", "timestamp": ""}],
                                     "current_version_index": 1}}}
    assert to_tgw(CHAT, VERSIONS) == json.dumps(expected, indent=4, ensure_ascii=False)
    assert export_name("tgw", "x", 1700000000.0).count("-") == 3   # its ids: YYYYmmdd-HH-MM-SS
    assert export_name("openai", "What is: the capital?", 0) == "what-is-the-capital.messages.json"


def test_reads_files_text_generation_webui_wrote_new_and_old():
    # As its UI saves a chat that began with a character's greeting and had a reply regenerated.
    saved = {"internal": [["<|BEGIN-VISIBLE-CHAT|>", "How can I help?"], ["Hi & bye", "First"]],
             "visible": [["", "How can I help?"], ["Hi &amp; bye", "First"]],
             "metadata": {"assistant_0": {"timestamp": "Nov 30, 2026 10:00"},
                          "user_1": {"timestamp": "Nov 30, 2026 10:01"},
                          "assistant_1": {"timestamp": "Nov 30, 2026 10:01", "model_name": "m",
                                          "versions": [{"content": "Zeroth", "visible_content": "Zeroth",
                                                        "timestamp": ""},
                                                       {"content": "First", "visible_content": "First",
                                                        "timestamp": ""}],
                                          "current_version_index": 1}}}
    chat = parse_chat(json.dumps(saved, indent=4, ensure_ascii=False).encode(), "20261130-10-00-00.json")
    assert chat.messages == [{"role": "assistant", "content": "How can I help?"},
                             {"role": "user", "content": "Hi & bye"}, {"role": "assistant", "content": "First"}]
    assert chat.versions == {"2": {"texts": ["Zeroth", "First"], "shown": 1, "reasoning": [{}, {}]}}
    old = {"data": [["Hi", "Hello"]], "data_visible": [["Hi", "Hello"]]}   # before 2023's rename
    assert parse_chat(json.dumps(old)).messages == [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"}]
    # What the chat cannot hold is named, not dropped in silence.
    saved["metadata"]["user_1"]["attachments"] = [{"name": "a.txt", "type": "text", "content": "x"}]
    assert any("attachments of 1 message" in n for n in parse_chat(json.dumps(saved)).notes)


@pytest.mark.parametrize("raw, says", [
    (b"{not json", "not JSON (line 1, column 2"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b'{"title": "x"}', "neither text-generation-webui"),
    (b'{"internal": "text"}', '"internal" is not a list'),
    (b'{"internal": [["only one"]], "visible": []}', "row 0 of \"internal\" is not a [user, reply] pair"),
    (b'{"internal": [["q", 5]]}', "row 0"),
    (b'[{"role": "tool", "content": "42"}]', "role 'tool'"),
    (b'[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]', "'image_url' part"),
    (b'[{"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}]', "tool calls"),
    (b'[{"content": "no role"}]', "message 0 is not"),
    (b'[]', "holds no messages"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_malformed_files_are_one_clear_line(raw, says):
    with pytest.raises(ChatImportError) as caught:
        parse_chat(raw, "chat.json")
    message = str(caught.value)
    assert says in message and "\n" not in message and message.startswith("chat.json"), message


def test_huge_files_are_refused_before_they_are_read(tmp_path):
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:   # sparse: the size is there without writing the bytes
        fh.truncate(MAX_IMPORT_BYTES + 1)
    with pytest.raises(ChatImportError, match=r"^huge\.json is 16\.0 MiB: chats to import are limited to 16 MiB$"):
        read_chat_file(huge)
    many = [{"role": "user", "content": "hi"}] * (MAX_IMPORT_MESSAGES + 1)
    with pytest.raises(ChatImportError, match=f"holds {MAX_IMPORT_MESSAGES + 1} messages"):
        parse_chat(json.dumps(many))


def test_an_import_is_a_new_conversation_and_never_replaces_one(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    existing = store.save_messages(None, CHAT)
    before = (store.folder / f"{existing.id}.json").read_bytes()
    chat = parse_chat(to_openai(CHAT, "Be brief."))
    clash = store.new(messages=chat.messages, system_message=chat.system_message)
    clash.id = existing.id   # as if the new id were taken meanwhile
    added = store.add(clash)
    assert added.id != existing.id
    assert (store.folder / f"{existing.id}.json").read_bytes() == before
    assert store.open(added.id).messages == CHAT and store.open(added.id).system_message == "Be brief."
    assert added.title == f"{title_from(CHAT)} (2)"   # the same first question: told apart in the list


def test_automatic_titles_are_short_single_lines_unique_and_renamable(tmp_path):
    long = "Please explain,\nin detail and with examples,\tthe difference between\x00TCP and UDP for games"
    title = title_from([{"role": "assistant", "content": "Greeting first"}, {"role": "user", "content": "  "},
                        {"role": "user", "content": long}])
    assert title == "Please explain, in detail and with examples…"   # cut at a word
    assert len(title) <= TITLE_LENGTH and title.isprintable()
    assert title_from([]) == "New conversation"
    store = ConversationStore(tmp_path)
    first = store.save_messages(None, [{"role": "user", "content": "Hello"}])
    second = store.save_messages(None, [{"role": "user", "content": "Hello"}])
    third = store.save_messages(None, [{"role": "user", "content": "Hello"}])
    assert [first.title, second.title, third.title] == ["Hello", "Hello (2)", "Hello (3)"]
    store.rename(second.id, "Greetings")
    again = store.save_messages(second.id, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}])
    assert again.title == "Greetings"   # a saved change keeps the name given


def test_search_finds_titles_and_text_case_insensitively_with_a_snippet(tmp_path):
    store = ConversationStore(tmp_path)
    geo = store.save_messages(None, CHAT)
    cooking = store.save_messages(None, [{"role": "user", "content": "How long do I boil an egg?"},
                                         {"role": "assistant", "content": "About " + "very " * 30
                                          + "roughly nine MINUTES for a hard egg, " + "then cool it " * 10}])
    store.rename(cooking.id, "Kitchen notes")
    [hit] = search(store.list(), "minutes for")
    assert hit.id == cooking.id and hit.title == "Kitchen notes" and hit.matches == 1
    assert hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert "roughly nine MINUTES for a hard egg" in hit.snippet and len(hit.snippet) < 130
    # A query's space matches the line break in "Italy?\nOne word."; the snippet is one line.
    [hit] = search(store.list(), "ITALY? one")
    assert hit.id == geo.id and hit.snippet == "And of Italy? One word." and "\n" not in hit.snippet
    [hit] = search(store.list(), "kitchen")   # only in the title
    assert (hit.id, hit.snippet) == (cooking.id, "Kitchen notes")
    assert [h.id for h in search(store.list(), "egg")] == [cooking.id]
    assert search(store.list(), "the") and [h.id for h in search(store.list(), "capital")] == [geo.id]
    assert search(store.list(), "submarine") == [] and search(store.list(), "   ") == []
    assert [h.matches for h in search(store.list(), "egg")] == [2]
