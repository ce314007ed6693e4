"""The Text Generation tab's characters: the picker, import of a character file or card, and "Your name".

Chat and Chat-instruct chats belong to a character, and every mode keeps its own chats: picking a mode or a
character shows its newest saved chat, or opens a new one with the character's greeting (saved at once, as
text-generation-webui does); it never overwrites the chat that was on screen, which stays saved. Logic
lives in prompts/characters.py and prompts/chat_modes.py; this file wires widgets to it.
"""
from __future__ import annotations

import os
from typing import Callable

import gradio as gr

from prompts import reasoning
from prompts.characters import IMPORT_SUFFIXES, MAX_IMPORT_BYTES, CharacterError, CharacterStore, ChatProfile
from prompts.chat_modes import CHARACTER_MODES, CHAT_MODES, INSTRUCT, ChatSetup
from prompts.conversations import ConversationStore


class CharactersPanel:
    """Built inside the tab's layout; `wire` connects it to the chat once the chat's widgets exist."""

    def __init__(self, state, conversations: ConversationStore):
        self.conversations = conversations
        self.store = CharacterStore(state.settings.data_dir / "characters")
        self.profile = ChatProfile(state.settings.data_dir / "chat-profile.yaml")
        chosen = self.profile.read()
        with gr.Group(visible=False, elem_id="characters") as self.area:   # shown in the character modes
            with gr.Row():
                self.character = gr.Dropdown(self.store.names(), value=chosen["character"], label="Character",
                                             elem_id="character", scale=2)
                self.your_name = gr.Textbox(chosen["your_name"], label="Your name ({{user}})", elem_id="your-name",
                                            scale=1, max_lines=1)
                self.upload = gr.File(label="Import a character: .yaml, .json or a TavernAI/SillyTavern .png card",
                                      file_types=list(IMPORT_SUFFIXES), type="filepath",
                                      elem_id="character-upload", scale=2, height=130)
            self.status = gr.Markdown("", elem_id="character-status")
        self._choices: Callable = lambda selected=None: gr.skip()

    # ---- what the chat needs ---------------------------------------------------------------------------------
    def setup(self, mode_name: str, conversation_id: str) -> ChatSetup:
        """Who talks in the chat `conversation_id` in `mode_name`: the character it was started with (else the
        one picked last) and the user's name. CharacterError when that character's file is gone or broken."""
        your_name = self.profile.your_name()
        if mode_name not in CHARACTER_MODES:
            return ChatSetup(INSTRUCT, your_name=your_name)
        return ChatSetup(mode_name, self.store.load(self.recorded(conversation_id, mode_name)), your_name)

    def recorded(self, conversation_id: str, mode_name: str) -> str:
        """The character a conversation records: the one it has, or for a new chat in a character mode the
        character picked last (Instruct chats have none)."""
        try:
            own = self.conversations.open(conversation_id).character if conversation_id else ""
        except ValueError:
            own = ""
        if own or mode_name not in CHARACTER_MODES:
            return own
        return self.profile.read()["character"]

    # ---- showing the chat of a mode or character ---------------------------------------------------------------
    def _show(self, mode_name: str, key: str):
        """(chat, conversation id, list) of `mode_name`'s newest chat (with `key` in a character mode), or a
        new chat: empty in Instruct, opened by the character's greeting (saved at once) otherwise."""
        character = key if mode_name in CHARACTER_MODES else None
        conv = self.conversations.latest(mode_name, character)
        if conv is not None:
            return reasoning.shown(conv.messages), conv.id, self._choices(conv.id)   # with thinking parts
        if mode_name not in CHARACTER_MODES:
            return [], "", self._choices("")
        return self._greet("", mode_name, key)

    def _greet(self, conversation_id: str, mode_name: str, key: str):
        setup = ChatSetup(mode_name, self.store.load(key), self.profile.your_name())
        conv = self.conversations.save_messages(conversation_id, setup.greeting(), mode=mode_name, character=key)
        return conv.messages, conv.id, self._choices(conv.id)

    def on_mode(self, mode_name: str, conversation_id: str):
        """A mode picked: its own chat comes on screen (Notebook leaves the chat as it is)."""
        unchanged = (gr.skip(), gr.skip(), gr.skip(), "")
        if mode_name not in CHAT_MODES:
            return unchanged
        try:
            current = self.conversations.open(conversation_id) if conversation_id else None
        except ValueError:
            current = None
        if current is not None and current.mode == mode_name:
            return unchanged
        try:
            return *self._show(mode_name, self.profile.read()["character"]), ""
        except CharacterError as exc:
            return gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}"

    def on_character(self, key: str, mode_name: str):
        """A character picked: remembered, and in a character mode its chat comes on screen."""
        try:
            self.store.load(key)
        except CharacterError as exc:
            return gr.skip(), gr.skip(), gr.skip(), f"⚠️ {exc}"
        self.profile.update(character=key)
        if mode_name not in CHARACTER_MODES:
            return gr.skip(), gr.skip(), gr.skip(), f"picked {key}: its chats show in Chat and Chat-instruct"
        return *self._show(mode_name, key), ""

    def on_upload(self, path: str | None, mode_name: str):
        """An imported file becomes a new character (never replacing one), picked, and opens its first chat."""
        skip = (gr.skip(),) * 3
        if not path:
            return *skip, gr.skip(), gr.skip(), ""
        name = os.path.basename(path)
        try:
            if os.path.getsize(path) > MAX_IMPORT_BYTES:   # refused before reading it into memory
                raise CharacterError(f"{name} is over {MAX_IMPORT_BYTES // 2**20} MiB: not a character file")
            with open(path, "rb") as fh:
                key = self.store.import_file(name, fh.read())
        except (CharacterError, OSError) as exc:
            return *skip, gr.skip(), None, f"⚠️ {exc}"
        self.profile.update(character=key)
        character = self.store.load(key)
        picked = gr.update(choices=self.store.names(), value=key)
        line = f"imported {character.name} as {key}"
        if mode_name not in CHARACTER_MODES:
            return *skip, picked, None, f"{line}: pick Chat or Chat-instruct to talk to {character.name}"
        return *self._show(mode_name, key), picked, None, line

    def on_your_name(self, name: str):
        try:
            stored = self.profile.set_your_name(name)
        except CharacterError as exc:
            return gr.skip(), f"⚠️ {exc}"
        return stored, f"your name is {stored}"

    def greet_new(self, conversation_id: str, history, mode_name: str):
        """After New, Clear or Delete in a character mode: the new, empty chat opens with the greeting."""
        if mode_name not in CHARACTER_MODES or history:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            return self._greet(conversation_id, mode_name, self.profile.read()["character"])
        except CharacterError:
            return gr.skip(), gr.skip(), gr.skip()

    def follow(self, conversation_id: str):
        """A conversation opened (Open, Restore, a page load): the mode and character show the ones it has."""
        try:
            conv = self.conversations.open(conversation_id) if conversation_id else None
        except ValueError:
            conv = None
        if conv is None or conv.mode not in CHAT_MODES:
            return gr.skip(), gr.skip()
        if conv.character and conv.character != self.profile.read()["character"]:
            self.profile.update(character=conv.character)   # new chats now get this character too
        return conv.mode, (gr.update(choices=self.store.names(), value=conv.character) if conv.character
                           else gr.skip())

    # ---- wiring ----------------------------------------------------------------------------------------------
    def wire(self, *, mode, chatbot, conversation_id, conversation_list, choices: Callable,
             new_chats=(), opened_chats=()) -> list:
        """Connect to the chat. `choices(selected)`: the conversation list's update; `new_chats`: events after
        which an empty new chat is on screen (New, Clear, Delete); `opened_chats`: events that put a saved
        conversation on screen. Returns the events that change the chat on screen (for its reply versions)."""
        self._choices = choices
        shown = [chatbot, conversation_id, conversation_list]
        mode.change(lambda m: gr.update(visible=m in CHARACTER_MODES), [mode], [self.area], queue=False)
        # .input, not .change: a mode or character set by `follow` must not switch the chat again.
        switches = [
            mode.input(self.on_mode, [mode, conversation_id], [*shown, self.status], queue=False),
            self.character.input(self.on_character, [self.character, mode], [*shown, self.status], queue=False),
            self.upload.upload(self.on_upload, [self.upload, mode], [*shown, self.character, self.upload, self.status],
                               queue=False),
        ]
        for event in new_chats:
            switches.append(event.then(self.greet_new, [conversation_id, chatbot, mode], shown, queue=False))
        for event in opened_chats:
            self.follow_after(event, conversation_id, mode)
        for event in (self.your_name.submit, self.your_name.blur):
            event(self.on_your_name, [self.your_name], [self.your_name, self.status], queue=False)
        return switches

    def follow_after(self, event, conversation_id, mode) -> None:
        event.then(self.follow, [conversation_id], [mode, self.character], queue=False)
