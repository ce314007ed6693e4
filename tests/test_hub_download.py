"""The downloader against the test Hub: branch downloads, verification, retries, cancel/resume, disk space,
traversal. Resume across a real process kill is in test_hub_cli.py (it kills `python app.py download`)."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest

from hub.download import PROVENANCE_FILE, download_model, plan_download
from hub.errors import (DiskSpaceError, DownloadCancelled, GatedRepo, HubError, NetworkError, UnsafePath,
                        VerifyError)
from hub.repo_id import parse_repo_spec
from hub_server import SEND_CHUNK
from hub_fixtures import GATED_REPO, GATED_TOKEN, LLAMA2_CHAT_GPTQ, random_bytes

BRANCH_32G = "gptq-4bit-32g-actorder_True"
FOLDER_32G = f"TheBloke_Llama-2-7b-Chat-GPTQ_{BRANCH_32G}"
BIG = 4 * 1024 * 1024


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def visible_models(models_dir: Path) -> list[str]:
    """What a model list shows: non-hidden folders (hidden ones are partial downloads)."""
    return sorted(p.name for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if models_dir.exists() else []


def add_big_repo(hub, name="org/big-model", size=BIG) -> bytes:
    weights = random_bytes(size, 42)
    hub.add_repo(name, {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights})
    return weights


def test_non_main_branch_lands_complete_with_provenance(hub_env, tmp_path):
    models = tmp_path / "models"
    result = download_model(parse_repo_spec(f"{LLAMA2_CHAT_GPTQ}:{BRANCH_32G}"), models)
    assert result.path == models / FOLDER_32G and not result.already_present
    assert visible_models(models) == [FOLDER_32G]
    assert sorted(p.name for p in models.iterdir()) == [FOLDER_32G]     # no partial folder left behind
    assert json.loads((result.path / "quantize_config.json").read_text())["group_size"] == 32
    assert not (result.path / ".gitattributes").exists()

    record = json.loads((result.path / PROVENANCE_FILE).read_text())
    commit = hub_env.repos[LLAMA2_CHAT_GPTQ].branches[BRANCH_32G]
    assert (record["repo"], record["branch"], record["commit"]) == (LLAMA2_CHAT_GPTQ, BRANCH_32G, commit)
    assert record["downloaded_at"]
    server_files = hub_env.repos[LLAMA2_CHAT_GPTQ].commits[commit]
    for entry in record["files"]:
        on_disk = result.path / entry["path"]
        assert entry["sha256"] == sha256_of(on_disk) == server_files[entry["path"]].sha256
        assert entry["size"] == on_disk.stat().st_size

    again = download_model(parse_repo_spec(f"{LLAMA2_CHAT_GPTQ}:{BRANCH_32G}"), models)
    assert again.already_present


def test_progress_reports_bytes_speed_and_eta_per_file_and_overall(hub_env, tmp_path):
    add_big_repo(hub_env)
    hub_env.faults.throttle(8 * 1024 * 1024, "model.safetensors")
    seen = []
    download_model(parse_repo_spec("org/big-model"), tmp_path / "models", progress=seen.append)
    final = seen[-1]
    assert final.done == final.total == BIG + len(b'{"model_type": "llama"}')
    assert {f.path: f.state for f in final.files} == {"config.json": "done", "model.safetensors": "done"}
    mid = [p for p in seen if 0 < p.done < p.total and p.speed > 0]
    assert mid and all(p.eta is not None and p.eta > 0 for p in mid)
    assert any(f.speed > 0 and f.eta for p in mid for f in p.active if f.path == "model.safetensors")
    assert all(a.done <= b.done for a, b in zip(seen, seen[1:]))


def test_gated_repo_downloads_with_hf_token(hub_env, tmp_path, monkeypatch):
    with pytest.raises(GatedRepo):
        download_model(parse_repo_spec(GATED_REPO), tmp_path / "models")
    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    result = download_model(parse_repo_spec(GATED_REPO), tmp_path / "models")
    assert (result.path / "model.safetensors").stat().st_size == 32 * 1024


def test_dropped_connections_and_5xx_are_retried_from_the_bytes_received(hub_env, tmp_path):
    weights = add_big_repo(hub_env)
    hub_env.faults.drop_after("model.safetensors", 1_000_000, times=2)
    hub_env.faults.fail("config.json", 503, times=1)
    result = download_model(parse_repo_spec("org/big-model"), tmp_path / "models")
    assert (result.path / "model.safetensors").read_bytes() == weights
    ranges = [r for (method, path, r) in hub_env.requests if method == "GET" and path.endswith("model.safetensors")]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    # Resumed, not restarted: the server sent about one file's worth, not three.
    assert hub_env.bytes_served("model.safetensors") < BIG + 2 * 1_000_000


def test_network_failure_after_retries_is_one_sentence(hub_env, tmp_path):
    add_big_repo(hub_env)
    hub_env.faults.fail("model.safetensors", 503, times=100)
    with pytest.raises(NetworkError) as info:
        download_model(parse_repo_spec("org/big-model"), tmp_path / "models", max_retries=1)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)
    assert visible_models(tmp_path / "models") == []


def test_corruption_from_the_server_is_detected_and_refetched(hub_env, tmp_path):
    weights = add_big_repo(hub_env)
    hub_env.faults.corrupt("model.safetensors", times=1)
    result = download_model(parse_repo_spec("org/big-model"), tmp_path / "models")
    assert (result.path / "model.safetensors").read_bytes() == weights
    assert hub_env.bytes_served("model.safetensors") == 2 * BIG   # the bad copy, then a good one


def test_persistent_corruption_fails_and_lists_no_model(hub_env, tmp_path):
    add_big_repo(hub_env)
    hub_env.faults.corrupt("model.safetensors", times=100)
    with pytest.raises(VerifyError) as info:
        download_model(parse_repo_spec("org/big-model"), tmp_path / "models")
    assert "model.safetensors" in str(info.value)
    assert visible_models(tmp_path / "models") == []


def test_corrupted_partial_bytes_on_disk_are_detected_and_refetched(hub_env, tmp_path):
    weights = add_big_repo(hub_env)
    models = tmp_path / "models"
    hub_env.faults.drop_after("model.safetensors", 1_500_000, times=1)
    with pytest.raises(NetworkError):
        download_model(parse_repo_spec("org/big-model"), models, max_retries=0)
    partial = models / ".partial-org_big-model" / "model.safetensors.incomplete"
    kept = partial.stat().st_size
    assert 0 < kept <= 1_500_000
    partial.write_bytes(b"\0" * kept)          # the disk (or another program) damaged what was kept
    hub_env.reset_counters()
    result = download_model(parse_repo_spec("org/big-model"), models)
    assert (result.path / "model.safetensors").read_bytes() == weights
    assert hub_env.bytes_served("model.safetensors") == (BIG - kept) + BIG   # resumed, failed the check, refetched


def test_cancel_leaves_no_listed_model_and_a_later_run_resumes(hub_env, tmp_path):
    weights = add_big_repo(hub_env)
    models = tmp_path / "models"
    hub_env.faults.throttle(1024 * 1024, "model.safetensors")
    cancel = threading.Event()

    def cancel_after_a_megabyte(p):
        if p.done > 1024 * 1024:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download_model(parse_repo_spec("org/big-model"), models, cancel=cancel, progress=cancel_after_a_megabyte)
    assert visible_models(models) == []
    kept = (models / ".partial-org_big-model" / "model.safetensors.incomplete").stat().st_size
    assert kept > 512 * 1024

    hub_env.faults.clear()
    hub_env.reset_counters()
    plan = plan_download(parse_repo_spec("org/big-model"), models)
    assert plan.partial_files["model.safetensors"] == kept
    result = download_model(parse_repo_spec("org/big-model"), models, plan=plan)
    assert (result.path / "model.safetensors").read_bytes() == weights
    # Only the missing tail was sent again (give or take the last throttled chunk the server thread of the
    # cancelled request was still pushing into a closed socket).
    served = hub_env.bytes_served("model.safetensors")
    assert BIG - kept <= served <= BIG - kept + 2 * SEND_CHUNK
    assert visible_models(models) == ["org_big-model"]


def test_not_enough_disk_space_is_refused_with_the_numbers(hub_env, tmp_path, monkeypatch):
    add_big_repo(hub_env)
    real = shutil.disk_usage

    def nearly_full(path):
        usage = real(path)
        return usage._replace(free=1_000_000)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(DiskSpaceError) as info:
        download_model(parse_repo_spec("org/big-model"), tmp_path / "models")
    message = str(info.value)
    assert "4.19 MB" in message and "1.00 MB" in message and "\n" not in message
    assert hub_env.bytes_served("model.safetensors") == 0
    assert visible_models(tmp_path / "models") == []


def test_branch_update_replaces_the_folder_without_stale_files(hub_env, tmp_path):
    models = tmp_path / "models"
    hub_env.add_repo("org/evolving", {"config.json": b"{}", "old.safetensors": random_bytes(1000, 1)})
    download_model(parse_repo_spec("org/evolving"), models)
    new_commit = hub_env.add_repo("org/evolving", {"config.json": b'{"v": 2}',
                                                   "new.safetensors": random_bytes(1000, 2)})
    result = download_model(parse_repo_spec("org/evolving"), models)
    assert sorted(p.name for p in result.path.iterdir()) == ["config.json", "hearth-download.json", "new.safetensors"]
    assert json.loads((result.path / PROVENANCE_FILE).read_text())["commit"] == new_commit
    assert sorted(p.name for p in models.iterdir()) == ["org_evolving"]


def test_specific_files_join_the_same_folder(hub_env, tmp_path):
    models = tmp_path / "models"
    hub_env.add_repo("TheBloke/Mistral-7B-GGUF", {"mistral.Q4_K_M.gguf": random_bytes(3000, 1),
                                                   "mistral.Q8_0.gguf": random_bytes(5000, 2)})
    download_model(parse_repo_spec("TheBloke/Mistral-7B-GGUF", file="mistral.Q4_K_M.gguf"), models)
    result = download_model(parse_repo_spec("TheBloke/Mistral-7B-GGUF", file="mistral.Q8_0.gguf"), models)
    assert sorted(p.name for p in result.path.iterdir()) == [
        "hearth-download.json", "mistral.Q4_K_M.gguf", "mistral.Q8_0.gguf"]
    record = json.loads((result.path / PROVENANCE_FILE).read_text())
    assert [e["path"] for e in record["files"]] == ["mistral.Q4_K_M.gguf", "mistral.Q8_0.gguf"]


def test_server_supplied_traversal_names_write_nothing_outside(hub_env, tmp_path):
    models = tmp_path / "models"
    hub_env.add_repo("evil/repo", {"config.json": b"{}", "../../escape.json": b'{"pwned": true}',
                                   "sub/../../../escape2.json": b"{}"})
    with pytest.raises(UnsafePath):
        download_model(parse_repo_spec("evil/repo"), models)
    assert not list(tmp_path.rglob("escape*.json"))
    assert visible_models(models) == []


def test_a_folder_not_downloaded_by_hearth_is_never_replaced(hub_env, tmp_path):
    models = tmp_path / "models"
    mine = models / "org_big-model"
    mine.mkdir(parents=True)
    (mine / "my-notes.txt").write_text("keep me")
    add_big_repo(hub_env)
    with pytest.raises(HubError) as info:
        download_model(parse_repo_spec("org/big-model"), models)
    assert "was not downloaded by Hearth" in str(info.value)
    assert (mine / "my-notes.txt").read_text() == "keep me"


def test_a_second_download_of_the_same_folder_is_refused_while_one_runs(hub_env, tmp_path):
    add_big_repo(hub_env)
    hub_env.faults.throttle(512 * 1024, "model.safetensors")
    models = tmp_path / "models"
    started, cancel, outcome = threading.Event(), threading.Event(), {}

    def first():
        try:
            download_model(parse_repo_spec("org/big-model"), models, cancel=cancel,
                           progress=lambda p: p.done > 0 and started.set())
        except DownloadCancelled as exc:
            outcome["first"] = exc

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert started.wait(30)
        with pytest.raises(HubError) as info:
            download_model(parse_repo_spec("org/big-model"), models)
        assert "already being downloaded" in str(info.value)
    finally:
        cancel.set()
        worker.join(30)
    assert isinstance(outcome.get("first"), DownloadCancelled)


def test_an_unreachable_hub_is_a_network_error(hub_env, tmp_path, monkeypatch):
    with socket.socket() as s:       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    with pytest.raises(NetworkError) as info:
        download_model(parse_repo_spec(LLAMA2_CHAT_GPTQ), tmp_path / "models")
    assert dead in str(info.value) and "\n" not in str(info.value)


def test_leftovers_of_an_older_commit_are_not_published(hub_env, tmp_path):
    models = tmp_path / "models"
    hub_env.add_repo("org/evolving", {"config.json": b"{}", "old.safetensors": random_bytes(BIG, 1)})
    hub_env.faults.throttle(1024 * 1024, "old.safetensors")
    cancel = threading.Event()
    with pytest.raises(DownloadCancelled):
        download_model(parse_repo_spec("org/evolving"), models, cancel=cancel,
                       progress=lambda p: p.done > 256 * 1024 and cancel.set())
    assert (models / ".partial-org_evolving" / "old.safetensors.incomplete").exists()
    hub_env.faults.clear()
    hub_env.add_repo("org/evolving", {"config.json": b'{"v": 2}', "new.safetensors": random_bytes(1000, 2)})
    result = download_model(parse_repo_spec("org/evolving"), models)
    assert sorted(p.name for p in result.path.iterdir()) == ["config.json", "hearth-download.json", "new.safetensors"]
    assert sorted(p.name for p in models.iterdir()) == ["org_evolving"]
