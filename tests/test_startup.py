"""Start-up and Stop (issue 20, item 6): the UI answers before the start-up model has loaded, requests wait for
that load instead of failing, and Stop ends a long prompt's processing between its prefill chunks."""
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import torch

from tests.browser import browser_page, open_tab, wait_for_chat
from tests.conftest import DEFAULT_MODEL, REPO, RunningApp, free_port, make_state

STARTUP_S = 240   # the app's own start (imports on a busy 2-core machine); not what is measured


def test_the_page_answers_while_the_startup_model_is_still_loading_and_send_waits_for_it(tmp_path, models_dir):
    port = free_port()
    log = tmp_path / "app.log"
    launched = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "serve", "--port", str(port), "--models-dir",
                                 str(models_dir), "--data-dir", str(tmp_path / "user_data"), "--model",
                                 DEFAULT_MODEL], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    app = RunningApp(proc, port, log)
    try:
        answered_at = None
        while answered_at is None:
            assert proc.poll() is None, app.output()
            assert time.monotonic() - launched < STARTUP_S, f"no answer within {STARTUP_S} s:\n{app.output()}"
            try:
                with urllib.request.urlopen(app.url + "/", timeout=5) as r:
                    if r.status == 200:
                        answered_at = time.monotonic() - launched
                        log_then = app.output()
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        # The order is what matters: the page was there before the model had loaded (the log line that
        # ends the load was not written yet).
        assert "loading in the background" in log_then, log_then
        assert f"\nloaded {DEFAULT_MODEL}" not in log_then, f"the page answered only after the load:\n{log_then}"
        print(f"page answered {answered_at:.1f} s after launch")

        with browser_page(tmp_path) as (page, shoot):
            page.goto(app.url)
            header = page.locator("#chat-template-info")
            header.wait_for()
            shoot("1-page-up")
            # Send at once: it waits for the start-up load instead of failing with "no model is loaded".
            page.locator("#chat-input textarea").fill("What is the capital of France?")
            page.locator("#chat-send").click()
            wait_for_chat(page, "() => document.querySelector('#chat-status')?.innerText.includes('tok/s')",
                          timeout_ms=240_000, app=app)
            assert "no model is loaded" not in page.locator("#chat-status").inner_text()
            assert page.locator("#chatbot [data-testid=bot]").last.inner_text().strip()
            # Once the load is over the header names the model (the timer's last tick refreshed it).
            page.wait_for_function(
                f"() => document.querySelector('#chat-template-info')?.innerText.includes('{DEFAULT_MODEL}')")
            shoot("2-replied-after-the-load")
            open_tab(page, "tab-model")
            page.locator("#model-status").get_by_text(f"Loaded {DEFAULT_MODEL}").wait_for()
        assert f"\nloaded {DEFAULT_MODEL}" in app.output()
    finally:
        app.stop()


def test_a_request_during_the_startup_load_waits_for_it(models_dir):
    state = make_state(models_dir)
    startup = state.load_at_startup(DEFAULT_MODEL)
    assert state.startup is startup and startup.line().startswith("⏳ loading")
    # Asked for at once, the prompt is built once the model is there, not refused.
    prompt = state.chat_prompt([{"role": "user", "content": "Hello"}])
    assert startup.finished.is_set() and startup.error is None and startup.line() == ""
    assert prompt.n_tokens > 0
    state.unload_model()


def test_a_first_start_installs_the_default_model_in_the_startup_load(tmp_path, default_model_dir):
    """./start_linux.sh launches the UI at once; on a first start the start-up load installs the default model
    (from pip's cached wheel, as run_tests.sh's install did) into an empty models folder, then loads it."""
    models = tmp_path / "models"
    state = make_state(models)
    startup = state.load_at_startup(DEFAULT_MODEL)
    assert state.wait_for_startup(600)
    assert startup.error is None, startup.error
    assert (models / DEFAULT_MODEL / "config.json").is_file()
    assert state.model is not None and state.model.name == DEFAULT_MODEL
    assert state.chat_prompt([{"role": "user", "content": "Hello"}]).n_tokens > 0
    state.unload_model()


def test_a_failed_startup_load_is_reported_and_requests_then_fail_plainly(models_dir):
    state = make_state(models_dir)
    startup = state.load_at_startup("no-such-model")
    assert state.wait_for_startup(60)
    assert "could not load no-such-model" in startup.line() and "no model named" in startup.line()
    try:
        state.require_model()
    except Exception as exc:  # LoadError: the usual sentence, right away
        assert "no model is loaded" in str(exc)
    else:
        raise AssertionError("a failed start-up load left a model loaded")


def test_stop_ends_prompt_processing_after_the_chunk_in_progress(loaded_state):
    engine = loaded_state.model.engine
    chunk = engine.prefill_chunk
    ids = [(i * 7) % 1000 + 10 for i in range(3 * chunk)]   # three chunks of prompt
    stopped = threading.Event()
    stopped.set()   # Stop pressed before the first chunk ended
    cut = engine.prefill(ids, stopped)
    first_chunk_only = engine.prefill(ids[:chunk])
    whole = engine.prefill(ids)
    assert torch.allclose(cut, first_chunk_only, atol=1e-4)
    assert not torch.allclose(cut, whole, atol=1e-4)


class SetAfterFirstLook(threading.Event):
    """A Stop pressed just after the generation began: the first look sees it clear, every later one set."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > 1


def test_stop_during_prompt_processing_ends_the_reply_with_no_token(loaded_state):
    from engine.generation import DoneEvent, TextEvent
    from engine.sampling import GenerationParams

    chunk = loaded_state.model.engine.prefill_chunk
    prompt = loaded_state.raw_prompt(" ".join(["word"] * (3 * chunk)))
    events = list(loaded_state.model.generate(prompt, GenerationParams(max_new_tokens=8, temperature=0),
                                              SetAfterFirstLook()))
    assert not any(isinstance(e, TextEvent) for e in events)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.reason == "cancelled" and done.text == ""
