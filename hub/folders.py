"""Which folder under models/ a download goes to, and which repo and branch a folder belongs to.

text-generation-webui's naming, models/<owner>_<name>[_<branch>] ('/' in a branch becomes '_'), is ambiguous:
'_' is legal in owners, names and branches, so alice_x/model and alice/x_model (or the branches a/b and a_b)
get the same name. A folder belongs to the repo and branch its hearth-download.json names (a partial one, its
.hearth-partial.json), and a download never takes a folder that belongs to another repo or branch: it goes to
<name>-<tag> instead, where tag is 8 hex digits of sha256("owner/name:branch"). The tag depends only on the repo
and branch, so every later run finds the same folder again (to resume, or to see it is complete).

A name too long for the file system (branches may have 255 characters) is cut and tagged the same way.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hub.errors import HubError
from hub.repo_id import DEFAULT_BRANCH, RepoRef

PROVENANCE_FILE = "hearth-download.json"
PARTIAL_STATE_FILE = ".hearth-partial.json"
PARTIAL_PREFIX = ".partial-"
NAME_MAX = 255      # bytes in one file name on ext4, xfs, btrfs and tmpfs
# The folder's name is also used in '.partial-<name>.lock', the longest name derived from it.
FOLDER_MAX = NAME_MAX - len(PARTIAL_PREFIX) - len(".lock")


@dataclass(frozen=True)
class Destination:
    name: str           # the folder under models/
    note: str = ""      # why it is not ref.folder_name, in one sentence; empty when it is


def label(repo: str, branch: str) -> str:
    return repo if branch == DEFAULT_BRANCH else f"{repo}:{branch}"


def _tag(ref: RepoRef) -> str:
    return hashlib.sha256(f"{ref.repo_id}:{ref.branch}".encode()).hexdigest()[:8]


def _fit(name: str, ref: RepoRef) -> str:
    if len(name.encode()) <= FOLDER_MAX:
        return name
    return f"{name[:FOLDER_MAX - 9]}-{_tag(ref)}"     # repo and branch names are ASCII: characters are bytes


def recorded_source(record: Path) -> str | None:
    """The repo (and branch, unless main) a hearth-download.json or .hearth-partial.json names; None when there
    is no such file. An unreadable one still claims its folder: nobody may overwrite it unseen."""
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        return label(str(data["repo"]), str(data["branch"]))
    except (OSError, ValueError, KeyError, TypeError):
        return f"a download whose {record.name} is unreadable"


def holders(models_dir: Path, name: str) -> set[str]:
    """Who models/<name> and its partial folder belong to; empty when neither records anyone."""
    records = (models_dir / name / PROVENANCE_FILE, models_dir / f"{PARTIAL_PREFIX}{name}" / PARTIAL_STATE_FILE)
    return {source for source in map(recorded_source, records) if source is not None}


def choose_folder(ref: RepoRef, models_dir: Path) -> Destination:
    """The folder for `ref`: its usual name unless another repo or branch holds that, else the tagged one.

    A folder without any record (copied in by the user) is not claimed here; the downloader refuses to
    replace it.
    """
    me = label(ref.repo_id, ref.branch)
    base = _fit(ref.folder_name, ref)
    candidates = list(dict.fromkeys([base, _fit(f"{ref.folder_name}-{_tag(ref)}", ref)]))
    held = {name: holders(models_dir, name) for name in candidates}
    # A folder this repo and branch already has (complete or partial) is the one to continue.
    chosen = next((n for n in candidates if held[n] == {me}), None) or next((n for n in candidates if not held[n]),
                                                                            None)
    if chosen is None:
        taken = "; ".join(f"models/{n} holds {', '.join(sorted(held[n]))}" for n in candidates)
        raise HubError(f"No folder is free for {me}: {taken}; move one of them out of the models folder and "
                       f"download again.")
    if chosen == ref.folder_name:
        return Destination(chosen)
    if chosen == base:
        return Destination(chosen, f"The folder name for {me} is too long for the file system, so it is "
                                   f"shortened to models/{chosen}.")
    others = ", ".join(sorted(held[base] - {me}))
    return Destination(chosen, f"models/{base} already holds {others}, so {me} goes to models/{chosen}.")
