"""NaN and the infinities are refused at the one option declaration that the UI, API, CLI, settings.yaml and
presets share, and an empty prompt is one clear error (issue 14, finding 7, the numeric part and the CLI).

NaN passes every bounds check (all its comparisons are False) and then makes the sampler's softmax fail on
every token; a NaN saved in a preset broke every later generation with that preset."""
import json
import math
import subprocess
import sys

import httpx
import pytest
from gradio_client import Client

from api.server import ApiConfig, ApiServer
from app_settings import SettingsError, load_settings
from engine.sampling import GenerationParams
from core.options import OptionError, build, specs
from prompts.presets import load_presets, save_preset
from tests.conftest import DEFAULT_MODEL, REPO, free_port

NON_FINITE = [math.nan, math.inf, -math.inf, "nan", "NaN", "inf", "-Infinity"]
FLOAT_OPTIONS = [s for s in specs(GenerationParams) if s.type is float]
INT_OPTIONS = [s for s in specs(GenerationParams) if s.type is int]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("spec", FLOAT_OPTIONS, ids=lambda s: s.name)
def test_every_float_sampler_option_refuses_non_finite_values(spec, value):
    with pytest.raises(OptionError, match=f"^{spec.label}: .* is not a finite number$") as err:
        build(GenerationParams, {spec.name: value})
    assert err.value.option == spec.name


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan"])
@pytest.mark.parametrize("spec", INT_OPTIONS, ids=lambda s: s.name)
def test_every_int_sampler_option_refuses_non_finite_values(spec, value):
    with pytest.raises(OptionError, match=f"^{spec.label}: .* is not a valid int$"):
        build(GenerationParams, {spec.name: value})


def test_numbers_beyond_float_range_are_refused_in_one_short_line():
    with pytest.raises(OptionError, match=r"^temperature: 1000000000\d{47}\.\.\. is not a valid float$"):
        build(GenerationParams, {"temperature": 10**400})   # float() of it overflows
    with pytest.raises(OptionError, match=r"^seed must be at most \d+ \(got 1000000000\d{47}\.\.\.\)$"):
        build(GenerationParams, {"seed": 10**400})


def test_generation_params_made_in_code_meet_the_declaration():
    with pytest.raises(OptionError, match="temperature: nan is not a finite number"):
        GenerationParams(temperature=math.nan)
    with pytest.raises(OptionError, match="top p must be at most 1.0"):
        GenerationParams(top_p=2.0)
    assert GenerationParams(temperature=0).temperature == 0.0


def test_a_preset_with_nan_is_skipped_and_one_cannot_be_saved(tmp_path):
    (tmp_path / "poisoned.yaml").write_text("temperature: .nan\n")
    (tmp_path / "inf-penalty.yaml").write_text("repetition_penalty: .inf\n")
    (tmp_path / "fine.yaml").write_text("temperature: 0.5\n")
    catalog = load_presets(tmp_path)
    assert catalog.names() == ["fine"]
    assert "poisoned.yaml: skipped, temperature: nan is not a finite number" in catalog.problems
    assert "inf-penalty.yaml: skipped, repetition penalty: inf is not a finite number" in catalog.problems
    with pytest.raises(OptionError, match="min p: nan is not a finite number"):
        save_preset(tmp_path, "saved-nan", {"temperature": 0.5, "min_p": math.nan})
    assert not (tmp_path / "saved-nan.yaml").exists()


def test_settings_yaml_with_nan_is_one_error(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("generation:\n  top_p: .nan\n")
    with pytest.raises(SettingsError, match="generation: top p: nan is not a finite number"):
        load_settings(settings)


def run_app(*args, models_dir):
    return subprocess.run([sys.executable, str(REPO / "app.py"), *args, "--models-dir", str(models_dir)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_empty_prompt_is_one_line_and_exit_1(models_dir):
    result = run_app("generate", "--model", DEFAULT_MODEL, "--prompt", "", models_dir=models_dir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the prompt is empty: give some text for the model to continue"]
    assert result.stdout == ""


def test_cli_nan_temperature_is_one_line_and_exit_1(models_dir):
    result = run_app("generate", "--model", DEFAULT_MODEL, "--prompt", "Hi", "--temperature", "nan",
                     models_dir=models_dir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: temperature: nan is not a finite number"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
def test_api_non_finite_sampler_fields_are_400s(loaded_state, field):
    server = ApiServer(loaded_state, ApiConfig(port=free_port())).start()
    try:
        body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "%s": NaN}'
                % (DEFAULT_MODEL, field))
        reply = httpx.post(f"{server.url}/chat/completions", content=body,
                           headers={"Content-Type": "application/json"}, timeout=120)
        assert reply.status_code == 400, reply.text
        assert f"{field}: nan is not a finite number" in reply.json()["error"]["message"]
        assert reply.json()["error"]["param"] == field
    finally:
        server.stop()


def test_ui_nan_sampler_value_is_refused_before_generating(shared_app):
    """A client that puts a bare NaN into the JSON (Gradio's own client will not, so the call is made by hand
    through Gradio's /call protocol); Gradio's slider range check lets NaN through, the declaration does not."""
    client = Client(shared_app.url, verbose=False)
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/send"]["parameters"]
    data = [math.nan if p["label"] == "temperature" else p.get("parameter_default") for p in params]
    data[next(i for i, p in enumerate(params) if p["parameter_name"] == "text")] = "What is the capital of France?"
    body = json.dumps({"data": data})   # allow_nan: the bare NaN goes out as is
    assert "NaN" in body
    call = f"{shared_app.url}/gradio_api/call/send"
    started = httpx.post(call, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert started.status_code == 200, started.text
    with httpx.stream("GET", f"{call}/{started.json()['event_id']}", timeout=120) as events:
        text = "".join(events.iter_text())
    assert "temperature: nan is not a finite number" in text, text[-2000:]
