"""One channel for problems with the user's files (a malformed preset, template, saved chat or
config-user.yaml): each reader reports what it skipped under its source, the UI's problem list reads them all
from here, and the log hears each problem once, when it is first seen."""
from __future__ import annotations

import logging
import threading
from typing import Iterable

log = logging.getLogger("hearth.files")


class Diagnostics:
    def __init__(self) -> None:
        self._by_source: dict[str, list[str]] = {}
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def report(self, source: str, problems: Iterable[str]) -> None:
        """What `source` (e.g. "presets") finds wrong now; replaces its earlier report, so fixed files leave
        the list. Each line is prefixed with the source, e.g. "presets/Broken.yaml: skipped, ...". """
        lines = [f"{source}/{p}" if source else p for p in problems]
        with self._lock:
            self._by_source[source] = lines
            fresh = [line for line in lines if line not in self._logged]
            self._logged.update(fresh)
        for line in fresh:
            log.warning(line)

    def problems(self) -> list[str]:
        with self._lock:
            return [line for lines in self._by_source.values() for line in lines]
