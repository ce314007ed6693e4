"""llama-cpp-python: whether the pinned version is importable, and building it without making anyone wait.

PyPI ships llama-cpp-python as source only, so it is compiled here (all of llama.cpp: minutes on a laptop).
`./start_linux.sh` starts `python -m loaders.llamacpp_install build` in the background and brings the UI up at
once; `./run_tests.sh` runs the same build in the foreground. The build writes its state to a file beside the
venv, which `state()` reads for the Model tab and the loader's detection. The build flags live here only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PACKAGE = "llama-cpp-python"
PIN = "0.3.36"
# What Hearth uses is the llama library and its sampler; the multimodal library (mtmd/llava), the HTTPS
# model downloader (openssl) and llama.cpp's tools, examples, tests and server are not built.
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF")
# x86 instruction sets ggml is built for -> the /proc/cpuinfo flags that must all be present: this CPU's, as
# -march=native would pick, but only up to AVX2. Left out: AMX, which a CPU may list while its OS or hypervisor
# has not enabled the tile state (a Firecracker VM here: ggml's AMX matmul dies on its first instruction), and
# AVX-512 / AVX-VNNI. Those two were dropped while chasing the default model's Q4_1 reply ("L'Étoile..." instead
# of Paris), which the AVX2 build gives too: it comes from llama.cpp rounding activations to 8 bits on any
# instruction set (tests/test_llamacpp.py), so AVX-512 is not known to be wrong; it is simply not built.
X86_FEATURES = {"GGML_SSE42": {"sse4_2"}, "GGML_AVX": {"avx"}, "GGML_AVX2": {"avx2"}, "GGML_FMA": {"fma"},
                "GGML_F16C": {"f16c"}, "GGML_BMI2": {"bmi2"}}
NEVER = ("GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
         "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
COMPILER_HINT = "no C/C++ compiler or cmake here: install them with `sudo apt-get install build-essential cmake`"
# Beside the interpreter's environment, so each venv keeps its own build's state.
STATE_DIR = Path(sys.prefix) / "llama-cpp-build"


@dataclass(frozen=True)
class BuildState:
    ready: bool
    line: str          # one line for people, e.g. "building llama-cpp-python 0.3.36 since 95 s (log: ...)"


def installed_version() -> str | None:
    """The installed llama-cpp-python's version, from its metadata (the shared library is not loaded)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def cpu_cmake_args(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """ggml's instruction-set switches for this x86 CPU (up to AVX2); "" elsewhere (llama.cpp's own
    -march=native then applies)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), None)
    except OSError:
        flags = None
    if not flags or "sse2" not in flags:
        return ""
    have = set(flags)
    return " ".join(["-DGGML_NATIVE=OFF"] + [f"-D{name}={'ON' if need <= have else 'OFF'}"
                                             for name, need in X86_FEATURES.items()]
                    + [f"-D{name}=OFF" for name in NEVER])


def missing_tools() -> list[str]:
    return [tool for tool in ("cc", "c++", "cmake") if shutil.which(tool) is None]


def state(state_dir: Path = STATE_DIR) -> BuildState:
    """Ready, building (since when), failed (the log's last line) or not installed (and why)."""
    if installed_version() == PIN:
        return BuildState(True, f"llama-cpp-python {PIN} installed")
    log = state_dir / "build.log"
    running = state_dir / "building"
    started = _builder_alive(running)
    if started:
        return BuildState(False, f"building llama-cpp-python {PIN} since {time.time() - started:.0f} s "
                                 f"(log: {log}); the gguf loader serves GGUF models meanwhile")
    failed = state_dir / "failed"
    if failed.is_file():
        return BuildState(False, f"building llama-cpp-python {PIN} failed: {failed.read_text().strip()} "
                                 f"(log: {log}); the gguf loader serves GGUF models")
    if missing_tools():
        return BuildState(False, COMPILER_HINT)
    return BuildState(False, f"llama-cpp-python {PIN} is not installed (./start_linux.sh builds it); "
                             "the gguf loader serves GGUF models")


def _builder_alive(running: Path) -> float | None:
    """When the build recorded in `running` started, if its process is still alive (a killed build leaves the
    file behind), else None."""
    try:
        pid, started = running.read_text().split()
        os.kill(int(pid), 0)
        return float(started)
    except (ValueError, OSError):
        return None


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def build(state_dir: Path = STATE_DIR, quiet: bool = True) -> int:
    """pip-install the pinned version with the trimmed flags; a no-op when it is already importable (pip's
    wheel cache makes a rebuild on the same machine take seconds). Returns pip's exit status."""
    if installed_version() == PIN:
        print(f"llama-cpp-python {PIN} already installed")
        return 0
    state_dir.mkdir(parents=True, exist_ok=True)
    running = state_dir / "building"
    while _builder_alive(running):       # a background build is under way: wait for it, never pip twice
        time.sleep(5)
    if installed_version() == PIN:
        return 0
    failed = state_dir / "failed"
    failed.unlink(missing_ok=True)
    missing = missing_tools()
    if missing:
        failed.write_text(f"{', '.join(missing)} not found: {COMPILER_HINT}\n")
        print(COMPILER_HINT, file=sys.stderr)
        return 1
    running.write_text(f"{os.getpid()} {time.time()}\n")
    log = state_dir / "build.log"
    # The user's own CMAKE_ARGS (e.g. -DGGML_CUDA=on) come last, so they win.
    env = {**os.environ, "CMAKE_ARGS": f"{CMAKE_ARGS} {cpu_cmake_args()} {os.environ.get('CMAKE_ARGS', '')}".strip()}
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", f"{PACKAGE}=={PIN}"]
    started = time.time()
    try:
        with log.open("w") as out:
            rc = subprocess.run(cmd, env=env, stdout=out if quiet else None, stderr=subprocess.STDOUT if quiet
                                else None).returncode
        if rc != 0:
            failed.write_text(f"pip exited with {rc}: {_last_error(log) if quiet else 'see the output above'}\n")
    finally:
        running.unlink(missing_ok=True)
    print(f"llama-cpp-python {PIN}: {'installed' if rc == 0 else 'build failed'} in {time.time() - started:.0f} s")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "state"], help="build: install the pinned version (a no-op "
                        "when installed); state: one line, exit status 0 when installed")
    parser.add_argument("--verbose", action="store_true", help="show pip's output instead of logging it")
    args = parser.parse_args(argv)
    if args.action == "state":   # exit status 0 when ready, so scripts can ask
        current = state()
        print(current.line)
        return 0 if current.ready else 1
    return build(quiet=not args.verbose)


if __name__ == "__main__":
    sys.exit(main())
