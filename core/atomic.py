"""The one way Hearth writes a user's file: whole or not at all, private to the user.

The text goes to a temporary file beside the target (created 0600 by mkstemp, so nobody else can read saved
settings or chats even for a moment), is flushed and fsynced, then moved into place: a reader, a crash or a full
disk never leaves half a file. With replace=False the move is a hard link, which fails (FileExistsError) if the
target appeared meanwhile, so an existing file is never overwritten.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str, replace: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
