"""Chat templates and the library of built-in ones (templates/*.yaml, plus match.yaml's rules).

A ChatTemplate is Jinja over `messages` (run in prompts.sandbox) with where it came from; which template a
model gets is prompts.templates' business. Built-in templates are text-generation-webui instruction-template
files (`instruction_template: |-`), so a user's own files drop in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from engine.model import content_text
from prompts.sandbox import render_template
from prompts.template_options import NO_OPTIONS, TemplateOptions, referenced_variables
from prompts.tool_prompt import hermes_messages, template_messages

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
               special_tokens: dict[str, str] | None = None, options: TemplateOptions = NO_OPTIONS) -> str:
        """The prompt text. The template's default system message is used when `messages` has none.
        `options`: the tools and thinking switch of this prompt (prompts.template_options); a template that
        takes `tools` renders them and the tool turns itself, any other gets them in the Hermes convention."""
        messages = list(messages)
        if self.system_message and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_message})
        if self.takes("tools"):
            messages = [{**m, "content": content_text(m["content"])} for m in template_messages(messages)]
        else:
            messages = [{"role": m["role"], "content": content_text(m["content"])}
                        for m in hermes_messages(messages, options.tools)]
        tokens = {"bos_token": "", "eos_token": "", **(special_tokens or {})}
        return render_template(self.jinja, messages=messages, add_generation_prompt=add_generation_prompt,
                               **tokens, **self.variables, **options.variables(referenced_variables(self.jinja)))

    def takes(self, variable: str) -> bool:
        """Whether the template reads `variable` (e.g. "tools", "enable_thinking"): only then does a prompt's
        TemplateOptions value for it change the text."""
        return variable in referenced_variables(self.jinja)

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
