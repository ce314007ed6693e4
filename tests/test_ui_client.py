"""The UI's event handlers through gradio_client, against a real `app.py serve` process."""
import time

import pytest
from gradio_client import Client

from tests.conftest import DEFAULT_MODEL


@pytest.fixture
def client(running_app):
    return Client(running_app.url, verbose=False)


def last_reply(history) -> str:
    content = history[-1]["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def test_chat_streams_reply_in_several_updates(client):
    job = client.submit("What is the capital of France?", [], "", api_name="/send")
    updates = [out for out in job]
    history, textbox, status = job.result()
    assert "Paris" in last_reply(history)
    assert len(updates) > 2, "the reply must stream in several updates"
    assert "tok/s" in status
    assert textbox == ""


def test_stop_ends_a_long_reply(client):
    job = client.submit("Write a very long story about a dragon who learns to cook.", [], "",
                        api_name="/send")
    deadline = time.time() + 60
    while len(job.outputs()) < 4 and time.time() < deadline:
        time.sleep(0.05)
    assert "stopping" in client.predict(api_name="/stop")
    history, _, status = job.result(timeout=60)
    assert "stopped" in status
    assert 0 < len(last_reply(history)) < 2000


def test_model_load_errors_are_shown_and_the_app_keeps_serving(client, running_app):
    status = client.predict("no-such-model", "transformers", api_name="/load_model")
    assert "no model named 'no-such-model'" in status
    status = client.predict(DEFAULT_MODEL, "transformers", api_name="/load_model")
    assert f"Loaded **{DEFAULT_MODEL}**" in status
    history, _, _ = client.predict("What is the capital of France?", [], "", api_name="/send")
    assert "Paris" in last_reply(history)
    assert running_app.proc.poll() is None
