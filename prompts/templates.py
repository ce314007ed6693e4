"""Which chat template a model gets, and why.

Resolution order (the first that applies wins, and its name is reported as the template's `source`):
  1. "saved choice": the per-model instruction_template saved in models/config-user.yaml;
  2. "tokenizer chat_template": tokenizer_config.json's chat_template or chat_template.jinja;
  3. "model card": README.md's front matter `prompt_template` (or its "Prompt template:" section);
  4. "built-in match": templates/match.yaml rules over the folder name and config.json's model_type;
  5. "default": match.yaml's `default` template.
Built-in templates are text-generation-webui instruction-template files (`instruction_template: |-`).

A model's template is resolved once per load (loaded_model.LoadedModel), not per message; the files read
here go through core.folder, so inside a load each is read once however many steps ask for it.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from loaders.base import LoadError
from core.folder import read_json, read_text
from loaders.gguf_header import gguf_chat_template
from prompts.card_template import template_from_card
from core.front_matter import FrontMatterError
from prompts.library import CHOSEN, DEFAULT, MATCH_FILE, MATCHED, SAVED, TOKENIZER, ChatTemplate, TemplateLibrary
from prompts.sandbox import TemplateRenderError

def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object, or {} for a missing or broken file (the loaders report broken files; a template
    lookup just moves on to the next source)."""
    try:
        return read_json(path) or {}
    except (LoadError, OSError):
        return {}


def tokenizer_chat_template(model_dir: Path) -> tuple[str, str] | None:
    """(the model's own chat template, the file it came from): tokenizer_config.json's chat_template,
    chat_template.jinja, or a GGUF file's metadata. Files only, no tokenizer loading."""
    template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template.strip():
        return template, "tokenizer_config.json"
    text = read_text(model_dir / "chat_template.jinja", errors="replace")
    if text and text.strip():
        return text, "chat_template.jinja"
    own = gguf_chat_template(model_dir)   # GGUF-only folders carry it in the file's metadata
    return (own, "GGUF metadata") if own else None


def match_builtin(library: TemplateLibrary, model_name: str, model_type: str | None) -> tuple[str, str] | None:
    """(template name, reason) of the first match.yaml rule that fits, or None."""
    for rule in library.rules:
        pattern = rule.get("name")
        if pattern and re.search(pattern, model_name, re.I):
            return rule["template"], f"folder name matches {pattern!r} in {MATCH_FILE}"
        if rule.get("model_type") and model_type and rule["model_type"] == model_type:
            return rule["template"], f"model_type {model_type!r} in {MATCH_FILE}"
    return None


def resolve_template(model_dir: Path, library: TemplateLibrary, saved: dict[str, Any] | None = None,
                     choice: str | None = None) -> ChatTemplate:
    """The template for the model in `model_dir`, following the documented order. `choice` (a library
    name picked in the UI for this session) beats everything. `saved`: the model's saved settings."""
    if choice:
        found = library.find(choice)
        if found:
            return library.get(found, CHOSEN, f"{found} picked in the Text Generation tab")
    notes = []
    saved_name = (saved or {}).get("instruction_template")
    if saved_name:
        found = library.find(saved_name)
        if found:
            return library.get(found, SAVED, "saved for this model in config-user.yaml")
        notes.append(f"saved template {saved_name!r} is not in templates/")
    own = tokenizer_chat_template(model_dir)
    if own:
        return ChatTemplate(name="tokenizer", source=TOKENIZER, jinja=own[0], reason=f"from {own[1]}")
    readme = read_text(model_dir / "README.md", errors="replace")
    warning = ""
    if readme is not None:
        try:
            card = template_from_card(readme, library)
        except FrontMatterError as exc:
            card, warning = None, f"{exc}; its prompt_template was not used"
        if card is not None:
            return card
    config = _read_json(model_dir / "config.json")
    matched = match_builtin(library, model_dir.name, config.get("model_type"))
    if matched:
        return replace(library.get(matched[0], MATCHED, matched[1]), warning=warning)
    reason = "nothing else names a template; " + (notes[0] if notes else f"{MATCH_FILE} default")
    return replace(library.get(library.default, DEFAULT, reason), warning=warning)


def check_renders(template: ChatTemplate) -> str | None:
    """None when the template renders a simple exchange, else the error (for reports, never raised)."""
    try:
        template.render([{"role": "user", "content": "hi"}])
    except TemplateRenderError as exc:
        return str(exc)
    return None
