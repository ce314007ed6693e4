"""AppState's generation line on the real default model: a RunHandle per generation, Stop while queued,
Stop reaching the generation it belongs to, and an API client that hangs up while waiting leaving the line.
(The line on its own, without a model: tests/test_scheduler.py.)"""
import threading
import time

import httpx

from api.server import ApiConfig, ApiServer
from engine.generation import DoneEvent, QueuedEvent, TextEvent
from tests.conftest import DEFAULT_MODEL, free_port

WAIT_S = 120   # generous: the machine running the tests may be loaded; a deadlock still fails, not hangs


def _wait_until(predicate, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


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
    waiter.join(WAIT_S)
    # it reported its place in line, then ended without running
    assert [type(e).__name__ for e in events] == ["QueuedEvent", "DoneEvent"]
    assert events[0].ahead == 1 and events[1].reason == "cancelled"
    assert loaded_state.stop("queue-test-running")
    rest = list(running)
    assert rest[-1].reason == "cancelled"
    assert loaded_state.queue_position("queue-test-running") is None


def test_stop_reaches_the_running_generation_not_the_one_queued_behind_it_under_the_same_key(loaded_state):
    """Issue 15, bug (a): a UI session that pressed Send again has two generations under one key; Stop must end
    the one running (the reply on screen), and the queued one then runs. It used to cancel the queued one and
    leave the running one going to max_new_tokens."""
    state = loaded_state
    prompt = state.raw_prompt("1, 2, 3,")
    running = state.generate(prompt, state.generation_params(temperature=0.0, max_new_tokens=200), key="same")
    assert isinstance(next(running), TextEvent)   # holds the model now (it generates only as it is read)
    queued_events: list = []
    queued = threading.Thread(target=lambda: queued_events.extend(
        state.generate(prompt, state.generation_params(temperature=0.0, max_new_tokens=8), key="same")),
        daemon=True)
    queued.start()
    _wait_until(lambda: QueuedEvent(1) in queued_events)

    assert state.stop("same")

    rest = list(running)
    assert rest[-1].reason == "cancelled", "Stop ended the running generation"
    assert len([e for e in rest if isinstance(e, TextEvent)]) <= 2, "within a token of the Stop"
    queued.join(WAIT_S)
    done = queued_events[-1]
    assert isinstance(done, DoneEvent) and done.reason == "max_tokens", "the queued one ran to its end"
    assert "".join(e.text for e in queued_events if isinstance(e, TextEvent)).startswith(" 4, 5")
    assert state.queue_position("same") is None


def test_an_api_client_that_hangs_up_while_waiting_leaves_the_line(loaded_state):
    state = loaded_state
    server = ApiServer(state, ApiConfig(port=free_port(), api_key="k")).start()
    holder = state.generate(state.raw_prompt("1, 2, 3,"),
                            state.generation_params(temperature=0.0, max_new_tokens=200), key="holder")
    try:
        assert isinstance(next(holder), TextEvent)
        body = {"model": DEFAULT_MODEL, "prompt": "1, 2, 3,", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{server.url}/completions", json=body, headers={"Authorization": "Bearer k"},
                          timeout=WAIT_S):
            _wait_until(lambda: state.queue_position("api") == 1)   # the request waits behind the holder
        _wait_until(lambda: state.queue_position("api") is None)    # hung up: its handle left the line
        assert state.queue_position("holder") == 0
    finally:
        holder.close()
        server.stop()
    assert state.generations.wait_idle(WAIT_S)
