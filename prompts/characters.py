"""Characters: text-generation-webui's character files and TavernAI/SillyTavern character cards.

A character is a name, a greeting (the first message of a new chat) and a context (what the model is told
about the character, the chat's system text). text-generation-webui keeps them as YAML in
user_data/characters/ (`name`, `greeting`, `context`); its older Pygmalion JSON says `char_name`,
`char_persona`, `char_greeting`, `world_scenario`, `example_dialogue`. A TavernAI card is a PNG whose tEXt
chunk "chara" holds base64 JSON: V1 has `name`, `description`, `personality`, `scenario`, `first_mes`,
`mes_example` at the top; V2 (`"spec": "chara_card_v2"`) nests them, and more, under `data`. Every import is
stored as text-generation-webui YAML, so a user's own files and imported cards read the same way.

`{{char}}` and `{{user}}` (and the older `<BOT>`, `<USER>`) stand for the character's and the user's names
and are replaced when a prompt or a greeting is made, so renaming yourself changes every chat's prompt.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.atomic import write_atomic

# Cards are portraits with a few KB of JSON; anything bigger than this is not worth reading into memory.
MAX_IMPORT_BYTES = 16 * 1024 * 1024
# A zTXt/iTXt chunk could inflate without bound; no card text comes near this.
MAX_TEXT_BYTES = 4 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMPORT_SUFFIXES = (".yaml", ".yml", ".json", ".png")
DEFAULT_YOUR_NAME = "You"
# text-generation-webui's shipped "Assistant" character: what Chat mode uses before any character exists.
DEFAULT_CHARACTER_NAME = "Assistant"


class CharacterError(ValueError):
    """A character file or card that cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class Character:
    name: str          # the character's own name ({{char}}, the label of its turns)
    greeting: str = ""
    context: str = ""
    key: str = ""      # the file stem in the characters folder (what the picker and conversations record)


DEFAULT_CHARACTER = Character(
    name="AI", key=DEFAULT_CHARACTER_NAME, greeting="How can I help you today?",
    context="The following is a conversation with an AI Large Language Model. The AI has been trained to answer "
            "questions, provide recommendations, and help with decision making. The AI follows user requests. "
            "The AI thinks outside the box.")

_PLACEHOLDERS = re.compile(r"\{\{(user|char)\}\}|<(USER|BOT|CHAR)>", re.IGNORECASE)


def substitute(text: str, your_name: str, character_name: str) -> str:
    """`text` with {{user}}/<USER> replaced by `your_name` and {{char}}/<BOT>/<CHAR> by `character_name`
    (case-insensitively, as SillyTavern does; text-generation-webui matches the same spellings)."""
    def name(match: re.Match) -> str:
        which = (match.group(1) or match.group(2)).lower()
        return your_name if which == "user" else character_name
    return _PLACEHOLDERS.sub(name, text or "")


# ---- PNG cards -------------------------------------------------------------------------------------------
def png_text_chunks(data: bytes, where: str = "the image") -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, keyword -> text. CharacterError when `data` is not a PNG
    or its chunk structure is broken. The first chunk with a keyword wins."""
    if not data.startswith(PNG_SIGNATURE):
        raise CharacterError(f"{where} is not a PNG image")
    found: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise CharacterError(f"{where}: the PNG is cut short")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise CharacterError(f"{where}: the PNG is cut short")
        if kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _text_chunk(kind, body, where)
            found.setdefault(keyword, text)
        pos += 12 + length   # length, type, body, CRC
    return found


def _inflate(compressed: bytes, where: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(compressed, MAX_TEXT_BYTES + 1)
    except zlib.error:
        raise CharacterError(f"{where}: a compressed PNG text chunk is corrupt") from None
    if len(out) > MAX_TEXT_BYTES:
        raise CharacterError(f"{where}: a PNG text chunk inflates past {MAX_TEXT_BYTES // (1024 * 1024)} MiB")
    return out


def _text_chunk(kind: bytes, body: bytes, where: str) -> tuple[str, str]:
    keyword, sep, rest = body.partition(b"\0")
    if not sep:
        raise CharacterError(f"{where}: a PNG {kind.decode()} chunk has no keyword")
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        return name, rest.decode("latin-1")
    if kind == b"zTXt":
        return name, _inflate(rest[1:], where).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text
    if len(rest) < 2:
        raise CharacterError(f"{where}: a PNG iTXt chunk is cut short")
    compressed, rest = rest[0], rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    if compressed:
        text = _inflate(text, where)
    return name, text.decode("utf-8", errors="replace")


def card_json(data: bytes, where: str = "the image") -> dict[str, Any]:
    """The character JSON a PNG card carries: the "chara" chunk (V1/V2), or "ccv3" (V3, a superset of V2)."""
    chunks = png_text_chunks(data, where)
    encoded = chunks.get("ccv3") or chunks.get("chara")
    if encoded is None:
        raise CharacterError(f"{where} is a PNG without a character card (no \"chara\" text chunk)")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=False)
        card = json.loads(decoded.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise CharacterError(f"{where}: the card's \"chara\" chunk is not base64 JSON "
                             f"({exc.__class__.__name__})") from None
    if not isinstance(card, dict):
        raise CharacterError(f"{where}: the card's JSON is not an object")
    return card


# ---- the JSON / YAML shapes -------------------------------------------------------------------------------
def _text(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CharacterError(f"{where}: {key} must be text, not {type(value).__name__}")
    return value.replace("\r\n", "\n")


def _card_context(fields: dict, name: str, where: str) -> str:
    """A card's fields as one context, the way text-generation-webui turns a card into a character
    ("<name>'s Persona: ...", "Scenario: ...", the example dialogue), plus the card's personality and V2
    system_prompt, which it otherwise drops. `{{original}}` (V2: "the frontend's own system prompt") has
    none here to stand for."""
    parts = []
    system = _text(fields, "system_prompt", where).replace("{{original}}", "").strip()
    if system:
        parts.append(system)
    for label, key in ((f"{name}'s Persona", "description"), ("Personality", "personality"),
                       ("Scenario", "scenario")):
        value = _text(fields, key, where).strip()
        if value:
            parts.append(f"{label}: {value}")
    example = _text(fields, "mes_example", where).strip()
    if example:
        parts.append(example)
    return "\n".join(parts)


def character_from_data(data: Any, where: str) -> Character:
    """A Character from parsed JSON or YAML in any of the shapes above; CharacterError otherwise."""
    if not isinstance(data, dict):
        raise CharacterError(f"{where}: a character must be a mapping of fields, not {type(data).__name__}")
    if data.get("spec") in ("chara_card_v2", "chara_card_v3") or isinstance(data.get("data"), dict):
        fields = data.get("data")
        if not isinstance(fields, dict):
            raise CharacterError(f"{where}: a {data.get('spec')} card has no \"data\" object")
        return _from_card(fields, where)
    if "char_name" in data:   # text-generation-webui's older Pygmalion-style JSON
        card = {"name": data.get("char_name"), "description": data.get("char_persona"),
                "scenario": data.get("world_scenario"), "mes_example": data.get("example_dialogue"),
                "first_mes": data.get("char_greeting")}
        return _from_card(card, where)
    if ("first_mes" in data or "description" in data) and "context" not in data:   # a V1 card as JSON
        return _from_card(data, where)
    name = _text(data, "name", where).strip()
    if not name:
        raise CharacterError(f"{where}: the character has no name")
    return Character(name=name, greeting=_text(data, "greeting", where), context=_text(data, "context", where).strip())


def _from_card(fields: dict, where: str) -> Character:
    name = _text(fields, "name", where).strip()
    if not name:
        raise CharacterError(f"{where}: the card has no name")
    return Character(name=name, greeting=_text(fields, "first_mes", where),
                     context=_card_context(fields, name, where))


def parse_character(filename: str, data: bytes) -> Character:
    """The character in an uploaded file: .yaml/.yml, .json, or a .png card. CharacterError (one line naming
    the file) for anything else: another type, too big, not UTF-8, malformed, no name."""
    where = Path(filename).name or "the file"
    suffix = Path(filename).suffix.lower()
    if suffix not in IMPORT_SUFFIXES:
        raise CharacterError(f"{where}: a character is a .yaml, .json or .png file, not "
                             f"{suffix or 'a file without a type'}")
    if len(data) > MAX_IMPORT_BYTES:
        raise CharacterError(f"{where} is {len(data) / 2**20:.1f} MiB; a character file is at most "
                             f"{MAX_IMPORT_BYTES // 2**20} MiB")
    if suffix == ".png":
        return character_from_data(card_json(data, where), where)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CharacterError(f"{where} is not UTF-8 text") from None
    try:
        parsed = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise CharacterError(f"{where} is not valid {kind} ({exc.__class__.__name__})") from None
    return character_from_data(parsed, where)


# ---- the characters folder ---------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^\w .()'-]+")


def file_stem(name: str) -> str:
    """A character name as a file name: path separators and other odd characters become '_'."""
    stem = _UNSAFE.sub("_", name).strip(" ._") or "character"
    return stem[:80]


class CharacterStore:
    """user_data/characters/: one YAML (or JSON) file per character, text-generation-webui's layout."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _files(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        if self.folder.is_dir():
            for suffix in (".yaml", ".yml", ".json"):   # text-generation-webui's order of preference
                for path in sorted(self.folder.glob(f"*{suffix}")):
                    files.setdefault(path.stem, path)
        return files

    def names(self) -> list[str]:
        """Every character's key, the built-in Assistant first unless a file of that name replaces it."""
        names = sorted(self._files(), key=str.lower)
        return names if DEFAULT_CHARACTER_NAME in names else [DEFAULT_CHARACTER_NAME, *names]

    def load(self, key: str | None) -> Character:
        """The character saved as `key`; the built-in Assistant for an empty key or its own name.
        CharacterError when the file is missing or unreadable."""
        path = self._files().get(key or "")
        if path is None:
            if not key or key == DEFAULT_CHARACTER_NAME:
                return DEFAULT_CHARACTER
            raise CharacterError(f"no character {key!r} in {self.folder}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CharacterError(f"{path.name} cannot be read ({exc.__class__.__name__})") from None
        found = parse_character(path.name, raw)
        return Character(name=found.name, greeting=found.greeting, context=found.context, key=path.stem)

    def save(self, character: Character) -> str:
        """Store `character` as text-generation-webui YAML under a new file: its name, or name_001, name_002...
        when that is taken (a character of the same name is never replaced). Returns the key."""
        stem = file_stem(character.name)
        data = {"name": character.name, "greeting": character.greeting, "context": character.context}
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=1000)
        taken = {k.lower() for k in self._files()} | {DEFAULT_CHARACTER_NAME.lower()}
        for n in range(1000):
            key = stem if n == 0 else f"{stem}_{n:03d}"
            if key.lower() in taken:
                continue
            try:   # replace=False: a file that appeared meanwhile is not overwritten either
                write_atomic(self.folder / f"{key}.yaml", text, replace=False)
            except FileExistsError:
                continue
            return key
        raise CharacterError(f"too many characters named {character.name!r}")

    def import_file(self, filename: str, data: bytes) -> str:
        """Parse an uploaded file and store it; returns the new character's key."""
        return self.save(parse_character(filename, data))


# ---- the user's own name ------------------------------------------------------------------------------------
class ChatProfile:
    """The chat settings the user sets in the UI and expects back after a restart: their name and the
    character last chosen. One small YAML file (user_data/chat-profile.yaml), written atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict[str, str]:
        try:
            data = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = {}   # missing or damaged: the defaults; the next change writes a good file
        if not isinstance(data, dict):
            data = {}
        name = data.get("your_name")
        character = data.get("character")
        return {"your_name": name.strip() if isinstance(name, str) and name.strip() else DEFAULT_YOUR_NAME,
                "character": character if isinstance(character, str) and character else DEFAULT_CHARACTER_NAME}

    def update(self, **values: str) -> dict[str, str]:
        data = {**self.read(), **{k: v for k, v in values.items() if v is not None}}
        write_atomic(self.path, yaml.safe_dump(data, allow_unicode=True, sort_keys=True))
        return data

    def your_name(self) -> str:
        return self.read()["your_name"]

    def set_your_name(self, name: str) -> str:
        """Stores `name` (stripped, one line); ValueError for an empty one."""
        name = " ".join((name or "").split())
        if not name:
            raise CharacterError("your name cannot be empty")
        return self.update(your_name=name[:100])["your_name"]
