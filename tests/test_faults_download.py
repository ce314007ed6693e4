"""The disk filling up in the middle of a download (not the up-front free-space refusal, which
test_hub_download.py covers): a real, small tmpfs is mounted in a private mount namespace, the download
starts with enough free space, then another writer takes the rest of the disk. `python app.py download`
must stop with one clear line, keep the bytes it has, and a rerun after space is freed must resume from
them and verify.

The tmpfs lives only in the namespace of a `sleep` process started with `unshare --mount`; this test (and
the CLI) reach it through /proc/<pid>/root, so nothing is mounted on the host and killing the holder
removes it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_fixtures import hub_environment, random_bytes
from hub_server import SEND_CHUNK

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "org/big-model"
FOLDER = "org_big-model"
WEIGHTS = 4 * 1024 * 1024
DISK = 8 * 1024 * 1024        # twice the download: the up-front free-space check passes
WAIT_S = 120


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs seen at the returned path (through /proc/<holder>/root)."""
    if not shutil.which("unshare"):
        pytest.fail("util-linux `unshare` is needed to mount a private tmpfs")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    user_ns = [] if os.geteuid() == 0 else ["--map-root-user"]   # unprivileged: mount inside a user namespace
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", *user_ns, "sh", "-c",
         f"mount -t tmpfs -o size={DISK} hearth-test-disk '{mount_point}' && echo mounted && exec sleep 3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().strip()
        if line != "mounted":
            pytest.fail(f"could not mount a tmpfs in a private namespace: {holder.stderr.read().strip()}")
        view = Path(f"/proc/{holder.pid}/root") / mount_point.relative_to("/")
        assert shutil.disk_usage(view).total <= DISK, "the path does not show the small filesystem"
        yield view
    finally:
        holder.kill()
        holder.wait(10)


def fill_the_disk(folder: Path) -> Path:
    """Write zeros until the filesystem says it is full, like another program taking the space."""
    filler = folder / "someone-elses-file"
    block = b"\0" * (64 * 1024)
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def download_cli(models: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "app.py"), "download", REPO_ID, "--models-dir", str(models)]


def cli_env(hub, hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return {**env, **hub_environment(hub.url, hf_home)}


def test_disk_full_mid_download_is_one_clear_line_and_a_rerun_resumes(fake_hub, small_disk, tmp_path):
    weights = random_bytes(WEIGHTS, 99)
    fake_hub.add_repo(REPO_ID, {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights})
    fake_hub.faults.throttle(1024 * 1024, "model.safetensors")   # slow enough to fill the disk mid-file
    models = small_disk / "models"
    partial = models / f".partial-{FOLDER}" / "model.safetensors.incomplete"
    env = cli_env(fake_hub, tmp_path / "hf-home")

    proc = subprocess.Popen(download_cli(models), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (partial.exists() and partial.stat().st_size >= 1024 * 1024):
            assert proc.poll() is None, f"the download ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "the download never got going"
            time.sleep(0.02)
        filler = fill_the_disk(small_disk)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    last = lines[-1]
    assert last.startswith("error: The disk holding") and "filled up during the download" in last, err
    assert "run the download again to resume" in last and "Traceback" not in err
    kept = partial.stat().st_size
    assert 1024 * 1024 <= kept < WEIGHTS
    assert partial.read_bytes() == weights[:kept]           # what was kept is the file's true prefix
    assert not (models / FOLDER).exists()                  # nothing half-done is listed as a model

    filler.unlink()                                        # the user frees space
    fake_hub.faults.clear()
    fake_hub.reset_counters()
    rerun = subprocess.run(download_cli(models), cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=WAIT_S)
    assert rerun.returncode == 0, rerun.stderr
    assert "downloaded and verified" in rerun.stdout
    served = fake_hub.bytes_served("model.safetensors")
    assert served <= WEIGHTS - kept + 2 * SEND_CHUNK, (served, kept)   # resumed, not restarted
    landed = models / FOLDER / "model.safetensors"
    assert hashlib.sha256(landed.read_bytes()).hexdigest() == hashlib.sha256(weights).hexdigest()
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == [FOLDER]
