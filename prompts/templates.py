"""Which chat template a model gets, and why.

Resolution order (the first that applies wins, and its name is reported as the template's `source`):
  1. "saved choice": the per-model instruction_template saved in models/config-user.yaml;
  2. "tokenizer chat_template": tokenizer_config.json's chat_template or chat_template.jinja;
  3. "model card": README.md's front matter `prompt_template` (or its "Prompt template:" section);
  4. "built-in match": templates/match.yaml rules over the folder name and config.json's model_type;
  5. "default": match.yaml's `default` template.
Built-in templates are text-generation-webui instruction-template files (`instruction_template: |-`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from prompts.front_matter import FrontMatterError
from prompts.sandbox import TemplateRenderError, render_template

APP_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = APP_ROOT / "templates"
MATCH_FILE = "match.yaml"

SAVED, TOKENIZER, CARD, MATCHED, DEFAULT, CHOSEN = ("saved choice", "tokenizer chat_template", "model card",
                                                  "built-in match", "default", "chosen in the UI")


@dataclass(frozen=True)
class ChatTemplate:
    name: str            # e.g. "Llama-2-Chat", or "tokenizer" for a model's own template
    source: str          # one of the resolution sources above
    jinja: str           # Jinja over `messages` and `add_generation_prompt`
    reason: str = ""     # one human line: why this template was chosen
    system_message: str = ""   # default system message (e.g. the preamble a model card states)
    variables: dict[str, str] = field(default_factory=dict)   # literals a converted card template needs
    warning: str = ""    # one line for the user when a source was unreadable and the next one was used

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               special_tokens: dict[str, str] | None = None) -> str:
        """The prompt text. The template's default system message is used when `messages` has none."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.system_message and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_message})
        tokens = {"bos_token": "", "eos_token": "", **(special_tokens or {})}
        return render_template(self.jinja, messages=messages, add_generation_prompt=add_generation_prompt,
                               **tokens, **self.variables)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.source})"


@dataclass
class TemplateLibrary:
    """The instruction templates in a folder (templates/*.yaml), plus match.yaml's rules."""
    templates: dict[str, str]                      # name (file stem) -> Jinja source
    rules: list[dict[str, str]]
    default: str
    problems: list[str]                            # files that could not be read, one line each

    def names(self) -> list[str]:
        return sorted(self.templates, key=str.lower)

    def get(self, name: str, source: str, reason: str = "") -> ChatTemplate:
        return ChatTemplate(name=name, source=source, jinja=self.templates[name], reason=reason)

    def find(self, name: str) -> str | None:
        """The library's spelling of `name` (case-insensitive), or None."""
        folded = {n.lower(): n for n in self.templates}
        return folded.get(str(name).strip().lower())


def load_library(folder: Path = TEMPLATES_DIR) -> TemplateLibrary:
    templates: dict[str, str] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == MATCH_FILE:
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problems.append(f"{path.name}: not readable YAML ({exc.__class__.__name__})")
            continue
        source = data.get("instruction_template") if isinstance(data, dict) else None
        if not isinstance(source, str) or not source.strip():
            problems.append(f"{path.name}: has no instruction_template")
            continue
        templates[path.stem] = source
    rules, default = [], "Raw" if "Raw" in templates else next(iter(templates), "")
    match_path = folder / MATCH_FILE
    if match_path.exists():
        try:
            data = yaml.safe_load(match_path.read_text(encoding="utf-8")) or {}
            rules = [r for r in data.get("rules") or [] if isinstance(r, dict) and r.get("template") in templates]
            if data.get("default") in templates:
                default = data["default"]
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            problems.append(f"{MATCH_FILE}: not readable ({exc.__class__.__name__}); using no rules")
    return TemplateLibrary(templates, rules, default, problems)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tokenizer_chat_template(model_dir: Path) -> str | None:
    """The model's own chat template from tokenizer_config.json or chat_template.jinja (files, no loading)."""
    template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template.strip():
        return template
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        text = jinja_file.read_text(encoding="utf-8", errors="replace")
        return text if text.strip() else None
    from loaders.gguf_header import gguf_chat_template   # GGUF-only folders carry it in the file's metadata

    return gguf_chat_template(model_dir)


def match_builtin(library: TemplateLibrary, model_name: str, model_type: str | None) -> tuple[str, str] | None:
    """(template name, reason) of the first match.yaml rule that fits, or None."""
    for rule in library.rules:
        pattern = rule.get("name")
        if pattern and re.search(pattern, model_name, re.I):
            return rule["template"], f"folder name matches {pattern!r} in {MATCH_FILE}"
        if rule.get("model_type") and model_type and rule["model_type"] == model_type:
            return rule["template"], f"model_type {model_type!r} in {MATCH_FILE}"
    return None


def saved_settings(models_dir: Path, name: str) -> dict[str, Any]:
    """The per-model saved settings, read through the loaders' settings store when it is installed."""
    try:
        from loaders.settings_store import SettingsStore
    except ImportError:
        return {}
    try:
        saved = SettingsStore(models_dir).get(name)
    except Exception:  # a broken settings file must not stop a model from chatting; the store reports it
        return {}
    return saved if isinstance(saved, dict) else {}


def resolve_template(model_dir: Path, library: TemplateLibrary, saved: dict[str, Any] | None = None,
                     choice: str | None = None) -> ChatTemplate:
    """The template for the model in `model_dir`, following the documented order. `choice` (a library
    name picked in the UI for this session) beats everything."""
    from prompts.card_template import template_from_card

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
        where = "tokenizer_config.json" if _read_json(model_dir / "tokenizer_config.json").get("chat_template") \
            else "chat_template.jinja" if (model_dir / "chat_template.jinja").is_file() else "GGUF metadata"
        return ChatTemplate(name="tokenizer", source=TOKENIZER, jinja=own, reason=f"from {where}")
    readme = model_dir / "README.md"
    warning = ""
    if readme.is_file():
        try:
            card = template_from_card(readme.read_text(encoding="utf-8", errors="replace"), library)
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
