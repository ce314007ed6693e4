"""The GGUF's own tokenizer, through llama.cpp, in the shape Hearth's prompt code calls.

prompts/ renders a chat template and counts tokens through a Hugging Face-style tokenizer (`tok(text,
add_special_tokens=...)["input_ids"]`, `decode`, `convert_ids_to_tokens`, `bos_token`, `eos_token`). llama.cpp
already holds the vocabulary in memory once the model is open, so this wraps it instead of building a
transformers tokenizer from the GGUF (9 s for the 135M default model on 2 cores).
"""
from __future__ import annotations

from typing import Sequence


class LlamaCppTokenizer:
    def __init__(self, llm) -> None:
        self._llm = llm
        model = llm._model                      # llama-cpp-python's vocab accessors live on its model wrapper
        self._n_vocab = llm.n_vocab()
        self.bos_token_id = llm.token_bos() if llm.token_bos() >= 0 else None
        self.eos_token_id = llm.token_eos() if llm.token_eos() >= 0 else None
        self.bos_token = model.token_get_text(self.bos_token_id) if self.bos_token_id is not None else None
        self.eos_token = model.token_get_text(self.eos_token_id) if self.eos_token_id is not None else None
        self._adds_bos = bool(model.add_bos_token())

    def __len__(self) -> int:
        return self._n_vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # special=True: a rendered template spells its control tokens (<|im_start|>) as text, to be read as such.
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens and self._adds_bos,
                                       special=True))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        # An incomplete UTF-8 sequence at the end shows as U+FFFD; the incremental decoder waits on it.
        return self._llm.detokenize([int(i) for i in ids], special=not skip_special_tokens).decode("utf-8", "replace")

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self._llm._model.token_get_text(int(token_id))
