"""Safe by default: loopback bind, no open network listen without a login, logins enforced in a browser."""
import subprocess
import sys
import urllib.request

import pytest

from tests.browser import browser_page
from tests.conftest import REPO, start_app


def serve(*args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "app.py"), "serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_listen_without_login_refuses_to_start(models_dir):
    result = serve("--listen", "--models-dir", str(models_dir))
    assert result.returncode == 2
    assert "--listen exposes Hearth to your network" in result.stderr
    assert "--gradio-auth" in result.stderr and "--insecure-listen" in result.stderr


@pytest.mark.parametrize("login", ["nocolon", ":pass", "user:"])
def test_malformed_login_is_refused(models_dir, login):
    result = serve("--gradio-auth", login, "--models-dir", str(models_dir))
    assert result.returncode != 0
    assert "user:password" in result.stderr


def test_default_bind_is_loopback_only(tmp_path, models_dir):
    app = start_app(["--models-dir", str(models_dir)], tmp_path / "app.log")
    try:
        assert "http://127.0.0.1:" in app.output()
        import psutil  # installed with gradio
        listening = [c.laddr for c in psutil.Process(app.proc.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    finally:
        app.stop()


@pytest.mark.browser
def test_gradio_auth_from_file_refuses_wrong_password_in_the_browser(tmp_path, models_dir):
    logins = tmp_path / "logins.txt"
    logins.write_text("alice:wonderland\nbob:builder\n")
    app = start_app(["--models-dir", str(models_dir), "--gradio-auth-path", str(logins)], tmp_path / "app.log")
    try:
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(app.url + "/gradio_api/queue/status", timeout=5)
        with browser_page(tmp_path) as (page, shoot):
            page.goto(app.url)
            page.get_by_label("username").fill("alice")
            page.get_by_label("password").fill("wrong")
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Incorrect Credentials").wait_for()
            shoot("login-refused")
            assert page.locator("#tab-chat-button").count() == 0
            page.get_by_label("username").fill("alice")  # the form is cleared after a refusal
            page.get_by_label("password").fill("wonderland")
            page.get_by_role("button", name="Login").click()
            page.locator("#tab-chat-button").wait_for()
            shoot("login-accepted")
    finally:
        app.stop()
