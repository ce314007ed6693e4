"""The whole journey a user walks, in a real browser, against a Hub-protocol server on 127.0.0.1.

Download TheBloke/Llama-2-7b-Chat-GPTQ:gptq-4bit-32g-actorder_True (the real default model quantized to GPTQ
4-bit g32 act-order, with that repo's model card) -> the Model tab lists it with the GPTQ loader and its
reason -> load -> change context length and template, save -> restart Hearth -> the saved values are back ->
chat, the reply streams -> Stop mid-stream -> Regenerate. A screenshot at each step lands in tmp_path.
"""
import pytest

from hub_fixtures import LLAMA2_CHAT_GPTQ, hub_environment, llama2_chat_readme
from hub_server import HubServer
from quant_fixtures import quantize_model_dir
from tests.browser import browser_page, open_tab
from tests.conftest import start_app

pytestmark = pytest.mark.browser

BRANCH = "gptq-4bit-32g-actorder_True"
FOLDER = f"TheBloke_Llama-2-7b-Chat-GPTQ_{BRANCH}"


@pytest.fixture
def hub_with_quantized_default_model(tmp_path, default_model_dir):
    repo_dir = tmp_path / "repo"
    quantize_model_dir(default_model_dir, repo_dir, method="gptq", bits=4, group_size=32, desc_act=True, sym=True)
    (repo_dir / "README.md").write_text(llama2_chat_readme())
    files = {p.name: p for p in repo_dir.iterdir() if p.is_file()}
    with HubServer(tmp_path / "hub") as hub:
        hub.add_repo(LLAMA2_CHAT_GPTQ, files, branch=BRANCH)
        hub.add_repo(LLAMA2_CHAT_GPTQ, {"README.md": files["README.md"]}, branch="main")
        yield hub


def pick_model(page, name: str) -> None:
    page.locator("#model-refresh").click()
    page.locator("#model-select input").click()
    page.get_by_role("option", name=name).click()


def wait_for_status(page, text: str, shoot, timeout_ms: int = 60_000) -> None:
    """Wait until the chat status line contains `text`; on timeout, fail with what it said instead."""
    try:
        page.locator("#chat-status").get_by_text(text).wait_for(timeout=timeout_ms)
    except Exception:
        shoot("status-timeout")
        pytest.fail(f"chat status never said {text!r}; it says {page.locator('#chat-status').inner_text()!r}")


def bot_messages(page):
    return page.locator("#chatbot [data-testid=bot]")


def test_download_load_save_restart_chat_stop_regenerate(tmp_path, hub_with_quantized_default_model):
    hub = hub_with_quantized_default_model
    models = tmp_path / "models"
    models.mkdir()
    env = hub_environment(hub.url, tmp_path / "hf-home")
    app = start_app(["--models-dir", str(models)], tmp_path / "app-1.log", env=env)
    try:
        with browser_page(tmp_path) as (page, shoot):
            # 1. Download the branch and watch the progress bar move.
            page.goto(app.url)
            open_tab(page, "tab-download")
            page.locator("#download-repo textarea, #download-repo input").first.fill(f"{LLAMA2_CHAT_GPTQ}:{BRANCH}")
            hub.faults.throttle(40 * 1024 * 1024, "model.safetensors")  # ~3 s of visible progress
            page.locator("#download-start").click()
            progress = page.locator("#download-progress")
            progress.get_by_text("ETA").first.wait_for()
            first_view = progress.inner_text()
            shoot("01-download-progress")
            page.wait_for_function(
                "(before) => document.querySelector('#download-progress').innerText !== before",
                arg=first_view, timeout=60_000)
            page.locator("#download-status").get_by_text("downloaded and verified").wait_for(timeout=180_000)
            shoot("02-download-done")
            assert (models / FOLDER / "quantize_config.json").is_file()

            # 2. The Model tab lists it, with the GPTQ loader preselected and the reason shown.
            open_tab(page, "tab-model")
            pick_model(page, FOLDER)
            reason = page.locator("#loader-reason")
            reason.get_by_text("GPTQ 4-bit, group 32, act-order").wait_for()
            assert page.locator("#loader-select input").input_value() == "gptq"
            shoot("03-model-detected")
            page.locator("#model-load").click()
            page.locator("#model-status").get_by_text(f"Loaded {FOLDER}").wait_for(timeout=180_000)
            shoot("04-model-loaded")

            # 3. Change context length and template, save them for this model.
            page.locator("#opt-gptq-context_length input").fill("2048")
            page.locator("#model-template input").fill("ChatML")
            page.locator("#model-template input").press("Enter")
            page.locator("#model-save-settings").click()
            page.locator("#model-save-status").get_by_text("Saved settings").wait_for()
            shoot("05-settings-saved")
        saved = (models / "config-user.yaml").read_text()
        assert "context_length: 2048" in saved and "ChatML" in saved
    finally:
        app.stop()

    # 4. Restart Hearth: selecting the model brings the saved values back.
    app = start_app(["--models-dir", str(models)], tmp_path / "app-2.log", env=env)
    try:
        with browser_page(tmp_path) as (page, shoot):
            page.goto(app.url)
            open_tab(page, "tab-model")
            pick_model(page, FOLDER)
            page.wait_for_function(
                "() => document.querySelector('#opt-gptq-context_length input')?.value === '2048'", timeout=30_000)
            assert page.locator("#model-template input").input_value() == "ChatML"
            shoot("06-after-restart-saved-values")
            page.locator("#model-load").click()
            status = page.locator("#model-status")
            status.get_by_text(f"Loaded {FOLDER}").wait_for(timeout=180_000)
            assert "context 2048 tokens" in status.inner_text()

            # 5. Chat: the reply streams; Stop ends it mid-stream; Regenerate writes a new one.
            open_tab(page, "tab-chat")
            page.locator("#chat-template-info").get_by_text("ChatML").wait_for()
            page.locator("#chat-input textarea").fill("Write a long story about a dragon who learns to bake bread.")
            page.locator("#chat-send").click()
            page.wait_for_function(
                "() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
                " return b.length && b[b.length - 1].innerText.length > 40; }", timeout=120_000)
            shoot("07-streaming")
            page.locator("#chat-stop").click()
            wait_for_status(page, "stopped", shoot)
            stopped_reply = bot_messages(page).last.inner_text()
            shoot("08-stopped")
            assert 40 < len(stopped_reply)

            page.locator("#chat-regenerate").click()
            page.wait_for_function(
                "(old) => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
                " const t = b.length ? b[b.length - 1].innerText : '';"
                " return t.length > 40 && t !== old; }", arg=stopped_reply, timeout=120_000)
            page.locator("#chat-stop").click()  # stops it, or finds it already finished
            page.wait_for_function(
                "() => document.querySelector('#chat-status').innerText.includes('tok/s')", timeout=60_000)
            assert bot_messages(page).count() == 1, "regenerate replaces the last reply"
            assert bot_messages(page).last.inner_text() != stopped_reply
            shoot("09-regenerated")
    finally:
        app.stop()
