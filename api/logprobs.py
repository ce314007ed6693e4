"""Token log-probabilities in OpenAI's two shapes: chat's `logprobs.content` list and completions' parallel
lists (tokens, token_logprobs, top_logprobs, text_offset). Built from the decode loop's TokenEvents."""
from __future__ import annotations

from engine.generation import TokenEvent


def token_text(tokenizer, token_id: int) -> str:
    # A byte-level token that is part of a UTF-8 character decodes to U+FFFD alone; `bytes` in the chat
    # shape is what clients join to rebuild such characters, as OpenAI intends.
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def chat_logprobs(tokenizer, events: list[TokenEvent]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(e.token_id, e.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in e.top]} for e in events],
            "refusal": None}


class CompletionLogprobs:
    """Completions' logprobs, chunk by chunk: text_offset counts characters from the start of the choice's
    text (echoed prompt included), across chunks."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset

    def block(self, events: list[TokenEvent]) -> dict:
        tokens, offsets = [], []
        for event in events:
            text = token_text(self.tokenizer, event.token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [None if e.logprob is None else
                                 {token_text(self.tokenizer, i): lp for i, lp in e.top} for e in events],
                "text_offset": offsets}
