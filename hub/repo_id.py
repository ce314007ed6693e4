"""Parse what a user types into the Download box or the CLI into a validated repo reference.

Accepted forms:
    owner/name
    owner/name:branch
    https://huggingface.co/owner/name
    https://huggingface.co/owner/name/tree/<branch>
    https://huggingface.co/owner/name/resolve/<rev>/<file>   (also /blob/<rev>/<file>)
URLs may name huggingface.co, hf.co or the host of HF_ENDPOINT (a mirror). Anything else is refused with
one sentence saying what is wrong, before any network request is made.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from hub.errors import InvalidRepoSpec

DEFAULT_BRANCH = "main"

# The Hub's own rule for owner and repo names: letters, digits, '-', '_', '.', starting with a letter or
# digit, at most 96 characters, and no '--' or '..' anywhere.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Git ref names as the Hub accepts them for branches: these characters only; the structural rules
# (no '..', no '//', no leading '-' or '/', ...) are checked in `validate_branch`.
_BRANCH_CHARS = re.compile(r"^[A-Za-z0-9._/-]{1,255}$")
_HUB_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}


@dataclass(frozen=True)
class RepoRef:
    owner: str
    name: str
    branch: str = DEFAULT_BRANCH
    file: str | None = None        # a single file to fetch ("specific file"), relative to the repo root

    @property
    def repo_id(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def folder_name(self) -> str:
        """models/<owner>_<name>, plus _<branch> when the branch is not main ('/' in a branch becomes '_')."""
        base = f"{self.owner}_{self.name}"
        if self.branch != DEFAULT_BRANCH:
            base += "_" + self.branch.replace("/", "_")
        return base

    def with_branch(self, branch: str | None) -> "RepoRef":
        """The same repo on another branch (e.g. one picked from the branch list); None keeps this one."""
        if not branch or branch == self.branch:
            return self
        return RepoRef(self.owner, self.name, validate_branch(branch), self.file)

    def __str__(self) -> str:
        text = self.repo_id if self.branch == DEFAULT_BRANCH else f"{self.repo_id}:{self.branch}"
        return f"{text} ({self.file})" if self.file else text


def validate_name(part: str, what: str) -> str:
    if not part:
        raise InvalidRepoSpec(f"The {what} is empty; write the repo as owner/name, e.g. TheBloke/Llama-2-7b-Chat-GPTQ.")
    if not _NAME.match(part) or "--" in part or ".." in part or part.endswith(".git"):
        raise InvalidRepoSpec(
            f"{part!r} is not a valid {what}: use letters, digits, '-', '_' and '.', starting with a letter or "
            f"digit (no '..' or '--').")
    return part


def validate_branch(branch: str) -> str:
    bad = (not _BRANCH_CHARS.match(branch) or ".." in branch or "//" in branch or branch.startswith(("-", "/", "."))
           or branch.endswith(("/", ".", ".lock")) or "/." in branch)
    if bad:
        raise InvalidRepoSpec(
            f"{branch!r} is not a valid branch name: use letters, digits, '.', '_', '-' and '/' "
            f"(no '..', no leading '-' or '/'), e.g. gptq-4bit-32g-actorder_True.")
    return branch


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_file_path(path: str) -> str:
    """A repo-relative file path with no way out of its folder: no absolute path, '..', '.', or empty part,
    and no control characters (a newline in a file name would also split every line that names it)."""
    parts = path.split("/")
    if (not path or "\\" in path or _CONTROL.search(path) or any(p in ("", ".", "..") for p in parts)
            or re.match(r"^[A-Za-z]:", path)):
        raise InvalidRepoSpec(f"{path!r} is not a valid file name in a repo: use a relative path like "
                              f"'model.safetensors' or 'subfolder/config.json'.")
    return path


def _endpoint_host() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT")
    return urlsplit(endpoint).netloc.lower() if endpoint else None


def _parse_url(text: str) -> RepoRef:
    url = urlsplit(text)
    host = url.netloc.lower()
    if host not in _HUB_HOSTS and host != _endpoint_host():
        raise InvalidRepoSpec(f"{url.netloc!r} is not the Hugging Face Hub; paste a huggingface.co link or "
                              f"type owner/name[:branch].")
    # Split before unquoting, so an encoded '/' inside a branch (%2F) stays part of that branch.
    raw = [p for p in url.path.split("/")]
    if raw and raw[0] == "":
        raw = raw[1:]
    if raw and raw[-1] == "" and len(raw) > 2:
        raw = raw[:-1]
    if raw and raw[0] == "models":       # https://huggingface.co/models/owner/name is not a repo page, but be kind
        raw = raw[1:]
    if len(raw) < 2:
        raise InvalidRepoSpec(f"{text!r} does not name a repo; expected https://huggingface.co/owner/name.")
    owner, name = validate_name(unquote(raw[0]), "owner"), validate_name(unquote(raw[1]), "repo name")
    rest = raw[2:]
    if not rest:
        return RepoRef(owner, name)
    kind = rest[0]
    if kind == "tree" and len(rest) >= 2:
        # /tree/<branch>[/<subfolder>]: a branch may contain '/', so only an encoded one is unambiguous;
        # we take the first segment as the branch, which is right for every TheBloke-style branch name.
        return RepoRef(owner, name, validate_branch(unquote(rest[1])))
    if kind in ("resolve", "blob") and len(rest) >= 3:
        revision = validate_branch(unquote(rest[1]))
        file = validate_file_path("/".join(unquote(p) for p in rest[2:]))
        return RepoRef(owner, name, revision, file)
    raise InvalidRepoSpec(f"{text!r} is not a repo link Hearth understands; use .../owner/name, "
                          f".../tree/<branch> or .../resolve/<branch>/<file>.")


def parse_repo_spec(text: str, *, file: str | None = None) -> RepoRef:
    """`owner/name[:branch]` or a Hub URL -> RepoRef; `file` (the "specific file" option) overrides the URL's."""
    text = (text or "").strip()
    if not text:
        raise InvalidRepoSpec("Type a repo as owner/name or owner/name:branch, e.g. TheBloke/Llama-2-7b-Chat-GPTQ.")
    if re.match(r"^https?://", text, re.IGNORECASE):
        ref = _parse_url(text)
    else:
        repo, sep, branch = text.partition(":")
        parts = repo.split("/")
        if len(parts) != 2:
            raise InvalidRepoSpec(f"{text!r} is not owner/name[:branch]; e.g. "
                                  f"TheBloke/Llama-2-7b-Chat-GPTQ:gptq-4bit-32g-actorder_True.")
        if sep and not branch:
            raise InvalidRepoSpec(f"{text!r} ends with ':' but names no branch; drop the ':' or add a branch.")
        ref = RepoRef(validate_name(parts[0], "owner"), validate_name(parts[1], "repo name"),
                      validate_branch(branch) if sep else DEFAULT_BRANCH)
    if file:
        ref = RepoRef(ref.owner, ref.name, ref.branch, validate_file_path(file.strip()))
    return ref
