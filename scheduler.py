"""The scheduler: a first-come-first-served line of runs, and one RunHandle per run.

A run is long work on something shared: a generation on the one loaded model, a download. `submit` puts
the run at the end of the line and returns its handle at once. The handle owns everything about that run:
its place in line (`position`), its cancel flag (`cancel()`) and its events (iterate it). Nothing else keeps
cancel flags, so a second run started by the same user (a UI session that pressed Send again) can never take
the first one's Stop over; `stop(owner)` always reaches that owner's oldest run, the one it sees running.

Runs are pulled, not pushed: the work runs in the thread that iterates the handle, one event per `next()`.
A consumer that pauses pauses its run (the model computes nothing nobody reads, and the run keeps its
place); closing the handle, or dropping it, gives the place up and ends the work.

threading.Lock wakes waiters in no particular order, so under load one client could wait forever; a line
served in arrival order makes waiting predictable and lets every waiter say how many are ahead of it.

A line with several slots runs the first `slots` runs at once (a model that batches generations, engine.batch,
sets them at load through `set_slots`); an `exclusive` run (changing the model's adapters) waits until it is
first in line and runs alone, and the runs behind it wait for it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Iterator

from engine.generation import DoneEvent, QueuedEvent

# The work of a run: called with the run's cancel flag once its turn comes; yields the run's events.
Work = Callable[[threading.Event], Iterator[object]]


class _Place:
    """A place in line. The line holds places, not handles, so a handle nobody references any more is freed
    (and its finalizer gives the place up) instead of holding the line forever."""
    __slots__ = ("owner", "cancel", "exclusive")

    def __init__(self, owner: str, exclusive: bool = False) -> None:
        self.owner = owner
        self.cancel = threading.Event()
        self.exclusive = exclusive


class Scheduler:
    """A line of runs served in arrival order; `slots` of them run at once (None: all, e.g. downloads, which
    get handles for their cancel flag but never wait for each other)."""

    def __init__(self, slots: int | None = 1) -> None:
        self.slots = slots
        # One condition for the whole line: every change (a place joins, leaves, is cancelled) wakes every
        # waiter, which then re-reads its own position. RLock-based, so a handle finalized by the garbage
        # collector while this thread holds the lock can still give its place up.
        self._cond = threading.Condition()
        self._line: list[_Place] = []

    def set_slots(self, slots: int | None) -> None:
        """Run `slots` runs at once from now on (waiting runs move up at once when there are more)."""
        with self._cond:
            self.slots = slots
            self._cond.notify_all()

    def submit(self, work: Work, owner: str = "default", exclusive: bool = False) -> RunHandle:
        """Queue `work` at the end of the line for `owner` (a UI session, "api"); returns its handle.
        The place is taken now, so the run's position counts from this call. `exclusive`: it runs alone."""
        place = _Place(owner, exclusive)
        with self._cond:
            self._line.append(place)
            self._cond.notify_all()
        return RunHandle(self, place, _run(self, place, work))

    def stop(self, owner: str) -> bool:
        """Cancel `owner`'s oldest run in line (the running one when it has one); False when it has none."""
        with self._cond:
            place = next((p for p in self._line if p.owner == owner), None)
            if place is None:
                return False
            self._cancel(place)
            return True

    def stop_all(self) -> int:
        """Cancel every run in line (running or waiting); returns how many were not cancelled already."""
        with self._cond:
            live = [p for p in self._line if not p.cancel.is_set()]
            for place in live:
                place.cancel.set()
            self._cond.notify_all()
            return len(live)

    def position(self, owner: str) -> int | None:
        """How many runs are ahead of `owner`'s oldest run (0: it runs); None when `owner` has none in line."""
        with self._cond:
            place = next((p for p in self._line if p.owner == owner), None)
            return None if place is None else self._ahead(place)

    def wait_idle(self, timeout: float) -> bool:
        """Block until the line is empty (False when `timeout` seconds pass first)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._line, timeout)

    # ---- used by RunHandle and _run -------------------------------------------------------------------
    def _ahead(self, place: _Place) -> int | None:
        with self._cond:
            if place not in self._line:
                return None
            index = self._line.index(place)
            if place.exclusive or any(p.exclusive for p in self._line[:index]):
                return index   # alone: it waits for every run ahead, and those behind wait for it
            return 0 if self.slots is None else max(0, index - self.slots + 1)

    def _cancel(self, place: _Place) -> bool:
        with self._cond:
            if place not in self._line:
                return False
            place.cancel.set()
            self._cond.notify_all()   # a run still waiting in line leaves it now
            return True

    def _wait(self, place: _Place, last: int | None) -> int | None:
        """Block until the number ahead of `place` differs from `last` or its turn comes; returns that number
        (0: its turn). None, and out of the line, when the run is cancelled first."""
        with self._cond:
            while True:
                if place.cancel.is_set():
                    self._leave(place)
                    return None
                ahead = self._ahead(place)
                if ahead == 0 or ahead != last:
                    return ahead
                self._cond.wait()

    def _leave(self, place: _Place) -> None:
        """Give the place up (the turn too, from the front); those behind move up. No-op once gone."""
        with self._cond:
            if place in self._line:
                self._line.remove(place)
                self._cond.notify_all()


def _run(scheduler: Scheduler, place: _Place, work: Work) -> Iterator[object]:
    """A run's events: QueuedEvent(ahead) whenever the number ahead changes while it waits, QueuedEvent(0)
    when its turn comes after a wait, then the work's own events. A run cancelled before its turn never
    starts: its only event after the queue reports is DoneEvent(reason="cancelled").
    (A module function, not a method: the generator must not keep its handle alive.)"""
    try:
        ahead = scheduler._wait(place, None)
        waited = bool(ahead)
        while ahead:
            yield QueuedEvent(ahead)
            ahead = scheduler._wait(place, ahead)
        if ahead is None:
            yield DoneEvent(reason="cancelled", text="")
            return
        if waited:
            yield QueuedEvent(0)
        yield from work(place.cancel)
    finally:
        scheduler._leave(place)


class RunHandle:
    """One run: iterate it for its events (the work runs as they are read), `cancel()` it from any thread,
    ask its `position`. `close()` (from the thread that reads it) ends it and gives its place up; so does
    dropping the last reference to it."""

    def __init__(self, scheduler: Scheduler, place: _Place, events: Iterator[object]) -> None:
        self.owner = place.owner
        self._scheduler, self._place, self._events = scheduler, place, events
        # A handle dropped before its first event never runs _run's finally: this gives its place up then.
        self._release = weakref.finalize(self, scheduler._leave, place)

    @property
    def position(self) -> int | None:
        """How many runs are ahead of this one (0: it runs); None once it has left the line."""
        return self._scheduler._ahead(self._place)

    @property
    def cancelled(self) -> bool:
        return self._place.cancel.is_set()

    def cancel(self) -> bool:
        """Stop this run: a waiting run leaves the line, a running one sees the flag (a generation within one
        token). Safe from any thread. False when the run has already left the line."""
        return self._scheduler._cancel(self._place)

    def __iter__(self) -> RunHandle:
        return self

    def __next__(self) -> object:
        return next(self._events)

    def close(self) -> None:
        """End the run now, from the thread that reads it: its work is closed and its place given up."""
        self._place.cancel.set()   # work that runs threads of its own (a download) stops them too
        self._events.close()
        self._release()
