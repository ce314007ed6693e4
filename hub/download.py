"""Hearth's downloader: parallel, resumable across process restarts, verified, cancellable, atomic.

Why not `huggingface_hub.snapshot_download`: in 2.4 it cannot resume after the process dies (each run writes
a new `<uuid>.incomplete` file and starts from byte 0), it gives no per-file speed/ETA to a callback, it can
be cancelled only through a tqdm subclass checked every 10 MiB, and it does not check the bytes it has just
downloaded against the sha256 the Hub reports (only a pre-existing local file without metadata is hashed). So metadata and auth come from huggingface_hub (hub/listing.py, `build_hf_headers`),
and the byte transfer is done here with httpx:

    models/.partial-<dest>/<path>.incomplete   bytes so far; a rerun asks for `Range: bytes=<size on disk>-`
    models/.partial-<dest>/<path>              complete and verified (sha256 = LFS oid, or git blob sha1)
    models/.partial-<dest>/.hearth-partial.json  which repo/branch/commit/hashes those bytes belong to
    models/.partial-<dest>.lock                 held (flock) while a process downloads into that folder
    models/<dest>/                              appears only by one rename once every file is verified,
                                                with hearth-download.json (repo, branch, commit, sha256s)
Folders starting with '.' are never listed as models. <dest> is chosen by hub/folders.py: never a folder that
belongs to another repo or branch.

What a failed download leaves: names that cannot be stored are refused before anything is written; a file
the server sends with the wrong size or hash loses its bytes; a partial folder left with no bytes at all is
removed; everything else stays in models/.partial-<dest>/ for the next run to resume from.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator
from urllib.parse import quote

from core.atomic import write_atomic
from hub.errors import (TOKEN_HINT, DiskSpaceError, DownloadCancelled, EntryNotFound, GatedRepo, HubError,
                        NetworkError, RepoNotFound, RevisionNotFound, SizeMismatch, UnsafePath, UnstorableName,
                        VerifyError)
from hub.folders import NAME_MAX, PARTIAL_PREFIX, PARTIAL_STATE_FILE, PROVENANCE_FILE, choose_folder
from hub.listing import RemoteFile, RepoListing, Selection, endpoint, human_size, list_files, select_files
from hub.repo_id import RepoRef

INCOMPLETE_SUFFIX = ".incomplete"
PATH_MAX = 4095      # bytes in a whole path on Linux, the terminating NUL not counted
HASH_BLOCK = 8 << 20
PROGRESS_INTERVAL_S = 0.1
ALREADY_PRESENT = "already downloaded and verified"


# ----------------------------------------------------------------------------------------------- progress

@dataclass(frozen=True)
class FileProgress:
    path: str
    done: int
    total: int
    speed: float              # bytes/s over the last few seconds
    eta: float | None         # seconds, None while unknown
    state: str                # waiting | downloading | verifying | done | retrying


@dataclass(frozen=True)
class DownloadProgress:
    files: tuple[FileProgress, ...]
    done: int
    total: int
    speed: float
    eta: float | None
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def active(self) -> list[FileProgress]:
        return [f for f in self.files if f.state in ("downloading", "verifying", "retrying")]


ProgressCallback = Callable[[DownloadProgress], None]


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def describe(p: DownloadProgress) -> str:
    """One line for logs and plain-text UIs: overall bytes, speed, ETA."""
    return (f"{human_size(p.done)} / {human_size(p.total)} ({p.fraction:.0%}) at {human_size(p.speed)}/s, "
            f"ETA {format_eta(p.eta)}")


class _RateMeter:
    """Bytes per second over a sliding window, so speed follows the network rather than the whole run."""

    WINDOW_S = 3.0

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()
        self.count = 0

    def add(self, n: int, now: float) -> None:
        self.count += n
        self.samples.append((now, self.count))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW_S:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        if len(self.samples) < 2:
            return 0.0
        t0, c0 = self.samples[0]
        return (self.count - c0) / max(now - t0, 1e-3)


class _Tracker:
    """Thread-safe byte counts per file; calls the user's callback at most every PROGRESS_INTERVAL_S."""

    def __init__(self, files: list[RemoteFile], callback: ProgressCallback | None) -> None:
        self.lock = threading.Lock()
        self.callback_lock = threading.Lock()
        self.callback = callback
        self.totals = {f.path: f.size for f in files}
        self.done = {f.path: 0 for f in files}
        self.state = {f.path: "waiting" for f in files}
        self.meters = {f.path: _RateMeter() for f in files}
        self.overall = _RateMeter()
        self.last_emit = 0.0

    def set(self, path: str, *, done: int | None = None, state: str | None = None, force: bool = True) -> None:
        with self.lock:
            if done is not None:
                self.done[path] = done
            if state is not None:
                self.state[path] = state
        self.emit(force=force)

    def add(self, path: str, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.done[path] += n
            self.meters[path].add(n, now)
            self.overall.add(n, now)
        self.emit(force=False)

    def snapshot(self, message: str = "") -> DownloadProgress:
        now = time.monotonic()
        with self.lock:
            files = []
            for path, total in self.totals.items():
                speed = self.meters[path].rate(now) if self.state[path] == "downloading" else 0.0
                left = total - self.done[path]
                eta = 0.0 if left <= 0 else (left / speed if speed > 0 else None)
                files.append(FileProgress(path, self.done[path], total, speed, eta, self.state[path]))
            done, total = sum(self.done.values()), sum(self.totals.values())
            speed = self.overall.rate(now)
        eta = 0.0 if done >= total else (((total - done) / speed) if speed > 0 else None)
        return DownloadProgress(tuple(files), done, total, speed, eta, message)

    def emit(self, force: bool, message: str = "") -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        with self.lock:
            if not force and now - self.last_emit < PROGRESS_INTERVAL_S:
                return
            self.last_emit = now
        snap = self.snapshot(message)
        with self.callback_lock:   # callbacks (tqdm, UI queues) need not be thread-safe themselves
            self.callback(snap)


# ----------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class DownloadResult:
    path: Path
    ref: RepoRef
    commit: str
    files: list[RemoteFile]
    already_present: bool = False
    note: str = ""            # why the folder is not the usual <owner>_<name>[_<branch>], for the user


@dataclass
class DownloadPlan:
    ref: RepoRef
    listing: RepoListing
    selection: Selection
    models_dir: Path
    folder: str                # under models_dir, from hub.folders.choose_folder
    note: str = ""
    partial_files: dict[str, int] = field(default_factory=dict)   # bytes already on disk per path

    @property
    def dest(self) -> Path:
        return self.models_dir / self.folder

    @property
    def partial_dir(self) -> Path:
        return self.models_dir / f"{PARTIAL_PREFIX}{self.folder}"

    @property
    def bytes_needed(self) -> int:
        return sum(max(f.size - self.partial_files.get(f.path, 0), 0) for f in self.selection.files)


def plan_download(ref: RepoRef, models_dir: Path, *, specific_file: str | None = None,
                  token: str | None = None) -> DownloadPlan:
    """List the branch and choose its files (network), pick the folder, refuse names that cannot be stored,
    and see what is on disk already (no writes)."""
    listing = list_files(ref, token=token)
    selection = select_files(listing, specific_file=specific_file)
    destination = choose_folder(ref, Path(models_dir))
    plan = DownloadPlan(ref, listing, selection, Path(models_dir), destination.name, destination.note)
    _check_storable(plan)
    for f in selection.files:
        target = _target(plan.partial_dir, f.path)
        for candidate in (target, target.with_name(target.name + INCOMPLETE_SUFFIX)):
            if candidate.is_file():
                plan.partial_files[f.path] = min(candidate.stat().st_size, f.size)
    return plan


def _target(root: Path, repo_path: str) -> Path:
    """Where a repo file goes under `root`; a name that escapes `root` is refused, whatever listing let by."""
    rel = PurePosixPath(repo_path)
    if rel.is_absolute() or any(part in ("..", ".", "") for part in rel.parts) or "\\" in repo_path:
        raise UnsafePath(f"The server listed a file named {repo_path!r}, which would write outside the model "
                         f"folder; refusing to download from this repo.")
    target = root.joinpath(*rel.parts)
    root_abs = root.resolve()
    if not target.resolve().is_relative_to(root_abs) or target.resolve() == root_abs:
        raise UnsafePath(f"The file name {repo_path!r} resolves outside the model folder; refusing to write it.")
    return target


def _shorten(name: str) -> str:
    return f"{name[:40]}…{name[-12:]}" if len(name) > 60 else name


def _check_storable(plan: DownloadPlan) -> None:
    """Refuse, before a byte is written, names this disk cannot hold side by side: a name too long (with
    the '.incomplete' a partial file adds), a path too long, or a name that is a file and a folder at once
    (a real git tree cannot list both; a hostile or broken server can)."""
    paths = [f.path for f in plan.selection.files]
    most = NAME_MAX - len(INCOMPLETE_SUFFIX)
    for path in paths:
        for part in path.split("/"):
            if len(part.encode()) > most:
                raise UnstorableName(f"{plan.ref} lists a file name too long to store, {_shorten(part)!r} "
                                     f"({len(part.encode())} bytes; at most {most} fit); nothing was downloaded.")
        if len(str(plan.partial_dir / path).encode()) + len(INCOMPLETE_SUFFIX) > PATH_MAX:
            raise UnstorableName(f"{plan.ref} lists a file whose path is too long to store under "
                                 f"{plan.models_dir}, {_shorten(path)!r}; nothing was downloaded.")
    files = set(paths)
    partials = {p + INCOMPLETE_SUFFIX: p for p in paths}
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in files:
                raise UnstorableName(f"{plan.ref} lists {folder!r} both as a file and as a folder (holding "
                                     f"{_shorten(path)!r}); a disk cannot store both, so nothing was downloaded.")
            if folder in partials:
                raise UnstorableName(f"{plan.ref} lists a folder {folder!r} (holding {_shorten(path)!r}), the name "
                                     f"Hearth gives the partial download of the file {partials[folder]!r}; "
                                     f"nothing was downloaded.")


def _refuse_foreign_folder(plan: DownloadPlan) -> None:
    """A full download replaces models/<dest>; never do that to a folder Hearth did not download."""
    if plan.ref.file is None and plan.dest.exists() and not (plan.dest / PROVENANCE_FILE).is_file():
        raise HubError(f"{plan.dest} already exists and was not downloaded by Hearth; move or rename it, then "
                       f"download again.")


@contextmanager
def _drop_partial_dir_if_empty_on_failure(plan: DownloadPlan) -> Iterator[None]:
    """A failed or cancelled download keeps its partial folder only if it holds bytes to resume from."""
    try:
        yield
    except BaseException:
        if plan.partial_dir.is_dir() and not any(
                p.is_file() and p.name != PARTIAL_STATE_FILE and p.stat().st_size
                for p in plan.partial_dir.rglob("*")):
            shutil.rmtree(plan.partial_dir, ignore_errors=True)
        raise


@contextmanager
def _exclusive(plan: DownloadPlan) -> Iterator[None]:
    """One download per destination at a time, across processes (two UI sessions, or the UI and the CLI),
    so two writers never append to the same partial file."""
    plan.models_dir.mkdir(parents=True, exist_ok=True)
    lock_path = plan.models_dir / f"{PARTIAL_PREFIX}{plan.folder}.lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HubError(f"{plan.ref} is already being downloaded by another Hearth session; wait for it "
                           f"or cancel it there.") from None
        try:
            yield
        finally:
            if not plan.partial_dir.exists():
                lock_path.unlink(missing_ok=True)   # finished: leave nothing behind
            fcntl.flock(lock, fcntl.LOCK_UN)


def _expected_hash(f: RemoteFile) -> str | None:
    return f.sha256 or f.git_oid


def _check_disk_space(plan: DownloadPlan) -> None:
    plan.models_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(plan.models_dir).free
    needed = plan.bytes_needed
    if needed > free:
        raise DiskSpaceError(f"Not enough disk space in {plan.models_dir}: this download needs "
                             f"{human_size(needed)} more but only {human_size(free)} is free; free up space or "
                             f"choose another models folder.")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(plan: DownloadPlan, exc: OSError) -> DiskSpaceError:
    """The disk filled up mid-download (the up-front check passed, then something else took the space)."""
    kept = sum(p.stat().st_size for p in plan.partial_dir.rglob("*") if p.is_file()) \
        if plan.partial_dir.is_dir() else 0
    return DiskSpaceError(f"The disk holding {plan.models_dir} filled up during the download "
                          f"({exc.strerror or 'no space left'}); {human_size(kept)} already downloaded is kept in "
                          f"{plan.partial_dir.name}: free up space and run the download again to resume.")


def _already_complete(plan: DownloadPlan) -> bool:
    record_path = plan.dest / PROVENANCE_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
        recorded = {e["path"]: e for e in record["files"]}
    except (ValueError, KeyError, TypeError):
        return False
    if (record.get("repo"), record.get("branch"), record.get("commit")) != (
            plan.ref.repo_id, plan.ref.branch, plan.listing.commit):
        return False
    for f in plan.selection.files:
        entry = recorded.get(f.path)
        on_disk = plan.dest.joinpath(*PurePosixPath(f.path).parts)
        if entry is None or not on_disk.is_file() or on_disk.stat().st_size != f.size:
            return False
        if f.sha256 and entry.get("sha256") != f.sha256:
            return False
    return True


def _prepare_partial_dir(plan: DownloadPlan) -> None:
    """Keep bytes from an earlier run only if they belong to the same file version (same expected hash)."""
    plan.partial_dir.mkdir(parents=True, exist_ok=True)
    state_path = plan.partial_dir / PARTIAL_STATE_FILE
    try:
        previous = json.loads(state_path.read_text()).get("expected", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    expected = {f.path: _expected_hash(f) for f in plan.selection.files}
    for path, old_hash in previous.items():
        if path in expected and old_hash != expected[path]:
            target = _target(plan.partial_dir, path)
            for stale in (target, target.with_name(target.name + INCOMPLETE_SUFFIX)):
                stale.unlink(missing_ok=True)
            plan.partial_files.pop(path, None)
    merged = {**previous, **expected}
    state = {"repo": plan.ref.repo_id, "branch": plan.ref.branch, "commit": plan.listing.commit,
             "expected": merged}
    _write_json_atomic(state_path, state)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------- transfer

class _StopSignal:
    """Set by the user's cancel event or internally when another worker failed (the user's event stays as
    the caller left it)."""

    def __init__(self, user: threading.Event) -> None:
        self.user, self.internal = user, threading.Event()

    def is_set(self) -> bool:
        return self.user.is_set() or self.internal.is_set()

    def wait(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self.is_set() and time.monotonic() < deadline:
            self.internal.wait(min(0.05, max(deadline - time.monotonic(), 0)))
        return self.is_set()


class _Transient(Exception):
    """A failure worth retrying from the bytes on disk (connection drop, timeout, 5xx, 429)."""


class _Digest:
    """sha256 (plus the git blob sha1 for plain files) of a file's bytes so far, fed as they arrive, so a
    finished download is verified without reading it back; `catch_up` hashes bytes a previous run left."""

    def __init__(self, f: RemoteFile) -> None:
        self.f = f
        self.reset()

    def reset(self) -> None:
        self.sha256 = hashlib.sha256()
        # git's object id hashes a "blob <size>\0" header first; the Hub told us the size.
        self.git = hashlib.sha1(b"blob %d\0" % self.f.size) if not self.f.is_lfs and self.f.git_oid else None
        self.count = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)
        self.count += len(data)

    def catch_up(self, path: Path, length: int, cancel: _StopSignal) -> None:
        """Make the digest cover exactly the first `length` bytes of `path`."""
        if self.count == length:
            return
        self.reset()
        with open(path, "rb") as fh:
            while self.count < length:
                if cancel.is_set():
                    raise DownloadCancelled("Download cancelled; run it again to resume where it stopped.")
                block = fh.read(min(HASH_BLOCK, length - self.count))
                if not block:
                    break
                self.update(block)


class _Fetcher:
    """Fetches single files into the partial folder; shared by the worker threads."""

    def __init__(self, plan: DownloadPlan, tracker: _Tracker, cancel: _StopSignal, token: str | None,
                 max_retries: int, workers: int) -> None:
        import httpx
        from huggingface_hub.utils import build_hf_headers
        self.plan, self.tracker, self.cancel, self.max_retries = plan, tracker, cancel, max_retries
        # build_hf_headers: Authorization from the token argument, HF_TOKEN or the stored login, plus the
        # user agent the Hub expects. identity encoding keeps Range offsets in file bytes.
        self.headers = {**build_hf_headers(token=token, library_name="hearth"), "Accept-Encoding": "identity"}
        # LFS files redirect to a CDN on another host; httpx drops Authorization on cross-origin redirects.
        self.client = httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, connect=10.0),
                                   limits=httpx.Limits(max_connections=workers + 2))
        self.httpx = httpx
        self.sha256s: dict[str, str] = {}

    def close(self) -> None:
        self.client.close()

    def url(self, f: RemoteFile) -> str:
        # Fetch at the listed commit, not the branch name: a push during the download cannot mix versions.
        return (f"{endpoint()}/{self.plan.ref.repo_id}/resolve/{quote(self.plan.listing.commit, safe='')}/"
                f"{quote(f.path, safe='/')}")

    def fetch(self, f: RemoteFile) -> None:
        target = _target(self.plan.partial_dir, f.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = _Digest(f)
        if target.is_file():      # completed by an earlier run: re-hash it, it is cheap next to a download
            self.tracker.set(f.path, done=target.stat().st_size, state="verifying")
            digest.catch_up(target, target.stat().st_size, self.cancel)
            if self._verify(f, digest):
                self.tracker.set(f.path, state="done")
                return
            target.unlink()
            digest.reset()
        partial = target.with_name(target.name + INCOMPLETE_SUFFIX)
        verify_failures = 0
        while True:
            self._fetch_into(f, partial, digest)
            self.tracker.set(f.path, state="verifying")
            digest.catch_up(partial, f.size, self.cancel)   # a no-op unless the file changed under us
            if self._verify(f, digest):
                os.replace(partial, target)
                self.tracker.set(f.path, state="done")
                return
            # Corrupt bytes (on disk from an earlier run, or sent by the server): drop them and fetch the
            # whole file once more; a second mismatch means the source itself is wrong.
            partial.unlink(missing_ok=True)
            digest.reset()
            verify_failures += 1
            self.tracker.set(f.path, done=0, state="retrying")
            if verify_failures >= 2:
                raise VerifyError(f"{f.path} failed its checksum twice (expected {_expected_hash(f)}); the "
                                  f"server may be serving a damaged file, try again later.")

    def _verify(self, f: RemoteFile, digest: "_Digest") -> bool:
        if digest.count != f.size:
            return False
        if f.is_lfs:
            ok = digest.sha256.hexdigest() == f.sha256
        elif f.git_oid:
            ok = digest.git is not None and digest.git.hexdigest() == f.git_oid
        else:
            ok = True         # a server that gives no hash at all: size is all we can check
        if ok:
            self.sha256s[f.path] = digest.sha256.hexdigest()
        return ok

    def _fetch_into(self, f: RemoteFile, partial: Path, digest: "_Digest") -> None:
        """Append to `partial` until it holds f.size bytes, retrying transient failures with backoff."""
        attempt = 0
        while True:
            if self.cancel.is_set():
                raise DownloadCancelled("Download cancelled; run it again to resume where it stopped.")
            offset = partial.stat().st_size if partial.exists() else 0
            if offset > f.size:
                partial.unlink()
                offset = 0
            self.tracker.set(f.path, done=offset, state="downloading")
            if offset == f.size:
                return
            try:
                self._stream(f, partial, offset, digest)
                return
            except _Transient as e:
                now_on_disk = partial.stat().st_size if partial.exists() else 0
                # Count failures in a row without progress: a link that drops but keeps delivering is
                # worth resuming for as long as it takes.
                attempt = 1 if now_on_disk > offset else attempt + 1
                if attempt > self.max_retries:
                    raise NetworkError(f"Downloading {f.path} kept failing after {self.max_retries} retries "
                                       f"({e}); check the connection and run the download again to resume."
                                       ) from None
                self.tracker.set(f.path, state="retrying")
                delay = min(0.5 * 2 ** (attempt - 1), 10.0) * (0.5 + random.random())   # jitter: no herd
                if self.cancel.wait(delay):
                    raise DownloadCancelled("Download cancelled; run it again to resume where it stopped.")

    def _stream(self, f: RemoteFile, partial: Path, offset: int, digest: "_Digest") -> None:
        headers = dict(self.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        httpx = self.httpx
        try:
            with self.client.stream("GET", self.url(f), headers=headers) as r:
                self._check_status(f, r)
                self._check_announced_size(f, r, partial)
                if r.status_code == 416:
                    partial.unlink(missing_ok=True)   # our bytes do not fit the file any more: start over
                    raise _Transient("range not satisfiable")
                mode = "ab"
                if offset and r.status_code == 200:   # server ignored the Range header: take the full body
                    mode, offset = "wb", 0
                    self.tracker.set(f.path, done=0)
                    digest.reset()
                elif offset and not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                    raise _Transient(f"server answered an unexpected range {r.headers.get('Content-Range')!r}")
                else:
                    digest.catch_up(partial, offset, self.cancel)   # resumed: hash what an earlier run kept
                # The listing's size is the most this file may take on disk (the free-space check added up
                # those sizes): a server sending more is cut off at the first byte too many.
                room, overflow = f.size - offset, False
                with open(partial, mode) as out:
                    for chunk in r.iter_raw():
                        if self.cancel.is_set():
                            raise DownloadCancelled("Download cancelled; run it again to resume where it stopped.")
                        if len(chunk) > room:
                            overflow = True
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        self.tracker.add(f.path, len(chunk))
                        room -= len(chunk)
                if overflow:
                    partial.unlink()
                    raise _size_mismatch(f, "kept sending past that size")
                received = partial.stat().st_size
                if received < f.size:
                    raise _Transient(f"connection closed at byte {received} of {f.size}")
        except httpx.TooManyRedirects:
            raise NetworkError(f"The server redirected {f.path} in a loop (more than {self.client.max_redirects} "
                               f"redirects); nothing of that file was kept. Try again later or check "
                               f"HF_ENDPOINT.") from None
        except httpx.TransportError as e:   # drops, timeouts, resets: resume from what reached the disk
            raise _Transient(type(e).__name__) from None

    def _check_announced_size(self, f: RemoteFile, r, partial: Path) -> None:
        """Believe a server that announces another size than the listing at once, before any byte: those
        bytes could only fail verification, and a retry would fetch them again."""
        if r.status_code in (206, 416):     # Content-Range: bytes <start>-<end>/<size> or bytes */<size>
            size = r.headers.get("Content-Range", "").rpartition("/")[2]
        else:
            size = r.headers.get("Content-Length", "")
        if size.isdigit() and int(size) != f.size:
            partial.unlink(missing_ok=True)
            raise _size_mismatch(f, f"announced {human_size(int(size))}")

    def _check_status(self, f: RemoteFile, r) -> None:
        status = r.status_code
        if status in (200, 206, 416):
            return
        code = r.headers.get("X-Error-Code", "")
        repo = self.plan.ref.repo_id
        if status in (401, 403) or code == "GatedRepo":
            raise GatedRepo(f"{repo} is gated and needs an access token: {TOKEN_HINT}.")
        if status == 404:
            if code == "RepoNotFound":
                raise RepoNotFound(f"No repo named {repo} on {endpoint()}; check the spelling.")
            if code == "RevisionNotFound":
                raise RevisionNotFound(f"{repo} no longer has commit {self.plan.listing.commit}; list the "
                                       f"branch again and retry.")
            raise EntryNotFound(f"{repo} no longer has {f.path}; list the files again and retry.")
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}")
        raise NetworkError(f"The server answered HTTP {status} for {f.path}; try again later.")


def _size_mismatch(f: RemoteFile, what: str) -> SizeMismatch:
    return SizeMismatch(f"The server {what} for {f.path}, which the repo lists at {human_size(f.size)}; the "
                        f"file's bytes were dropped. The listing and the file disagree (a broken mirror, or the "
                        f"repo changed): try again later.")


# ----------------------------------------------------------------------------------------------- finish

def _write_provenance(plan: DownloadPlan, sha256s: dict[str, str], folder: Path, merge_with: Path | None) -> None:
    entries = {f.path: {"path": f.path, "size": f.size, "sha256": sha256s[f.path]} for f in plan.selection.files}
    if merge_with is not None and merge_with.is_file():
        try:
            old = json.loads(merge_with.read_text())
            if old.get("commit") == plan.listing.commit:
                for e in old.get("files", []):
                    entries.setdefault(e["path"], e)
        except (ValueError, KeyError, TypeError):
            pass
    record = {"repo": plan.ref.repo_id, "branch": plan.ref.branch, "commit": plan.listing.commit,
              "endpoint": endpoint(), "downloaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "files": sorted(entries.values(), key=lambda e: e["path"])}
    _write_json_atomic(folder / PROVENANCE_FILE, record)


def _remove_empty_dirs(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _prune_partial_dir(plan: DownloadPlan) -> None:
    """Drop what the partial folder holds beyond this selection (files of an older commit, leftovers of a
    cancelled single-file download), so the published folder has exactly the verified files."""
    keep = {_target(plan.partial_dir, f.path) for f in plan.selection.files}
    for path in list(plan.partial_dir.rglob("*")):
        if (path.is_file() or path.is_symlink()) and path not in keep:
            path.unlink()
    _remove_empty_dirs(plan.partial_dir)


def _publish(plan: DownloadPlan, sha256s: dict[str, str]) -> None:
    """Make the model visible in one step: the folder appears complete or not at all."""
    dest = plan.dest
    if plan.ref.file:
        # A single chosen file (e.g. one GGUF of many) joins the folder next to earlier picks; bytes of
        # other files still in the partial folder stay there for their own resume.
        dest.mkdir(parents=True, exist_ok=True)
        for f in plan.selection.files:
            final = _target(dest, f.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(_target(plan.partial_dir, f.path), final)
        _write_provenance(plan, sha256s, dest, merge_with=dest / PROVENANCE_FILE)
        _remove_empty_dirs(plan.partial_dir)
        leftovers = [p for p in plan.partial_dir.rglob("*") if p.is_file() and p.name != PARTIAL_STATE_FILE]
        if not leftovers:
            shutil.rmtree(plan.partial_dir, ignore_errors=True)
        return
    _prune_partial_dir(plan)
    _write_provenance(plan, sha256s, plan.partial_dir, merge_with=None)
    if dest.exists():   # an older version: swap it out so no stale files linger in the new folder
        old = plan.models_dir / f".old-{plan.folder}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(plan.partial_dir, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(plan.partial_dir, dest)


def download_model(ref: RepoRef, models_dir: Path, *, specific_file: str | None = None,
                   cancel: threading.Event | None = None, progress: ProgressCallback | None = None,
                   workers: int = 4, max_retries: int = 5, token: str | None = None,
                   plan: DownloadPlan | None = None) -> DownloadResult:
    """Download the branch's selected files into models/<folder>; resumes whatever an earlier run left.

    Raises a HubError subclass whose message is one sentence for the user; DownloadCancelled when `cancel`
    is set (the bytes stay in the partial folder for the next run).
    """
    cancel = cancel or threading.Event()
    if specific_file and not ref.file:
        ref = RepoRef(ref.owner, ref.name, ref.branch, specific_file)
    plan = plan or plan_download(ref, Path(models_dir), token=token)
    files = plan.selection.files
    if _already_complete(plan):
        tracker = _Tracker(files, None)       # one report with everything done, not one per file
        for f in files:
            tracker.set(f.path, done=f.size, state="done")
        tracker.callback = progress
        tracker.emit(force=True, message=ALREADY_PRESENT)
        return DownloadResult(plan.dest, plan.ref, plan.listing.commit, files, already_present=True, note=plan.note)
    _refuse_foreign_folder(plan)
    _check_disk_space(plan)
    try:
        return _download_locked(plan, cancel, progress, workers, max_retries, token)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:   # a write hit the true edge of the disk: bytes so far stay
            raise _disk_full(plan, exc) from None
        # Anything else the file system refuses (e.g. a folder where a file should go): one line, no trace.
        where = f" ({exc.filename})" if exc.filename else ""
        kept = (f"; the bytes downloaded so far stay in {plan.partial_dir.name} for the next run"
                if plan.partial_dir.exists() else "")
        raise HubError(f"Could not store {plan.ref} in {plan.dest}: {exc.strerror or exc}{where}{kept}.") from None


def _download_locked(plan: DownloadPlan, cancel: threading.Event, progress: ProgressCallback | None,
                     workers: int, max_retries: int, token: str | None) -> DownloadResult:
    files = plan.selection.files
    with _exclusive(plan), _drop_partial_dir_if_empty_on_failure(plan):
        _prepare_partial_dir(plan)
        tracker = _Tracker(files, progress)
        for path, size in plan.partial_files.items():
            tracker.set(path, done=size, force=False)
        stop = _StopSignal(cancel)
        fetcher = _Fetcher(plan, tracker, stop, token, max_retries, workers)
        try:
            # Largest first, so the long transfers start at once and small files fill the gaps.
            ordered = sorted(files, key=lambda f: f.size, reverse=True)
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hearth-download") as pool:
                futures = [pool.submit(fetcher.fetch, f) for f in ordered]
                done, pending = wait(futures, return_when=FIRST_EXCEPTION)
                if any(fut.exception() is not None for fut in done):
                    stop.internal.set()   # stop the other workers; their bytes stay for the next run
                    wait(pending)
                    errors = [fut.exception() for fut in futures if fut.exception() is not None]
                    # Report the root cause rather than the cancellations it triggered in the other workers.
                    real = [e for e in errors if not isinstance(e, DownloadCancelled)]
                    raise (real or errors)[0]
        finally:
            fetcher.close()
        tracker.emit(force=True, message="verified; moving into place")
        _publish(plan, fetcher.sha256s)
    tracker.emit(force=True, message="done")
    return DownloadResult(plan.dest, plan.ref, plan.listing.commit, files, note=plan.note)

