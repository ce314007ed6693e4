"""The UI's event handlers through gradio_client, against a real `app.py serve` process."""
import time

import pytest
from gradio_client import Client

from tests.conftest import DEFAULT_MODEL, start_app


@pytest.fixture
def client(shared_app):
    """A new session (its own chat) on the shared server."""
    return Client(shared_app.url, verbose=False)


def last_reply(history) -> str:
    content = history[-1]["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def greedy(client) -> dict:
    """Keyword arguments that set /send's temperature widget to 0, found by its label."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/send"]["parameters"]
    name = next(p["parameter_name"] for p in params if p["label"] == "temperature")
    return {name: 0}


def first(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def final(outputs):
    """The last (history, status) a streamed chat event produced; later updates may skip fields."""
    history = next(o[0] for o in reversed(outputs) if isinstance(o[0], list))
    status = next(o[2] for o in reversed(outputs) if isinstance(o[2], str))
    return history, status


def test_chat_streams_reply_in_several_updates(client):
    job = client.submit(text="What is the capital of France?", api_name="/send", **greedy(client))
    job.result()
    updates = job.outputs()
    history, status = final(updates)
    assert "Paris" in last_reply(history)
    assert len(updates) > 2, "the reply must stream in several updates"
    assert "tok/s" in status
    # The box is cleared by the first update and left alone after it, so that what the user types for the
    # next turn while this reply streams survives.
    assert updates[0][1] == ""
    assert all(update[1] == {"__type__": "update"} for update in updates[1:]), [u[1] for u in updates]


def test_stop_ends_a_long_reply(client):
    job = client.submit(text="Write a very long story about a dragon who learns to cook.", api_name="/send")
    deadline = time.time() + 60
    while len(job.outputs()) < 4 and time.time() < deadline:
        time.sleep(0.05)
    assert "nothing is generating" not in str(client.predict(api_name="/stop"))
    job.result(timeout=60)
    history, status = final(job.outputs())
    assert "stopped" in status
    assert 0 < len(last_reply(history)) < 2000


def test_model_load_errors_are_shown_and_the_app_keeps_serving(tmp_path, models_dir):
    broken = models_dir / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    app = start_app(["--models-dir", str(models_dir)], tmp_path / "app.log")
    try:
        client = Client(app.url, verbose=False)
        status = first(client.predict(name="broken-config", api_name="/load_model"))
        assert "cannot read broken-config" in status and "config.json in broken-config is not valid JSON" in status
        status = first(client.predict(name=DEFAULT_MODEL, api_name="/load_model"))
        assert f"Loaded **{DEFAULT_MODEL}**" in status
        job = client.submit(text="What is the capital of France?", api_name="/send", **greedy(client))
        job.result()
        history, _ = final(job.outputs())
        assert "Paris" in last_reply(history)
        assert app.proc.poll() is None
    finally:
        app.stop()
