"""The scheduler on its own (no model): runs served in arrival order, a RunHandle per run owning its place,
its cancel flag and its events; Stop by owner reaches that owner's oldest run; dropped and closed handles give
their place up. Every wait is bounded, so a deadlock fails a test instead of hanging it."""
import gc
import threading
import time

import pytest

from engine.generation import DoneEvent, QueuedEvent, TextEvent
from scheduler import Scheduler

WAIT_S = 30


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def ticks(n: int = 1000, closed: list | None = None):
    """Work that yields n text events, ending as 'cancelled' once its flag is set (as the decode loop does);
    `closed` records that it was closed, not run to its end."""
    def work(cancel: threading.Event):
        try:
            for i in range(n):
                if cancel.is_set():
                    yield DoneEvent(reason="cancelled", text="")
                    return
                yield TextEvent(str(i))
            yield DoneEvent(reason="max_tokens", text="")
        except GeneratorExit:
            if closed is not None:
                closed.append(True)
            raise
    return work


def drain(handle, into: list) -> threading.Thread:
    """Read `handle` to its end in a thread of its own, as the UI and the API do."""
    thread = threading.Thread(target=lambda: into.extend(handle), daemon=True)
    thread.start()
    return thread


def test_runs_are_served_in_arrival_order_and_report_their_position():
    scheduler = Scheduler()
    first = scheduler.submit(ticks(), "first")
    assert isinstance(next(first), TextEvent)   # it runs: the others wait behind it
    served: list[str] = []

    def wait_turn(owner):
        handle = scheduler.submit(ticks(2), owner)
        events = list(handle)
        assert [e.ahead for e in events if isinstance(e, QueuedEvent)][-1] == 0   # its turn came after a wait
        served.append(owner)

    threads = []
    for i, owner in enumerate(["a", "b", "c", "d", "e"]):
        threads.append(threading.Thread(target=wait_turn, args=(owner,), daemon=True))
        threads[-1].start()
        wait_until(lambda: scheduler.position(owner) == i + 1, f"{owner} to queue")   # arrivals are ordered
    assert scheduler.position("first") == 0 and first.position == 0
    assert scheduler.position("nobody") is None
    first.close()
    for t in threads:
        t.join(WAIT_S)
    assert served == ["a", "b", "c", "d", "e"]
    assert scheduler.position("a") is None and first.position is None
    assert scheduler.wait_idle(WAIT_S)


def test_a_cancelled_waiter_leaves_the_line_without_running_and_the_rest_move_up():
    scheduler = Scheduler()
    running = scheduler.submit(ticks(), "running")
    next(running)
    leaver, stayer = scheduler.submit(ticks(), "leaver"), scheduler.submit(ticks(3), "stayer")
    leaver_events: list = []
    stayer_events: list = []
    threads = [drain(leaver, leaver_events), drain(stayer, stayer_events)]
    wait_until(lambda: QueuedEvent(2) in stayer_events, "the stayer to report 2 ahead")
    assert leaver.cancel()
    threads[0].join(WAIT_S)
    assert leaver_events == [QueuedEvent(1), DoneEvent(reason="cancelled", text="")]   # it never ran
    assert not leaver.cancel(), "a run that left the line has nothing to cancel"
    wait_until(lambda: QueuedEvent(1) in stayer_events, "the stayer to move up")
    assert stayer.position == 1
    running.close()
    threads[1].join(WAIT_S)
    assert stayer_events == [QueuedEvent(2), QueuedEvent(1), QueuedEvent(0), TextEvent("0"), TextEvent("1"),
                             TextEvent("2"), DoneEvent(reason="max_tokens", text="")]


def test_stop_by_owner_reaches_its_running_run_not_the_one_it_queued_behind_it():
    """Issue 15, bug (a): a second run under the same owner (a UI session that pressed Send again) must not
    take the first one's Stop over."""
    scheduler = Scheduler()
    running = scheduler.submit(ticks(), "session")
    assert next(running) == TextEvent("0")
    queued = scheduler.submit(ticks(3), "session")
    queued_events: list = []
    reader = drain(queued, queued_events)
    wait_until(lambda: QueuedEvent(1) in queued_events, "the second run to queue")

    assert scheduler.stop("session")

    assert list(running)[-1] == DoneEvent(reason="cancelled", text="")   # the running one ended at once
    reader.join(WAIT_S)
    assert queued_events[-1] == DoneEvent(reason="max_tokens", text=""), "the queued one ran to its end"
    assert TextEvent("2") in queued_events and not queued.cancelled
    assert not scheduler.stop("session"), "nothing of that session is left to stop"


def test_a_dropped_handle_gives_its_place_up():
    """A reader that goes away without closing (a generator Gradio stops iterating) must not hold the line."""
    scheduler = Scheduler()
    never_read = scheduler.submit(ticks(), "never-read")
    started = scheduler.submit(ticks(), "started")
    assert scheduler.position("started") == 1
    del never_read
    gc.collect()
    assert scheduler.position("started") == 0
    assert next(started) == TextEvent("0")
    del started
    gc.collect()
    assert scheduler.wait_idle(WAIT_S)


def test_close_ends_the_work_and_sets_its_cancel_flag():
    scheduler = Scheduler()
    closed: list = []
    seen: list[threading.Event] = []

    def work(cancel):
        seen.append(cancel)
        yield from ticks(closed=closed)(cancel)

    handle = scheduler.submit(work, "reader")
    next(handle)
    handle.close()
    assert closed == [True] and seen[0].is_set() and handle.cancelled
    assert handle.position is None
    with pytest.raises(StopIteration):
        next(handle)


def test_stop_all_ends_every_run_and_counts_each_once():
    scheduler = Scheduler()
    running = scheduler.submit(ticks(), "a")
    next(running)
    waiting = scheduler.submit(ticks(), "b")
    waiting_events: list = []
    reader = drain(waiting, waiting_events)
    wait_until(lambda: waiting_events == [QueuedEvent(1)], "the waiter to queue")
    assert scheduler.stop_all() == 2
    assert scheduler.stop_all() == 0, "runs already cancelled are not counted again"
    reader.join(WAIT_S)
    assert waiting_events[-1].reason == "cancelled"
    assert list(running)[-1].reason == "cancelled"
    assert scheduler.wait_idle(WAIT_S)


def test_without_a_slot_limit_runs_never_wait_for_each_other():
    """Downloads: each gets a handle (its own Cancel), none waits behind another."""
    scheduler = Scheduler(slots=None)
    first, second = scheduler.submit(ticks(), "a"), scheduler.submit(ticks(), "a")
    assert first.position == 0 and second.position == 0
    assert next(second) == TextEvent("0") and next(first) == TextEvent("0")
    assert scheduler.stop("a")   # the oldest of that owner
    assert list(first)[-1].reason == "cancelled"
    assert next(second) == TextEvent("1") and not second.cancelled
    second.close()


def test_an_error_in_the_work_reaches_the_reader_and_frees_the_line():
    scheduler = Scheduler()

    def failing(cancel):
        yield TextEvent("partial")
        raise OSError("disk full")

    handle = scheduler.submit(failing, "x")
    assert next(handle) == TextEvent("partial")
    with pytest.raises(OSError, match="disk full"):
        next(handle)
    assert scheduler.position("x") is None and scheduler.wait_idle(WAIT_S)
