"""Model card (README.md) front matter: the YAML between the leading `---` lines (closed by `---` or `...`).
The Download tab's card summary and the prompt-template search read it through this one reader.

Cards copied from web pages sometimes arrive with their whitespace collapsed, so the whole front matter sits
on one line (`--- license: other ... prompt_template: '...' quantized_by: TheBloke ---`). That is no longer
YAML, so for that shape the scalar values of known keys are picked out one by one.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

KNOWN_KEYS = ("prompt_template", "model_type", "model_name", "model_creator", "base_model", "quantized_by",
              "license", "inference")
# A YAML scalar as it appears after `key: `: single-quoted (with '' escapes), double-quoted, or a bare word.
_SCALAR = r"('(?:[^']|'')*'|\"(?:[^\"\\]|\\.)*\"|[^\s]+)"


class FrontMatterError(ValueError):
    """The card has a front matter block that is not a YAML mapping; the message is one line for the user."""


def read_front_matter(text: str) -> dict[str, Any]:
    """The front matter of a model card as a dict ({} when there is none).

    Raises FrontMatterError when a front matter block is present but is not a YAML mapping, so the caller can
    say so and fall back to the next template source instead of silently using none."""
    text = text.lstrip("\ufeff")
    if not text.startswith("---"):
        return {}
    first_line = text.split("\n", 1)[0]
    collapsed = re.match(r"---\s(.*)\s---\s*$", first_line)
    if collapsed:
        return _scan_collapsed(collapsed.group(1))
    block = re.match(r"---[ \t]*\r?\n(.*?)\r?\n(?:---|\.\.\.)[ \t]*(\r?\n|$)", text, re.S)
    if not block:
        return {}        # an opening '---' with no closing one is a horizontal rule, not front matter
    try:
        data = yaml.safe_load(block.group(1))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""   # +2: 0-based, after the '---' line
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise FrontMatterError(f"README.md front matter is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FrontMatterError("README.md front matter is not a YAML mapping of keys to values")
    return data


def _scan_collapsed(body: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in KNOWN_KEYS:
        m = re.search(rf"(?:^|\s){key}:\s+{_SCALAR}", body)
        if m:
            try:
                found[key] = yaml.safe_load(m.group(1))
            except yaml.YAMLError:
                continue
    return found
