"""Repo metadata through huggingface_hub (refs, commit, recursive tree with sizes and LFS sha256), and the
rules that pick which files a model download needs.

huggingface_hub does the talking here: it knows HF_ENDPOINT (mirrors), HF_TOKEN or the stored token, and
the Hub's error codes. We translate its exceptions into hub.errors so users read one sentence, not a trace.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator

from hub.errors import (TOKEN_HINT, ChoiceNeeded, EntryNotFound, GatedRepo, HubError, InvalidRepoSpec, NetworkError,
                        RepoNotFound, RevisionNotFound, UnsafePath)
from hub.folders import PARTIAL_STATE_FILE, PROVENANCE_FILE
from hub.repo_id import RepoRef, validate_file_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
PYTORCH_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Small files a model folder needs besides its weights: configs, tokenizers, generation settings, chat
# templates, the card. `.model` is a sentencepiece tokenizer (tokenizer.model).
ALWAYS_SUFFIXES = (".json", ".txt", ".md", ".jinja", ".model", ".tiktoken", ".yaml", ".yml")
# Hearth's own records (hub/folders.py): the download record in every model folder and the state file of a
# partial one. A repo file of either name would overwrite them, or be overwritten.
RESERVED_NAMES = (PROVENANCE_FILE, PARTIAL_STATE_FILE)


@dataclass(frozen=True)
class RemoteFile:
    path: str                  # repo-relative, '/'-separated, validated against traversal
    size: int
    git_oid: str | None        # git blob sha1; what the Hub's etag is for a plain (non-LFS) file
    sha256: str | None         # LFS oid; None for plain git files

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class RepoListing:
    ref: RepoRef
    commit: str                # the commit the branch pointed at when listed; files are fetched at this commit
    files: list[RemoteFile]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class Selection:
    files: list[RemoteFile]
    skipped: dict[str, str] = field(default_factory=dict)   # path -> why it is not downloaded

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_api(token: str | None = None):
    from huggingface_hub import HfApi
    # HfApi reads HF_ENDPOINT only when huggingface_hub is imported; pass it explicitly so a mirror set
    # later (tests, settings) is honoured. token=None makes it use HF_TOKEN or the stored login token.
    return HfApi(endpoint=endpoint(), token=token, library_name="hearth")


@contextmanager
def hub_errors(ref: RepoRef) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into hub.errors with one actionable sentence."""
    from huggingface_hub import errors as hf
    try:
        yield
    except hf.OfflineModeIsEnabled:
        raise NetworkError("Hub access is switched off (HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE to "
                           "download models.") from None
    except hf.GatedRepoError:
        raise GatedRepo(f"{ref.repo_id} is gated and needs an access token: {TOKEN_HINT}.") from None
    except hf.RevisionNotFoundError:
        raise RevisionNotFound(f"{ref.repo_id} has no branch or revision {ref.branch!r}; use "
                               f"\"List branches\" to see the ones it has.") from None
    except hf.RemoteEntryNotFoundError:
        raise EntryNotFound(f"{ref.repo_id}:{ref.branch} has no file {ref.file!r}; use \"Get file list\" to "
                            f"see its files.") from None
    except hf.RepositoryNotFoundError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = f" If it is private or gated, {TOKEN_HINT}." if status == 401 else ""
        raise RepoNotFound(f"No repo named {ref.repo_id} on {endpoint()}; check the spelling.{hint}") from None
    except hf.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise NetworkError(f"The Hub answered HTTP {status} for {ref.repo_id}; try again later.") from None
    except (OSError, ConnectionError) as e:
        raise NetworkError(f"Could not reach {endpoint()} ({type(e).__name__}); check the network or "
                           f"HF_ENDPOINT.") from None
    except Exception as e:  # httpx errors do not share a base with OSError
        if type(e).__module__.startswith(("httpx", "httpcore")):
            raise NetworkError(f"Could not reach {endpoint()} ({type(e).__name__}); check the network or "
                               f"HF_ENDPOINT.") from None
        raise


def list_branches(ref: RepoRef, token: str | None = None) -> list[str]:
    """Branch names of the repo, main first, then alphabetical."""
    with hub_errors(ref):
        refs = hub_api(token).list_repo_refs(ref.repo_id)
    names = sorted(b.name for b in refs.branches)
    return sorted(names, key=lambda n: n != "main")


def safe_repo_path(path: str) -> str:
    """A Hub-supplied file name, accepted only if it stays inside the model folder."""
    try:
        return validate_file_path(path)
    except InvalidRepoSpec:
        raise UnsafePath(f"The server listed a file named {path!r}, which is not a safe name (it leaves the "
                         f"model folder or holds control characters); refusing to download from this repo.") from None


def list_files(ref: RepoRef, token: str | None = None) -> RepoListing:
    """Every file of the branch (all subfolders), with size, git oid and LFS sha256, at one commit."""
    from huggingface_hub.hf_api import RepoFile
    api = hub_api(token)
    with hub_errors(RepoRef(ref.owner, ref.name, ref.branch)):
        info = api.model_info(ref.repo_id, revision=ref.branch)
        # List the tree at the commit we just resolved, so a push between the two calls cannot mix commits.
        entries = list(api.list_repo_tree(ref.repo_id, recursive=True, revision=info.sha))
    files = []
    for entry in entries:
        if not isinstance(entry, RepoFile):
            continue
        lfs = entry.lfs
        files.append(RemoteFile(path=safe_repo_path(entry.path), size=int(entry.size),
                                git_oid=entry.blob_id, sha256=lfs.sha256 if lfs else None))
    files.sort(key=lambda f: f.path)
    return RepoListing(ref=ref, commit=info.sha, files=files)


def _suffix(path: str) -> str:
    return PurePosixPath(path).suffix.lower()


def select_files(listing: RepoListing, *, specific_file: str | None = None) -> Selection:
    """The files a careful user would download.

    - a specific file (the "specific file" option, or a /resolve/ URL): that file only;
    - GGUF repos: the one .gguf file plus the small text files; several .gguf files -> ChoiceNeeded;
    - safetensors preferred: .bin/.pt/.pth/.ckpt weights are skipped when any .safetensors exists;
    - always config/tokenizer/generation/json/txt/md/jinja/tokenizer.model and LICENSE files, in every subfolder;
    - anything else (images, .gitattributes, code, ONNX...) is skipped with the reason.
    """
    wanted = specific_file or listing.ref.file
    by_path = {f.path: f for f in listing.files}
    if wanted:
        if wanted not in by_path:
            raise EntryNotFound(f"{listing.ref.repo_id}:{listing.ref.branch} has no file {wanted!r}; use "
                                f"\"Get file list\" to see its files.")
        return Selection([by_path[wanted]], {p: "not the requested file" for p in by_path if p != wanted})

    ggufs = [f for f in listing.files if _suffix(f.path) == ".gguf"]
    if len(ggufs) > 1:
        names = [f.path for f in ggufs]
        raise ChoiceNeeded(f"{listing.ref.repo_id} has {len(ggufs)} GGUF files; pick one with the specific-file "
                           f"option (e.g. {names[0]}).", names)
    has_safetensors = any(_suffix(f.path) == ".safetensors" for f in listing.files)

    chosen: list[RemoteFile] = []
    skipped: dict[str, str] = {}
    for f in listing.files:
        name = PurePosixPath(f.path).name
        suffix = _suffix(f.path)
        if suffix == ".gguf":
            chosen.append(f)
        elif ggufs and suffix in WEIGHT_SUFFIXES:
            skipped[f.path] = "the GGUF file is the model"
        elif suffix == ".safetensors":
            chosen.append(f)
        elif suffix in PYTORCH_PICKLE_SUFFIXES:
            if has_safetensors:
                skipped[f.path] = "safetensors weights are preferred"
            else:
                chosen.append(f)
        elif has_safetensors and name.endswith((".bin.index.json", ".pt.index.json")):
            skipped[f.path] = "index of the skipped pickle weights"
        elif f.path in RESERVED_NAMES:
            skipped[f.path] = "the name is reserved for Hearth's own download record"
        elif suffix in ALWAYS_SUFFIXES or name.upper().startswith(("LICENSE", "NOTICE", "USE_POLICY")):
            chosen.append(f)
        else:
            skipped[f.path] = "not needed to run the model"
    return Selection(chosen, skipped)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def hub_error_message(error: Exception) -> str:
    """The one sentence to show for any failure of a hub call."""
    if isinstance(error, HubError):
        return str(error)
    return f"Unexpected error: {type(error).__name__}: {error}"
