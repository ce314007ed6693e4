"""Load on one Hearth process (`app.py serve --api`) with the default model: 8 concurrent streaming clients
of the OpenAI API (the real `openai` package) plus one UI chat, first through gradio_client, then in a real
browser. Every request must finish with the right answer; every wait is bounded, so a deadlock fails the
test instead of hanging it."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import openai
import pytest
from gradio_client import Client

from tests.browser import browser_page, set_slider
from tests.conftest import DEFAULT_MODEL, free_port, start_app

QUESTION = "What is the capital of France?"
API_CLIENTS = 8
MAX_TOKENS = 16
DEADLINE_S = 300     # all nine requests, queued one after another on a shared CPU, finish well within this


@pytest.fixture(scope="module")
def app_with_api(tmp_path_factory, default_model_dir):
    """One server for the module: UI plus API on two free ports, the default model loaded once."""
    root = tmp_path_factory.mktemp("load")
    models = root / "models"
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default_model_dir, target_is_directory=True)
    api_port = free_port()
    app = start_app(["--models-dir", str(models), "--model", DEFAULT_MODEL, "--api", "--api-port", str(api_port)],
                    root / "app.log")
    app.api_url = f"http://127.0.0.1:{api_port}/v1"
    yield app
    app.stop()


def stream_answer(api_url: str, first_chunk: threading.Event) -> dict:
    """One streaming chat completion; the text, how many content chunks it came in, and why it ended."""
    client = openai.OpenAI(base_url=api_url, api_key="not-needed-on-loopback", max_retries=0, timeout=DEADLINE_S)
    parts, finish = [], None
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=MAX_TOKENS, stream=True)
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            parts.append(choice.delta.content)
            first_chunk.set()
        finish = choice.finish_reason or finish
    return {"text": "".join(parts), "chunks": len(parts), "finish": finish}


def start_api_streams(pool: ThreadPoolExecutor, api_url: str):
    first_chunk = threading.Event()
    futures = [pool.submit(stream_answer, api_url, first_chunk) for _ in range(API_CLIENTS)]
    return futures, first_chunk


def assert_all_answered(futures) -> None:
    done, pending = wait(futures, timeout=DEADLINE_S)
    assert not pending, f"{len(pending)} API streams never finished: deadlock or starvation"
    for result in (f.result() for f in futures):
        assert "Paris" in result["text"], result
        assert result["chunks"] > 1, f"the reply was not streamed: {result}"
        assert result["finish"] in ("stop", "length"), result


def test_eight_api_streams_and_a_ui_chat_all_finish_correctly(app_with_api):
    ui = Client(app_with_api.url, verbose=False)
    params = ui.view_api(return_format="dict", print_info=False)["named_endpoints"]["/send"]["parameters"]
    by_label = {p["label"]: p["parameter_name"] for p in params}
    with ThreadPoolExecutor(API_CLIENTS) as pool:
        futures, first_chunk = start_api_streams(pool, app_with_api.api_url)
        assert first_chunk.wait(DEADLINE_S), "no API stream ever started"
        job = ui.submit(text=QUESTION, api_name="/send", **{by_label["temperature"]: 0,
                                                           by_label["max_new_tokens"]: MAX_TOKENS})
        job.result(timeout=DEADLINE_S)
        assert_all_answered(futures)
    outputs = job.outputs()
    history = next(o[0] for o in reversed(outputs) if isinstance(o[0], list))
    content = history[-1]["content"]
    assert "Paris" in (content if isinstance(content, str) else "".join(p.get("text", "") for p in content))
    statuses = [o[2] for o in outputs if isinstance(o[2], str)]
    assert "tok/s" in statuses[-1]
    assert app_with_api.proc.poll() is None


@pytest.mark.browser
def test_eight_api_streams_and_a_browser_chat_all_finish_correctly(app_with_api, tmp_path):
    with browser_page(tmp_path) as (page, shoot), ThreadPoolExecutor(API_CLIENTS) as pool:
        page.goto(app_with_api.url)
        page.locator("#chat-status").wait_for(state="attached")
        # Keep every text the status line shows, to see the queue position while the chat waits.
        page.evaluate("""() => {
            window.__statusTexts = [];
            const status = document.querySelector('#chat-status');
            new MutationObserver(() => {
                const text = status.innerText;
                if (window.__statusTexts[window.__statusTexts.length - 1] !== text) window.__statusTexts.push(text);
            }).observe(status, {subtree: true, childList: true, characterData: true});
        }""")
        page.get_by_text("Generation parameters").click()          # the accordion holds the sampler widgets
        set_slider(page, "gen-temperature", "0")
        set_slider(page, "gen-max_new_tokens", str(MAX_TOKENS))
        page.locator("#chat-input textarea").fill(QUESTION)
        futures, first_chunk = start_api_streams(pool, app_with_api.api_url)
        assert first_chunk.wait(DEADLINE_S), "no API stream ever started"
        page.locator("#chat-send").click()
        page.wait_for_function(
            "() => { const s = document.querySelector('#chat-status'); return s && s.innerText.includes('tok/s'); }",
            timeout=DEADLINE_S * 1000, polling=100)
        shoot("browser-chat-under-load")
        assert "Paris" in page.locator("#chatbot [data-testid=bot]").last.inner_text()
        assert_all_answered(futures)
        statuses = page.evaluate("window.__statusTexts")
    assert any("ahead" in s for s in statuses), f"the browser never showed its place in line: {statuses}"
    assert app_with_api.proc.poll() is None
