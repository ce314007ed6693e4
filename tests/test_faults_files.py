"""Malformed user files (models/config-user.yaml, presets/*.yaml, templates/*.yaml, saved conversations)
are reported, skipped, and Hearth still starts and chats: a real `app.py serve` is checked through
/gradio_api/info, its log, the UI's /config and one chat through gradio_client.

presets/ and templates/ live beside app.py, in the shared tree other tests read. So the server runs in a
private mount namespace where copies of those folders, with the broken files added, are bind-mounted over
them: the real app code runs unchanged and nothing outside the namespace sees the bad files.
The store-level rules (backup of a bad config-user.yaml, per-entry problems) are in test_settings_store.py,
test_presets.py and test_conversations.py; this file tests that the running app survives and reports them.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from prompts.conversations import ConversationStore
from tests.conftest import DEFAULT_MODEL, REPO, RunningApp, free_port, wait_until_serving

STARTUP_S = 180

BAD_PRESETS = {"Broken.yaml": "temperature: [0.5,\n", "OutOfRange.yaml": "temperature: -3\n"}
BAD_TEMPLATES = {"Broken.yaml": "instruction_template: |-\n  {{ x }\n bad: [\n", "Empty.yaml": "name: nothing\n"}
BAD_CONVERSATIONS = {"20240101-000000-aaaaaa.json": "{not json", "20240101-000000-bbbbbb.json": '{"messages": 3}'}
BAD_CONFIG_USER = f"{DEFAULT_MODEL}$:\n  loader: [transformers\n  context_length: 2048\n"


def start_app_with_overlays(args: list[str], overlays: dict[Path, Path], log: Path) -> RunningApp:
    """`app.py serve` (as conftest.start_app runs it) inside a private mount namespace where each key of
    `overlays` (a folder of the repo) shows the contents of its value instead."""
    if not shutil.which("unshare"):
        pytest.fail("util-linux `unshare` is needed for a private mount namespace")
    port = free_port()
    mounts = " && ".join(f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}"
                         for dst, src in overlays.items())
    serve = shlex.join([sys.executable, str(REPO / "app.py"), "serve", "--port", str(port), *args])
    user_ns = [] if os.geteuid() == 0 else ["--map-root-user"]
    fh = open(log, "w")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", *user_ns, "sh", "-c",
                             f"{mounts} && exec {serve}"], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    return wait_until_serving(RunningApp(proc, port, log), STARTUP_S)


def folder_with(original: Path, copy: Path, extra: dict[str, str]) -> Path:
    shutil.copytree(original, copy)
    for name, text in extra.items():
        (copy / name).write_text(text)
    return copy


def component(config: dict, elem_id: str) -> dict:
    return next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def choice_values(props: dict) -> list[str]:
    return [c[1] if isinstance(c, (list, tuple)) else c for c in props["choices"]]


@pytest.fixture
def damaged_install(tmp_path, models_dir):
    """A models folder and conversations beside it, plus presets/templates overlays, each with bad files."""
    (models_dir / "config-user.yaml").write_text(BAD_CONFIG_USER)
    store = ConversationStore(models_dir.parent / "user_data" / "conversations")
    good = store.save(store.new(messages=[{"role": "user", "content": "a conversation that survives"}]))
    for name, text in BAD_CONVERSATIONS.items():
        (store.folder / name).write_text(text)
    overlays = {REPO / "presets": folder_with(REPO / "presets", tmp_path / "presets", BAD_PRESETS),
                REPO / "templates": folder_with(REPO / "templates", tmp_path / "templates", BAD_TEMPLATES)}
    return models_dir, overlays, good


def test_malformed_user_files_are_reported_skipped_and_the_app_serves(tmp_path, damaged_install):
    models_dir, overlays, good_conversation = damaged_install
    app = start_app_with_overlays(["--models-dir", str(models_dir), "--model", DEFAULT_MODEL, "--data-dir",
                                   str(models_dir.parent / "user_data")], overlays, tmp_path / "app.log")
    try:
        with urllib.request.urlopen(app.url + "/gradio_api/info", timeout=30) as r:
            assert "named_endpoints" in json.loads(r.read())
        log = app.output()
        # The log names every bad file and why; the start-up model still loaded (bad saved settings ignored).
        assert f"loaded {DEFAULT_MODEL}" in log, log
        for expected in ("warning: presets/Broken.yaml: skipped, not valid YAML",
                         "warning: presets/OutOfRange.yaml: skipped",
                         "warning: templates/Broken.yaml: not readable YAML",
                         "warning: templates/Empty.yaml: has no instruction_template",
                         "warning: conversations/20240101-000000-aaaaaa.json is corrupt",
                         "warning: conversations/20240101-000000-bbbbbb.json is corrupt",
                         "config-user.yaml is malformed"):
            assert expected in log, f"{expected!r} missing from the log:\n{log}"
        assert "Traceback" not in log
        assert list(models_dir.glob("config-user.yaml.bad-*")), "the malformed settings file was not backed up"

        with urllib.request.urlopen(app.url + "/config", timeout=30) as r:
            config = json.loads(r.read())
        shown = component(config, "chat-file-problems")["value"]
        for name in ("presets/Broken.yaml", "presets/OutOfRange.yaml", "templates/Broken.yaml",
                     "templates/Empty.yaml", "20240101-000000-aaaaaa.json", "20240101-000000-bbbbbb.json",
                     "config-user.yaml"):
            assert name in shown, f"{name} is not reported in the UI: {shown}"
        # The good files around them are all there; the bad ones are not offered.
        presets = choice_values(component(config, "preset"))
        assert {"Default", "Deterministic", "Creative", "min_p"} <= set(presets)
        assert "Broken" not in presets and "OutOfRange" not in presets
        templates = choice_values(component(config, "template"))
        assert "ChatML" in templates and "Broken" not in templates and "Empty" not in templates
        assert choice_values(component(config, "conversation-list")) == [good_conversation.id]

        client = Client(app.url, verbose=False)
        params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/send"]["parameters"]
        by_label = {p["label"]: p["parameter_name"] for p in params}
        job = client.submit(text="What is the capital of France?", api_name="/send",
                            **{by_label["temperature"]: 0, by_label["max_new_tokens"]: 24})
        job.result(timeout=120)
        history = next(o[0] for o in reversed(job.outputs()) if isinstance(o[0], list))
        content = history[-1]["content"]
        assert "Paris" in (content if isinstance(content, str) else "".join(p.get("text", "") for p in content))
        assert app.proc.poll() is None
    finally:
        app.stop()
    # Nothing outside the namespace saw the bad files.
    assert not (REPO / "presets" / "Broken.yaml").exists() and not (REPO / "templates" / "Broken.yaml").exists()
