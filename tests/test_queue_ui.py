"""A chat reply that waits behind other generations tells the user how many are ahead, and the number
follows the line as it moves: first through prompts.chat_session (no UI), then through the real UI's /send
endpoint with gradio_client, two sessions of one running Hearth."""
from __future__ import annotations

import threading
import time

from gradio_client import Client

from engine.generation import TextEvent
from prompts import chat_session

QUESTION = "What is the capital of France?"
WAIT_S = 120   # every wait in this module is bounded: a deadlock fails the test instead of hanging it


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def hold_the_model(state, key: str, started: threading.Event, release: threading.Event) -> None:
    """Start a generation under `key`, take its first token (so it owns the model) and keep it until
    `release`: a generation that is reliably 'ahead' for as long as the test needs, with no timing."""
    prompt = state.chat_prompt([{"role": "user", "content": "Tell me a long story about a dragon."}])
    events = state.generate(prompt, state.generation_params(temperature=0, max_new_tokens=200), key)
    try:
        first = next(event for event in events if isinstance(event, TextEvent))
        assert first.text is not None
        started.set()
        release.wait(WAIT_S)
    finally:
        events.close()   # leaves the line: the next generation starts


def test_a_waiting_reply_reports_how_many_are_ahead_as_the_line_moves(loaded_state):
    state = loaded_state
    a_started, a_release = threading.Event(), threading.Event()
    b_started, b_release = threading.Event(), threading.Event()
    holders = [threading.Thread(target=hold_the_model, args=(state, "holder-a", a_started, a_release), daemon=True),
               threading.Thread(target=hold_the_model, args=(state, "holder-b", b_started, b_release), daemon=True)]
    statuses: list[str] = []
    replies: list[str] = []

    def chat() -> None:
        params = state.generation_params(temperature=0, max_new_tokens=24)
        for history, status in chat_session.send(state, [], QUESTION, params, key="waiting-user"):
            if not statuses or statuses[-1] != status.text:
                statuses.append(status.text)
            replies.append(history[-1]["content"])

    chatter = threading.Thread(target=chat, daemon=True)
    try:
        holders[0].start()
        wait_until(a_started.is_set, "the first holder to own the model")
        holders[1].start()
        wait_until(lambda: state.queue_position("holder-b") == 1, "the second holder to queue")
        chatter.start()
        wait_until(lambda: any("waiting: 2 ahead" in s for s in statuses), "'waiting: 2 ahead'")
        assert state.queue_position("waiting-user") == 2

        a_release.set()                       # the line moves up by one
        wait_until(b_started.is_set, "the second holder to own the model")
        wait_until(lambda: any("waiting: 1 ahead" in s for s in statuses), "'waiting: 1 ahead'")

        b_release.set()                       # our turn
        chatter.join(WAIT_S)
        assert not chatter.is_alive(), "the waiting reply never finished"
    finally:
        a_release.set()
        b_release.set()
        for t in holders:
            t.join(WAIT_S)
    waiting = [s for s in statuses if "waiting:" in s]
    assert [s.split("waiting: ")[1] for s in waiting] == ["2 ahead", "1 ahead"]
    after = statuses[statuses.index(waiting[-1]) + 1:]
    assert after and "generating…" in after[0]          # the status changes as soon as its turn comes
    assert "Paris" in replies[-1]
    assert "tok/s" in statuses[-1]
    assert state.queue_position("waiting-user") is None


def test_a_reply_that_never_waits_shows_no_queue_line(loaded_state):
    params = loaded_state.generation_params(temperature=0, max_new_tokens=24)
    statuses = [s.text for _, s in chat_session.send(loaded_state, [], QUESTION, params, key="alone")]
    assert not any("waiting:" in s for s in statuses)
    assert "tok/s" in statuses[-1]


def test_closing_a_waiting_reply_takes_it_out_of_the_line(loaded_state):
    """A browser tab closed while its reply waits must not keep a place in the line."""
    state = loaded_state
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_the_model, args=(state, "holder", started, release), daemon=True)
    holder.start()
    try:
        wait_until(started.is_set, "the holder to own the model")
        params = state.generation_params(temperature=0, max_new_tokens=8)
        reply = chat_session.send(state, [], QUESTION, params, key="leaver")
        for _, status in reply:
            if "waiting: 1 ahead" in status.text:
                break
        assert state.queue_position("leaver") == 1
        reply.close()
        assert state.queue_position("leaver") is None
    finally:
        release.set()
        holder.join(WAIT_S)


# ---- through the UI's own endpoint ---------------------------------------------------------------------

def send_parameter(client: Client, label: str) -> str:
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/send"]["parameters"]
    return next(p["parameter_name"] for p in params if p["label"] == label)


def statuses_of(job) -> list[str]:
    """The status line (third output of /send) of every update so far; skipped fields are not strings."""
    return [o[2] for o in job.outputs() if isinstance(o[2], str)]


def test_second_session_sees_its_position_through_gradio_client(shared_app):
    first, second = Client(shared_app.url, verbose=False), Client(shared_app.url, verbose=False)
    temperature, max_tokens = send_parameter(first, "temperature"), send_parameter(first, "max_new_tokens")
    long_job = first.submit(text="Write a very long story about a dragon who learns to cook.", api_name="/send",
                            **{temperature: 0, max_tokens: 2000})
    try:
        wait_until(lambda: any("generating" in s for s in statuses_of(long_job)) and len(long_job.outputs()) > 4,
                   "the first session to stream")
        waiting_job = second.submit(text=QUESTION, api_name="/send", **{temperature: 0, max_tokens: 24})
        wait_until(lambda: any("waiting: 1 ahead" in s for s in statuses_of(waiting_job)),
                   "the second session to show its place in line")
        assert not any("tok/s" in s for s in statuses_of(waiting_job))   # it really had not started
        assert "nothing is generating" not in str(first.predict(api_name="/stop"))
        long_job.result(timeout=WAIT_S)
        waiting_job.result(timeout=WAIT_S)
    finally:
        first.predict(api_name="/stop")
    history = next(o[0] for o in reversed(waiting_job.outputs()) if isinstance(o[0], list))
    content = history[-1]["content"]
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
    assert "Paris" in text
    assert "tok/s" in statuses_of(waiting_job)[-1]
    assert "stopped" in statuses_of(long_job)[-1]
    assert shared_app.proc.poll() is None


def test_stop_ends_the_sessions_running_reply_not_the_one_it_queued_next(shared_app):
    """Issue 15, bug (a), through the UI: one session sends a long message, then a second one while the first
    streams (it queues behind it); Stop ends the reply on screen and the queued one runs. It used to cancel the
    queued one and leave the running one going to max_new_tokens."""
    session = Client(shared_app.url, verbose=False)
    temperature, max_tokens = send_parameter(session, "temperature"), send_parameter(session, "max_new_tokens")
    long_job = session.submit(text="Write a very long story about a dragon who learns to cook.", api_name="/send",
                              **{temperature: 0, max_tokens: 2000})
    try:
        wait_until(lambda: any("generating" in s for s in statuses_of(long_job)) and len(long_job.outputs()) > 4,
                   "the first reply to stream")
        queued_job = session.submit(text=QUESTION, api_name="/send", **{temperature: 0, max_tokens: 24})
        wait_until(lambda: any("waiting: 1 ahead" in s for s in statuses_of(queued_job)),
                   "the second reply of the same session to queue")
        assert "nothing is generating" not in str(session.predict(api_name="/stop"))
        long_job.result(timeout=WAIT_S)
        queued_job.result(timeout=WAIT_S)
    finally:
        session.predict(api_name="/stop")
    assert "stopped" in statuses_of(long_job)[-1], "Stop ended the reply that was running"
    assert "tok/s" in statuses_of(queued_job)[-1] and "stopped" not in statuses_of(queued_job)[-1]
    history = next(o[0] for o in reversed(queued_job.outputs()) if isinstance(o[0], list))
    content = history[-1]["content"]
    assert "Paris" in (content if isinstance(content, str) else "".join(p.get("text", "") for p in content))
    assert shared_app.proc.poll() is None


def test_events_that_fire_without_a_click_skip_gradios_queue(tmp_path):
    """Gradio's browser client can lose a queued event's result when it joins just as the session's stream
    closes, which is when a page's own load events have just finished: the output then stays under a spinner
    for good (the Model tab's list did, in CI). So what fires by itself (page loads, a value set by another
    event) runs unqueued; what a click starts and takes a while (loads, generations, downloads) stays queued."""
    from tests.conftest import make_state
    from ui.app import build_ui

    demo = build_ui(make_state(tmp_path / "models"))
    self_fired = {"load", "change", "select", "input"}
    queued = [(fn.name, [event for _, event in fn.targets]) for fn in demo.fns.values()
              if fn.queue and any(event in self_fired for _, event in fn.targets)]
    assert queued == []
    by_name = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    assert by_name["load_model"].queue and by_name["send"].queue and not by_name["select_model"].queue
