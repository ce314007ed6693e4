"""Playwright driving Debian's chromium (never `playwright install`), shared by the browser tests."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium keeps trying to reach Google's hosts on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("Debian chromium is missing: ./run_tests.sh installs it with apt-get")


@contextlib.contextmanager
def browser_page(tmp_path: Path):
    """A fresh chromium page with its own profile; yields (page, shoot) where shoot(name) saves a PNG."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    shots = tmp_path / "screenshots"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)

            def shoot(name: str) -> Path:
                path = shots / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                return path

            yield page, shoot
        finally:
            browser.close()


@contextlib.contextmanager
def app_page(tmp_path: Path, models_dir: Path, model: str | None = None, env: dict | None = None,
             greedy: bool = False):
    """What every browser test of the app starts with: `app.py serve` on `models_dir` (loading `model` first,
    when named; chats in tmp_path/user_data, the log in tmp_path/app.log), a fresh chromium page on it, and,
    with `greedy`, the Deterministic preset picked so that replies are known. Yields (app, page, shoot); the
    page and the app are closed and stopped after, whatever happened."""
    from tests.conftest import start_app

    args = ["--models-dir", str(models_dir), *(["--model", model] if model else [])]
    app = start_app(args, tmp_path / "app.log", env=env)
    try:
        with browser_page(tmp_path) as (page, shoot):
            page.goto(app.url)
            if greedy:
                choose_preset(page, "Deterministic", "0")
            yield app, page, shoot
    finally:
        app.stop()


def open_tab(page, elem_id: str) -> None:
    """Gradio renders gr.Tab(elem_id=X) as a button #X-button; its panel exists only once clicked."""
    page.locator(f"#{elem_id}-button").click()


def wait_for_chat(page, condition_js: str, arg=None, timeout_ms: int = 120_000, app=None) -> None:
    """page.wait_for_function(condition_js, arg), but a timeout fails with what the chat showed (status line,
    bot messages) and the tail of the app's log, so that a slow or stuck reply can be told apart."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(condition_js, arg=arg, timeout=timeout_ms)
    except PlaywrightTimeout:
        seen = page.evaluate("""() => ({
            status: document.querySelector('#chat-status')?.innerText,
            bots: [...document.querySelectorAll('#chatbot [data-testid=bot]')].map(b => b.innerText)})""")
        log = app.output()[-3000:] if app is not None else ""
        raise AssertionError(f"chat condition not met in {timeout_ms} ms (arg={arg!r}): status "
                             f"{seen['status']!r}, bot messages {seen['bots']!r}\napp log tail:\n{log}") from None


STATUS = "document.querySelector('#chat-status')?.innerText || ''"
BOTS = "[...document.querySelectorAll('#chatbot [data-testid=bot]')]"
USERS = "[...document.querySelectorAll('#chatbot [data-testid=user]')]"


def watch_status(page) -> None:
    """Record every text the status line shows from now on (a reply's 'generating…' may be brief)."""
    page.evaluate("""() => {
        window.__statuses = [];
        if (window.__statusObserver) return;
        window.__statusObserver = new MutationObserver(() => window.__statuses.push(
            document.querySelector('#chat-status')?.innerText || ''));
        window.__statusObserver.observe(document.querySelector('#chat-status'),
                                        {subtree: true, childList: true, characterData: true});
    }""")


def wait_for_new_reply(page, app) -> None:
    """Until a reply started after `watch_status` has finished: the line said 'generating…', now it shows
    the finished reply's figures."""
    wait_for_chat(page, f"() => {{ const s = {STATUS}; return window.__statuses.some(t => t.includes('generating'))"
                        " && s.includes('tok/s') && !s.includes('generating'); }", app=app)


def send(page, app, text: str) -> str:
    """Type `text` in the chat box, click Send and wait until that reply has finished; returns the last reply."""
    watch_status(page)
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()
    wait_for_new_reply(page, app)
    return page.evaluate(f"{BOTS}.at(-1).innerText")


def choose_preset(page, name: str, temperature: str) -> None:
    """Pick a sampler preset in the Text Generation tab and wait until the temperature slider shows its value:
    the preset fills the sliders by its own event, and a Send clicked before that lands samples with the old
    values (seen once as a sampled reply in a test that expected the greedy one)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.get_by_text("Generation parameters").click()   # the accordion holding the sliders
    for attempt in (1, 2):
        page.locator("#preset input").fill(name)
        page.locator("#preset input").press("Enter")
        try:   # a page opened during the start-up load refreshes the sliders when it ends: pick once more then
            wait_for_slider(page, "gen-temperature", temperature, 15_000 if attempt == 1 else 30_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def wait_for_slider(page, elem_id: str, value: str, timeout_ms: int) -> None:
    """Until the Gradio slider `elem_id` itself (its range input) shows `value`: only then does an event read it."""
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input[type=range]`)?.value === v",
                           arg=[elem_id, value], timeout=timeout_ms)


def set_slider(page, elem_id: str, value: str, attempts: int = 3) -> None:
    """Type `value` into a Gradio slider's number box and wait until the slider shows it. Under load the box's
    blur was once not taken at all, so typing is retried."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    number = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(attempts):
        number.fill(value)
        number.press("Tab")                                   # Gradio takes a slider's value on blur
        try:
            return wait_for_slider(page, elem_id, value, 10_000)
        except PlaywrightTimeout:
            continue
    shown = page.locator(f"#{elem_id} input[type=range]").input_value()
    raise AssertionError(f"slider {elem_id} shows {shown!r} after typing {value!r} {attempts} times")
