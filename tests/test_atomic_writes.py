"""One atomic-write helper for every user file (issue 15, item 7): whole or not at all, private, never leaving
temp files, and every writer of a user file goes through it."""
from __future__ import annotations

import ast
import stat
from pathlib import Path

import pytest

from core.atomic import write_atomic

REPO = Path(__file__).resolve().parent.parent


def test_a_write_is_private_and_replaces_whole(tmp_path):
    target = tmp_path / "sub" / "settings.yaml"
    write_atomic(target, "a: 1\n")
    write_atomic(target, "a: 2\n")
    assert target.read_text() == "a: 2\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["settings.yaml"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "chat.json"
    write_atomic(target, "old")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(target, "\ud800")          # a lone surrogate cannot be encoded: the write fails midway
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_replace_false_never_overwrites(tmp_path):
    target = tmp_path / "preset.yaml"
    write_atomic(target, "mine", replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(target, "other", replace=False)
    assert target.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["preset.yaml"]


def test_no_other_module_makes_its_own_temp_files():
    """mkstemp/NamedTemporaryFile belong to core/atomic.py; a module rolling its own is writing a user file
    some other way."""
    own = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "tests", "bench", "cache", "models") or rel == Path("core/atomic.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("mkstemp", "NamedTemporaryFile"):
                own.append(f"{rel}:{node.lineno}")
    assert own == []
