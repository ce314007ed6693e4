"""Chat actions on a message history (send, regenerate, continue, remove last), independent of any UI.

A history is a list of {"role", "content"} dicts, the shape Gradio's Chatbot and the OpenAI API both use.
Each action is a generator of (history, status) pairs, so a UI can stream them and a test can drain them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from engine.generation import DoneEvent, StatsEvent, TextEvent
from engine.sampling import GenerationParams

History = list[dict[str, Any]]

STOP_REASONS = {"eos": "end of reply", "stop_string": "stop string", "max_tokens": "max_new_tokens reached",
                "cancelled": "stopped", "error": "error"}


def message_text(content: Any) -> str:
    """Chatbot content arrives as a string or as a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def normalize(history: History | None) -> History:
    return [{"role": m["role"], "content": message_text(m.get("content"))} for m in (history or [])
            if m.get("role") in ("user", "assistant", "system")]


@dataclass
class ReplyStatus:
    text: str                    # a one-line status for the UI, e.g. "42 tokens, 31.2 tok/s ..."
    done: bool = False
    error: str | None = None


def stats_line(stats: StatsEvent | None, done: DoneEvent | None) -> str:
    parts = []
    if stats is not None:
        parts.append(f"{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
                     f"prompt {stats.prompt_tokens} tokens, first token {stats.time_to_first_token:.2f} s")
    if done is not None:
        parts.append(STOP_REASONS.get(done.reason, done.reason))
        if done.error:
            parts.append(done.error)
    return " · ".join(parts)


def _stream_into(state, history: History, system_message: str | None, params: GenerationParams, key: str,
                 continue_last: bool) -> Iterator[tuple[History, ReplyStatus]]:
    """Generate into history[-1] (an assistant message), yielding after every text piece."""
    messages = ([{"role": "system", "content": system_message}] if system_message else []) + history
    prompt = state.chat_prompt(messages[:-1]) if not continue_last else state.continue_prompt(messages)
    yield history, ReplyStatus(f"prompt {len(prompt.ids)} tokens · generating…")
    stats = None
    for event in state.generate(prompt, params, key):
        if isinstance(event, TextEvent):
            history[-1]["content"] += event.text
            yield history, ReplyStatus(f"prompt {len(prompt.ids)} tokens · generating…")
        elif isinstance(event, StatsEvent):
            stats = event
        elif isinstance(event, DoneEvent):
            yield history, ReplyStatus(stats_line(stats, event), done=True, error=event.error)


def send(state, history: History, user_message: str, params: GenerationParams, key: str = "default",
         system_message: str | None = None) -> Iterator[tuple[History, ReplyStatus]]:
    history = normalize(history) + [{"role": "user", "content": user_message},
                                    {"role": "assistant", "content": ""}]
    yield from _stream_into(state, history, system_message, params, key, continue_last=False)


def regenerate(state, history: History, params: GenerationParams, key: str = "default",
               system_message: str | None = None) -> Iterator[tuple[History, ReplyStatus]]:
    history = normalize(history)
    if history and history[-1]["role"] == "assistant":
        history = history[:-1]
    if not history or history[-1]["role"] != "user":
        yield history, ReplyStatus("nothing to regenerate", done=True)
        return
    history.append({"role": "assistant", "content": ""})
    yield from _stream_into(state, history, system_message, params, key, continue_last=False)


def continue_reply(state, history: History, params: GenerationParams, key: str = "default",
                   system_message: str | None = None) -> Iterator[tuple[History, ReplyStatus]]:
    history = normalize(history)
    if not history or history[-1]["role"] != "assistant":
        yield history, ReplyStatus("nothing to continue: the last message is not a reply", done=True)
        return
    yield from _stream_into(state, history, system_message, params, key, continue_last=True)


def remove_last(history: History) -> History:
    """Drop the last exchange: the last reply and the user message it answered."""
    history = normalize(history)
    if history and history[-1]["role"] == "assistant":
        history.pop()
    if history and history[-1]["role"] == "user":
        history.pop()
    return history
