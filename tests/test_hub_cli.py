"""`python app.py download ...` end to end in a subprocess against the test Hub (HF_ENDPOINT), including a
SIGKILL mid-file and a rerun that resumes from the bytes on disk."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hub_fixtures import LLAMA2_CHAT_GPTQ, gptq_branch_files, hub_environment, random_bytes
from hub_server import SEND_CHUNK

REPO_ROOT = Path(__file__).resolve().parent.parent
BRANCH = "gptq-4bit-32g-actorder_True"
FOLDER = f"TheBloke_Llama-2-7b-Chat-GPTQ_{BRANCH}"


def cli(fake_hub, tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "app.py"), "download", *args, "--models-dir", str(tmp_path / "models")]


def cli_env(fake_hub, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return {**env, **hub_environment(fake_hub.url, tmp_path / "hf-home")}


def run_cli(fake_hub, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(fake_hub, tmp_path, *args), cwd=REPO_ROOT, env=cli_env(fake_hub, tmp_path),
                          capture_output=True, text=True, timeout=180)


def test_download_verb_lands_a_verified_branch_folder(fake_hub, tmp_path):
    done = run_cli(fake_hub, tmp_path, f"{LLAMA2_CHAT_GPTQ}:{BRANCH}")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "models" / FOLDER
    record = json.loads((folder / "hearth-download.json").read_text())
    assert record["commit"] == fake_hub.repos[LLAMA2_CHAT_GPTQ].branches[BRANCH]
    for entry in record["files"]:
        assert hashlib.sha256((folder / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert "downloaded and verified" in done.stdout and FOLDER in done.stdout
    assert "verified model.safetensors" in done.stderr          # the per-file lines under the progress bar

    again = run_cli(fake_hub, tmp_path, f"{LLAMA2_CHAT_GPTQ}:{BRANCH}")
    assert again.returncode == 0 and "already complete" in again.stdout
    assert "verified model.safetensors" not in again.stderr       # nothing was fetched or re-verified


def test_killed_download_resumes_from_the_bytes_on_disk(fake_hub, tmp_path):
    size = 8 * 1024 * 1024
    fake_hub.add_repo(LLAMA2_CHAT_GPTQ, gptq_branch_files(BRANCH, weight_size=size), branch=BRANCH)
    fake_hub.faults.throttle(1024 * 1024, "model.safetensors")      # slow enough to kill it mid-file
    partial = tmp_path / "models" / f".partial-{FOLDER}" / "model.safetensors.incomplete"
    proc = subprocess.Popen(cli(fake_hub, tmp_path, f"{LLAMA2_CHAT_GPTQ}:{BRANCH}"), cwd=REPO_ROOT,
                            env=cli_env(fake_hub, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.stat().st_size >= 2 * 1024 * 1024):
            assert proc.poll() is None, "the download ended before it could be killed"
            assert time.monotonic() < deadline, "the download never got going"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = partial.stat().st_size
    assert not (tmp_path / "models" / FOLDER).exists()         # nothing half-done is listed as a model

    fake_hub.faults.clear()
    fake_hub.reset_counters()
    rerun = run_cli(fake_hub, tmp_path, f"{LLAMA2_CHAT_GPTQ}:{BRANCH}")
    assert rerun.returncode == 0, rerun.stderr
    served = fake_hub.bytes_served("model.safetensors")
    assert served <= size - kept + 2 * SEND_CHUNK and served < 0.8 * size, (served, kept, size)
    weights = (tmp_path / "models" / FOLDER / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == fake_hub.repos[LLAMA2_CHAT_GPTQ].commits[
        fake_hub.repos[LLAMA2_CHAT_GPTQ].branches[BRANCH]]["model.safetensors"].sha256


def test_failures_exit_non_zero_with_one_line(fake_hub, tmp_path):
    for spec, expected in [("TheBloke/No-Such-Model", "No repo named TheBloke/No-Such-Model"),
                           (f"{LLAMA2_CHAT_GPTQ}:gptq-9bit", "no branch or revision 'gptq-9bit'"),
                           ("meta-llama/Llama-2-7b-chat-hf", "HF_TOKEN"),
                           ("../../etc/passwd", "not owner/name")]:
        failed = run_cli(fake_hub, tmp_path, spec)
        assert failed.returncode == 1
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], failed.stderr
    assert not (tmp_path / "models").exists() or not any(
        p for p in (tmp_path / "models").iterdir() if not p.name.startswith("."))


def test_several_ggufs_list_the_choices_and_file_picks_one(fake_hub, tmp_path):
    fake_hub.add_repo("TheBloke/Mistral-7B-GGUF", {"mistral.Q4_K_M.gguf": random_bytes(3000, 1),
                                               "mistral.Q8_0.gguf": random_bytes(5000, 2)})
    ask = run_cli(fake_hub, tmp_path, "TheBloke/Mistral-7B-GGUF")
    assert ask.returncode == 1
    assert "--file mistral.Q4_K_M.gguf" in ask.stderr and "--file mistral.Q8_0.gguf" in ask.stderr
    pick = run_cli(fake_hub, tmp_path, "TheBloke/Mistral-7B-GGUF", "--file", "mistral.Q8_0.gguf")
    assert pick.returncode == 0, pick.stderr
    assert (tmp_path / "models" / "TheBloke_Mistral-7B-GGUF" / "mistral.Q8_0.gguf").stat().st_size == 5000
