"""Turning a conversation into the exact prompt text and token ids a model was trained on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    template_source: str   # where the template came from, e.g. "tokenizer chat_template"


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> Prompt:
    """The tokenizer's own chat template (run by transformers in a sandboxed Jinja environment)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use a raw prompt")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return Prompt(text=text, ids=encode(tokenizer, text), template_source="tokenizer chat_template")


def render_chat_continue(tokenizer, messages: Sequence[Message]) -> Prompt:
    """Prompt that resumes the last (assistant) message: the template up to the reply's start, then the reply
    so far, with no end-of-turn after it."""
    head = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    text = head.text + messages[-1]["content"]
    return Prompt(text=text, ids=encode(tokenizer, text), template_source=head.template_source)


def render_raw(tokenizer, text: str) -> Prompt:
    """Raw text with the tokenizer's usual special tokens (e.g. Llama's BOS) added."""
    return Prompt(text=text, ids=list(tokenizer(text)["input_ids"]), template_source="raw text")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text that already carries its special tokens (templates write BOS themselves)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
