"""Chat actions on a message history (send, regenerate, continue, remove last), independent of any UI.

A history is a list of {"role", "content"} dicts, the shape Gradio's Chatbot and the OpenAI API both use; a
reply a reasoning model thought about also holds its thinking (prompts.reasoning.REASONING_FIELDS), which
never goes back to the model as the reply's text. Each action is a generator of (history, status) pairs, so
a UI can stream them and a test can drain them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from engine.generation import DoneEvent, QueuedEvent, StatsEvent, TextEvent
from engine.model import Prompt
from engine.sampling import GenerationParams
from prompts.chat import encode
from prompts.template_options import TemplateOptions
from prompts.chat_modes import ChatSetup, build_prompt
from prompts.reasoning import (THINKING_NOW, ReasoningSplitter, continuation, folded, for_template,
                               reasoning_of, splitter_for)

History = list[dict[str, Any]]
# Reply versions (text-generation-webui's arrows): the history index of a reply (as a string, a JSON key) ->
# {"texts": every text that reply has had, oldest first, "shown": the index of the one in the history,
#  "reasoning": each text's thinking (its reasoning fields, {} for none), beside "texts"}.
Versions = dict[str, dict[str, Any]]

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
    """{role, content} messages, a reply's thinking in its reasoning fields (a Chatbot's thought parts are
    folded back into their replies: prompts.reasoning.folded)."""
    return [{"role": m["role"], "content": message_text(m.get("content")),
             **(reasoning_of(m) if m["role"] == "assistant" else {})} for m in folded(history)
            if m.get("role") in ("user", "assistant", "system")]


@dataclass
class ReplyStatus:
    text: str                    # a one-line status for the UI, e.g. "42 tokens, 31.2 tok/s ..."
    done: bool = False
    error: str | None = None
    prompt: Prompt | None = None  # the exact prompt sent (for the UI's Prompt view)


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


def _prompt_line(prompt: Prompt) -> str:
    line = f"prompt {prompt.n_tokens} tokens ({prompt.template_name}, {prompt.template_source})"
    return f"{line} · ⚠️ {prompt.notice}" if prompt.notice else line


def waiting_line(ahead: int) -> str:
    return f"waiting: {ahead} ahead"


def _stream(state, prompt: Prompt, params: GenerationParams, key: str,
            append: Callable[[str], None], snapshot: Callable[[], Any]) -> Iterator[tuple[Any, ReplyStatus]]:
    """Generate from `prompt`, handing every text piece to `append`, yielding `snapshot()` after each.
    While the reply waits behind other generations the status says how many are ahead."""
    head = _prompt_line(prompt)
    yield snapshot(), ReplyStatus(f"{head} · generating…", prompt=prompt)
    stats = None
    events = state.generate(prompt, params, key)
    try:
        for event in events:
            if isinstance(event, QueuedEvent):
                line = waiting_line(event.ahead) if event.ahead else "generating…"
                yield snapshot(), ReplyStatus(f"{head} · {line}", prompt=prompt)
            elif isinstance(event, TextEvent):
                append(event.text)
                yield snapshot(), ReplyStatus(f"{head} · generating…", prompt=prompt)
            elif isinstance(event, StatsEvent):
                stats = event
            elif isinstance(event, DoneEvent):
                notice = f" · ⚠️ {prompt.notice}" if prompt.notice else ""
                yield snapshot(), ReplyStatus(stats_line(stats, event) + notice, done=True, error=event.error,
                                              prompt=prompt)
    finally:
        events.close()   # a consumer that left early (a closed tab) stops the reply, or gives up its place


class _Thinking:
    """Streams a reply into `message`: the reply into its content, the model's thinking (prompts.reasoning)
    into its reasoning fields, with how long the thinking took and how many tokens it was."""

    def __init__(self, state, message: dict[str, Any], splitter: ReasoningSplitter):
        self.splitter = splitter
        self.message = message
        self.before = reasoning_of(message)        # Continue keeps the thinking the reply had
        # Continue inside an unfinished block thinks on in the same text; a block of its own comes after a break.
        self.joint = "" if splitter.in_block else "\n\n"
        self.tokenizer = getattr(state.model, "tokenizer", None)
        self.started: float | None = None
        self.ended: float | None = None
        self.pieces = 0   # text pieces inside the block: the token count while it streams

    def feed(self, text: str) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        was_inside = self.splitter.in_block
        _, reply = self.splitter.feed(text)
        self.message["content"] += reply
        if was_inside or self.splitter.in_block:
            self.pieces += 1
        if was_inside and not self.splitter.in_block:
            self.ended = now
        self._show(now, done=False)

    def finish(self) -> None:
        _, reply = self.splitter.flush()
        self.message["content"] += reply
        self._show(time.monotonic(), done=True)
        self.message.pop(THINKING_NOW, None)

    def _show(self, now: float, done: bool) -> None:
        thinking = self.splitter.thinking
        if not thinking:
            return
        before = self.before.get("reasoning_content", "")
        thinking_now = self.splitter.in_block and not done
        if not thinking_now and self.ended is None:
            self.ended = now
        tokens = self.pieces
        if not thinking_now and self.tokenizer is not None:   # counted exactly once the block is whole
            tokens = len(encode(self.tokenizer, thinking))
        self.message.update({
            "reasoning_content": f"{before}{self.joint}{thinking}" if before else thinking,
            "reasoning_tokens": self.before.get("reasoning_tokens", 0) + tokens,
            "reasoning_seconds": round(self.before.get("reasoning_seconds", 0.0)
                                       + (self.ended or now) - (self.started or now), 1),
            THINKING_NOW: thinking_now})


def _stream_into(state, history: History, system_message: str | None, params: GenerationParams, key: str,
                 continue_last: bool, template: str | None = None,
                 setup: ChatSetup | None = None,
                 enable_thinking: bool | None = None) -> Iterator[tuple[History, ReplyStatus]]:
    """Generate into history[-1] (an assistant message), yielding after every text piece. The prompt goes
    through the resolved template and is cut to fit context_length - max_new_tokens. Earlier replies go to
    the template without their thinking as content (prompts.reasoning.for_template). `enable_thinking`
    reaches a template that takes it (Qwen3's switch); None leaves the template's default."""
    messages = ([{"role": "system", "content": system_message}] if system_message else []) \
        + [for_template(m) for m in history]
    chosen = state.resolve_template(template)
    # Only a template that reads the switch gets it: a server's own template cannot be handed one.
    options = TemplateOptions(enable_thinking=enable_thinking if chosen.takes("enable_thinking") else None)
    characters = setup is not None and setup.uses_character
    splitter = None
    if continue_last and not characters and history[-1].get("reasoning_content"):
        # Continue goes on from the reply as the model wrote it, thinking block included (the prompt for a new
        # reply shows whether the template opens that block itself).
        opening = state.chat_prompt(messages[:-1], template, options=options).text
        tail, splitter = continuation(history[-1], opening, chosen.jinja)
        messages[-1] = {**messages[-1], "content": tail}
    if characters:   # Chat, Chat-instruct: the character's transcript (prompts.chat_modes)
        prompt = build_prompt(state, setup, messages if continue_last else messages[:-1],
                              system_message=system_message, template=template,
                              max_new_tokens=params.max_new_tokens, continue_last=continue_last, options=options)
    elif continue_last:
        prompt = state.continue_prompt(messages, template, params.max_new_tokens, options=options)
    else:
        prompt = state.chat_prompt(messages[:-1], template, params.max_new_tokens, options=options)
    if splitter is None:
        splitter = splitter_for(prompt.text, chosen.jinja)
        if continue_last and history[-1]["content"]:   # going on with a reply: its thinking is over
            splitter = ReasoningSplitter(splitter.syntaxes, replying=True)
    thinking = _Thinking(state, history[-1], splitter)

    final = None
    for snapshot, status in _stream(state, prompt, params, key, thinking.feed, lambda: history):
        if status.done:
            final = status
            break
        yield snapshot, status
    thinking.finish()
    # A reply cut at a stop string ("... USER:") would keep the space before it.
    if final is not None and not continue_last:
        # A character's reply follows "Name:" and so starts with a space (text-generation-webui strips it too).
        history[-1]["content"] = history[-1]["content"].strip() if characters else history[-1]["content"].rstrip()
    if final is not None:
        yield history, final


def notebook(state, text: str, params: GenerationParams, key: str = "default") -> Iterator[tuple[str, ReplyStatus]]:
    """Raw text in, continuation appended (text-generation-webui's Notebook): no template, no derived stops."""
    prompt = state.raw_prompt(text)
    parts = [text]
    yield from _stream(state, prompt, params, key, parts.append, lambda: "".join(parts))


def send(state, history: History, user_message: str, params: GenerationParams, key: str = "default",
         system_message: str | None = None, template: str | None = None,
         setup: ChatSetup | None = None,
         enable_thinking: bool | None = None) -> Iterator[tuple[History, ReplyStatus]]:
    """Reply to `user_message` after `history`. `setup`: the chat mode and character (prompts.chat_modes);
    None or Instruct: the model's template over the plain turns. `enable_thinking`: the thinking switch for
    templates that take one (None: the template's default). Regenerate and Continue take both too."""
    history = normalize(history) + [{"role": "user", "content": user_message},
                                    {"role": "assistant", "content": ""}]
    yield from _stream_into(state, history, system_message, params, key, False, template, setup, enable_thinking)


def regenerate(state, history: History, params: GenerationParams, key: str = "default",
               system_message: str | None = None, template: str | None = None,
               setup: ChatSetup | None = None,
               enable_thinking: bool | None = None) -> Iterator[tuple[History, ReplyStatus]]:
    history = normalize(history)
    if history and history[-1]["role"] == "assistant":
        history = history[:-1]
    if not history or history[-1]["role"] != "user":
        yield history, ReplyStatus("nothing to regenerate", done=True)
        return
    history.append({"role": "assistant", "content": ""})
    yield from _stream_into(state, history, system_message, params, key, False, template, setup, enable_thinking)


def continue_reply(state, history: History, params: GenerationParams, key: str = "default",
                   system_message: str | None = None, template: str | None = None,
                   setup: ChatSetup | None = None,
                   enable_thinking: bool | None = None) -> Iterator[tuple[History, ReplyStatus]]:
    history = normalize(history)
    if not history or history[-1]["role"] != "assistant":
        yield history, ReplyStatus("nothing to continue: the last message is not a reply", done=True)
        return
    yield from _stream_into(state, history, system_message, params, key, True, template, setup, enable_thinking)


def remove_last(history: History) -> tuple[History, str]:
    """Drop the last exchange: the last reply and the user message it answered. Returns the shorter history
    and that user message's text, which goes back into the input box (nothing typed is lost)."""
    history = normalize(history)
    if history and history[-1]["role"] == "assistant":
        history.pop()
    text = ""
    if history and history[-1]["role"] == "user":
        text = history.pop()["content"]
    return history, text


def edit(history: History, index: int, text: str, thinking: bool = False) -> tuple[History, bool]:
    """Message `index` of `history` with `text` as its content (with `thinking`: as its reply's thinking).
    An edited user message drops what came after it, so the next reply answers the new text; an edited reply
    keeps the rest. Returns (history, whether a reply should now be generated). IndexError for an index
    outside the history."""
    history = normalize(history)
    if not 0 <= index < len(history):
        raise IndexError(f"no message {index} in this chat of {len(history)}")
    if thinking:
        history[index]["reasoning_content"] = text
        return normalize(history), False   # emptied thinking goes, with its counts
    history[index]["content"] = text
    if history[index]["role"] == "user":
        del history[index + 1:]
        return history, True
    return history, False


def remember(versions: Versions, history: History, new: bool = False) -> Versions:
    """`versions` with the last reply's text kept as its shown version: added unless it is the shown one
    already; with `new` (a reply just generated) always added, so even an identical regeneration counts."""
    versions = {k: {"texts": list(v["texts"]), "shown": v["shown"],
                    "reasoning": list(v.get("reasoning") or [{} for _ in v["texts"]])}
                for k, v in (versions or {}).items()}
    if history and history[-1]["role"] == "assistant":
        entry = versions.setdefault(str(len(history) - 1), {"texts": [], "shown": -1, "reasoning": []})
        text = message_text(history[-1]["content"])
        thinking = reasoning_of(history[-1])
        shown = (entry["texts"][entry["shown"]], entry["reasoning"][entry["shown"]]) if entry["texts"] else None
        if new or shown != (text, thinking):
            entry["texts"].append(text)
            entry["reasoning"].append(thinking)
            entry["shown"] = len(entry["texts"]) - 1
    return versions


def prune(versions: Versions, history: History) -> Versions:
    """The versions of replies still in `history` (after a removal or an edit that dropped turns)."""
    return {k: v for k, v in (versions or {}).items()
            if k.isdigit() and int(k) < len(history) and history[int(k)]["role"] == "assistant"}


def browse(versions: Versions, history: History, step: int) -> tuple[History, Versions]:
    """The history with its last reply shown `step` versions further (-1: the one before), kept in range."""
    history = normalize(history)
    key = str(len(history) - 1)
    entry = (versions or {}).get(key)
    if not entry or history[-1]["role"] != "assistant":
        return history, versions
    shown = max(0, min(len(entry["texts"]) - 1, entry["shown"] + step))
    thinking = (entry.get("reasoning") or [{} for _ in entry["texts"]])[shown]
    history[-1] = {"role": "assistant", "content": entry["texts"][shown], **thinking}
    return history, {**versions, key: {**entry, "shown": shown}}


def version_label(versions: Versions, history: History) -> str:
    """ "version k of n" for the last reply when it has more than one, else empty."""
    history = normalize(history)
    entry = (versions or {}).get(str(len(history) - 1))
    if not entry or len(entry["texts"]) < 2 or history[-1]["role"] != "assistant":
        return ""
    return f"version {entry['shown'] + 1} of {len(entry['texts'])}"
