"""A chat in and out of two other programs' formats: text-generation-webui's chat history JSON and OpenAI-style
messages JSON. Pure text in, text out: the caller writes files (core.atomic) and stores conversations
(prompts.conversations).

text-generation-webui (modules/chat.py, `save_history`) writes `json.dumps(history, indent=4, ensure_ascii=False)`
of {"internal": [[user, reply], ...], "visible": [...], "metadata": {...}} to user_data/logs/chat/<character>/
<YYYYmmdd-HH-MM-SS>.json. "internal" holds the raw texts, "visible" the same html-escaped; a greeting is the row
["<|BEGIN-VISIBLE-CHAT|>", greeting] (visible ["", greeting]), a reply with no question before it ["", reply], a
question not answered yet [question, ""]. metadata["assistant_<row>"] keeps a reply's versions
({"versions": [{"content", "visible_content", "timestamp"}], "current_version_index"}). Older files say "data" and
"data_visible" instead; they are read too. The system message is not part of that format (text-generation-webui
keeps it with the character or template), so only OpenAI messages carry it.

A reasoning model's thinking (a message's "reasoning_content", prompts.reasoning) goes into OpenAI messages under
that name, the one OpenAI-style servers use, and into text-generation-webui's replies inline, as it keeps them:
"<think>\n...\n</think>\n\n" before the reply.

Import never loses anything silently: what a Hearth chat cannot hold (tool messages, images, attachments) is
either refused with one line or named in `ImportedChat.notes`.
"""
from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prompts.reasoning import reasoning_of

FORMATS = {"tgw": "text-generation-webui chat JSON", "openai": "OpenAI messages JSON"}
# Bigger than any chat a person has had, small enough that parsing and showing it stays quick.
MAX_IMPORT_BYTES = 16 * 1024 * 1024
MAX_IMPORT_MESSAGES = 10_000
BEGIN_VISIBLE = "<|BEGIN-VISIBLE-CHAT|>"   # text-generation-webui's marker for a row that is only a greeting
TGW_ID_FORMAT = "%Y%m%d-%H-%M-%S"          # its file names; its chat list shows the first prompt only for these

Messages = list[dict[str, Any]]
THINK_BLOCK = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)   # a reply's leading thinking, inline


class ChatImportError(ValueError):
    """One line saying why a file cannot be imported; nothing was stored."""


@dataclass
class ImportedChat:
    messages: Messages
    system_message: str = ""
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)   # as prompts.chat_session.Versions
    format: str = ""
    notes: list[str] = field(default_factory=list)   # what the file held that the chat does not keep


# ---- export -----------------------------------------------------------------------------------------------------

def to_tgw(messages: Messages, versions: dict[str, dict[str, Any]] | None = None) -> str:
    """The chat as text-generation-webui writes its history file. A system message inside the turns has no place
    there: ValueError (OpenAI messages keep it)."""
    internal: list[list[str]] = []
    metadata: dict[str, dict[str, Any]] = {}
    row_of: dict[int, int] = {}     # history index of a reply -> its row
    waiting = False                 # the last row holds a question with no reply yet
    for index, message in enumerate(messages):
        role, text = message["role"], message["content"]
        if role == "system":
            raise ValueError("a system message inside the chat has no place in text-generation-webui's format: "
                             "export it as OpenAI messages")
        if role == "user":
            internal.append([text, ""])
            metadata[f"user_{len(internal) - 1}"] = {"timestamp": ""}
            waiting = True
            continue
        if not waiting:
            internal.append([BEGIN_VISIBLE if not internal else "", ""])
        internal[-1][1] = _inline(text, message)
        row_of[index] = len(internal) - 1
        metadata[f"assistant_{len(internal) - 1}"] = {"timestamp": ""}
        waiting = False
    for key, entry in (versions or {}).items():
        row = row_of.get(int(key)) if key.isdigit() else None
        if row is None or not entry.get("texts"):
            continue
        thinking = entry.get("reasoning") or [{} for _ in entry["texts"]]
        texts = [_inline(t, r) for t, r in zip(entry["texts"], thinking)]
        metadata[f"assistant_{row}"].update(
            versions=[{"content": t, "visible_content": html.escape(t), "timestamp": ""} for t in texts],
            current_version_index=entry["shown"])
    visible = [["" if user == BEGIN_VISIBLE else html.escape(user), html.escape(reply)] for user, reply in internal]
    return json.dumps({"internal": internal, "visible": visible, "metadata": metadata}, indent=4, ensure_ascii=False)


def to_openai(messages: Messages, system_message: str = "") -> str:
    """[{"role", "content"}, ...], the system message first when there is one."""
    out = ([{"role": "system", "content": system_message}] if system_message else []) + \
          [{"role": m["role"], "content": m["content"], **_thinking(m)} for m in messages]
    return json.dumps(out, indent=2, ensure_ascii=False)


def _thinking(message: dict[str, Any]) -> dict[str, str]:
    text = reasoning_of(message).get("reasoning_content")
    return {"reasoning_content": text} if text else {}


def _inline(reply: str, message: dict[str, Any]) -> str:
    """text-generation-webui's form of a reply with thinking: the block inline before it."""
    thinking = _thinking(message)
    return f"<think>\n{thinking['reasoning_content']}\n</think>\n\n{reply}" if thinking else reply


def _split_thinking(reply: str) -> tuple[str, dict[str, str]]:
    """A reply that begins with a closed <think> block: (the reply after it, its reasoning fields)."""
    found = THINK_BLOCK.match(reply)
    if not found or not found.group(1).strip():
        return reply, {}
    return reply[found.end():], {"reasoning_content": found.group(1).strip()}


def export_text(fmt: str, messages: Messages, system_message: str = "",
                versions: dict[str, dict[str, Any]] | None = None) -> str:
    if fmt == "tgw":
        return to_tgw(messages, versions)
    if fmt == "openai":
        return to_openai(messages, system_message)
    raise ValueError(f"unknown chat format {fmt!r} (known: {', '.join(FORMATS)})")


def export_name(fmt: str, title: str, created: float) -> str:
    """A file name for the download. text-generation-webui's are its own ids (the chat's start time), so the
    file drops into its logs/chat/<character>/ folder and lists there under its first prompt."""
    if fmt == "tgw":
        return time.strftime(TGW_ID_FORMAT, time.localtime(created or time.time())) + ".json"
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40].strip("-") or "chat"
    return f"{slug}.messages.json"


# ---- import -----------------------------------------------------------------------------------------------------

def read_chat_file(path: Path) -> ImportedChat:
    """The chat in `path`, whichever of the two formats it is in. ChatImportError (one line) for a file too big,
    not JSON, or not a chat; nothing is stored by this function."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise ChatImportError(f"{path.name}: cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    if len(raw) > MAX_IMPORT_BYTES:
        size = path.stat().st_size / 2**20
        raise ChatImportError(f"{path.name} is {size:.1f} MiB: chats to import are limited to "
                              f"{MAX_IMPORT_BYTES // 2**20} MiB")
    return parse_chat(raw, path.name)


def parse_chat(raw: bytes | str, name: str = "the file") -> ImportedChat:
    if isinstance(raw, bytes):
        if len(raw) > MAX_IMPORT_BYTES:
            raise ChatImportError(f"{name} is {len(raw) / 2**20:.1f} MiB: chats to import are limited to "
                                  f"{MAX_IMPORT_BYTES // 2**20} MiB")
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ChatImportError(f"{name} is not UTF-8 text") from None
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ChatImportError(f"{name} is nested too deeply to be a chat") from None
    except ValueError as exc:
        detail = f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else exc
        raise ChatImportError(f"{name} is not JSON ({detail})") from None
    if isinstance(data, dict) and ("internal" in data or "data" in data):
        chat = _from_tgw(data, name)
    elif isinstance(data, list) or (isinstance(data, dict) and "messages" in data):
        chat = _from_openai(data if isinstance(data, list) else data["messages"], name)
    else:
        raise ChatImportError(f"{name} is neither text-generation-webui's chat JSON ({{\"internal\": [[user, "
                              f"reply], ...]}}) nor OpenAI messages ([{{\"role\", \"content\"}}, ...])")
    if len(chat.messages) > MAX_IMPORT_MESSAGES:
        raise ChatImportError(f"{name} holds {len(chat.messages)} messages: chats to import are limited to "
                              f"{MAX_IMPORT_MESSAGES}")
    if not chat.messages:
        raise ChatImportError(f"{name} holds no messages")
    return chat


def _from_tgw(data: dict, name: str) -> ImportedChat:
    rows = data.get("internal", data.get("data"))
    if not isinstance(rows, list):
        raise ChatImportError(f"{name}: \"internal\" is not a list of [user, reply] rows")
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    messages: Messages = []
    versions: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for row_index, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and all(isinstance(t, str) for t in row)):
            raise ChatImportError(f"{name}: row {row_index} of \"internal\" is not a [user, reply] pair of texts")
        user, reply = row
        if user and user != BEGIN_VISIBLE:
            messages.append({"role": "user", "content": user})
        if reply:
            text, thinking = _split_thinking(reply)
            messages.append({"role": "assistant", "content": text, **thinking})
            kept = _tgw_versions(metadata.get(f"assistant_{row_index}"), reply)
            if kept:
                versions[str(len(messages) - 1)] = kept
    edited = sum(1 for key, meta in metadata.items() if key.startswith("user_") and isinstance(meta, dict)
                 and len(meta.get("versions") or []) > 1)
    if edited:
        notes.append(f"earlier versions of {edited} edited question(s) are not kept")
    attached = sum(1 for meta in metadata.values() if isinstance(meta, dict) and meta.get("attachments"))
    if attached:
        notes.append(f"the attachments of {attached} message(s) are not kept (Hearth's chats hold text)")
    return ImportedChat(messages, versions=versions, format="tgw", notes=notes)


def _tgw_versions(meta: Any, reply: str) -> dict[str, Any] | None:
    """A reply's versions from text-generation-webui's metadata; the reply itself is always one of them (shown)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("versions"), list):
        return None
    texts = [v.get("content") for v in meta["versions"] if isinstance(v, dict)]
    texts = [t for t in texts if isinstance(t, str)]
    if len(texts) < 2 and reply in texts:
        return None   # one version, the reply: nothing to browse
    shown = meta.get("current_version_index")
    if not (isinstance(shown, int) and 0 <= shown < len(texts) and texts[shown] == reply):
        shown = texts.index(reply) if reply in texts else None
    if shown is None:
        texts.append(reply)
        shown = len(texts) - 1
    split = [_split_thinking(t) for t in texts]
    return {"texts": [t for t, _ in split], "shown": shown, "reasoning": [r for _, r in split]}


def _from_openai(items: Any, name: str) -> ImportedChat:
    if not isinstance(items, list):
        raise ChatImportError(f"{name}: \"messages\" is not a list")
    messages: Messages = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise ChatImportError(f"{name}: message {index} is not {{\"role\", \"content\"}}")
        role = "system" if item["role"] == "developer" else item["role"]   # OpenAI's newer name for it
        if role not in ("system", "user", "assistant"):
            raise ChatImportError(f"{name}: message {index} has role {item['role']!r}; a Hearth chat holds "
                                  "system, user and assistant messages")
        if item.get("tool_calls") or item.get("function_call"):
            raise ChatImportError(f"{name}: message {index} holds tool calls, which a Hearth chat cannot keep")
        thinking = _thinking(item) if role == "assistant" else {}
        messages.append({"role": role, "content": _openai_text(item.get("content"), name, index), **thinking})
    system = ""
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    return ImportedChat(messages, system_message=system, format="openai")


def _openai_text(content: Any, name: str, index: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text"} parts (other parts are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatImportError(f"{name}: message {index} holds a {kind!r} part; a Hearth chat holds text")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatImportError(f"{name}: message {index} has no text content")
