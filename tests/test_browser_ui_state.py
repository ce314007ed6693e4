"""What the UI shows is the app's state: every page load shows the model that is loaded (or that none is), and
the chat tab's sliders start from the values the Model tab's settings table says the next generation uses."""
import pytest

from tests.browser import app_page, open_tab, wait_for_slider
from tests.conftest import DEFAULT_MODEL

pytestmark = pytest.mark.browser


def test_every_page_load_shows_the_loaded_model_and_the_values_a_generation_uses(tmp_path, models_dir):
    with app_page(tmp_path, models_dir, DEFAULT_MODEL) as (app, page, shoot):
        open_tab(page, "tab-model")
        # The loaded model is selected, so its loader, options and settings table are shown too.
        page.wait_for_function("v => document.querySelector('#model-select input')?.value === v",
                               arg=DEFAULT_MODEL, timeout=60_000)
        page.locator("#model-status").get_by_text(f"Loaded {DEFAULT_MODEL}").wait_for()
        table = page.locator("#model-settings-sources")
        table.get_by_text("sampler.temperature").wait_for(timeout=60_000)
        row = table.locator("tr", has_text="sampler.temperature").inner_text()
        assert "0.2" in row and "generation_config.json" in row, row
        shoot("1-model-tab")

        open_tab(page, "tab-chat")
        page.get_by_text("Generation parameters").click()
        wait_for_slider(page, "gen-temperature", "0.2", 60_000)   # not settings.yaml's 0.7

        open_tab(page, "tab-model")
        page.locator("#model-unload").click()
        page.locator("#model-status").get_by_text("No model loaded").wait_for(timeout=60_000)

        # A second browser tab opened now shows the state now, not the state at start-up.
        second = page.context.browser.new_page(viewport={"width": 1280, "height": 900})
        second.goto(app.url)
        second.locator("#chat-template-info").get_by_text("No model loaded").wait_for(timeout=60_000)
        open_tab(second, "tab-model")
        second.locator("#model-status").get_by_text("No model loaded").wait_for(timeout=60_000)
        assert second.locator("#model-select input").input_value() == ""
        second.screenshot(path=str(tmp_path / "screenshots" / "2-second-tab.png"), full_page=True)
