"""Slowing down password and key guessing: each client address waits longer after every failure in a row.

After the n-th consecutive failure from an address, that address's next attempt is held for
min(FIRST_DELAY * 2**(n-1), MAX_DELAY) seconds before it is even checked, and its attempts are checked one at
a time, so sending many in parallel guesses no faster. A success resets the count. Each failure is logged
with the address. Other addresses are never held up.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

FIRST_DELAY = 0.5      # seconds after one failure: a user who mistyped barely notices
MAX_DELAY = 30.0
FORGET_AFTER = 900.0   # failures older than this no longer count
MAX_RECORDS = 10_000   # beyond this, forgotten addresses are dropped


def delay_after(failures: int) -> float:
    return 0.0 if failures <= 0 else min(FIRST_DELAY * 2 ** (failures - 1), MAX_DELAY)


@dataclass
class _Record:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failures: int = 0
    last_failure: float = 0.0
    users: int = 0   # attempts holding or waiting for the lock


class Attempt:
    def __init__(self, throttle: "FailureThrottle", address: str, record: _Record):
        self._throttle, self._address, self._record = throttle, address, record

    def failed(self) -> float:
        """Count a failure; returns how long this address's next attempt will wait."""
        record, now = self._record, time.monotonic()
        if now - record.last_failure > FORGET_AFTER:
            record.failures = 0
        record.failures += 1
        record.last_failure = now
        wait = delay_after(record.failures)
        log.warning("%s failed from %s (%d in a row); its next attempt waits %.1f s", self._throttle.what,
                    self._address, record.failures, wait)
        return wait

    def succeeded(self) -> None:
        self._record.failures = 0


class FailureThrottle:
    """Per-address delays for one kind of credential check (`what` names it in the log, e.g. "UI login")."""

    def __init__(self, what: str):
        self.what = what
        self._records: dict[str, _Record] = {}

    @asynccontextmanager
    async def attempt(self, address: str) -> AsyncIterator[Attempt]:
        """Wait for this address's turn, then let the caller check the credential and report the outcome."""
        record = self._records.get(address)
        if record is None:
            self._forget_old()
            record = self._records[address] = _Record()
        record.users += 1
        try:
            async with record.lock:
                if record.failures and time.monotonic() - record.last_failure <= FORGET_AFTER:
                    wait = record.last_failure + delay_after(record.failures) - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                yield Attempt(self, address, record)
        finally:
            record.users -= 1
            if record.users == 0 and record.failures == 0:
                self._records.pop(address, None)

    def _forget_old(self) -> None:
        if len(self._records) < MAX_RECORDS:
            return
        now = time.monotonic()
        for address, record in list(self._records.items()):
            if record.users == 0 and now - record.last_failure > FORGET_AFTER:
                del self._records[address]


def client_address(scope: Scope) -> str:
    return (scope.get("client") or ("unknown",))[0]


class LoginThrottle:
    """ASGI middleware over a login form posted to `paths`: throttles it per client address, reading the
    outcome from the answer (2xx: logged in; 400/401/403: refused), so the login code itself is untouched."""

    def __init__(self, app: ASGIApp, throttle: FailureThrottle, paths: tuple[str, ...]):
        self.app, self.throttle, self.paths = app, throttle, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        async with self.throttle.attempt(client_address(scope)) as attempt:
            async def observe(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    if 200 <= status < 300:
                        attempt.succeeded()
                    elif status in (400, 401, 403):
                        attempt.failed()
                await send(message)

            await self.app(scope, receive, observe)
