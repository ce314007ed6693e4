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


def open_tab(page, elem_id: str) -> None:
    """Gradio renders gr.Tab(elem_id=X) as a button #X-button; its panel exists only once clicked."""
    page.locator(f"#{elem_id}-button").click()
