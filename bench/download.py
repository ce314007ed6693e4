"""Loopback download throughput: Hearth's downloader vs huggingface_hub.snapshot_download, same repo, same run.

    .venv/bin/python bench/download.py [--size-mb 1024] [--shards 4] [--repeats 1]

Builds a sharded ~1 GB safetensors-style repo (random bytes, as LFS files) in a temp dir, serves it with the
tests' Hub-protocol server on 127.0.0.1, downloads it with both clients in alternation and prints JSON.
Hearth's timing includes its sha256 verification of every file and the atomic move into models/.
Not part of the test suite: timings are never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

REPO_ID = "bench/Llama-2-7b-Chat-GPTQ-sharded"


def build_repo(workdir: Path, size_mb: int, shards: int) -> dict[str, Path]:
    files: dict[str, Path] = {}
    shard_bytes = size_mb * 1024 * 1024 // shards
    for i in range(shards):
        path = workdir / f"shard-{i}"
        with open(path, "wb") as fh:
            left = shard_bytes
            while left:
                block = os.urandom(min(left, 16 << 20))
                fh.write(block)
                left -= len(block)
        files[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = path
    for name, text in {"config.json": '{"model_type": "llama"}', "tokenizer_config.json": "{}",
                       "quantize_config.json": '{"bits": 4, "group_size": 128}'}.items():
        path = workdir / name
        path.write_text(text)
        files[name] = path
    return files


def time_hearth(dest: Path, workers: int) -> float:
    from hub.download import download_model
    from hub.repo_id import parse_repo_spec

    start = time.perf_counter()
    download_model(parse_repo_spec(REPO_ID), dest, workers=workers)
    return time.perf_counter() - start


def time_snapshot_download(dest: Path, workers: int) -> float:
    from huggingface_hub import snapshot_download

    start = time.perf_counter()
    snapshot_download(REPO_ID, local_dir=dest, max_workers=workers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="parallel files, the same for both clients")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hearth-bench-") as tmp:
        tmp_path = Path(tmp)
        os.environ.update({"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "0"})
        from hub_server import HubServer

        source = tmp_path / "source"
        source.mkdir()
        files = build_repo(source, args.size_mb, args.shards)
        with HubServer(tmp_path / "server") as server:
            server.add_repo(REPO_ID, files)
            os.environ["HF_ENDPOINT"] = server.url   # huggingface_hub reads it at import, which comes after
            total = sum(p.stat().st_size for p in files.values())
            runs: dict[str, list[float]] = {"hearth": [], "snapshot_download": []}
            for i in range(args.repeats):
                for name, fn in (("hearth", time_hearth), ("snapshot_download", time_snapshot_download)):
                    dest = tmp_path / f"{name}-{i}"
                    runs[name].append(fn(dest, args.workers))
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.rmtree(tmp_path / "hf-home", ignore_errors=True)

    def figures(seconds: list[float]) -> dict:
        best = min(seconds)
        return {"seconds": [round(s, 3) for s in seconds], "best_seconds": round(best, 3),
                "best_MB_per_s": round(total / best / 1e6, 1)}

    hearth, hf = figures(runs["hearth"]), figures(runs["snapshot_download"])
    import huggingface_hub
    print(json.dumps({
        "repo": REPO_ID, "bytes": total, "files": len(files), "workers": args.workers,
        "cpu_count": os.cpu_count(), "huggingface_hub": huggingface_hub.__version__,
        "hearth": hearth, "snapshot_download": hf,
        "hearth_speed_over_snapshot_download": round(hf["best_seconds"] / hearth["best_seconds"], 2),
        "note": "loopback; Hearth's time includes sha256 verification of every file and the atomic rename",
    }, indent=2))


if __name__ == "__main__":
    main()
