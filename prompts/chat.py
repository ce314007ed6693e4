"""Turning a conversation into the engine.model.Prompt a model gets.

A model with a local tokenizer gets the exact text its template renders and that text's token ids
(`render_with_template`, `render_raw`). A model that applies its chat template itself (a remote server)
gets the messages as they are, counted by the model (`render_messages`). Either way the oldest whole turns
are dropped to fit a budget (context length minus max_new_tokens), and the Prompt says so.
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

from engine.model import Message, Prompt
from prompts.library import TOKENIZER, ChatTemplate
from prompts.template_options import NO_OPTIONS, TemplateOptions
from prompts.tool_prompt import hermes_messages
from prompts.truncation import fit_messages


def render_raw(tokenizer, text: str) -> Prompt:
    """Raw text with the tokenizer's usual special tokens (e.g. Llama's BOS) added."""
    return Prompt(text=text, ids=list(tokenizer(text)["input_ids"]), template_source="raw text",
                  template_name="none")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text that already carries its special tokens (templates write BOS themselves)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_tokens(tokenizer) -> dict[str, str]:
    return {"bos_token": getattr(tokenizer, "bos_token", None) or "",
            "eos_token": getattr(tokenizer, "eos_token", None) or ""}


def eos_texts(tokenizer, eos_token_ids: Sequence[int] = ()) -> list[str]:
    """The text of each EOS token, so a template's end-of-turn marker also stops when spelled out."""
    to_token = getattr(tokenizer, "convert_ids_to_tokens", None)
    texts = [to_token(int(i)) for i in eos_token_ids] if eos_token_ids and to_token else []
    texts.append(getattr(tokenizer, "eos_token", None) or "")
    return [t for t in dict.fromkeys(texts) if isinstance(t, str) and t]


def encode_for(template: ChatTemplate, tokenizer, text: str) -> list[int]:
    """A model's own template writes its BOS; other templates get the tokenizer's usual special tokens
    (Llama's <s>) unless their text already starts with the BOS token."""
    if template.source == TOKENIZER:
        return encode(tokenizer, text)
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def _split_partial(messages: Sequence[Message], continue_final: bool) -> tuple[list[Message], Message | None]:
    """(the finished messages, the partial reply to go on with) for Continue; (messages, None) otherwise."""
    messages = list(messages)
    if continue_final and messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]
    return messages, None


def _fit(messages: list[Message], count: Callable[[list[Message]], int], budget: int | None):
    if budget is None:
        return messages, 0, ""
    fitted = fit_messages(messages, count, max(budget, 1))
    return fitted.messages, fitted.dropped_turns, fitted.notice()


def render_with_template(template: ChatTemplate, tokenizer, messages: Sequence[Message], *,
                         budget: int | None = None, continue_final: bool = False,
                         stops: Sequence[str] = (), options: TemplateOptions = NO_OPTIONS) -> Prompt:
    """Render `messages` through `template` for a local tokenizer. With `continue_final` the last (assistant)
    message is the reply so far: the template runs up to the reply's start and that text follows, with no
    end-of-turn. With `budget` the oldest whole turns are dropped until the prompt fits. `stops`: the stop
    strings this template implies (prompts.stop_strings, worked out once per template by the caller).
    `options`: the tools and thinking switch the template gets (prompts.template_options)."""
    tokens = special_tokens(tokenizer)
    finished, partial = _split_partial(messages, continue_final)
    tail = partial["content"] if partial is not None else ""

    def text_of(kept: list[Message]) -> str:
        return template.render(kept, True, tokens, options) + tail

    kept, dropped, notice = _fit(finished, lambda kept: len(encode_for(template, tokenizer, text_of(kept))), budget)
    text = text_of(kept)
    return Prompt(text=text, ids=encode_for(template, tokenizer, text),
                  messages=tuple(kept + ([partial] if partial is not None else [])), continue_final=partial is not None,
                  template_source=template.source, template_name=template.name, stop=tuple(stops),
                  dropped_turns=dropped, notice=notice)


def render_messages(count: Callable[[Prompt], int], messages: Sequence[Message], *, budget: int | None = None,
                    continue_final: bool = False, template_name: str, template_source: str,
                    options: TemplateOptions = NO_OPTIONS) -> Prompt:
    """The messages as they are, for a model that applies its own template; `count` is that model's token
    count of a Prompt. The text is the messages as JSON, for people to read (the Prompt view).
    Tools go in the messages in the Hermes convention (prompts.tool_prompt): whether the server's template
    takes a tool list is unknown here, and written into the messages they reach the model either way. The
    server's template cannot be handed enable_thinking, so a value for it is a ValueError naming it."""
    if options.enable_thinking is not None:
        raise ValueError("enable_thinking: the loaded model's chat template is applied by the server it runs on, "
                         "which Hearth cannot pass enable_thinking to; leave it unset")
    if options.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        messages = hermes_messages(messages, options.tools)
    finished, partial = _split_partial(messages, continue_final)
    extra = [partial] if partial is not None else []

    def prompt_of(kept: list[Message], **fields) -> Prompt:
        shown = kept + extra
        return Prompt(text=json.dumps(shown, ensure_ascii=False, indent=1), messages=tuple(shown),
                      continue_final=partial is not None, template_name=template_name,
                      template_source=template_source, **fields)

    kept, dropped, notice = _fit(finished, lambda kept: count(prompt_of(kept)), budget)
    prompt = prompt_of(kept, dropped_turns=dropped, notice=notice)
    return prompt_of(kept, dropped_turns=dropped, notice=notice, counted=count(prompt))
