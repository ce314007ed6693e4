"""Characters (issue 20, item 3): text-generation-webui YAML, TavernAI/SillyTavern cards (V1, V2) in PNGs this
test writes with zlib/struct, bad files, {{char}}/{{user}}, the prompt of each chat mode (Chat's transcript,
Chat-instruct's command through the model's template), and conversations that record mode and character."""
import base64
import json
import struct
import zlib

import pytest

from prompts import chat_session
from prompts.characters import (DEFAULT_CHARACTER, MAX_IMPORT_BYTES, Character, CharacterError, CharacterStore,
                                ChatProfile, parse_character, png_text_chunks, substitute)
from prompts.chat_modes import (CHAT, CHAT_INSTRUCT, INSTRUCT, ChatSetup, build_prompt, chat_instruct_messages,
                                transcript)
from prompts.conversations import ConversationStore
from engine.sampling import GenerationParams
from tests.test_reasoning import thinker  # noqa: F401 (a fixture: the default model under a Qwen3-style template)

V1 = {"name": "Alice", "description": "{{char}} is a botanist who talks to {{user}} about ferns.",
      "personality": "patient", "scenario": "A greenhouse in spring.",
      "first_mes": "Hello {{user}}, I am {{char}}. Mind the ferns!",
      "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello there."}
V2 = {"spec": "chara_card_v2", "spec_version": "2.0",
      "data": {"name": "Bob", "description": "A retired sailor.", "personality": "", "scenario": "",
               "first_mes": "Ahoy, {{user}}!", "mes_example": "", "creator_notes": "not for the model",
               "system_prompt": "{{original}} Stay in character as {{char}}.", "post_history_instructions": "",
               "alternate_greetings": ["Yo"], "tags": ["sea"], "creator": "me", "character_version": "1",
               "extensions": {}}}


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(*text_chunks: bytes) -> bytes:
    """A 1x1 RGB PNG with the given extra chunks before its pixel data."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(text_chunks) + pixels + chunk(b"IEND", b"")


def chara(card: dict) -> bytes:
    """The tEXt chunk TavernAI writes: keyword "chara", base64 of the card's JSON."""
    return chunk(b"tEXt", b"chara\0" + base64.b64encode(json.dumps(card).encode()))


# ---- parsing ----------------------------------------------------------------------------------------------
def test_text_generation_webui_yaml():
    text = "name: Ada\ngreeting: Hi {{user}}!\ncontext: |-\n  {{char}} is a mathematician.\n"
    found = parse_character("ada.yaml", text.encode())
    assert found == Character(name="Ada", greeting="Hi {{user}}!", context="{{char}} is a mathematician.")


def test_v1_card_in_a_png():
    found = parse_character("alice.png", png(chunk(b"tEXt", b"Software\0test"), chara(V1)))
    assert found.name == "Alice"
    assert found.greeting == V1["first_mes"]
    # text-generation-webui's card context: "<name>'s Persona:", the scenario, the example dialogue
    assert found.context == ("Alice's Persona: {{char}} is a botanist who talks to {{user}} about ferns.\n"
                             "Personality: patient\nScenario: A greenhouse in spring.\n"
                             "<START>\n{{user}}: Hi\n{{char}}: Hello there.")


def test_v2_card_in_a_png_and_compressed_text_chunks():
    found = parse_character("bob.png", png(chara(V2)))
    assert (found.name, found.greeting) == ("Bob", "Ahoy, {{user}}!")
    # V2's system_prompt leads; {{original}} (the frontend's own prompt) has nothing to stand for here
    assert found.context == "Stay in character as {{char}}.\nBob's Persona: A retired sailor."
    assert "not for the model" not in found.context
    encoded = base64.b64encode(json.dumps(V2).encode())
    ztxt = chunk(b"zTXt", b"chara\0\0" + zlib.compress(encoded))
    itxt = chunk(b"iTXt", b"chara\0\1\0en\0\0" + zlib.compress(encoded))
    assert parse_character("z.png", png(ztxt)).name == "Bob"
    assert parse_character("i.png", png(itxt)).name == "Bob"
    assert png_text_chunks(png(ztxt))["chara"] == encoded.decode()


def test_card_json_and_pygmalion_json():
    assert parse_character("alice.json", json.dumps(V1).encode()).name == "Alice"
    assert parse_character("bob.json", json.dumps(V2).encode()).greeting == "Ahoy, {{user}}!"
    old = {"char_name": "Eve", "char_persona": "curious", "char_greeting": "Hey", "world_scenario": "a lab",
           "example_dialogue": "You: hi"}
    found = parse_character("eve.json", json.dumps(old).encode())
    assert found == Character(name="Eve", greeting="Hey", context="Eve's Persona: curious\nScenario: a lab\nYou: hi")


@pytest.mark.parametrize("filename, data, says", [
    ("card.png", b"GIF89a not a png", "card.png is not a PNG image"),
    ("card.png", png(chunk(b"tEXt", b"Comment\0hello")), "card.png is a PNG without a character card"),
    ("card.png", png(chunk(b"tEXt", b"chara\0%%% not base64 json")), "card.png: the card's \"chara\" chunk is not"),
    ("card.png", png(chunk(b"tEXt", b"chara\0" + base64.b64encode(b"[1, 2]"))), "card.png: the card's JSON is not"),
    ("card.png", png(chara(V1))[:60], "card.png: the PNG is cut short"),
    ("card.png", png(chunk(b"zTXt", b"chara\0\0not zlib")), "card.png: a compressed PNG text chunk is corrupt"),
    ("bad.json", b"{\"name\": ", "bad.json is not valid JSON"),
    ("bad.yaml", b"name: [unclosed", "bad.yaml is not valid YAML"),
    ("list.yaml", b"- a\n- b\n", "list.yaml: a character must be a mapping"),
    ("nameless.yaml", b"greeting: hi\n", "nameless.yaml: the character has no name"),
    ("nameless.png", png(chara({**V1, "name": ""})), "nameless.png: the card has no name"),
    ("typed.yaml", b"name: [1]\n", "typed.yaml: name must be text"),
    ("latin1.yaml", "name: Zoë".encode("latin-1"), "latin1.yaml is not UTF-8 text"),
    ("notes.txt", b"name: x", "notes.txt: a character is a .yaml, .json or .png file, not .txt"),
    ("huge.json", b" " * (MAX_IMPORT_BYTES + 1), "huge.json is 16.0 MiB; a character file is at most 16 MiB"),
])
def test_bad_files_are_one_clear_line(filename, data, says):
    with pytest.raises(CharacterError) as caught:
        parse_character(filename, data)
    assert str(caught.value).startswith(says), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_text_chunk_cannot_inflate_without_bound():
    bomb = chunk(b"zTXt", b"chara\0\0" + zlib.compress(b"A" * (8 * 1024 * 1024)))
    with pytest.raises(CharacterError, match="inflates past 4 MiB"):
        parse_character("bomb.png", png(bomb))


def test_placeholders_are_replaced_as_sillytavern_does():
    text = "{{char}} meets {{user}}; {{Char}} and {{USER}}; <BOT> greets <USER>; <CHAR>."
    assert substitute(text, "Sam", "Alice") == "Alice meets Sam; Alice and Sam; Alice greets Sam; Alice."


# ---- the characters folder and the user's name ----------------------------------------------------------------
def test_import_stores_yaml_and_never_overwrites_a_character_of_the_same_name(tmp_path):
    store = CharacterStore(tmp_path / "characters")
    assert store.names() == ["Assistant"]           # the built-in character before any import
    assert store.load("") == DEFAULT_CHARACTER
    first = store.import_file("alice.png", png(chara(V1)))
    second = store.import_file("alice-again.json", json.dumps({**V1, "first_mes": "Second Alice"}).encode())
    assert (first, second) == ("Alice", "Alice_001")
    assert store.load("Alice").greeting == V1["first_mes"]
    assert store.load("Alice_001").greeting == "Second Alice"
    assert store.names() == ["Assistant", "Alice", "Alice_001"]
    # A name that is a path stays a file name inside the folder.
    sneaky = store.save(Character(name="../../etc/passwd", greeting="x"))
    assert (tmp_path / "characters" / f"{sneaky}.yaml").is_file() and "/" not in sneaky
    # The saved file is text-generation-webui's YAML, readable by it as is.
    saved = (tmp_path / "characters" / "Alice.yaml").read_text()
    assert saved.startswith("name: Alice\ngreeting:") and "context:" in saved


def test_a_bad_import_loses_nothing(tmp_path):
    store = CharacterStore(tmp_path / "characters")
    store.import_file("alice.yaml", b"name: Alice\ngreeting: Hi\ncontext: c\n")
    before = {p.name: p.read_bytes() for p in (tmp_path / "characters").iterdir()}
    for name, data in (("x.png", b"not a png"), ("Alice.yaml", b"name: [oops")):
        with pytest.raises(CharacterError):
            store.import_file(name, data)
    assert {p.name: p.read_bytes() for p in (tmp_path / "characters").iterdir()} == before


def test_your_name_and_the_picked_character_persist(tmp_path):
    path = tmp_path / "chat-profile.yaml"
    assert ChatProfile(path).read() == {"your_name": "You", "character": "Assistant"}
    ChatProfile(path).set_your_name("  Sam   Smith ")
    ChatProfile(path).update(character="Alice")
    assert ChatProfile(path).read() == {"your_name": "Sam Smith", "character": "Alice"}
    with pytest.raises(CharacterError):
        ChatProfile(path).set_your_name("   ")
    path.write_text("your_name: [broken")            # a damaged file: the defaults, nothing fatal
    assert ChatProfile(path).your_name() == "You"


# ---- the prompt of each mode ----------------------------------------------------------------------------------
ALICE = Character(name="Alice", greeting="Hello {{user}}!", context="{{char}} is a botanist. {{user}} visits.")
HISTORY = [{"role": "assistant", "content": "Hello Sam!"}, {"role": "user", "content": " Hi Alice. "},
           {"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Which fern?"}]


def test_greeting_opens_a_chat_in_the_character_modes_only():
    assert ChatSetup(CHAT, ALICE, "Sam").greeting() == [{"role": "assistant", "content": "Hello Sam!"}]
    assert ChatSetup(CHAT_INSTRUCT, ALICE, "Sam").greeting() == [{"role": "assistant", "content": "Hello Sam!"}]
    assert ChatSetup(INSTRUCT, ALICE, "Sam").greeting() == []


def test_chat_transcript_labels_turns_with_names():
    setup = ChatSetup(CHAT, ALICE, "Sam")
    assert transcript(setup, HISTORY) == ("Alice is a botanist. Sam visits.\n\n"
                                          "Alice: Hello Sam!\nSam: Hi Alice.\nAlice: Welcome.\nSam: Which fern?\n"
                                          "Alice:")
    partial = HISTORY + [{"role": "assistant", "content": "The maidenhair"}]
    assert transcript(setup, partial, continue_last=True).endswith("Sam: Which fern?\nAlice: The maidenhair")
    assert setup.stops() == ("\nSam:", "\nAlice:")


def test_chat_instruct_wraps_the_transcript_in_the_command():
    setup = ChatSetup(CHAT_INSTRUCT, ALICE, "Sam")
    messages = chat_instruct_messages(setup, HISTORY, "Be brief.")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": 'Continue the chat dialogue below. Write a single reply for the character '
                                    '"Alice".\n\nAlice is a botanist. Sam visits.\n\nAlice: Hello Sam!\n'
                                    'Sam: Hi Alice.\nAlice: Welcome.\nSam: Which fern?'}]
    going_on = chat_instruct_messages(setup, HISTORY + [{"role": "assistant", "content": "The"}], None, True)
    assert [m["role"] for m in going_on] == ["user", "assistant"] and going_on[1]["content"] == "The"


def test_each_mode_builds_its_prompt_through_the_loaded_model(loaded_state):
    chat = build_prompt(loaded_state, ChatSetup(CHAT, ALICE, "Sam"), HISTORY, max_new_tokens=16)
    assert chat.text == transcript(ChatSetup(CHAT, ALICE, "Sam"), HISTORY)   # no template: the transcript itself
    assert "<|im_start|>" not in chat.text and {"\nSam:", "\nAlice:"} <= set(chat.stop)
    assert chat.ids and chat.template_name == "chat as Alice"

    wrapped = build_prompt(loaded_state, ChatSetup(CHAT_INSTRUCT, ALICE, "Sam"), HISTORY, max_new_tokens=16)
    command = chat_instruct_messages(ChatSetup(CHAT_INSTRUCT, ALICE, "Sam"), HISTORY)[0]["content"]
    assert f"<|im_start|>user\n{command}<|im_end|>\n" in wrapped.text   # the model's ChatML wraps the command
    assert wrapped.text.endswith("<|im_start|>assistant\n")
    assert {"<|im_end|>", "\nSam:", "\nAlice:"} <= set(wrapped.stop)
    assert "chat-instruct as Alice" in wrapped.template_source


def test_a_long_character_chat_drops_its_oldest_turns(loaded_state):
    long = [m for i in range(60) for m in ({"role": "user", "content": f"question {i} " + "word " * 40},
                                            {"role": "assistant", "content": f"answer {i}"})]
    long.append({"role": "user", "content": "last question"})
    context_length = loaded_state.model.context_length
    for mode in (CHAT, CHAT_INSTRUCT):
        prompt = build_prompt(loaded_state, ChatSetup(mode, ALICE, "Sam"), long,
                              max_new_tokens=context_length - 600)
        assert prompt.dropped_turns > 0 and prompt.n_tokens <= 600
        assert "last question" in prompt.text and "question 0 " not in prompt.text
        assert "Alice is a botanist" in prompt.text      # the context stays


def test_a_character_chat_is_multi_turn_with_the_real_model(loaded_state):
    params = GenerationParams(max_new_tokens=12, temperature=0, seed=1)
    setup = ChatSetup(CHAT, ALICE, "Sam")
    history = setup.greeting()
    for question in ("What is your name?", "What do you grow?"):
        *_, (history, status) = chat_session.send(loaded_state, history, question, params, "chars", setup=setup)
        assert status.done and not status.error
        assert "Sam visits." in status.prompt.text and status.prompt.text.endswith("Alice:")
    assert [m["role"] for m in history] == ["assistant", "user", "assistant", "user", "assistant"]
    assert status.prompt.text.count("\nSam: ") == 2      # both questions, labelled with the user's name
    for reply in history[2::2]:
        assert reply["content"] == reply["content"].strip() and "\nSam:" not in reply["content"]


def test_chat_instruct_hands_the_thinking_switch_to_the_instruction_template(thinker):
    # A Qwen3-style template closes an empty think block when thinking is off; Chat-instruct goes through it.
    params = GenerationParams(max_new_tokens=4, temperature=0, seed=1)
    setup = ChatSetup(CHAT_INSTRUCT, ALICE, "Sam")
    *_, (_, status) = chat_session.send(thinker, HISTORY[:3], "Which fern?", params, "t", setup=setup,
                                        enable_thinking=False)
    assert 'for the character "Alice"' in status.prompt.text
    assert status.prompt.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    *_, (_, status) = chat_session.send(thinker, HISTORY[:3], "Which fern?", params, "t", setup=setup)
    assert status.prompt.text.endswith("<|im_start|>assistant\n<think>\n")


# ---- conversations record their mode and character -----------------------------------------------------------
def test_conversations_record_mode_and_character(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    older = store.save_messages("", [{"role": "assistant", "content": "Hi"}], mode=CHAT, character="Alice")
    store.save_messages("", [{"role": "assistant", "content": "Ahoy"}], mode=CHAT, character="Bob")
    plain = store.save_messages("", [{"role": "user", "content": "2+2?"}], mode=INSTRUCT)
    assert store.open(older.id).character == "Alice"
    assert store.latest(CHAT, "Alice").id == older.id
    assert store.latest(INSTRUCT).id == plain.id
    assert store.latest(CHAT_INSTRUCT, "Alice") is None
    # A chat saved before characters existed said "Chat" for the template's plain turns: Instruct now.
    (tmp_path / "conversations" / "old-1.json").write_text(json.dumps(
        {"id": "old-1", "title": "t", "mode": "Chat", "messages": [{"role": "user", "content": "x"}]}))
    assert store.open("old-1").mode == INSTRUCT
