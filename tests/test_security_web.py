"""No web page can drive Hearth (issue 14, findings 1, 2, 3, 7 and the API's bad input).

Each test re-runs an attack from the issue against real servers on 127.0.0.1 (`app.py serve --api`, or the API
in this process) with raw HTTP: a foreign Host (DNS rebinding), a foreign Origin, a text/plain "simple" POST,
CORS preflights, wrong logins and keys in bursts, a settings.yaml that binds every interface without a login.
"""
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from api.server import ApiConfig, ApiServer
from conftest import DEFAULT_MODEL, REPO, free_port, start_app
from web.guard import OriginPolicy
from web.throttle import delay_after

ALLOWED_HOST, ALLOWED_ORIGIN, EVIL = "hearth.lan", "http://localhost:3000", "http://evil.example"


@pytest.fixture(scope="module")
def hearth(tmp_path_factory, default_model_dir):
    """`app.py serve --api` with the default model loaded, one allowed host name and one CORS origin."""
    tmp = tmp_path_factory.mktemp("web")
    models = tmp / "models"
    models.mkdir()
    (models / DEFAULT_MODEL).symlink_to(default_model_dir, target_is_directory=True)
    api_port = free_port()
    app = start_app(["--models-dir", str(models), "--model", DEFAULT_MODEL, "--api", "--api-port", str(api_port),
                     "--allowed-hosts", ALLOWED_HOST, "--cors-origins", ALLOWED_ORIGIN], tmp / "app.log")
    app.api = f"http://127.0.0.1:{api_port}"
    yield app
    app.stop()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def loaded_model(hearth) -> str | None:
    return httpx.get(hearth.api + "/v1/internal/model/info", timeout=30).json()["model_name"]


def test_a_rebinding_host_is_refused_by_both_servers_and_known_hosts_are_served(hearth):
    for base, path in ((hearth.url, "/gradio_api/info"), (hearth.url, "/config"), (hearth.url, "/"),
                       (hearth.api, "/v1/models"), (hearth.api, "/v1/internal/model/list")):
        port = port_of(base)
        refused = httpx.get(base + path, headers={"Host": f"evil.example:{port}"}, timeout=30)
        assert refused.status_code == 403, (path, refused.text)
        assert "--allowed-hosts evil.example" in refused.text
        # Gradio used to answer this rebinding page as its own origin
        rebinding = httpx.get(base + path, timeout=30, headers={"Host": f"evil.example:{port}",
                                                                "Origin": f"http://evil.example:{port}"})
        assert rebinding.status_code == 403 and "access-control-allow-origin" not in rebinding.headers
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost",
                     f"{ALLOWED_HOST}:{port}"):
            assert httpx.get(base + path, headers={"Host": host}, timeout=30).status_code == 200, (host, path)
    assert "refused GET /config from 127.0.0.1: Host 'evil.example:" in hearth.output()


def test_a_cross_site_simple_post_cannot_load_unload_or_redirect_chats(hearth):
    attacks = [("/v1/internal/model/load", {"model_name": "x", "loader": "remote",
                                            "args": {"base_url": "http://evil.example/v1", "model": "x"}}),
               ("/v1/internal/model/load", {"model_name": DEFAULT_MODEL, "args": {"trust_remote_code": True,
                                                                                 "allow_pickle": True}}),
               ("/v1/internal/model/unload", {})]
    for path, body in attacks:
        # what a page on any site can send without a preflight: text/plain, with its Origin
        cross_site = httpx.post(hearth.api + path, content=json.dumps(body), timeout=30,
                                headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": EVIL})
        assert cross_site.status_code == 403, cross_site.text
        assert cross_site.json()["error"]["code"] == "forbidden_origin"
        assert "access-control-allow-origin" not in cross_site.headers
        # the same body without a browser's Origin is still not JSON
        untyped = httpx.post(hearth.api + path, content=json.dumps(body), timeout=30,
                             headers={"Content-Type": "text/plain"})
        assert untyped.status_code == 415 and untyped.json()["error"]["code"] == "unsupported_media_type"
    # A local program on a keyless API may not choose them either: they need an admin key
    for body in attacks[0][1], attacks[1][1]:
        local = httpx.post(hearth.api + "/v1/internal/model/load", json=body, timeout=30)
        assert local.status_code == 403 and local.json()["error"]["code"] == "admin_key_required"
        assert "--api-admin-key" in local.json()["error"]["message"]
    # The UI refuses the foreign page too (its queue is how a page would chat or switch the model)
    ui = httpx.post(hearth.url + "/gradio_api/queue/join", content=b"{}", timeout=30,
                    headers={"Content-Type": "text/plain", "Origin": EVIL})
    assert ui.status_code == 403 and "access-control-allow-origin" not in ui.headers
    assert loaded_model(hearth) == DEFAULT_MODEL


def test_cors_preflights_answer_only_allow_listed_origins(hearth):
    for base, path in ((hearth.api, "/v1/chat/completions"), (hearth.url, "/gradio_api/queue/join")):
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        allowed = httpx.options(base + path, headers={"Origin": ALLOWED_ORIGIN, **preflight}, timeout=30)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        foreign = httpx.options(base + path, headers={"Origin": EVIL, **preflight}, timeout=30)
        assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
    # the allowed page's real request is answered with its origin; the app's own page needs no CORS
    listed = httpx.get(hearth.api + "/v1/models", headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    own = httpx.get(hearth.url + "/gradio_api/info", headers={"Origin": hearth.url}, timeout=30)
    assert own.status_code == 200


def test_settings_yaml_binding_every_interface_needs_a_login_and_an_api_key(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("host: 0.0.0.0\n")

    def serve(*args):
        return subprocess.run([sys.executable, str(REPO / "app.py"), "serve", "--settings", str(settings),
                               "--models-dir", str(tmp_path), "--port", str(free_port()), *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    no_login = serve()
    assert no_login.returncode == 2, no_login.stderr
    assert f"host: 0.0.0.0 in {settings} exposes Hearth to your network" in no_login.stderr
    assert "--gradio-auth" in no_login.stderr and "--insecure-listen" in no_login.stderr
    no_key = serve("--gradio-auth", "u:p", "--api", "--api-port", str(free_port()))
    assert no_key.returncode == 2 and "without a key: pass --api-key" in no_key.stderr
    bad_entries = serve("--cors-origins", "http://localhost:3000/app")   # what browsers send has no path
    assert bad_entries.returncode == 1 and bad_entries.stderr.strip().splitlines() == [
        "error: --cors-origins: CORS origin 'http://localhost:3000/app' must look like http://host[:port] (what "
        "browsers send as Origin: a scheme and a host, no path), 'null', or a pattern such as http://localhost:*"]
    settings.write_text("allowed_hosts: [http://hearth.lan]\n")
    assert "allowed_hosts: allowed host 'http://hearth.lan' must be a bare host name" in serve().stderr


def test_policy_rules():
    local = OriginPolicy.build("127.0.0.1", ["Hearth.LAN"], ["http://localhost:3000", "https://*.example.org"])
    assert all(local.host_allowed(h) for h in ("127.0.0.1:7860", "localhost", "[::1]:7860", "hearth.lan:80",
                                               "HEARTH.LAN", ""))
    assert not any(local.host_allowed(h) for h in ("evil.example:7860", "192.168.1.5", "localhost.evil.example"))
    assert local.origin_allowed("http://127.0.0.1:7860", "127.0.0.1:7860")        # the app's own page
    assert local.origin_allowed("http://localhost:3000", "127.0.0.1:7860")         # allow-listed
    assert local.origin_allowed("https://chat.example.org", "127.0.0.1:7860")      # a listed pattern
    assert not local.origin_allowed("http://localhost:7860", "127.0.0.1:7860")     # same machine, other origin
    assert not local.origin_allowed("null", "127.0.0.1:7860")
    everywhere = OriginPolicy.build("0.0.0.0")
    assert everywhere.host_allowed("192.168.1.5:7860")     # an address cannot be rebound
    assert not everywhere.host_allowed("evil.example:7860")
    with pytest.raises(ValueError, match="no path"):
        OriginPolicy.build("127.0.0.1", cors_origins=["http://localhost:3000/app"])
    with pytest.raises(ValueError, match="bare host name"):
        OriginPolicy.build("127.0.0.1", allowed_hosts=["http://hearth.lan"])


def _burst(n: int, send) -> tuple[float, list]:
    """Send n attempts at once; how long until the last answer came, and the answers."""
    answers: list = [None] * n

    def one(i):
        answers[i] = send()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return time.monotonic() - started, answers


def test_wrong_ui_logins_are_slowed_per_address_and_logged(tmp_path, models_dir):
    app = start_app(["--models-dir", str(models_dir), "--gradio-auth", "alice:wonderland"], tmp_path / "app.log")
    try:
        def login(password):
            return httpx.post(app.url + "/login", data={"username": "alice", "password": password}, timeout=120)

        # 4 guesses in parallel are checked one after the other, each waiting for the previous failure's delay
        started = time.monotonic()
        elapsed, answers = _burst(4, lambda: login("guess"))
        assert [a.status_code for a in answers] == [400] * 4
        assert elapsed >= sum(delay_after(n) for n in range(1, 4)), elapsed
        assert login("wonderland").status_code == 200       # the right password still works, after the wait
        assert time.monotonic() - started >= sum(delay_after(n) for n in range(1, 5))
        failures = [line for line in app.output().splitlines()
                    if line.startswith("warning: UI login failed from 127.0.0.1")]
        assert len(failures) == 4, app.output()
        assert "(4 in a row); its next attempt waits 4.0 s" in failures[-1]
    finally:
        app.stop()


def test_wrong_api_keys_are_slowed_per_address_and_logged(models_dir, caplog):
    from conftest import make_state

    server = ApiServer(make_state(models_dir), ApiConfig(port=free_port(), api_key="right-key")).start()
    try:
        def models(key):
            return httpx.get(server.url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=120)

        with caplog.at_level("WARNING", logger="web.throttle"):
            elapsed, answers = _burst(4, lambda: models("guess"))
        assert [a.status_code for a in answers] == [401] * 4
        assert elapsed >= sum(delay_after(n) for n in range(1, 4)), elapsed
        failures = [r.getMessage() for r in caplog.records if r.name == "web.throttle"]
        assert len(failures) == 4 and all(m.startswith("API key failed from 127.0.0.1") for m in failures)
        assert models("right-key").status_code == 200
        assert models("right-key").status_code == 200   # a success resets the count: no wait any more
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keyless_api(loaded_state):
    server = ApiServer(loaded_state, ApiConfig(port=free_port())).start()
    yield server
    server.stop()


@pytest.mark.parametrize("path, body", [
    ("/completions", {"model": DEFAULT_MODEL, "prompt": "", "max_tokens": 4}),
    ("/completions", {"model": DEFAULT_MODEL, "prompt": [""], "max_tokens": 4}),
    ("/chat/completions", {"model": DEFAULT_MODEL, "messages": [], "max_tokens": 4}),
    ("/chat/completions", {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/completions", {"model": DEFAULT_MODEL, "prompt": "hi \udfff there", "max_tokens": 4}),
    ("/chat/completions", {"model": "m" * 300, "messages": [{"role": "user", "content": "hi"}]}),
    ("/chat/completions", {"model": DEFAULT_MODEL + "\n", "messages": [{"role": "user", "content": "hi"}]}),
    ("/internal/model/load", {"model_name": "m" * 300}),
    ("/internal/model/load", {"model_name": "name\n"}),
    ("/internal/token-count", {"text": "\ud800"}),
])
def test_bad_input_is_a_400_in_openai_shape(keyless_api, loaded_state, path, body):
    # json.dumps writes lone surrogates as the \ud800 escapes a client would send
    reply = httpx.post(keyless_api.url + path, content=json.dumps(body), timeout=60,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert loaded_state.model is not None and loaded_state.model.name == DEFAULT_MODEL


def test_deeply_nested_json_is_a_400(keyless_api):
    for depth in (100_000, 100):
        body = '{"model": "%s", "prompt": "hi", "extra": %s%s}' % (DEFAULT_MODEL, "[" * depth, "]" * depth)
        reply = httpx.post(keyless_api.url + "/completions", content=body, timeout=60,
                           headers={"Content-Type": "application/json"})
        assert reply.status_code == 400, reply.text
        assert "nests more than" in reply.json()["error"]["message"]
