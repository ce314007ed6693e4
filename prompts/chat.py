"""Turning a conversation into the exact prompt text and token ids a model was trained on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prompts.stop_strings import derive_stop_strings
from prompts.templates import TOKENIZER, ChatTemplate
from prompts.truncation import fit_messages

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Prompt:
    text: str
    ids: list[int]
    template_source: str   # where the template came from, e.g. "tokenizer chat_template"
    template_name: str = ""
    stop: tuple[str, ...] = ()     # stop strings the template implies (added to the user's at generation)
    dropped_turns: int = 0         # oldest turns left out to fit the context
    notice: str = ""               # a line for the user when something was dropped or does not fit
    counted: int | None = None     # the model's token count where `ids` are not its tokens (remote models)

    @property
    def n_tokens(self) -> int:
        """How many tokens the model sees: what context checks and truncation count."""
        return len(self.ids) if self.counted is None else self.counted


def count_tokens(tokenizer, text: str) -> int | None:
    """The model's own count for a prompt whose ids are not its tokens: a remote model's codec asks the
    server (WirePromptCodec.count_tokens); None for a local tokenizer, whose ids are the tokens."""
    counter = getattr(tokenizer, "count_tokens", None)
    return counter(text) if counter is not None else None


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> Prompt:
    """The tokenizer's own chat template, run in Hearth's sandbox."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; use a raw prompt")
    own = ChatTemplate(name="tokenizer", source=TOKENIZER, jinja=template)
    return render_with_template(own, tokenizer, messages, add_generation_prompt)


def render_chat_continue(tokenizer, messages: Sequence[Message]) -> Prompt:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; use a raw prompt")
    return render_continue_with_template(ChatTemplate("tokenizer", TOKENIZER, template), tokenizer, messages)


def render_raw(tokenizer, text: str) -> Prompt:
    """Raw text with the tokenizer's usual special tokens (e.g. Llama's BOS) added."""
    return Prompt(text=text, ids=list(tokenizer(text)["input_ids"]), template_source="raw text",
                  template_name="none", counted=count_tokens(tokenizer, text))


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


def render_with_template(template: ChatTemplate, tokenizer, messages: Sequence[Message],
                         add_generation_prompt: bool = True, eos_token_ids: Sequence[int] = (),
                         budget: int | None = None, partial_reply: str = "", derive_stops: bool = True) -> Prompt:
    """Render `messages` (then `partial_reply`, for Continue) through `template`. With `budget` (context
    length minus max_new_tokens) the oldest whole turns are dropped until the prompt fits."""
    tokens = special_tokens(tokenizer)

    def text_of(kept: list[Message]) -> str:
        return template.render(kept, add_generation_prompt, tokens) + partial_reply

    messages = list(messages)
    notice, dropped = "", 0
    def tokens_of(kept: list[Message]) -> int:
        text = text_of(kept)
        counted = count_tokens(tokenizer, text)
        return len(encode_for(template, tokenizer, text)) if counted is None else counted

    if budget is not None:
        fitted = fit_messages(messages, tokens_of, max(budget, 1))
        messages, dropped, notice = fitted.messages, fitted.dropped_turns, fitted.notice()
    text = text_of(messages)
    # A codec standing in for a remote model's tokenizer writes wire data, not turns: no stops to derive.
    stops = derive_stop_strings(template, eos_texts(tokenizer, eos_token_ids)) if derive_stops else []
    return Prompt(text=text, ids=encode_for(template, tokenizer, text), template_source=template.source,
                  template_name=template.name, stop=tuple(stops), dropped_turns=dropped, notice=notice,
                  counted=count_tokens(tokenizer, text))


def render_continue_with_template(template: ChatTemplate, tokenizer, messages: Sequence[Message],
                                  eos_token_ids: Sequence[int] = (), budget: int | None = None,
                                  derive_stops: bool = True) -> Prompt:
    """Prompt that resumes the last (assistant) message: the template up to the reply's start, then the reply
    so far, with no end-of-turn after it."""
    return render_with_template(template, tokenizer, messages[:-1], True, eos_token_ids, budget,
                                partial_reply=messages[-1]["content"], derive_stops=derive_stops)
