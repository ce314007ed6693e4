"""What a model card (a repo's README.md) says: its YAML front matter and its "Provided files" table.

TheBloke-style cards open with front matter between `---` lines (prompt_template, model_type, base_model,
quantized_by, ...) and list each branch's quantization in a Markdown table whose first column is "Branch".
The front matter is read by core.front_matter, as the prompt-template search reads it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from core.front_matter import FrontMatterError, read_front_matter

_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_SEPARATOR_CELL = re.compile(r"^:?-{2,}:?$")


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [_LINK.sub(r"\1", cell).strip() for cell in line.split("|")]


def provided_files_rows(text: str) -> list[dict[str, str]]:
    """Every row of the card's Markdown table(s) whose first header is "Branch", links reduced to their text."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("|"):
            header = None
            continue
        cells = _cells(stripped)
        if header is None:
            if cells and cells[0].lower() == "branch":
                header = cells
            continue
        if all(_SEPARATOR_CELL.match(c) for c in cells if c):
            continue
        rows.append({name: (cells[i] if i < len(cells) else "") for i, name in enumerate(header)})
    return rows


def provided_files_row(text: str, branch: str) -> dict | None:
    """The "Provided files" row for `branch` (e.g. {"Branch": "main", "Bits": "4", "GS": "128", ...})."""
    for row in provided_files_rows(text):
        if row.get("Branch", row.get("branch")) == branch:
            return row
    return None


@dataclass
class CardSummary:
    prompt_template: str | None = None
    model_type: str | None = None
    base_model: str | None = None
    quantized_by: str | None = None
    license: str | None = None
    branch_row: dict | None = None
    problems: list[str] = field(default_factory=list)   # e.g. malformed front matter, no README

    def as_markdown(self, branch: str) -> str:
        lines = []
        for label, value in (("Model type", self.model_type), ("Base model", self.base_model),
                             ("Quantized by", self.quantized_by), ("License", self.license)):
            if value:
                lines.append(f"- **{label}:** {value}")
        if self.prompt_template:
            fence = "````" if "```" in self.prompt_template else "```"
            lines.append(f"- **Prompt template** (from the card):\n\n{fence}\n{self.prompt_template.rstrip()}\n{fence}")
        else:
            lines.append("- **Prompt template:** the card names none")
        if self.branch_row:
            details = ", ".join(f"{k}: {v}" for k, v in self.branch_row.items() if k.lower() != "branch" and v)
            lines.append(f"- **Branch `{branch}`** (Provided files): {details}")
        lines.extend(f"- ⚠️ {p}" for p in self.problems)
        return "\n".join(lines)


def summarize_card(text: str, branch: str) -> CardSummary:
    summary = CardSummary()
    try:
        front = read_front_matter(text)
    except FrontMatterError as exc:
        summary.problems.append(str(exc))
        front = {}

    def text_of(key: str) -> str | None:
        value = front.get(key)
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        return str(value) if value not in (None, "") else None

    summary.prompt_template = text_of("prompt_template")
    summary.model_type = text_of("model_type")
    summary.base_model = text_of("base_model")
    summary.quantized_by = text_of("quantized_by")
    summary.license = text_of("license")
    summary.branch_row = provided_files_row(text, branch)
    return summary


def summarize_model_folder(folder: Path, branch: str) -> CardSummary:
    readme = folder / "README.md"
    if not readme.is_file():
        return CardSummary(problems=["The repo has no README.md model card."])
    return summarize_card(readme.read_text(encoding="utf-8", errors="replace"), branch)
