"""A real browser on the Download tab: list branches, pick one, list files, download with live progress, see
the model card summary, find the model on the Model tab; then a GGUF repo's files by quant type and one of them
downloaded. Hearth runs as `app.py serve` against the test Hub."""
from __future__ import annotations

import pytest

from hub_fixtures import LLAMA2_CHAT_GPTQ, hub_environment, random_bytes
from tests.browser import app_page, open_tab

pytestmark = pytest.mark.browser

BRANCH = "gptq-4bit-32g-actorder_True"
FOLDER = f"TheBloke_Llama-2-7b-Chat-GPTQ_{BRANCH}"


def test_download_a_branch_in_the_browser(fake_hub, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    fake_hub.add_repo("TheBloke/Mistral-7B-GGUF", {"mistral.Q8_0.gguf": random_bytes(5000, 2),
                                                   "mistral.Q4_K_M.gguf": random_bytes(3000, 1)})
    env = hub_environment(fake_hub.url, tmp_path / "hf-home")
    with app_page(tmp_path, models, env=env) as (app, page, shoot):
        open_tab(page, "tab-download")
        page.locator("#download-repo textarea, #download-repo input").first.fill(LLAMA2_CHAT_GPTQ)
        page.locator("#download-list-branches").click()
        page.locator("#download-status").get_by_text("4 branches").wait_for()
        page.locator("#download-branch input").click()
        page.get_by_role("option", name=BRANCH).click()
        page.locator("#download-list-files").click()
        files = page.locator("#download-files")
        files.get_by_text("quantize_config.json").wait_for()
        assert "Total (10 files)" in files.inner_text()
        shoot("1-file-list")

        fake_hub.faults.throttle(128 * 1024, "model.safetensors")     # about two seconds of live progress
        page.locator("#download-start").click()
        page.locator("#download-progress").get_by_text("ETA").first.wait_for()
        shoot("2-progress")
        status = page.locator("#download-status")
        status.get_by_text("downloaded and verified").wait_for(timeout=120_000)
        card = page.locator("#download-card")
        card.get_by_text("Prompt template").wait_for()
        assert "[INST]" in card.inner_text() and "GS: 32" in card.inner_text()
        shoot("3-done")

        open_tab(page, "tab-model")
        page.locator("#model-select input").click()
        page.get_by_role("option", name=FOLDER).wait_for()
        shoot("4-model-listed")

        open_tab(page, "tab-download")
        page.locator("#download-repo textarea, #download-repo input").first.fill("TheBloke/Mistral-7B-GGUF:main")
        page.locator("#download-list-files").click()
        files.get_by_text("medium, balanced quality - recommended").wait_for()
        assert "Q8_0" in files.inner_text() and "mistral.Q4_K_M.gguf" in files.inner_text()
        shoot("5-gguf-by-quant-type")
        page.locator("#download-file textarea, #download-file input").first.fill("mistral.Q4_K_M.gguf")
        page.locator("#download-start").click()
        # The status names the new folder once this download is verified (the first one's text stays till then).
        status.get_by_text("TheBloke_Mistral-7B-GGUF").wait_for(timeout=120_000)
        assert "downloaded and verified" in status.inner_text()
        shoot("6-gguf-downloaded")
    assert (models / FOLDER / "hearth-download.json").is_file()
    assert (models / "TheBloke_Mistral-7B-GGUF" / "mistral.Q4_K_M.gguf").stat().st_size == 3000
