"""Model card (README.md) front matter: the YAML between the leading `---` lines.

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


def read_front_matter(text: str) -> dict[str, Any]:
    """The front matter of a model card as a dict ({} when there is none or it cannot be read)."""
    text = text.lstrip("\ufeff")
    if not text.startswith("---"):
        return {}
    block = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if block:
        try:
            data = yaml.safe_load(block.group(1))
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            return data
    first_line = text.split("\n", 1)[0]
    collapsed = re.match(r"---\s(.*)\s---\s*$", first_line)
    return _scan_collapsed(collapsed.group(1)) if collapsed else {}


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
