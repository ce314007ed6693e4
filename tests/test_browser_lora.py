"""A real browser (issue 22, the Model tab's LoRA section): a random PEFT adapter made for the default model and
written into the models folder is listed with its base model; picked, given a weight and applied, the section
and the model's status line show it, Save settings stores it for the model, and the greedy reply changes;
Remove all takes it off and the reply is the base model's again."""
import pytest

from tests.browser import BOTS, app_page, choose_preset, open_tab, send, set_slider
from tests.conftest import DEFAULT_MODEL, make_state

pytestmark = pytest.mark.browser

LORA = "my-lora"
TEXT = "(id) => document.querySelector(`#${id}`)?.innerText || ''"


def wait_for_text(page, elem_id: str, present: str, absent: str = "\0") -> None:
    page.wait_for_function(f"([id, yes, no]) => {{ const t = ({TEXT})(id); return t.includes(yes) && !t.includes(no); }}",
                           arg=[elem_id, present, absent], timeout=120_000)


def ask(page, app) -> str:
    """A new chat with one question; the reply once finished."""
    open_tab(page, "tab-chat")
    page.locator("#chat-clear").click()   # a new conversation
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")
    reply = send(page, app, "What is the capital of France?")
    assert page.evaluate(f"{BOTS}.length") == 1
    return reply


def test_lora_section_lists_applies_and_removes_an_adapter(tmp_path, models_dir, default_model_dir):
    from tests.test_lora import hf_model, write_lora

    write_lora(hf_model(default_model_dir), models_dir / LORA, seed=5)
    with app_page(tmp_path, models_dir, DEFAULT_MODEL) as (app, page, shoot):
        open_tab(page, "tab-model")
        wait_for_text(page, "lora-list", LORA)
        row = next(line for line in page.locator("#lora-list").inner_text().splitlines() if LORA in line)
        assert DEFAULT_MODEL in row and "fits" in row          # its base model, and no warning
        assert "No LoRA adapters applied" in page.locator("#lora-applied").inner_text()
        page.locator("#lora-select input").click()
        page.locator("#lora-select input").fill(LORA)
        page.locator("#lora-select input").press("Enter")
        weight = page.locator("#lora-weight-0 input")
        weight.fill("20")   # strong enough to change the greedy chat reply (8 changes only the logits)
        weight.press("Tab")
        page.locator("#lora-apply").click()
        wait_for_text(page, "lora-applied", f"{LORA} ×20")
        wait_for_text(page, "model-status", f"LoRA {LORA} ×20")
        shoot("1-lora-applied")
        # Save settings keeps the applied set for the model, applied again at its next load. (Saving
        # refreshes the chat tab's sliders from the saved settings: the preset is picked after it.)
        page.locator("#model-save-settings").click()
        wait_for_text(page, "model-save-status", "Saved settings")
        assert make_state(models_dir).settings_store.get(DEFAULT_MODEL)["loras"] == {LORA: 20.0}
        open_tab(page, "tab-chat")
        choose_preset(page, "Deterministic", "0")
        set_slider(page, "gen-max_new_tokens", "16")   # the adapted reply never ends by itself
        adapted_reply = ask(page, app)
        shoot("2-adapted-reply")
        open_tab(page, "tab-model")
        page.locator("#lora-remove").click()
        wait_for_text(page, "lora-applied", "No LoRA adapters applied")
        wait_for_text(page, "model-status", DEFAULT_MODEL, absent="LoRA")
        shoot("3-lora-removed")
        base_reply = ask(page, app)
        assert "Paris" in base_reply and adapted_reply != base_reply
