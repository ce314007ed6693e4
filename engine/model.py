"""The contract every loaded model keeps: what a prompt is, and what a model does with one.

A `Prompt` is built once per generation (by loaded_model.LoadedModel) and handed to `Model.generate`. It
carries what each kind of runtime needs: the structured messages (for runtimes that apply a chat template
themselves: a remote server, llama.cpp), the text, and the token ids where a local tokenizer made them
(Hearth's engine and transformers decode from ids). Runtimes take what they need and ignore the rest.

`Model` is the base class of every loaded model. Its class attributes declare what the runtime can do, so
callers ask `model.takes_images` rather than probing with getattr or checking class names; a subclass
overrides only what differs. It lives in engine/ (the lowest package that runs models) so that the engine's
own model, the loaders' models and the prompt code all share it without importing upward.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from engine.generation import GenerationEvent
from engine.sampling import GenerationParams

# {"role": "system" | "user" | "assistant" | "tool", "content": str | [parts]}; a part is OpenAI's shape,
# e.g. {"type": "text", "text": "..."} or {"type": "image_url", "image_url": {"url": "..."}}.
Message = dict
ROLES = ("system", "user", "assistant", "tool")


def content_text(content: Any) -> str:
    """The text of a message's content, whether a string or a list of parts (non-text parts give nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return "" if content is None else str(content)


@dataclass(frozen=True)
class Prompt:
    """One generation's input. `messages` is None for a raw (notebook/completion) prompt; `text` is what a
    local template rendered (or the raw text); `ids` are the model's tokens when a local tokenizer made them."""
    text: str
    ids: list[int] | None = None
    messages: tuple[Message, ...] | None = None
    # The last message is a partial assistant reply the model should go on with (Continue), not a finished turn.
    continue_final: bool = False
    template_source: str = ""      # where the template came from, e.g. "tokenizer chat_template"
    template_name: str = ""
    stop: tuple[str, ...] = ()     # stop strings the template implies (added to the user's at generation)
    dropped_turns: int = 0         # oldest turns left out to fit the context
    notice: str = ""               # a line for the user when something was dropped or does not fit
    counted: int | None = None     # the model's own count where `ids` are not its tokens (remote models)

    @property
    def n_tokens(self) -> int:
        """How many tokens the model sees: what context checks and truncation count."""
        if self.counted is not None:
            return self.counted
        return len(self.ids) if self.ids is not None else len(self.text.encode("utf-8"))


class Model:
    """A loaded model. Subclasses set the instance fields in __init__ and implement `generate`."""
    # Capabilities, declared per class; the defaults describe a local model run by Hearth.
    streams = True                 # yields text piece by piece (not one piece at the end)
    counts_tokens_locally = True   # has a tokenizer here: Prompt.ids are its tokens
    applies_chat_template = False  # renders messages itself (a server, llama.cpp): it gets messages, not text
    takes_tools = False            # understands tool definitions and tool-role messages
    takes_images = False           # understands image parts in message content
    # How many generations `generate` may run at once, from different threads (engine.batch shares the
    # decode step between them); 1: one at a time, the scheduler's first-come-first-served line.
    concurrent_generations = 1

    name: str = ""
    loader: str = ""
    runtime: str = ""              # what actually runs it, e.g. "transformers (cpu, float32)"
    context_length: int = 0
    tokenizer: Any = None          # the local tokenizer; None where the runtime tokenizes elsewhere
    eos_token_ids: Sequence[int] = ()
    model_dir: Path | None = None  # None for a model with no folder here (a remote endpoint)
    # What the load holds, e.g. "KV cache 8192 tokens ≈ 360.0 MiB, weights ≈ 513.0 MiB" (loaders.config_check).
    memory: str = ""

    def generate(self, prompt: Prompt, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        raise NotImplementedError

    def count_tokens(self, prompt: Prompt) -> int:
        """How many tokens `prompt` is for this model. Local models count their ids; others override this."""
        return prompt.n_tokens

    def unload(self) -> None:
        pass


def prompt_ids(prompt: Prompt) -> list[int]:
    """The token ids a local runtime decodes from; a prompt built without a tokenizer is a caller's bug."""
    if prompt.ids is None:
        raise ValueError("this prompt has no token ids: it was not built with this model's tokenizer")
    return list(prompt.ids)
