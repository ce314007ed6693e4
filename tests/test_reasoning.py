"""A reasoning model's thinking split from its reply (prompts.reasoning), kept beside the reply in the chat and
the saved conversation, and kept out of the next prompt; the thinking switch reaching a template that takes it."""
from __future__ import annotations

import json
import random

import pytest

from prompts import chat_session
from prompts.conversations import ConversationStore
from prompts.reasoning import (HARMONY, THINK, THINKING_NOW, TEMPLATE_SYNTAXES, folded,
                               message_index, shown, split_reply, splitter_for, syntaxes_for)

HARMONY_TEMPLATE = "{{ '<|start|>assistant<|channel|>' }}"   # names harmony's markers, as gpt-oss's does

# (template source, model output, thinking, reply): every syntax, with text that looks like a marker's start.
CASES = [
    ("", "<think>\nIs 2 < 3? Yes: 2 <th 3.\n</think>\n\nYes, 2 < 3.", "Is 2 < 3? Yes: 2 <th 3.", "Yes, 2 < 3."),
    ("{{ '[THINK]' }}", "[THINK]count [/THIN] words[/THINK]Four.", "count [/THIN] words", "Four."),
    ("{{ '<|START_THINKING|>' }}", "<|START_THINKING|>plan<|END_THINKING|>Done <|END", "plan", "Done <|END"),
    (HARMONY_TEMPLATE, "<|channel|>analysis<|message|>User wants < the capital.<|end|><|start|>assistant"
     "<|channel|>final<|message|>Paris <|end.", "User wants < the capital.", "Paris <|end."),
]


def feed_all(splitter, pieces):
    """Stream `pieces` through `splitter`; returns the concatenated deltas (thinking, reply)."""
    thinking, reply = [], []
    for piece in pieces:
        t, r = splitter.feed(piece)
        thinking.append(t)
        reply.append(r)
    t, r = splitter.flush()
    return "".join(thinking) + t, "".join(reply) + r


@pytest.mark.parametrize("source,text,thinking,reply", CASES)
def test_every_marker_split_at_every_position_gives_the_same_parts(source, text, thinking, reply):
    assert split_reply(text, template_source=source) == (thinking, reply)
    for cut in range(1, len(text)):
        splitter = splitter_for(template_source=source)
        assert feed_all(splitter, [text[:cut], text[cut:]]) == (thinking, reply), cut
        assert (splitter.thinking, splitter.reply) == (thinking, reply)
    # one character at a time, and random pieces
    assert feed_all(splitter_for(template_source=source), list(text)) == (thinking, reply)
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 6)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert feed_all(splitter_for(template_source=source), pieces) == (thinking, reply), pieces


def test_text_after_a_marker_start_is_given_out_once_it_cannot_be_a_marker():
    splitter = splitter_for()
    assert splitter.feed("<thi") == ("", "")            # could still be <think>
    assert splitter.feed("s is fine") == ("", "<this is fine")
    splitter = splitter_for()
    assert splitter.feed("<think>a</th") == ("a", "")   # the close marker's start is held back
    assert splitter.in_block
    assert splitter.feed("ink>b") == ("", "b")
    assert not splitter.in_block


def test_an_unclosed_block_streams_as_thinking_and_stays_thinking_at_the_end():
    splitter = splitter_for()
    assert splitter.feed("<think>\nstep one") == ("step one", "")
    assert splitter.in_block and splitter.reply == ""
    assert splitter.feed(", step two") == (", step two", "")
    assert splitter.flush() == ("", "")
    assert (splitter.thinking, splitter.reply) == ("step one, step two", "")


def test_a_reply_without_a_block_passes_through_unchanged():
    text = "  Hello <b>there</b>, 1 < 2 and <think about it> later."
    assert split_reply(text) == ("", text)
    for cut in range(1, len(text)):
        assert feed_all(splitter_for(), [text[:cut], text[cut:]]) == ("", text)
    # a think tag after the reply has started is the reply's text, not a block
    assert split_reply("Sure. <think>x</think>") == ("", "Sure. <think>x</think>")


def test_a_prompt_that_opened_the_block_starts_inside_it_and_one_that_closed_it_is_all_reply():
    opened = "<|im_start|>assistant\n<think>\n"
    assert split_reply("the user greets me\n</think>\n\nHello!", prompt_text=opened) == ("the user greets me",
                                                                                         "Hello!")
    assert splitter_for(opened).in_block
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"   # Qwen3 with enable_thinking false
    assert split_reply("Hello! <think>", prompt_text=closed) == ("", "Hello! <think>")


def test_the_templates_own_markers_and_harmony_are_used_only_where_the_template_names_them():
    assert syntaxes_for("") == (THINK,)
    assert syntaxes_for("{{ '<|channel|>analysis' }}") == (THINK, HARMONY)
    assert syntaxes_for("[THINK]{{ x }}[/THINK]") == (THINK, TEMPLATE_SYNTAXES[1])
    assert split_reply("[THINK]x[/THINK]y") == ("", "[THINK]x[/THINK]y")


def test_harmony_thinking_between_tool_calls_is_joined_and_the_headers_are_dropped():
    text = ("<|channel|>analysis<|message|>first<|end|><|start|>assistant<|channel|>commentary<|message|>call"
            "<|end|><|start|>assistant<|channel|>analysis<|message|>second<|end|><|start|>assistant"
            "<|channel|>final<|message|>answer")
    thinking, reply = split_reply(text, template_source=HARMONY_TEMPLATE)
    assert thinking == "first\n\nsecond"
    assert reply == "<|channel|>commentary<|message|>call<|end|>answer"


# ---- the chat: history, display, saved conversations -------------------------------------------------------
REPLY = {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 and 2 make 4", "reasoning_tokens": 6,
         "reasoning_seconds": 0.4}
CHAT = [{"role": "user", "content": "2+2?"}, REPLY, {"role": "user", "content": "and 3+3?"}]


def test_the_chatbot_shows_the_thinking_as_a_collapsed_part_and_gives_back_the_same_history():
    display = shown(CHAT)
    assert [m["content"] for m in display] == ["2+2?", "2 and 2 make 4", "It is 4.", "and 3+3?"]
    assert display[1]["metadata"] == {"title": "Thinking", "status": "done", "log": "6 tokens", "duration": 0.4}
    streaming = shown([{**REPLY, THINKING_NOW: True}])
    assert streaming[0]["metadata"]["status"] == "pending"
    assert chat_session.normalize(folded(display)) == CHAT
    # the edit event's index counts the thinking part as a message of its own
    assert [message_index(CHAT, i) for i in range(4)] == [(0, False), (1, True), (1, False), (2, False)]


def test_editing_the_thinking_part_changes_only_the_thinking():
    history, reply_needed = chat_session.edit(CHAT, 1, "2+2=4", thinking=True)
    assert not reply_needed and history[1]["reasoning_content"] == "2+2=4" and history[1]["content"] == "It is 4."
    history, _ = chat_session.edit(CHAT, 1, "", thinking=True)
    assert history[1] == {"role": "assistant", "content": "It is 4."}


def test_the_thinking_is_saved_with_the_conversation_and_read_back(tmp_path):
    store = ConversationStore(tmp_path)
    conv = store.save_messages("", CHAT)
    assert store.open(conv.id).messages == CHAT
    data = json.loads((tmp_path / f"{conv.id}.json").read_text())
    data["messages"][1]["reasoning_tokens"] = "many"   # a malformed count is dropped, the rest is kept
    (tmp_path / f"{conv.id}.json").write_text(json.dumps(data))
    assert store.open(conv.id).messages[1] == {k: v for k, v in REPLY.items() if k != "reasoning_tokens"}


def test_reply_versions_keep_their_own_thinking(tmp_path):
    versions = chat_session.remember({}, CHAT[:2])
    second = {"role": "assistant", "content": "Four.", "reasoning_content": "add", "reasoning_tokens": 1}
    versions = chat_session.remember(versions, [CHAT[0], second], new=True)
    history, versions = chat_session.browse(versions, [CHAT[0], second], -1)
    assert history[1] == REPLY
    history, versions = chat_session.browse(versions, history, 1)
    assert history[1] == second
    store = ConversationStore(tmp_path)
    conv = store.save_messages("", history, versions=versions)
    assert store.open(conv.id).versions == versions


def test_the_thought_parts_survive_a_round_trip_through_gradios_chatbot():
    import gradio as gr

    chatbot = gr.Chatbot()
    assert chat_session.normalize(chatbot.preprocess(chatbot.postprocess(shown(CHAT)))) == CHAT


# ---- the real default model behind a Qwen3-style template --------------------------------------------------
# Like Qwen3's: it names `tools` and `enable_thinking`, shows a reply's reasoning_content only for replies after
# the last user message (a tool loop), and, like Qwen3-Thinking's, opens the block in the generation prompt
# (with enable_thinking false it writes an empty block instead, as Qwen3's does).
QWEN3_STYLE = """\
{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' + tools | length | string + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}\
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.reasoning_content is defined and message.reasoning_content \
and loop.index0 > ns.last_query %}
{{- '<|im_start|>assistant\\n<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' + message.content \
+ '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}\
{%- else %}{{- '<think>\\n' }}{%- endif %}
{%- endif %}"""


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, default_model_dir):
    """An AppState with the default model loaded from a folder whose tokenizer_config.json carries the
    Qwen3-style template (the other files are links to the default model's)."""
    from conftest import make_state

    models = tmp_path_factory.mktemp("thinker") / "models"
    folder = models / "Thinker"
    folder.mkdir(parents=True)
    for path in default_model_dir.iterdir():
        if path.name != "tokenizer_config.json":
            (folder / path.name).symlink_to(path)
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3_STYLE}))
    state = make_state(models)
    state.load_model("Thinker")
    yield state
    state.unload_model()


def drain(actions):
    """(the last message as each step showed it, the final history, the final status)."""
    shown_last, history, status = [], None, None
    for history, status in actions:
        shown_last.append(dict(history[-1]))   # the history is updated in place as the reply streams
    return shown_last, history, status


def test_earlier_thinking_is_not_sent_back_but_a_template_reading_it_gets_it_in_a_tool_loop(thinker):
    prompt = thinker.chat_prompt([_for_template(m) for m in CHAT])
    assert "It is 4." in prompt.text and "2 and 2 make 4" not in prompt.text
    tool_loop = [CHAT[0], REPLY, {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "add"}]
    prompt = thinker.chat_prompt([_for_template(m) for m in tool_loop])
    assert "<think>\n2 and 2 make 4\n</think>\n\nIt is 4." in prompt.text


def _for_template(message):
    from prompts.reasoning import for_template
    return for_template(message) if message["role"] != "tool" else message


def test_a_reply_from_a_prompt_that_opened_the_block_streams_as_thinking_with_its_count(thinker):
    from engine.sampling import GenerationParams

    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    steps, history, status = drain(chat_session.send(thinker, CHAT[:2], "Is it?", params, "t"))
    assert status.done and status.prompt.text.endswith("<|im_start|>assistant\n<think>\n")
    assert "2 and 2 make 4" not in status.prompt.text   # the earlier reply's thinking stayed out
    reply = history[-1]
    # 12 tokens and no </think>: the block never closed, so all of it is thinking, counted by the tokenizer
    assert reply["content"] == "" and reply["reasoning_content"]
    assert reply["reasoning_tokens"] == len(thinker.model.tokenizer(reply["reasoning_content"],
                                                                    add_special_tokens=False)["input_ids"])
    assert reply["reasoning_seconds"] >= 0 and THINKING_NOW not in reply
    assert any(m.get(THINKING_NOW) for m in steps[:-1])   # shown open while it streamed
    assert chat_session.normalize(folded(shown(history))) == chat_session.normalize(history)


def test_enable_thinking_false_reaches_the_template_and_the_reply_has_no_thinking(thinker):
    from engine.sampling import GenerationParams

    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    _, history, status = drain(chat_session.send(thinker, [], "What is the capital of France?", params, "t",
                                                 enable_thinking=False))
    assert status.prompt.text.endswith("<think>\n\n</think>\n\n")
    assert history[-1]["content"] and "reasoning_content" not in history[-1]
    _, history, status = drain(chat_session.send(thinker, [], "Hi", params, "t", enable_thinking=True))
    assert status.prompt.text.endswith("<think>\n") and history[-1]["reasoning_content"]


def test_continue_keeps_the_replys_thinking_and_goes_on_with_its_text(thinker):
    from engine.sampling import GenerationParams

    params = GenerationParams(max_new_tokens=6, temperature=0.0)
    history = [CHAT[0], {**REPLY, "content": "It is"}]
    _, history, status = drain(chat_session.continue_reply(thinker, history, params, "t"))
    # the template opened the block: the reply goes on after its own thinking, closed, as the model wrote it
    assert status.prompt.text.endswith("<|im_start|>assistant\n<think>\n2 and 2 make 4\n</think>\n\nIt is")
    reply = history[-1]
    assert reply["content"].startswith("It is") and len(reply["content"]) > len("It is")
    assert reply["reasoning_content"] == "2 and 2 make 4" and reply["reasoning_tokens"] == 6


def test_the_thinking_switch_is_a_saved_per_model_setting_with_its_source(thinker):
    from loaders.model_settings import SAVED
    from ui import chat_render

    assert chat_render.enable_thinking(thinker) is None   # unset: the template's own default
    assert chat_render.switch_update(thinker)["value"] is True
    try:
        assert chat_render.save_switch(thinker, False).startswith("thinking off for **Thinker**")
        effective = thinker.model_settings["enable_thinking"]
        assert (effective.value, effective.source) == (False, SAVED)
        update = chat_render.switch_update(thinker)
        assert update["value"] is False and update["info"] == chat_render.SWITCH_INFO[True]
        # the Model tab's Save keeps it
        from loaders.model_settings import settings_to_save
        entry = settings_to_save(None, {}, None, None, None, thinker.settings_store.get("Thinker"))
        assert entry["enable_thinking"] is False
    finally:
        thinker.save_model_settings("Thinker", {})
    assert chat_render.enable_thinking(thinker) is None


def test_a_saved_thinking_switch_that_is_not_true_or_false_is_reported_and_ignored(tmp_path):
    from loaders.settings_store import SettingsStore

    (tmp_path / "config-user.yaml").write_text("Thinker$:\n  enable_thinking: sometimes\n  preset: min_p\n")
    store = SettingsStore(tmp_path)
    assert store.get("Thinker") == {"preset": "min_p"}
    assert any("enable_thinking for Thinker must be true or false" in p for p in store.problems)


def test_continue_writes_the_thinking_back_as_the_model_wrote_it():
    from prompts.reasoning import continuation

    reply = {"role": "assistant", "content": "It is", "reasoning_content": "add them"}
    tail, splitter = continuation(reply, "<|im_start|>assistant\n<think>\n")   # the template opened the block
    assert tail == "add them\n</think>\n\nIt is" and not splitter.in_block
    tail, splitter = continuation(reply, "<|im_start|>assistant\n")            # the model opened it
    assert tail == "<think>\nadd them\n</think>\n\nIt is"
    assert splitter.feed(" 4.") == ("", " 4.")                                # no strip: it goes on with the text
    tail, splitter = continuation({**reply, "content": ""}, "<|im_start|>assistant\n")   # stopped while thinking
    assert tail == "<think>\nadd them" and splitter.in_block
    assert splitter.feed(" up</think>\n\n4") == (" up", "4")              # thinks on from where it stopped
    tail, _ = continuation(reply, "<|start|>assistant", HARMONY_TEMPLATE)
    assert tail == "<|channel|>analysis<|message|>add them<|end|><|start|>assistant<|channel|>final<|message|>It is"
