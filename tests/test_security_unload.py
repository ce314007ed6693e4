"""Unloading (or loading another model) while a reply streams: the generation ends first and the unload says
so; nothing keeps generating on an "unloaded" model. Issue 14, finding 11."""
import json
import threading
import time

import httpx
import pytest

from api.server import ApiConfig, ApiServer
from engine.generation import DoneEvent, TextEvent
from engine.sampling import GenerationParams
from tests.conftest import DEFAULT_MODEL, free_port, make_state

COUNTING = "1, 2, 3,"   # greedy, the default model counts on for hundreds of tokens
LONG = GenerationParams(temperature=0, max_new_tokens=4000)
KEY = "unload-test-key"


class Consumer(threading.Thread):
    """Reads one generation to its end, as the UI and the API do, noting when the first text came and the end."""

    def __init__(self, state, key: str):
        super().__init__(daemon=True)
        self.events = state.generate(state.raw_prompt(COUNTING), LONG, key)
        self.started, self.ended = threading.Event(), threading.Event()
        self.texts: list[str] = []
        self.done: DoneEvent | None = None

    def run(self) -> None:
        for event in self.events:
            if isinstance(event, TextEvent):
                self.texts.append(event.text)
                self.started.set()
            elif isinstance(event, DoneEvent):
                self.done = event
        self.ended.set()


@pytest.fixture
def state(models_dir):
    state = make_state(models_dir)
    state.load_model(DEFAULT_MODEL)
    yield state
    state.unload_model()


def test_unload_stops_the_running_and_the_waiting_generation_first_and_says_so(state):
    running = Consumer(state, "running")
    running.start()
    assert running.started.wait(120), "the first generation never produced text"
    waiting = Consumer(state, "waiting")   # queued behind the running one
    waiting.start()
    deadline = time.monotonic() + 60
    while state.queue_position("waiting") != 1:
        assert time.monotonic() < deadline, "the second generation never joined the line"
        time.sleep(0.05)

    stopped = state.unload_model()

    assert stopped == 2, "the unload reports the generations it stopped"
    assert running.ended.is_set(), "the running generation ended before the unload returned"
    assert running.done.reason == "cancelled"
    assert len(running.texts) < LONG.max_new_tokens
    waiting.join(60)
    assert waiting.done.reason == "cancelled" and waiting.texts == [], "the queued one never ran"
    assert state.model is None and state.unload_model() == 0


def test_loading_another_model_during_a_stream_stops_it_first_and_says_so(state):
    running = Consumer(state, "running")
    running.start()
    assert running.started.wait(120)
    messages: list[str] = []

    state.load_model(DEFAULT_MODEL, progress=lambda fraction, message: messages.append(message))

    assert running.ended.is_set() and running.done.reason == "cancelled"
    assert any("stopped 1 generation(s) on the previous model first" in m for m in messages), messages
    assert state.model is not None


def test_api_unload_during_a_stream_ends_the_stream_first_and_reports_it(state):
    server = ApiServer(state, ApiConfig(port=free_port(), api_key=KEY)).start()
    headers = {"Authorization": f"Bearer {KEY}"}
    chunks: list[dict] = []
    first, ended = threading.Event(), threading.Event()

    def stream() -> None:
        body = {"model": DEFAULT_MODEL, "prompt": COUNTING, "temperature": 0, "max_tokens": 4000, "stream": True}
        with httpx.stream("POST", f"{server.url}/completions", json=body, headers=headers, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[len("data: "):]))
                    first.set()
        ended.set()

    try:
        threading.Thread(target=stream, daemon=True).start()
        assert first.wait(120), "the stream never started"
        reply = httpx.post(f"{server.url}/internal/model/unload", headers=headers, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"unloaded": True, "stopped_generations": 1}
        assert ended.wait(60), "the stream ended with the unload"
        assert len(chunks) < 4000
        assert state.model is None
    finally:
        server.stop()
