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
        """{check name: "ok" or its traceback, INTERPRETED: bool} from one child running `test_file` as a script
        under the interpreter; skips where a CUDA GPU is present."""
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: the GPU tests check the compiled kernels")
        pytest.importorskip("triton")   # requirements-test.txt installs it on CPU for its interpreter
        out = tmp_dir / "results.json"
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
        child = subprocess.run([sys.executable, test_file, str(out)], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=timeout)
        assert out.exists(), child.stdout[-3000:] + child.stderr[-3000:]
        return json.loads(out.read_text())

    def assert_all_ran(self, results: dict) -> None:
        """The child really interpreted Triton (not a silent fallback to something else) and ran every check."""
        assert results[INTERPRETED] is True
        assert set(self.checks) <= set(results)

    def child_main(self) -> None:
        """The child: run every check, write {name: "ok" | traceback} to the path in argv[1]."""
        import triton

        results = {INTERPRETED: bool(triton.knobs.runtime.interpret)}
        for name, run in self.checks.items():
            try:
                run()
                results[name] = "ok"
            except Exception:   # reported per check by the parent's tests
                results[name] = traceback.format_exc()
        Path(sys.argv[1]).write_text(json.dumps(results))
