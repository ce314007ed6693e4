"""Triton kernels checked on a CPU through Triton's interpreter (TRITON_INTERPRET=1 runs the same @triton.jit
kernels with numpy). Triton decides at import whether its library functions (tl.zeros, tl.max, ...) are
interpreted, so a test file registers its checks here and runs them all in one child process started with
TRITON_INTERPRET=1 (the test file run as a script), leaving the test process's Triton free to compile real
kernels for the GPU tests. Where a GPU is present the interpreter checks skip: the GPU tests check the compiled
kernels, and a GPU image's own Triton may interpret otherwise than requirements-test.txt's.

In a test file:

    CHECKS = InterpreterChecks()

    @CHECKS.check("name", rows=1)
    def some_check(rows): ...

    @pytest.fixture(scope="module")
    def interpreted(tmp_path_factory):
        return CHECKS.run_child(__file__, tmp_path_factory.mktemp("interpreter"))

    if __name__ == "__main__":
        CHECKS.child_main()
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
INTERPRETED = "__interpreted__"   # the key saying whether the child really interpreted Triton


class InterpreterChecks:
    def __init__(self) -> None:
        self.checks: dict[str, Callable[[], None]] = {}   # name -> check (no arguments)

    def check(self, name: str, **params):
        """Register f(**params) as the interpreter check `name`."""
        def register(f):
            self.checks[name] = lambda: f(**params)
            return f
        return register

    def run_child(self, test_file: str, tmp_dir: Path, timeout: int = 1200) -> dict:
        """{check name: "ok" or its traceback, INTERPRETED: bool} from children running `test_file` as a script
        under the interpreter, one a CPU core (at most 4), each taking every n-th check: the interpreter runs
        a kernel on one core, and the test process only waits meanwhile. Skips where a CUDA GPU is present."""
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: the GPU tests check the compiled kernels")
        pytest.importorskip("triton")   # requirements-test.txt installs it on CPU for its interpreter
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
        shards = max(1, min(4, os.cpu_count() or 1, len(self.checks)))
        outs = [tmp_dir / f"results-{i}.json" for i in range(shards)]
        logs = [tmp_dir / f"child-{i}.log" for i in range(shards)]
        children = []
        try:
            for i, (out, log) in enumerate(zip(outs, logs)):
                with log.open("w") as sink:   # a file, not a pipe: a chatty child never waits on a full pipe
                    children.append(subprocess.Popen([sys.executable, test_file, str(out), f"{i}/{shards}"], env=env,
                                                     cwd=REPO, stdout=sink, stderr=subprocess.STDOUT))
            for child in children:
                child.wait(timeout=timeout)
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
        results: dict = {INTERPRETED: True}
        for out, log in zip(outs, logs):
            assert out.exists(), log.read_text()[-6000:]
            part = json.loads(out.read_text())
            results[INTERPRETED] = results[INTERPRETED] and part.pop(INTERPRETED)
            results.update(part)
        return results

    def assert_all_ran(self, results: dict) -> None:
        """The child really interpreted Triton (not a silent fallback to something else) and ran every check."""
        assert results[INTERPRETED] is True
        assert set(self.checks) <= set(results)

    def child_main(self) -> None:
        """A child: run its share of the checks (argv[2] "i/n": every n-th from the i-th), write {name: "ok" |
        traceback} to the path in argv[1]."""
        import triton

        shard, shards = map(int, sys.argv[2].split("/"))
        results = {INTERPRETED: bool(triton.knobs.runtime.interpret)}
        for name, run in list(self.checks.items())[shard::shards]:
            try:
                run()
                results[name] = "ok"
            except Exception:   # reported per check by the parent's tests
                results[name] = traceback.format_exc()
        Path(sys.argv[1]).write_text(json.dumps(results))
