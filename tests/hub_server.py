"""A Hub-protocol HTTP server for tests: the routes huggingface_hub 2.4 uses (../shared/HUB.md), served from
repos the test builds in a temp dir, with fault injection and per-file byte counters.

    with HubServer(tmp_path) as hub:
        hub.add_repo("TheBloke/Llama-2-7b-Chat-GPTQ", {"config.json": b"{}", "model.safetensors": weights},
                     branch="gptq-4bit-32g-actorder_True")
        os.environ["HF_ENDPOINT"] = hub.url
        hub.faults.drop_after("model.safetensors", 100_000)    # next GET of that file dies after 100 kB
        hub.faults.wrong_size("model.safetensors", 100 << 20)  # a lying server: 100 MB for a listed 10 bytes
        hub.faults.redirect_loop("model.safetensors")          # redirects to itself, forever
        ...
        hub.bytes_served("model.safetensors")

File contents are stored once per content hash under root/blobs, so a repo path (even a hostile one like
"../x" used to test clients) never becomes a server-side file name.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
SEND_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Blob:
    path_on_disk: Path
    size: int
    git_sha1: str        # sha1 of "blob <size>\0" + content, the git object id
    sha256: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class Repo:
    repo_id: str
    token: str | None = None                               # gated: only this bearer token gets in
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


class Faults:
    """Misbehaviour for the next GETs of a repo file path (any repo), configured by tests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._corrupt: Counter[str] = Counter()
        self._drop: dict[str, list[int]] = {}        # path -> [after_bytes, times left]
        self._fail: dict[str, list[int]] = {}        # path -> [status, times left]
        self._rate: dict[str | None, float] = {}     # path (None: every file) -> bytes per second
        self._wrong_size: dict[str, tuple[int, bool]] = {}   # path -> (body bytes, declare Content-Length)
        self._loop: set[str] = set()

    def corrupt(self, path: str, times: int = 1) -> None:
        """Flip one byte in the middle of the file in the next `times` responses that include it."""
        with self.lock:
            self._corrupt[path] += times

    def drop_after(self, path: str, nbytes: int, times: int = 1) -> None:
        """Close the connection after `nbytes` body bytes of the next `times` GETs."""
        with self.lock:
            self._drop[path] = [nbytes, times]

    def fail(self, path: str, status: int = 503, times: int = 1) -> None:
        with self.lock:
            self._fail[path] = [status, times]

    def throttle(self, bytes_per_second: float | None, path: str | None = None) -> None:
        with self.lock:
            if bytes_per_second is None:
                self._rate.pop(path, None)
            else:
                self._rate[path] = bytes_per_second

    def wrong_size(self, path: str, send: int, declare_length: bool = True) -> None:
        """Answer every GET of `path` with `send` body bytes (the file's own, then zeros), whatever the listing
        says its size is, ignoring Range. With `declare_length` the answer carries a matching Content-Length;
        without, it has none and ends by closing the connection (so only counting tells the client)."""
        with self.lock:
            self._wrong_size[path] = (send, declare_length)

    def redirect_loop(self, path: str) -> None:
        """Answer every request for `path` with a 302 to the same URL."""
        with self.lock:
            self._loop.add(path)

    def clear(self) -> None:
        with self.lock:
            self._corrupt.clear(), self._drop.clear(), self._fail.clear(), self._rate.clear()
            self._wrong_size.clear(), self._loop.clear()

    # used by the handler -------------------------------------------------------------------------
    def take_failure(self, path: str) -> int | None:
        with self.lock:
            entry = self._fail.get(path)
            if not entry or entry[1] <= 0:
                return None
            entry[1] -= 1
            return entry[0]

    def take_drop(self, path: str) -> int | None:
        with self.lock:
            entry = self._drop.get(path)
            if not entry or entry[1] <= 0:
                return None
            entry[1] -= 1
            return entry[0]

    def take_corrupt(self, path: str) -> bool:
        with self.lock:
            if self._corrupt[path] <= 0:
                return False
            self._corrupt[path] -= 1
            return True

    def wrong_size_of(self, path: str) -> tuple[int, bool] | None:
        with self.lock:
            return self._wrong_size.get(path)

    def loops(self, path: str) -> bool:
        with self.lock:
            return path in self._loop

    def rate(self, path: str) -> float | None:
        with self.lock:
            return self._rate.get(path, self._rate.get(None))

    def any_for(self, path: str) -> bool:
        with self.lock:
            return bool(self._corrupt[path] or path in self._drop or path in self._rate or None in self._rate)


class HubServer:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self._lock = threading.Lock()
        self._served: Counter[tuple[str, str]] = Counter()     # (repo_id, path) -> body bytes sent
        self.requests: list[tuple[str, str, str | None]] = []  # (method, url path, Range header)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # repos -----------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], *, branch: str = "main",
                 gated_token: str | None = None, lfs: set[str] | None = None) -> str:
        """Add (or replace) one branch of a repo; returns its commit sha. `files` values are bytes or a
        path to an existing file (for big benchmark files); `lfs` forces which paths are LFS files."""
        blobs = {path: self._store(path, content, lfs) for path, content in files.items()}
        digest = hashlib.sha1(json.dumps([repo_id, branch, sorted((p, b.sha256) for p, b in blobs.items())])
                              .encode()).hexdigest()
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            if gated_token is not None:
                repo.token = gated_token
            repo.branches[branch] = digest
            repo.commits[digest] = blobs
        return digest

    def _store(self, path: str, content: bytes | Path, lfs: set[str] | None) -> Blob:
        sha256, size = hashlib.sha256(), 0
        chunks = [content] if isinstance(content, (bytes, bytearray)) else None
        if chunks is None:
            size = Path(content).stat().st_size
        else:
            size = len(content)
        git = hashlib.sha1(b"blob %d\0" % size)
        if chunks is not None:
            sha256.update(content), git.update(content)
        else:
            with open(content, "rb") as fh:
                while block := fh.read(8 << 20):
                    sha256.update(block), git.update(block)
        key = sha256.hexdigest()
        stored = self.root / "blobs" / key
        if not stored.exists():
            if chunks is not None:
                stored.write_bytes(content)
            else:
                try:
                    os.link(content, stored)     # big bench files: no second copy on disk
                except OSError:
                    import shutil
                    shutil.copyfile(content, stored)
        is_lfs = (path in lfs) if lfs is not None else (
            PurePosixPath(path).suffix.lower() in LFS_SUFFIXES or size >= LFS_MIN_SIZE)
        return Blob(stored, size, git.hexdigest(), key, is_lfs)

    # counters --------------------------------------------------------------------------------------
    def bytes_served(self, path: str, repo_id: str | None = None) -> int:
        with self._lock:
            return sum(n for (r, p), n in self._served.items() if p == path and (repo_id is None or r == repo_id))

    def reset_counters(self) -> None:
        with self._lock:
            self._served.clear()
            self.requests.clear()

    def _count(self, repo_id: str, path: str, n: int) -> None:
        with self._lock:
            self._served[(repo_id, path)] += n

    # lifecycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"       # keep-alive, as the real Hub; every answer carries Content-Length

    def log_message(self, format: str, *args) -> None:   # keep pytest output clean
        pass

    # plumbing ---------------------------------------------------------------------------------------
    def _send_json(self, data, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send_json({"error": message}, status, headers)

    def _authorized(self, repo: Repo) -> bool:
        return repo.token is None or self.headers.get("Authorization") == f"Bearer {repo.token}"

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if not self._authorized(repo):
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                          f"and be authenticated to access it. Please log in.")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # routes -----------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self.hub.requests.append((self.command, self.path, self.headers.get("Range")))
        url = urlsplit(self.path)
        raw = url.path.split("/")[1:]
        try:
            if raw[:2] == ["api", "agent-harnesses"]:
                return self._send_json({"standardEnvVars": [], "harnesses": {}})
            if raw[:2] == ["api", "models"] and len(raw) >= 4:
                return self._api(unquote(raw[2]) + "/" + unquote(raw[3]), raw[4:], parse_qs(url.query))
            if len(raw) >= 5 and raw[2] == "resolve":
                return self._resolve(unquote(raw[0]) + "/" + unquote(raw[1]), unquote(raw[3]),
                                     unquote("/".join(raw[4:])))
            self._error(404, None, f"no route for {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if rest == ["refs"]:
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            return self._send_json({"branches": branches, "tags": [], "converts": []})
        if not rest or rest[0] == "revision":
            rev = unquote(rest[1]) if len(rest) >= 2 else "main"
            commit = self._commit(repo, rev)
            if commit is None:
                return
            siblings = [{"rfilename": p} for p in sorted(repo.commits[commit])]
            return self._send_json({"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings,
                                    "private": False, "gated": "manual" if repo.token else False,
                                    "disabled": False, "tags": [], "downloads": 0, "likes": 0})
        if rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo, unquote(rest[1]))
            if commit is None:
                return
            prefix = unquote("/".join(rest[2:])).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            tree = self._tree(repo.commits[commit], prefix, recursive, repo_id)
            if tree is not None:
                self._send_json(tree)
            return
        self._error(404, None, f"no api route {'/'.join(rest)}")

    def _tree(self, blobs: dict[str, Blob], prefix: str, recursive: bool, repo_id: str):
        entries, dirs = [], set()
        base = prefix + "/" if prefix else ""
        for path, blob in sorted(blobs.items()):
            if base and not path.startswith(base):
                continue
            rel = path[len(base):]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                dirs.add(base + "/".join(parts[:i]))
            if not recursive and len(parts) > 1:
                continue
            entry = {"type": "file", "oid": blob.git_sha1, "size": blob.size, "path": path}
            if blob.lfs:
                pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{blob.sha256}\n"
                           f"size {blob.size}\n").encode()
                entry["oid"] = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(pointer)}
            entries.append(entry)
        if prefix and not entries and prefix not in dirs:
            self._error(404, "EntryNotFound", f"{prefix} does not exist on this revision")
            return None
        shown = sorted(d for d in dirs if recursive or "/" not in d[len(base):])
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in shown]
        return folders + entries

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self._commit(repo, rev)
        if commit is None:
            return
        blob = repo.commits[commit].get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        if self.hub.faults.loops(path):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = self.hub.faults.take_failure(path) if self.command == "GET" else None
        if status is not None:
            return self._error(status, None, "injected failure")
        wrong = self.hub.faults.wrong_size_of(path) if self.command == "GET" else None
        if wrong is not None:
            return self._send_wrong_size(repo_id, commit, path, blob, *wrong)
        start, end = 0, blob.size - 1
        range_header = self.headers.get("Range")
        partial = False
        if range_header and range_header.startswith("bytes="):
            first, _, last = range_header[len("bytes="):].partition("-")
            start = int(first) if first else 0
            end = min(int(last), blob.size - 1) if last else blob.size - 1
            if start >= blob.size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{blob.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            partial = True
        length = end - start + 1
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{blob.git_sha1 if not blob.lfs else blob.sha256}"')
        if blob.lfs:
            self.send_header("X-Linked-Etag", f'"{blob.sha256}"')
            self.send_header("X-Linked-Size", str(blob.size))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{blob.size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_body(repo_id, path, blob, start, length)

    def _send_wrong_size(self, repo_id: str, commit: str, path: str, blob: Blob, send: int, declare: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{blob.etag}"')
        if declare:
            self.send_header("Content-Length", str(send))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        own = blob.path_on_disk.read_bytes()[:send]
        zeros = bytes(SEND_CHUNK)
        sent = 0
        while sent < send:
            chunk = own[sent:sent + SEND_CHUNK] if sent < len(own) else zeros[:send - sent]
            self.wfile.write(chunk)
            sent += len(chunk)
            self.hub._count(repo_id, path, len(chunk))
        self.wfile.flush()

    def _send_body(self, repo_id: str, path: str, blob: Blob, start: int, length: int) -> None:
        faults = self.hub.faults
        with open(blob.path_on_disk, "rb") as fh:
            if not faults.any_for(path):
                # The fast path (benchmarks): the kernel copies file -> socket.
                self.wfile.flush()
                sent = 0
                try:
                    sent = self.connection.sendfile(fh, start, length)
                finally:
                    self.hub._count(repo_id, path, sent)
                return
            drop_after = faults.take_drop(path)
            corrupt_at = blob.size // 2 if faults.take_corrupt(path) else None
            rate = faults.rate(path)
            fh.seek(start)
            sent, began = 0, time.monotonic()
            while sent < length:
                n = min(SEND_CHUNK, length - sent)
                if drop_after is not None:
                    n = min(n, drop_after - sent)
                    if n <= 0:
                        # Pretend the network died: the client got fewer bytes than Content-Length promised.
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                chunk = bytearray(fh.read(n))
                pos = start + sent
                if corrupt_at is not None and pos <= corrupt_at < pos + len(chunk):
                    chunk[corrupt_at - pos] ^= 0xFF
                self.wfile.write(chunk)
                sent += len(chunk)
                self.hub._count(repo_id, path, len(chunk))
                if rate:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
