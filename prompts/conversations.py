"""Saved conversations: one JSON file per conversation in a folder, written atomically.

A file that cannot be read is reported (in `problems`) and skipped, never fatal: one bad file must not hide
the others. Ids are generated here and are the file names, so a title can be anything. Deleting moves the file
into the folder's trash/, from which it can be restored until the trash is emptied.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import write_atomic
from prompts.reasoning import reasoning_of

ID_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyz-")


@dataclass
class Conversation:
    id: str
    title: str
    # {role, content}; a reply a reasoning model thought about also has its reasoning fields (prompts.reasoning)
    messages: list[dict[str, Any]] = field(default_factory=list)
    system_message: str = ""
    mode: str = "Instruct"   # prompts.chat_modes: Chat, Chat-instruct or Instruct; each mode has its own chats
    character: str = ""      # the character's key (prompts.characters) in Chat and Chat-instruct
    template: str = ""
    model: str = ""
    created: float = 0.0
    updated: float = 0.0
    # reply versions: history index (a string) -> its texts and the one shown (prompts.chat_session.Versions)
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _valid_id(conversation_id: str) -> bool:
    return bool(conversation_id) and len(conversation_id) <= 64 and set(conversation_id) <= ID_CHARS


TITLE_LENGTH = 48   # an automatic title fits the conversation list's width


def title_from(messages: list[dict[str, str]]) -> str:
    """The first user message as one short line (cut at a word where it can be): a readable default title."""
    first = next((m["content"] for m in messages if m.get("role") == "user" and m.get("content", "").strip()), "")
    first = " ".join("".join(c if c.isprintable() else " " for c in first).split())
    if len(first) <= TITLE_LENGTH:
        return first or "New conversation"
    cut = first[:TITLE_LENGTH - 1]
    if " " in cut[TITLE_LENGTH // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:.-") + "…"


class ConversationStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.problems: list[str] = []

    def _path(self, conversation_id: str) -> Path:
        if not _valid_id(conversation_id):
            raise ValueError(f"{conversation_id!r} is not a conversation id")
        return self.folder / f"{conversation_id}.json"

    def new(self, title: str = "", **fields: Any) -> Conversation:
        now = time.time()
        conversation_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)
        conv = Conversation(id=conversation_id, title=title or "New conversation", created=now, updated=now,
                            **fields)
        return conv

    def save(self, conv: Conversation, replace: bool = True) -> Conversation:
        """Write `conv`; with replace=False a file already holding its id is never overwritten
        (FileExistsError)."""
        conv.updated = time.time()
        if not conv.title or conv.title == "New conversation":
            conv.title = self._unique_title(title_from(conv.messages), conv.id)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(conv.id), json.dumps(asdict(conv), ensure_ascii=False, indent=1), replace=replace)
        return conv

    def add(self, conv: Conversation) -> Conversation:
        """Store `conv` as a new conversation (an import): should its id be taken meanwhile, it gets another, so
        no saved conversation is ever replaced."""
        title = conv.title
        for _ in range(3):
            try:
                return self.save(conv, replace=False)
            except FileExistsError:
                conv.id, conv.title = self.new().id, title   # the automatic title is chosen anew for the new id
        raise ValueError("could not find a free conversation id")

    def _unique_title(self, title: str, conversation_id: str) -> str:
        """`title`, or "title (2)", "(3)"... when another saved conversation has it: chats that start alike
        stay apart in the list."""
        if title == "New conversation" or not self.folder.is_dir():
            return title
        taken = set()
        for path in self.folder.glob("*.json"):
            if path.stem != conversation_id:
                try:
                    taken.add(json.loads(path.read_text(encoding="utf-8")).get("title"))
                except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
                    continue   # list() reports unreadable files; a title check need not
        number, unique = 1, title
        while unique in taken:
            number += 1
            unique = f"{title} ({number})"
        return unique

    def save_messages(self, conversation_id: str | None, messages: list[dict[str, str]], **fields: Any) -> Conversation:
        """Store `messages` (and fields like system_message, mode, template) under `conversation_id`, creating
        the conversation when the id is empty or its file is gone."""
        try:
            conv = self.open(conversation_id) if conversation_id else self.new()
        except ValueError:
            conv = self.new()
        conv.messages = [{"role": m["role"], "content": m["content"], **reasoning_of(m)} for m in messages]
        for key, value in fields.items():
            setattr(conv, key, value)
        return self.save(conv)

    def open(self, conversation_id: str) -> Conversation:
        """The conversation; ValueError (naming the file) when it is missing or corrupt."""
        path = self._path(conversation_id)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"no saved conversation {conversation_id}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path.name} is corrupt: {exc.__class__.__name__}") from None
        conv = _from_dict(data, path.name)
        conv.id = conversation_id  # the file name is the id, whatever the file says
        return conv

    def list(self) -> list[Conversation]:
        """All readable conversations, newest first; unreadable files are listed in `self.problems`."""
        self.problems = []
        found = []
        if not self.folder.is_dir():
            return []
        for path in self.folder.glob("*.json"):
            try:
                found.append(self.open(path.stem))
            except ValueError as exc:
                self.problems.append(str(exc))
        return sorted(found, key=lambda c: c.updated, reverse=True)

    def latest(self, mode: str, character: str | None = None) -> Conversation | None:
        """The newest conversation in `mode` (and of `character`, when given): what switching to that mode or
        character shows."""
        return next((c for c in self.list() if c.mode == mode and (character is None or c.character == character)),
                    None)

    def rename(self, conversation_id: str, title: str) -> Conversation:
        title = " ".join(title.split())
        if not title:
            raise ValueError("a conversation title cannot be empty")
        conv = self.open(conversation_id)
        conv.title = title[:200]
        return self.save(conv)

    @property
    def trash(self) -> Path:
        return self.folder / "trash"

    def delete(self, conversation_id: str) -> None:
        """Move the conversation to the trash (a same-named one there is replaced)."""
        path = self._path(conversation_id)
        if path.exists():
            self.trash.mkdir(parents=True, exist_ok=True)
            path.replace(self.trash / path.name)

    def trashed(self) -> list[Conversation]:
        """The readable conversations in the trash, newest first."""
        return ConversationStore(self.trash).list()

    def restore(self, conversation_id: str) -> Conversation:
        """Move a conversation back from the trash; ValueError when it is not there."""
        self._path(conversation_id)   # the id check
        source = self.trash / f"{conversation_id}.json"
        if not source.is_file():
            raise ValueError(f"no conversation {conversation_id} in the trash")
        source.replace(self._path(conversation_id))
        return self.open(conversation_id)

    def empty_trash(self) -> int:
        """Delete every conversation in the trash for good; returns how many."""
        removed = 0
        for path in self.trash.glob("*.json") if self.trash.is_dir() else ():
            path.unlink(missing_ok=True)
            removed += 1
        return removed


def _versions(value: Any) -> dict[str, dict[str, Any]]:
    """Reply versions as saved (prompts.chat_session.Versions); a malformed entry is dropped: they are a
    convenience, the messages are the chat."""
    if not isinstance(value, dict):
        return {}
    found = {}
    for key, entry in value.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(entry, dict)):
            continue
        texts, shown = entry.get("texts"), entry.get("shown")
        if isinstance(texts, list) and all(isinstance(t, str) for t in texts) and isinstance(shown, int) \
                and 0 <= shown < len(texts):
            thinking = entry.get("reasoning")
            if not (isinstance(thinking, list) and len(thinking) == len(texts)
                    and all(isinstance(r, dict) for r in thinking)):
                thinking = [{} for _ in texts]
            found[key] = {"texts": texts, "shown": shown, "reasoning": [reasoning_of(r) for r in thinking]}
    return found


def _mode(data: dict) -> str:
    """The chat mode a conversation was saved in. Files from before characters (no "character" key) said
    "Chat" for the model's template over plain turns, which is Instruct now."""
    mode = str(data.get("mode") or "Instruct")
    return "Instruct" if mode == "Chat" and "character" not in data else mode


def _from_dict(data: Any, where: str) -> Conversation:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError(f"{where} is corrupt: not a conversation")
    messages = []
    for m in data["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{where} is corrupt: a message is not {{role, content}}")
        messages.append({"role": m["role"], "content": m["content"], **reasoning_of(m)})
    try:
        return Conversation(id=str(data["id"]), title=str(data.get("title") or "Untitled"), messages=messages,
                            system_message=str(data.get("system_message") or ""),
                            mode=_mode(data), character=str(data.get("character") or ""),
                            template=str(data.get("template") or ""),
                            model=str(data.get("model") or ""), created=float(data.get("created") or 0),
                            updated=float(data.get("updated") or 0), versions=_versions(data.get("versions")))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where} is corrupt: missing id or bad field") from None
