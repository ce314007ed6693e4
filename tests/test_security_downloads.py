"""Issue 14, findings 4 and 5, against the test Hub: repos whose names map to one folder never replace each
other (and saved settings follow the repo, not the folder name); a server that sends more or fewer bytes than
it lists is cut off at the listed size and refused; file names that cannot be stored (too long, a file that
is also a folder, control characters, Hearth's own bookkeeping names) and redirect loops end in one line,
never a traceback, with nothing half-done left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from hub.download import PROVENANCE_FILE, download_model, plan_download
from hub.errors import DownloadCancelled, HubError, NetworkError, SizeMismatch, UnsafePath, UnstorableName
from hub.folders import FOLDER_MAX
from hub.repo_id import parse_repo_spec
from hub_fixtures import hub_environment, random_bytes
from loaders.settings_store import FILE_NAME, SettingsStore

REPO_ROOT = Path(__file__).resolve().parent.parent


def record(folder: Path) -> dict:
    return json.loads((folder / PROVENANCE_FILE).read_text())


def tree(models: Path) -> list[str]:
    """Everything under models/, hidden partial folders and lock files included."""
    return sorted(str(p.relative_to(models)) for p in models.rglob("*")) if models.exists() else []


def add_model(hub, repo_id: str, seed: int, branch: str = "main") -> bytes:
    weights = random_bytes(2000, seed)
    hub.add_repo(repo_id, {"config.json": json.dumps({"who": f"{repo_id}:{branch}"}).encode(),
                           "model.safetensors": weights}, branch=branch)
    return weights


# ---- finding 4: folder collisions ------------------------------------------------------------------------

@pytest.mark.parametrize("first, second, base", [
    ("alice/x_model", "alice_x/model", "alice_x_model"),
    ("org/repo:a/b", "org/repo:a_b", "org_repo_a_b"),
])
def test_repos_that_map_to_one_folder_name_never_replace_each_other(hub_env, tmp_path, first, second, base):
    models = tmp_path / "models"
    ref1, ref2 = parse_repo_spec(first), parse_repo_spec(second)
    w1 = add_model(hub_env, ref1.repo_id, 1, ref1.branch)
    w2 = add_model(hub_env, ref2.repo_id, 2, ref2.branch)
    assert ref1.folder_name == ref2.folder_name == base          # the ambiguity is real

    one = download_model(ref1, models)
    two = download_model(ref2, models)
    assert one.path == models / base
    assert two.path != one.path and two.path.name.startswith(base + "-")
    # The first model is untouched, and each folder says which repo and branch it holds.
    assert (one.path / "model.safetensors").read_bytes() == w1
    assert (two.path / "model.safetensors").read_bytes() == w2
    assert (record(one.path)["repo"], record(one.path)["branch"]) == (ref1.repo_id, ref1.branch)
    assert (record(two.path)["repo"], record(two.path)["branch"]) == (ref2.repo_id, ref2.branch)
    # The user is told where the second one went and why.
    assert one.note == ""
    assert str(ref1) in two.note and two.path.name in two.note and "\n" not in two.note
    # The name is deterministic: both downloads find their own folders again.
    assert download_model(ref2, models).path == two.path and download_model(ref2, models).already_present
    assert download_model(ref1, models).path == one.path and download_model(ref1, models).already_present
    assert plan_download(ref2, models).dest == two.path
    assert sorted(p.name for p in models.iterdir()) == sorted([one.path.name, two.path.name])


def test_an_interrupted_download_of_one_repo_is_not_taken_over_by_its_name_twin(hub_env, tmp_path):
    models = tmp_path / "models"
    weights = random_bytes(1024 * 1024, 1)
    hub_env.add_repo("alice/x_model", {"config.json": b"{}", "model.safetensors": weights})
    add_model(hub_env, "alice_x/model", 2)
    hub_env.faults.throttle(256 * 1024, "model.safetensors")
    cancel = threading.Event()
    with pytest.raises(DownloadCancelled):
        download_model(parse_repo_spec("alice/x_model"), models, cancel=cancel,
                       progress=lambda p: p.done > 100_000 and cancel.set())
    kept = models / ".partial-alice_x_model" / "model.safetensors.incomplete"
    kept_bytes = kept.read_bytes()
    assert 0 < len(kept_bytes) < len(weights)
    hub_env.faults.clear()

    two = download_model(parse_repo_spec("alice_x/model"), models)
    assert two.path.name.startswith("alice_x_model-") and "alice/x_model" in two.note
    assert kept.read_bytes() == kept_bytes               # the twin neither used nor dropped those bytes
    hub_env.reset_counters()
    one = download_model(parse_repo_spec("alice/x_model"), models)
    assert one.path == models / "alice_x_model" and (one.path / "model.safetensors").read_bytes() == weights
    assert hub_env.bytes_served("model.safetensors", "alice/x_model") < len(weights)   # resumed


def test_saved_settings_follow_the_repo_not_the_folder_name(hub_env, tmp_path):
    models = tmp_path / "models"
    add_model(hub_env, "alice/x_model", 1)
    add_model(hub_env, "alice_x/model", 2)
    download_model(parse_repo_spec("alice/x_model"), models)
    store = SettingsStore(models)
    store.save("alice_x_model", {"preset": "Creative", "context_length": 1024})
    entry = yaml.safe_load((models / FILE_NAME).read_text())["alice_x_model$"]     # text-generation-webui's key
    assert (entry["repo"], entry["branch"]) == ("alice/x_model", "main")
    assert store.get("alice_x_model") == {"preset": "Creative", "context_length": 1024}

    shutil.rmtree(models / "alice_x_model")              # the user deletes that model...
    other = download_model(parse_repo_spec("alice_x/model"), models)
    assert other.path == models / "alice_x_model"        # ...and the twin takes the free name
    fresh = SettingsStore(models)
    assert fresh.get("alice_x_model") == {}              # alice/x_model's settings do not apply to it
    assert any("alice/x_model" in p and "alice_x/model" in p for p in fresh.problems), fresh.problems
    fresh.save("alice_x_model", {"preset": "Deterministic"})   # saving again binds the entry to the new repo
    assert SettingsStore(models).get("alice_x_model") == {"preset": "Deterministic"}


def test_settings_store_and_downloader_agree_on_the_record_file_name():
    from loaders import settings_store
    assert settings_store.PROVENANCE_FILE == PROVENANCE_FILE


# ---- finding 5: sizes ---------------------------------------------------------------------------------------

LISTED = 10
LIE = 64 * 1024 * 1024


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "no-content-length"])
def test_a_server_sending_more_than_listed_is_cut_off_at_the_listed_size(hub_env, tmp_path, monkeypatch,
                                                                         declare_length):
    models = tmp_path / "models"
    hub_env.add_repo("org/liar", {"config.json": b"{}", "model.safetensors": b"0123456789"})
    hub_env.faults.wrong_size("model.safetensors", LIE, declare_length=declare_length)
    real = shutil.disk_usage
    # Room for what the listing says, nowhere near what the server sends: the check trusts the listing,
    # so the download must never write more than that.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1024 * 1024))
    seen = []
    with pytest.raises(SizeMismatch) as info:
        download_model(parse_repo_spec("org/liar"), models, progress=seen.append)
    message = str(info.value)
    assert "model.safetensors" in message and f"{LISTED} B" in message and "\n" not in message
    assert all(f.done <= f.total for p in seen for f in p.files)     # never more on disk than listed
    assert not (models / ".partial-org_liar" / "model.safetensors.incomplete").exists()
    assert hub_env.bytes_served("model.safetensors") < LIE // 2       # stopped reading, did not retry
    assert not (models / "org_liar").exists()


def test_a_server_sending_fewer_bytes_than_listed_fails_at_once(hub_env, tmp_path):
    models = tmp_path / "models"
    hub_env.add_repo("org/short", {"config.json": b"{}", "model.safetensors": random_bytes(1_000_000, 3)})
    hub_env.faults.wrong_size("model.safetensors", 100_000)          # a complete answer, just too short
    with pytest.raises(SizeMismatch) as info:
        download_model(parse_repo_spec("org/short"), models)
    message = str(info.value)
    assert "model.safetensors" in message and "100.00 KB" in message and "1.00 MB" in message
    gets = [r for r in hub_env.requests if r[0] == "GET" and r[1].endswith("/model.safetensors")]
    assert len(gets) == 1                                            # no retry loop against a lying server
    assert not (models / "org_short").exists()


# ---- finding 5: names and redirects ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a" * 300 + ".json", "/".join(["d" * 200] * 21) + "/x.json"],
                         ids=["300-character-name", "4000-byte-path"])
def test_an_over_long_file_name_is_refused_before_anything_is_written(hub_env, tmp_path, name):
    models = tmp_path / "models"
    hub_env.add_repo("org/long-names", {"config.json": b"{}", name: b"{}"})
    with pytest.raises(UnstorableName) as info:
        download_model(parse_repo_spec("org/long-names"), models)
    message = str(info.value)
    assert "too long" in message and "nothing was downloaded" in message and "\n" not in message
    assert tree(models) == []                                        # no .partial-* folder, no lock file


@pytest.mark.parametrize("clash", [["extra.json", "extra.json/inner.json"],
                                   ["extra.json", "extra.json.incomplete/inner.json"]],
                         ids=["file-and-folder", "folder-named-like-a-partial-file"])
def test_a_name_that_is_both_file_and_folder_is_refused_before_anything_is_written(hub_env, tmp_path, clash):
    models = tmp_path / "models"
    hub_env.add_repo("org/clash", {"config.json": b"{}", **{path: b"{}" for path in clash}})
    with pytest.raises(UnstorableName) as info:
        download_model(parse_repo_spec("org/clash"), models)
    message = str(info.value)
    assert repr(clash[0]) in message and "folder" in message and "\n" not in message
    assert tree(models) == []


def test_control_characters_in_a_server_file_name_are_unsafe(hub_env, tmp_path):
    hub_env.add_repo("org/odd", {"config.json": b"{}", "bad\nname.json": b"{}"})
    with pytest.raises(UnsafePath) as info:
        download_model(parse_repo_spec("org/odd"), tmp_path / "models")
    assert "\n" not in str(info.value)
    assert tree(tmp_path / "models") == []


def test_a_folder_on_disk_where_a_file_must_go_is_one_line(hub_env, tmp_path):
    models = tmp_path / "models"
    hub_env.add_repo("org/gguf", {"a.gguf": random_bytes(3000, 1), "b.gguf": random_bytes(3000, 2)})
    first = download_model(parse_repo_spec("org/gguf", file="a.gguf"), models)
    (first.path / "b.gguf").mkdir()                      # something on disk already holds that name
    with pytest.raises(HubError) as info:
        download_model(parse_repo_spec("org/gguf", file="b.gguf"), models)
    message = str(info.value)
    assert "b.gguf" in message and "Could not store" in message and "\n" not in message
    assert (first.path / "a.gguf").is_file()


def test_a_repo_file_named_like_hearths_partial_record_is_skipped(hub_env, tmp_path):
    hub_env.add_repo("org/sneaky", {"config.json": b"{}", ".hearth-partial.json": b'{"expected": 1}'})
    result = download_model(parse_repo_spec("org/sneaky"), tmp_path / "models")
    assert sorted(p.name for p in result.path.iterdir()) == ["config.json", PROVENANCE_FILE]


def test_a_very_long_branch_name_gets_a_shortened_stable_folder(hub_env, tmp_path):
    models = tmp_path / "models"
    branch = "b" * 250
    add_model(hub_env, "org/repo", 5, branch)
    result = download_model(parse_repo_spec(f"org/repo:{branch}"), models)
    assert len(result.path.name.encode()) == FOLDER_MAX and result.path.name.startswith("org_repo_bbb")
    assert "shortened" in result.note
    assert len(f".partial-{result.path.name}.lock".encode()) <= 255
    assert record(result.path)["branch"] == branch
    assert download_model(parse_repo_spec(f"org/repo:{branch}"), models).already_present


def test_a_redirect_loop_is_one_line_and_leaves_only_what_a_rerun_can_use(hub_env, tmp_path):
    models = tmp_path / "models"
    add_model(hub_env, "org/loop", 6)
    hub_env.faults.redirect_loop("model.safetensors")
    with pytest.raises(NetworkError) as info:
        download_model(parse_repo_spec("org/loop"), models)
    message = str(info.value)
    assert "model.safetensors" in message and "redirect" in message and "\n" not in message
    # Kept for a rerun: only files that are complete and verified, nothing of the looping one.
    assert all(not name.endswith(".incomplete") and "model.safetensors" not in name for name in tree(models))
    assert not (models / "org_loop").exists()
    hub_env.faults.clear()
    assert (download_model(parse_repo_spec("org/loop"), models).path / "model.safetensors").is_file()


# ---- the CLI says all of it in one line --------------------------------------------------------------------

def run_cli(hub, tmp_path: Path, spec: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, **hub_environment(hub.url, tmp_path / "hf")}
    return subprocess.run([sys.executable, str(REPO_ROOT / "app.py"), "download", spec,
                           "--models-dir", str(tmp_path / "models")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_cli_reports_a_renamed_folder_and_each_failure_in_one_line(fake_hub, tmp_path):
    add_model(fake_hub, "alice/x_model", 1)
    add_model(fake_hub, "alice_x/model", 2)
    assert run_cli(fake_hub, tmp_path, "alice/x_model").returncode == 0
    twin = run_cli(fake_hub, tmp_path, "alice_x/model")
    assert twin.returncode == 0, twin.stderr
    assert "alice_x_model already holds alice/x_model" in twin.stdout and "alice_x_model-" in twin.stdout

    fake_hub.add_repo("org/long-names", {"config.json": b"{}", "a" * 300 + ".json": b"{}"})
    fake_hub.add_repo("org/clash", {"config.json": b"{}", "x.json": b"{}", "x.json/y.json": b"{}"})
    add_model(fake_hub, "org/loop", 3)
    fake_hub.faults.redirect_loop("model.safetensors")
    for spec, words in [("org/long-names", "too long"), ("org/clash", "folder"), ("org/loop", "redirect")]:
        failed = run_cli(fake_hub, tmp_path, spec)
        assert failed.returncode == 1, (spec, failed.stderr)
        assert "Traceback" not in failed.stderr, failed.stderr
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and words in last, (spec, failed.stderr)


# ---- and so does the Download tab -----------------------------------------------------------------------

@pytest.fixture
def ui_client(hub_env, tmp_path):
    """Hearth's whole UI around a real AppState, served in-process on a free port (as in test_hub_ui.py)."""
    import socket

    from gradio_client import Client

    from app_settings import AppSettings
    from app_state import AppState
    from ui.app import build_ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_ui(AppState(AppSettings(models_dir=tmp_path / "models")))
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, ssr_mode=False,
                quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}", verbose=False)
    finally:
        demo.close()


def test_download_tab_says_where_a_name_twin_went_and_why_a_name_cannot_be_stored(ui_client, hub_env):
    add_model(hub_env, "alice/x_model", 1)
    add_model(hub_env, "alice_x/model", 2)
    _, status, _ = ui_client.predict("alice/x_model", None, "", api_name="/download_start")
    assert "downloaded and verified" in status
    files, _ = ui_client.predict("alice_x/model", None, "", api_name="/download_list_files")
    assert "models/alice_x_model already holds alice/x_model" in files
    _, status, _ = ui_client.predict("alice_x/model", None, "", api_name="/download_start")
    assert "downloaded and verified" in status and "models/alice_x_model already holds alice/x_model" in status

    hub_env.add_repo("org/long-names", {"config.json": b"{}", "a" * 300 + ".json": b"{}"})
    _, status, _ = ui_client.predict("org/long-names", None, "", api_name="/download_start")
    assert status.startswith("⚠️") and "too long" in status and "Unexpected error" not in status
