"""Constrained decoding with llguidance: a grammar (JSON schema, GBNF or Lark) becomes a per-token mask of
the tokens that keep the output inside it, so the output always parses.

llguidance rather than xgrammar (not measured against it here): it needs no ahead-of-time compile per
schema (masks come from an Earley parser as decoding goes, so a new schema per request costs nothing up
front), it converts llama.cpp's GBNF itself (text-generation-webui's `grammar_string`), it builds its
tokenizer from any transformers tokenizer, and its abi3 wheel does not depend on the torch version. Measured
on the 2-core test machine with the default model's 49k-token vocabulary: 0.05-0.3 ms per token for a JSON
schema, up to ~25 ms at the few positions where most of the vocabulary is allowed (a string's first token).
The mask is computed on the CPU and applied on the logits' device, inside engine.generation.stream, so every
local runtime that decodes through it (Hearth's engine, transformers) honours grammars.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Sequence

import llguidance
import llguidance.hf
import llguidance.torch
import torch

# Compiling a tokenizer for llguidance takes ~0.4 s: once per loaded tokenizer, shared by its requests.
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """The grammar text does not compile; the message says where."""


def grammar_definition(kind: str, text: str) -> str:
    """kind: "json_schema" (a JSON schema as JSON text) or "gbnf" (llama.cpp's grammar format, Lark too).
    Raises GrammarError when the text is not one."""
    try:
        return llguidance.grammar_from(kind, text)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None


def _ll_tokenizer(tokenizer, eos_token_ids: Sequence[int]):
    with _LOCK:
        cached = _TOKENIZERS.get(tokenizer)
        if cached is None:
            cached = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos_token_ids) or None)
            _TOKENIZERS[tokenizer] = cached
        return cached


class Constraint:
    """One generation's grammar state: `mask(logits)` leaves only the tokens the grammar allows next,
    `accept(token_id)` moves past the chosen one. Once the grammar is complete only EOS is allowed."""

    def __init__(self, tokenizer, eos_token_ids: Sequence[int], definition: str):
        ll_tokenizer = _ll_tokenizer(tokenizer, eos_token_ids)
        self.matcher = llguidance.LLMatcher(ll_tokenizer, definition)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask)
        allowed = ((self.bitmask[0].unsqueeze(-1) >> _SHIFTS) & 1).view(-1).bool()
        vocab = logits.shape[-1]
        if allowed.numel() < vocab:   # the model's logits row can be padded past the tokenizer's vocabulary
            allowed = torch.cat([allowed, torch.zeros(vocab - allowed.numel(), dtype=torch.bool)])
        allowed = allowed[:vocab].to(logits.device, non_blocking=True)
        return logits.masked_fill(~allowed, float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise GrammarError(f"the grammar refused token {token_id}: {self.matcher.get_error()}")


def check_grammar(tokenizer, eos_token_ids: Sequence[int], definition: str) -> None:
    """Raise GrammarError when `definition` does not compile for this tokenizer (before a request queues)."""
    Constraint(tokenizer, eos_token_ids, definition)


def tool_call_grammar(functions: Sequence[tuple[str, dict]], open_tag: str = "<tool_call>",
                      close_tag: str = "</tool_call>") -> str:
    """A grammar for one tool call in the Hermes/Qwen form, `<tool_call>\\n{"name": ..., "arguments": {...}}
    \\n</tool_call>`, calling one of `functions` ((name, JSON schema of its arguments) pairs) with arguments
    that validate against that function's schema. Whitespace inside the JSON is fixed: a small model given
    free whitespace can spend its whole budget on newlines before the first key."""
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for name, schema in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    lark = f"start: {json.dumps(open_tag + chr(10))} call {json.dumps(chr(10) + close_tag)}\n" \
           f"call: %json {json.dumps(schema)}"
    return grammar_definition("lark", lark)
