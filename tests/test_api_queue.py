"""AppState's generation queue: first come, first served, with a position per key and leaving on Stop."""
import threading
import time

from app_state import FifoQueue


def _wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _acquire(queue: FifoQueue, key: str, cancel: threading.Event):
    """Join the line and wait for the lock; the place, or None when cancelled first."""
    place = queue.join(key)
    ahead = queue.wait(place, cancel)
    while ahead:
        ahead = queue.wait(place, cancel, ahead)
    return place if ahead == 0 else None


def test_waiters_are_served_in_arrival_order_and_report_their_position():
    queue = FifoQueue()
    first = _acquire(queue, "first", threading.Event())
    assert first is not None
    served: list[str] = []

    def wait_turn(key):
        place = _acquire(queue, key, threading.Event())
        assert place is not None
        served.append(key)
        queue.leave(place)

    threads = []
    for i, key in enumerate(["a", "b", "c", "d", "e"]):
        t = threading.Thread(target=wait_turn, args=(key,))
        t.start()
        threads.append(t)
        _wait_until(lambda: queue.position(key) == i + 1)   # arrivals are spaced so their order is known
    assert queue.position("first") == 0
    assert queue.position("nobody") is None
    queue.leave(first)
    for t in threads:
        t.join(5)
    assert served == ["a", "b", "c", "d", "e"]
    assert queue.position("a") is None


def test_a_cancelled_waiter_leaves_the_line_and_the_rest_move_up():
    queue = FifoQueue()
    running = _acquire(queue, "running", threading.Event())
    cancel = threading.Event()
    results = {}
    leaver = threading.Thread(target=lambda: results.setdefault("leaver", _acquire(queue, "leaver", cancel)))
    stayer = threading.Thread(target=lambda: results.setdefault("stayer", _acquire(queue, "stayer", threading.Event())))
    leaver.start()
    _wait_until(lambda: queue.position("leaver") == 1)
    stayer.start()
    _wait_until(lambda: queue.position("stayer") == 2)
    cancel.set()
    queue.wake()
    leaver.join(5)
    assert results["leaver"] is None
    assert queue.position("leaver") is None and queue.position("stayer") == 1
    queue.leave(running)
    stayer.join(5)
    assert results["stayer"] is not None and queue.position("stayer") == 0
    queue.leave(results["stayer"])


def test_state_stop_releases_a_request_still_waiting_for_the_model(loaded_state):
    """A generation queued behind another ends as cancelled when stopped, without ever running."""
    prompt = loaded_state.raw_prompt("1, 2, 3,")
    params = loaded_state.generation_params(temperature=0.0, max_new_tokens=400)
    running = loaded_state.generate(prompt, params, key="queue-test-running")
    next(running)   # holds the model now
    events = []
    waiter = threading.Thread(target=lambda: events.extend(loaded_state.generate(prompt, params, "queue-test-wait")))
    waiter.start()
    _wait_until(lambda: loaded_state.queue_position("queue-test-wait") == 1)
    assert loaded_state.queue_position("queue-test-running") == 0
    assert loaded_state.stop("queue-test-wait")
    waiter.join(5)
    # it reported its place in line, then ended without running
    assert [type(e).__name__ for e in events] == ["QueuedEvent", "DoneEvent"]
    assert events[0].ahead == 1 and events[1].reason == "cancelled"
    assert loaded_state.stop("queue-test-running")
    rest = list(running)
    assert rest[-1].reason == "cancelled"
    assert loaded_state.queue_position("queue-test-running") is None
