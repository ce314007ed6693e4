"""The prompt of each chat mode, as text-generation-webui builds it.

- Instruct: the model's instruction template over the plain user/assistant turns (prompts.chat does that).
- Chat: a transcript. The character's context, then one line per message labelled with who said it
  ("You: ...", "Alice: ..."), ending in "Alice:" for the model to go on as the character; no template.
- Chat-instruct: that transcript (without the closing "Alice:") pasted into a command ("Continue the chat
  dialogue below. Write a single reply for the character ...") sent as one user message through the
  instruction template, so an instruction-tuned model answers an instruction it understands.

Both character modes drop the oldest whole turns to fit the context, stop where the model starts a line
for someone else ("\\nYou:"), and have {{char}}/{{user}} replaced in the context and the command.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from engine.model import Message, Prompt
from prompts.characters import DEFAULT_CHARACTER, DEFAULT_YOUR_NAME, Character, substitute
from prompts.template_options import NO_OPTIONS, TemplateOptions
from prompts.truncation import fit_messages

CHAT, CHAT_INSTRUCT, INSTRUCT = "Chat", "Chat-instruct", "Instruct"
CHAT_MODES = (CHAT, CHAT_INSTRUCT, INSTRUCT)
CHARACTER_MODES = (CHAT, CHAT_INSTRUCT)
# text-generation-webui's default chat-instruct command: <|character|> is the character's name, <|prompt|>
# the chat transcript.
CHAT_INSTRUCT_COMMAND = ('Continue the chat dialogue below. Write a single reply for the character '
                         '"<|character|>".\n\n<|prompt|>')


@dataclass(frozen=True)
class ChatSetup:
    """Who is talking in a chat: its mode, the character (character modes) and the user's name."""
    mode: str
    character: Character = DEFAULT_CHARACTER
    your_name: str = DEFAULT_YOUR_NAME
    command: str = CHAT_INSTRUCT_COMMAND

    @property
    def uses_character(self) -> bool:
        return self.mode in CHARACTER_MODES

    def fill(self, text: str) -> str:
        """`text` with {{user}} and {{char}} replaced by the names of this chat."""
        return substitute(text, self.your_name, self.character.name)

    def context(self) -> str:
        return self.fill(self.character.context).strip()

    def greeting(self) -> list[Message]:
        """A new chat's history: the character's greeting as its first reply (character modes only)."""
        text = self.fill(self.character.greeting).strip()
        return [{"role": "assistant", "content": text}] if self.uses_character and text else []

    def stops(self) -> tuple[str, ...]:
        """Where a reply ends: a line that starts a speaker's turn. (text-generation-webui stops chat-instruct
        only at the template's end of turn; the labels are added here as well, since a small model otherwise
        goes on writing the dialogue, both sides of it, inside its one reply.)"""
        return (f"\n{self.your_name}:", f"\n{self.character.name}:")


def _speaker(setup: ChatSetup, message: Message) -> str:
    return setup.your_name if message["role"] == "user" else setup.character.name


def transcript(setup: ChatSetup, history: Sequence[Message], *, reply_prompt: bool = True,
               continue_last: bool = False) -> str:
    """The chat as text-generation-webui's chat template writes it: the context and a blank line, then
    "Name: message" lines; with `reply_prompt` it ends in "Character:" (the model's turn); with
    `continue_last` the last message is the character's reply so far, left open to go on."""
    messages = [m for m in history if m["role"] in ("user", "assistant")]
    partial = messages.pop() if continue_last and messages and messages[-1]["role"] == "assistant" else None
    context = setup.context()
    text = f"{context}\n\n" if context else ""
    text += "".join(f"{_speaker(setup, m)}: {str(m['content']).strip()}\n" for m in messages)
    if partial is not None:
        return text + f"{setup.character.name}: {partial['content']}"
    return text + f"{setup.character.name}:" if reply_prompt else text


def chat_instruct_messages(setup: ChatSetup, history: Sequence[Message], system_message: str | None = None,
                           continue_last: bool = False) -> list[Message]:
    """The messages the instruction template gets in Chat-instruct: an optional system message, the command
    holding the transcript (without its closing "Character:"), and for Continue the reply so far."""
    messages = [m for m in history if m["role"] in ("user", "assistant")]
    partial = messages.pop() if continue_last and messages and messages[-1]["role"] == "assistant" else None
    command = setup.command.replace("<|character|>", setup.character.name)
    command = command.replace("<|prompt|>", transcript(setup, messages, reply_prompt=False).rstrip("\n"))
    outer = [{"role": "system", "content": system_message}] if system_message else []
    outer.append({"role": "user", "content": setup.fill(command)})
    if partial is not None:
        outer.append({"role": "assistant", "content": partial["content"]})
    return outer


def build_prompt(state, setup: ChatSetup, history: Sequence[Message], *, system_message: str | None = None,
                 template: str | None = None, max_new_tokens: int | None = None,
                 continue_last: bool = False, options: TemplateOptions = NO_OPTIONS) -> Prompt:
    """The Prompt for the character's next reply to `history` (with `continue_last`: going on with its last
    reply), in Chat or Chat-instruct mode, cut to context_length - max_new_tokens by dropping the oldest
    whole turns. `state` renders and counts (app_state.AppState: raw_prompt, chat_prompt, continue_prompt).
    `options` (the thinking switch) reach the instruction template of Chat-instruct; Chat has no template."""
    if not setup.uses_character:
        raise ValueError(f"{setup.mode} is not a character mode")
    history = [m for m in history if m["role"] in ("user", "assistant")]

    def make(kept: list[Message]) -> Prompt:
        if setup.mode == CHAT:
            return state.raw_prompt(transcript(setup, kept, continue_last=continue_last))
        outer = chat_instruct_messages(setup, kept, system_message, continue_last)
        if continue_last:
            return state.continue_prompt(outer, template, options=options)
        return state.chat_prompt(outer, template, options=options)

    model = state.require_model()
    dropped, notice = 0, ""
    if max_new_tokens is not None and model.context_length and history:
        fitted = fit_messages(history, lambda kept: make(kept).n_tokens,
                              max(model.context_length - max_new_tokens, 1))
        history, dropped, notice = fitted.messages, fitted.dropped_turns, fitted.notice()
    prompt = make(history)
    if setup.mode == CHAT:
        name, source = f"chat as {setup.character.name}", "character transcript, no template"
    else:
        name, source = prompt.template_name, f"{prompt.template_source}, chat-instruct as {setup.character.name}"
    return dataclasses.replace(prompt, stop=tuple(dict.fromkeys((*prompt.stop, *setup.stops()))),
                               template_name=name, template_source=source, dropped_turns=dropped, notice=notice)
