"""A model card's stated prompt template, turned into a chat template.

Cards state one turn, e.g. "SYSTEM... USER: {prompt} ASSISTANT: ", with optional {system_message}. When that
one-turn text is exactly what a built-in template renders (with some system message), the built-in is used,
because it knows the model's multi-turn form; the system text the card spells out becomes the default system
message. Otherwise the card's text itself is converted: the part before the user's turn marker is the system
block, and later turns repeat "marker {prompt} suffix".
"""
from __future__ import annotations

import re
from typing import Any

from core.front_matter import read_front_matter
from prompts.sandbox import TemplateRenderError
from prompts.library import CARD, ChatTemplate, TemplateLibrary

_SYSTEM_MARK, _PROMPT_MARK = "\x00SYSTEM\x00", "\x00PROMPT\x00"
# "## Prompt template: Llama-2-Chat" (English cards) or "提供的模板:Llama-2-Chat" (a translated rendering).
_SECTION = re.compile(r"(?:Prompt template|提供的模板)\s*[:：]\s*(?P<name>[^\n`]*?)\s*(?:\n|(?=```))")
# A role marker ending the text before {prompt} on one line, e.g. "USER: " or "### Instruction:\n".
_ROLE_MARKER = re.compile(r"(?:#+ )?[A-Za-z][A-Za-z ]{0,24}:\s*$")

GENERIC_JINJA = """\
{%- set ns = namespace(system='') -%}
{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}
{%- if ns.system -%}{{- card_system_before + ns.system + card_system_after -}}{%- endif -%}
{%- for m in messages if m['role'] != 'system' -%}
    {%- if m['role'] == 'user' -%}{{- card_turn_prefix + m['content'] + card_turn_suffix -}}
    {%- else -%}{{- m['content'] + card_reply_suffix -}}{%- endif -%}
{%- endfor -%}"""


def stated_template(text: str) -> tuple[str | None, str | None, str]:
    """(template text, stated name, where) from a card: front matter `prompt_template`, else the body's
    "Prompt template: NAME" section and the block under it."""
    meta = read_front_matter(text)
    template = meta.get("prompt_template")
    section = _SECTION.search(text)
    name = section.group("name").strip() if section else None
    if isinstance(template, str) and "{prompt}" in template:
        return template, name, "README.md front matter prompt_template"
    if section is None:
        return None, None, ""
    rest = text[section.end():]
    fenced = re.match(r"\s*```[^\n]*?\s(.*?)```", rest, re.S)
    if fenced:
        block = fenced.group(1)
        block = block[:-1] if block.endswith("\n") else block.strip(" ")
    else:  # a rendered page: the paragraph under the heading
        paragraph = re.match(r"\s*(.*?)(?:\n[ \t]*\n|$)", rest, re.S)
        block = paragraph.group(1) if paragraph else ""
    if "{prompt}" not in block:
        return None, name, ""
    return block, name, f"README.md section 'Prompt template: {name}'"


def match_builtin_render(card_text: str, library: TemplateLibrary,
                         lenient: bool = False) -> tuple[str, str] | None:
    """(built-in name, default system message) of the built-in whose one-turn render equals the card text.
    `lenient` ignores trailing whitespace (YAML folding often turns a card's final newline into a space)."""
    target = card_text.replace("{system_message}", _SYSTEM_MARK).replace("{prompt}", _PROMPT_MARK)
    if lenient:
        target = target.rstrip()
    for with_system in (False, True):
        for name in library.names():
            messages = ([{"role": "system", "content": _SYSTEM_MARK}] if with_system else []) \
                + [{"role": "user", "content": _PROMPT_MARK}]
            try:
                rendered = library.get(name, CARD).render(messages, add_generation_prompt=True)
            except TemplateRenderError:
                continue
            if lenient:
                rendered = rendered.rstrip()
            parts = rendered.split(_SYSTEM_MARK)
            if len(parts) > 2:
                continue
            pattern = "(?P<system>.+?)".join(re.escape(p) for p in parts)
            m = re.fullmatch(pattern, target, re.S)
            if not m:
                continue
            system = m.groupdict().get("system") or ""
            if _PROMPT_MARK in system:
                continue
            return name, "" if system == _SYSTEM_MARK else system
    return None


def _split_turn_prefix(head: str) -> tuple[str, str]:
    """(system part, user-turn prefix) of the text before {prompt}."""
    lines = head.splitlines(keepends=True)
    if len(lines) > 1:
        # The last line with content is the turn marker ("<|im_start|>user\n", "### Instruction:\n").
        idx = max(i for i, line in enumerate(lines) if line.strip()) if head.strip() else len(lines) - 1
        return "".join(lines[:idx]), "".join(lines[idx:])
    marker = _ROLE_MARKER.search(head)
    if marker:
        return head[:marker.start()], head[marker.start():]
    return "", head


def convert_card_text(card_text: str, name: str, reason: str) -> ChatTemplate:
    """A chat template for a card text no built-in reproduces."""
    head, tail = card_text.split("{prompt}", 1)
    system_part, prefix = _split_turn_prefix(head)
    if "{system_message}" in system_part:
        before, after = system_part.split("{system_message}", 1)
        default_system = ""
    else:
        stripped = system_part.rstrip()
        before, after, default_system = "", system_part[len(stripped):], stripped
    if "{system_message}" in prefix:  # the placeholder shares the marker's line: keep it in the system block
        before, rest = prefix.split("{system_message}", 1)
        after, prefix, default_system = rest, "", ""
    separator = "\n" if "\n" in card_text else " "
    reply_suffix = "" if tail.endswith(("\n", " ")) and not prefix else separator
    return ChatTemplate(name=name, source=CARD, jinja=GENERIC_JINJA, reason=reason,
                        system_message=default_system,
                        variables={"card_system_before": before, "card_system_after": after,
                                   "card_turn_prefix": prefix, "card_turn_suffix": tail,
                                   "card_reply_suffix": reply_suffix})


def template_from_card(text: str, library: TemplateLibrary) -> ChatTemplate | None:
    """The chat template a model card states, or None when it states none."""
    card_text, name, where = stated_template(text)
    if card_text is None:
        stated = library.find(name) if name else None
        return library.get(stated, CARD, f"README.md names {name}") if stated else None
    for lenient in (False, True):
        matched = match_builtin_render(card_text, library, lenient)
        if matched:
            builtin, system = matched
            how = "renders exactly like" if not lenient else "renders like (up to trailing whitespace)"
            base = library.get(builtin, CARD, f"{where} {how} built-in {builtin}")
            return ChatTemplate(base.name, base.source, base.jinja, base.reason, system_message=system)
    return convert_card_text(card_text, name or "model card", f"{where}, converted")
