"""A reasoning model's thinking, split from its reply while the text streams.

Reasoning models write their thinking first, between markers: `<think>...</think>` (Qwen3, QwQ, DeepSeek-R1),
markers of a template's own (`[THINK]...[/THINK]`, `<|START_THINKING|>...`, ...), or gpt-oss's harmony channels
(`<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>reply`). The thinking is
shown apart from the reply, saved apart from it, and never sent back as the reply's text.

Text arrives in pieces that can cut a marker anywhere ("</th" + "ink>"), so `ReasoningSplitter` holds back
the end of a piece that could still become a marker, and gives out (thinking, reply) deltas as soon as they
are certain. A template can open the block itself in the generation prompt (Qwen3-Thinking's ends with
`<think>\\n`): `splitter_for` reads the prompt's end and starts inside the block. Then the model writes only
the closing marker; a block still open when the text ends is all thinking (the model ran out of tokens).

The API uses the same pieces, in the field DeepSeek, vLLM and llama.cpp's server use (Open WebUI and
SillyTavern read it): a stream makes `splitter_for(prompt.text, template.jinja)`, sends each TextEvent's text
through `feed` (thinking -> `delta.reasoning_content`, reply -> `delta.content`) and `flush`es at the end; a
whole reply is `split_reply(text, prompt.text, template.jinja)` (-> `message.reasoning_content`, `content`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from engine.model import content_text


@dataclass(frozen=True)
class Syntax:
    """One way of marking thinking. `strip`: markers around the reply that are dropped from it (harmony's
    channel headers). `anywhere`: the block may open after reply text (harmony's analysis channel comes again
    between tool calls); otherwise it opens only before the reply starts, so a reply that talks about a
    `<think>` tag is left alone. `inner` and `after`: what the model writes inside the markers around its
    thinking and between the block and its reply (Continue writes a block back the same way)."""
    open: str
    close: str
    strip: tuple[str, ...] = ()
    anywhere: bool = False
    inner: str = "\n"
    after: str = "\n\n"


THINK = Syntax("<think>", "</think>")
HARMONY = Syntax("<|channel|>analysis<|message|>", "<|end|>",
                 strip=("<|start|>assistant", "<|channel|>final<|message|>"), anywhere=True, inner="",
                 after="<|start|>assistant<|channel|>final<|message|>")
# Markers a template may define for itself; used when the template's source names the opening one.
TEMPLATE_SYNTAXES = (
    Syntax("<thinking>", "</thinking>"),
    Syntax("[THINK]", "[/THINK]"),                              # Magistral
    Syntax("<|START_THINKING|>", "<|END_THINKING|>"),           # Command A Reasoning
    Syntax("<|begin_of_thought|>", "<|end_of_thought|>"),
    Syntax("<seed:think>", "</seed:think>"),                    # Seed-OSS
    Syntax("◁think▷", "◁/think▷"),                              # Kimi
)
HARMONY_SIGN = "<|channel|>"
BLOCK_SEPARATOR = "\n\n"   # between two thinking blocks of one reply (harmony between tool calls)


def syntaxes_for(template_source: str = "") -> tuple[Syntax, ...]:
    """`<think>` always; a template's own markers and harmony where the template's source names them."""
    found = [THINK] + [s for s in TEMPLATE_SYNTAXES if s.open in template_source]
    if HARMONY_SIGN in template_source:
        found.append(HARMONY)
    return tuple(found)


def _held_back(text: str, markers: Iterable[str]) -> int:
    """How many characters at the end of `text` could be the start of one of `markers`."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class ReasoningSplitter:
    """Text in, (thinking, reply) deltas out; `thinking` and `reply` hold everything so far.

    `inside`: the block the generation starts in (the prompt opened it); `replying`: the prompt already closed
    a block (Qwen3 with enable_thinking off ends its prompt with an empty one), so the text is all reply.
    `resumed`: the block's thinking so far is in the prompt (Continue), so the text goes on from it as is."""

    def __init__(self, syntaxes: tuple[Syntax, ...] = (THINK,), inside: Syntax | None = None,
                 replying: bool = False, resumed: bool = False):
        self.syntaxes = syntaxes
        self._inside = inside
        self._started = replying or inside is not None   # past the point where a start-only block can open
        self._pending = ""      # text held back: it could still be (part of) a marker
        self._spaces = ""       # thinking's trailing whitespace, given out only if more thinking follows
        self._separate = False  # the next thinking text opens a second block
        self.thinking = ""
        self.reply = ""
        self.blocks = 1 if inside is not None else 0
        self._resumed = resumed

    @property
    def in_block(self) -> bool:
        """Inside an open thinking block (the UI shows it as still thinking)."""
        return self._inside is not None

    def feed(self, text: str) -> tuple[str, str]:
        """The (thinking, reply) text that `text` makes certain."""
        thinking, reply = [], []
        buf = self._pending + text
        while buf:
            if self._inside is not None:
                close = self._inside.close
                at = buf.find(close)
                if at >= 0:
                    thinking.append(self._think(buf[:at]))
                    self._spaces, self._inside, buf = "", None, buf[at + len(close):]
                    continue
                keep = _held_back(buf, (close,))
                thinking.append(self._think(buf[:len(buf) - keep]))
                buf = buf[len(buf) - keep:]
                break
            if not self._started:
                head = buf.lstrip()
                if not head:
                    break   # whitespace only so far: the reply or a block may follow
                opening = next((s for s in self.syntaxes if head.startswith(s.open)), None)
                if opening is not None:
                    self._open(opening)
                    buf = head[len(opening.open):]
                    continue
                if any(s.open.startswith(head) for s in self.syntaxes):
                    break   # could still become an opening marker
                self._started = True
            markers = [(s.open, s) for s in self.syntaxes if s.anywhere]
            markers += [(m, None) for s in self.syntaxes for m in s.strip]
            hits = [(buf.find(m), -len(m), m, s) for m, s in markers if m in buf]
            if hits:
                at, _, marker, syntax = min(hits, key=lambda h: (h[0], h[1]))
                reply.append(self._answer(buf[:at]))
                buf = buf[at + len(marker):]
                if syntax is not None:
                    self._open(syntax)
                continue
            keep = _held_back(buf, [m for m, _ in markers])
            reply.append(self._answer(buf[:len(buf) - keep]))
            buf = buf[len(buf) - keep:]
            break
        self._pending = buf
        return "".join(thinking), "".join(reply)

    def flush(self) -> tuple[str, str]:
        """The end of the text: what was held back is thinking in an unclosed block, else reply."""
        buf, self._pending = self._pending, ""
        if self._inside is not None:
            return self._think(buf), ""
        self._started = True
        return "", self._answer(buf)

    def _open(self, syntax: Syntax) -> None:
        self._inside, self._started = syntax, True
        self._separate = bool(self.thinking)
        self.blocks += 1

    def _think(self, text: str) -> str:
        if not self.thinking and not self._resumed:   # the break after the opening marker
            text = text.lstrip()
        text = self._spaces + text
        kept = text.rstrip()
        self._spaces = text[len(kept):]
        if kept and self._separate:
            kept, self._separate = BLOCK_SEPARATOR + kept, False
        self.thinking += kept
        return kept

    def _answer(self, text: str) -> str:
        if not self.reply and self.blocks:   # the break after a block; a reply with none is left as written
            text = text.lstrip()
        self.reply += text
        return text


def splitter_for(prompt_text: str = "", template_source: str = "") -> ReasoningSplitter:
    """A splitter for a reply to `prompt_text` (the rendered prompt; empty when a server renders it), with
    the markers `template_source` (the chat template's Jinja) names."""
    syntaxes = syntaxes_for(template_source)
    tail = prompt_text.rstrip()
    for syntax in syntaxes:
        if tail.endswith(syntax.open):
            return ReasoningSplitter(syntaxes, inside=syntax)
        if tail.endswith(syntax.close):
            return ReasoningSplitter(syntaxes, replying=True)
    return ReasoningSplitter(syntaxes)


def continuation(message: dict[str, Any], prompt_text: str,
                 template_source: str = "") -> tuple[str, ReasoningSplitter]:
    """For Continue of a reply with thinking: the text it goes on from, as the model wrote it, and the
    splitter for what follows. The thinking is written back as its block (closed once the reply had begun;
    left open, to be thought on, when it stopped while thinking), then the reply so far. `prompt_text`: the
    prompt for a new reply, whose end says whether the template opens the block itself."""
    syntaxes = syntaxes_for(template_source)
    thinking, content = message.get("reasoning_content") or "", message.get("content") or ""
    tail = prompt_text.rstrip()
    opened = next((s for s in syntaxes if tail.endswith(s.open)), None)
    syntax = opened or syntaxes[-1]   # the template's own markers before <think>
    block = ("" if opened else syntax.open + syntax.inner) + thinking
    if not content:
        return block, ReasoningSplitter(syntaxes, inside=syntax, resumed=True)
    return block + syntax.inner + syntax.close + syntax.after + content, ReasoningSplitter(syntaxes, replying=True)


def split_reply(text: str, prompt_text: str = "", template_source: str = "") -> tuple[str, str]:
    """(thinking, reply) of a whole reply."""
    splitter = splitter_for(prompt_text, template_source)
    splitter.feed(text)
    splitter.flush()
    return splitter.thinking, splitter.reply


# ---- a reply's thinking in a chat history ------------------------------------------------------------------
# An assistant message keeps its thinking beside the reply: "reasoning_content" (the field name templates and
# the OpenAI-style APIs use), "reasoning_tokens" and "reasoning_seconds" (how long it thought).
REASONING_FIELDS = ("reasoning_content", "reasoning_tokens", "reasoning_seconds")


def reasoning_of(message: dict[str, Any]) -> dict[str, Any]:
    """The reasoning fields `message` holds, checked: a malformed one is dropped (the reply is the chat; its
    thinking is a view of how it came about)."""
    text = message.get("reasoning_content")
    if not isinstance(text, str) or not text:
        return {}
    found: dict[str, Any] = {"reasoning_content": text}
    tokens, seconds = message.get("reasoning_tokens"), message.get("reasoning_seconds")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        found["reasoning_tokens"] = tokens
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < float("inf"):
        found["reasoning_seconds"] = float(seconds)
    return found


def for_template(message: dict[str, Any]) -> dict[str, Any]:
    """A history message as a template gets it: the reply as `content`, and the thinking only as
    `reasoning_content` (templates that show earlier thinking read it; Qwen3's drops it from past turns)."""
    out = {"role": message["role"], "content": message["content"]}
    thinking = message.get("reasoning_content")
    if thinking:
        out["reasoning_content"] = thinking
    return out


# ---- the thinking as a chat shows it ----------------------------------------------------------------------
# Gradio's Chatbot shows a "thought" as a message of its own before the reply, whose metadata has a title (open
# with a spinner while "pending", closed when "done", `log` and `duration` beside the title). A history goes
# to the Chatbot through `shown` and comes back through `folded` (chat_session.normalize), so the actions only
# ever see the thinking in the reply's own message.
THINKING_TITLE = "Thinking"
TOKENS_LOG = re.compile(r"^(\d+) tokens?$")
# While a reply streams, its message says whether it is inside its thinking block (shown open); transient, so
# `folded` and the saved conversation never have it.
THINKING_NOW = "thinking_now"


def _thought(message: dict[str, Any]) -> bool:
    metadata = message.get("metadata") or {}
    return message.get("role") == "assistant" and metadata.get("title") == THINKING_TITLE


def shown(history: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """`history` as the Chatbot displays it: each reply with thinking becomes a thought, then the reply."""
    out: list[dict[str, Any]] = []
    for message in history or []:
        thinking = {} if _thought(message) else reasoning_of(message)
        if message.get("role") != "assistant" or not thinking:
            out.append(message)
            continue
        metadata: dict[str, Any] = {"title": THINKING_TITLE,
                                    "status": "pending" if message.get(THINKING_NOW) else "done"}
        if "reasoning_tokens" in thinking:
            tokens = thinking["reasoning_tokens"]
            metadata["log"] = f"{tokens} token" if tokens == 1 else f"{tokens} tokens"
        if "reasoning_seconds" in thinking:
            metadata["duration"] = thinking["reasoning_seconds"]
        out.append({"role": "assistant", "content": thinking["reasoning_content"], "metadata": metadata})
        out.append({"role": "assistant", "content": message.get("content", "")})
    return out


def folded(messages: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Messages as the Chatbot holds them, with each thought put back into the reply after it."""
    out: list[dict[str, Any]] = []
    thinking: dict[str, Any] | None = None
    for message in messages or []:
        if _thought(message):
            if thinking is not None:   # two thoughts in a row: the first one's reply is empty
                out.append({"role": "assistant", "content": "", **thinking})
            metadata = message.get("metadata") or {}
            thinking = {"reasoning_content": content_text(message.get("content"))}
            tokens = TOKENS_LOG.match(str(metadata.get("log") or ""))
            if tokens:
                thinking["reasoning_tokens"] = int(tokens.group(1))
            if isinstance(metadata.get("duration"), (int, float)):
                thinking["reasoning_seconds"] = float(metadata["duration"])
            continue
        if thinking is not None:
            if message.get("role") == "assistant":
                message = {**message, **thinking}
            else:
                out.append({"role": "assistant", "content": "", **thinking})
            thinking = None
        out.append(message)
    if thinking is not None:
        out.append({"role": "assistant", "content": "", **thinking})
    return out


def message_index(history: list[dict[str, Any]], shown_index: int) -> tuple[int, bool]:
    """(the index in `history` (folded) of the message the Chatbot shows at `shown_index`, whether that is its
    thinking part). An index past the end maps past the end, for the caller to report."""
    position = 0
    for index, message in enumerate(history):
        if message.get("role") == "assistant" and reasoning_of(message):
            if shown_index == position:
                return index, True
            position += 1
        if shown_index == position:
            return index, False
        position += 1
    return len(history) + shown_index - position, False
