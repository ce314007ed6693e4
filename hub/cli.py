"""The `download` CLI verb: `python app.py download OWNER/NAME[:BRANCH] [--file NAME] [--models-dir DIR]`.

A terminal progress bar (tqdm) over all bytes, one line per verified file, exit code 0 on success and 1 with
one line on stderr on failure. Rerunning after Ctrl-C, a crash or a kill resumes from the bytes on disk.
Also runnable alone: `python -m hub.cli download ...`.
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from hub.download import ALREADY_PRESENT, DownloadProgress, DownloadResult, download_model, format_eta
from hub.errors import ChoiceNeeded, HubError
from hub.listing import human_size
from hub.repo_id import parse_repo_spec


def add_download_arguments(parser: argparse.ArgumentParser, *, with_models_dir: bool = True) -> None:
    parser.add_argument("repo", metavar="OWNER/NAME[:BRANCH]",
                        help="a Hub repo, optionally with a branch, or a huggingface.co URL")
    parser.add_argument("--file", metavar="NAME", help="download only this file (e.g. one GGUF of several)")
    parser.add_argument("--workers", type=int, default=4, help="files downloaded in parallel (default 4)")
    if with_models_dir:
        parser.add_argument("--models-dir", type=Path, help="folder holding the models (default: ./models)")


class _TerminalProgress:
    """tqdm over total bytes; the postfix names the file(s) in flight with their speed and ETA."""

    def __init__(self) -> None:
        self.bar = None
        self.reported: set[str] = set()

    def __call__(self, p: DownloadProgress) -> None:
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=p.total, initial=p.done, unit="B", unit_scale=True, unit_divisor=1000,
                            dynamic_ncols=True, file=sys.stderr, desc="download")
        self.bar.update(p.done - self.bar.n)
        active = p.active
        if active:
            f = max(active, key=lambda a: a.total - a.done)
            more = f" +{len(active) - 1}" if len(active) > 1 else ""
            self.bar.set_postfix_str(f"{f.path} {f.done / max(f.total, 1):.0%} {human_size(f.speed)}/s "
                                     f"ETA {format_eta(f.eta)}{more}", refresh=False)
        if p.message == ALREADY_PRESENT:
            return
        for f in p.files:
            if f.state == "done" and f.path not in self.reported:
                self.reported.add(f.path)
                self.bar.write(f"  verified {f.path} ({human_size(f.total)})", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_download(args: argparse.Namespace, models_dir: Path | None = None) -> int:
    """Run the verb; `models_dir` (from settings) wins over a missing --models-dir."""
    models_dir = Path(getattr(args, "models_dir", None) or models_dir or "models")
    try:
        ref = parse_repo_spec(args.repo, file=args.file)
    except HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cancel = threading.Event()
    progress = _TerminalProgress()
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["result"] = download_model(ref, models_dir, cancel=cancel, progress=progress,
                                               workers=max(1, args.workers))
        except BaseException as exc:  # handed to the main thread, which reports it
            outcome["error"] = exc

    # The download runs in a worker so Ctrl-C reaches this thread and can cancel it cleanly.
    worker = threading.Thread(target=work, name="hearth-download-main", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        cancel.set()
        worker.join()
        progress.close()
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    progress.close()
    error = outcome.get("error")
    if isinstance(error, ChoiceNeeded):
        print(f"error: {error}", file=sys.stderr)
        for choice in error.choices:
            print(f"  --file {choice}", file=sys.stderr)
        return 1
    if isinstance(error, HubError):
        print(f"error: {error}", file=sys.stderr)
        return 1
    if error is not None:
        raise error   # a bug, not a user error: keep the traceback
    result: DownloadResult = outcome["result"]  # type: ignore[assignment]
    if result.note:
        print(f"note: {result.note}")
    state = "already complete" if result.already_present else "downloaded and verified"
    size = human_size(sum(f.size for f in result.files))
    print(f"{result.ref} {state}: {len(result.files)} files, {size}, commit {result.commit[:12]} -> {result.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.cli")
    verbs = parser.add_subparsers(dest="verb", required=True)
    add_download_arguments(verbs.add_parser("download", help="download a model from the Hugging Face Hub"))
    args = parser.parse_args(argv)
    return run_download(args)


if __name__ == "__main__":
    sys.exit(main())
