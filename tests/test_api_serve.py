"""Starting the API (refused beyond loopback without a key) and its admin routes (load, unload a model)."""
import subprocess
import sys

import httpx
import openai
import pytest

from api.auth import ApiConfigError
from web.guard import is_loopback
from api.server import ApiConfig, ApiServer
from conftest import DEFAULT_MODEL, REPO, free_port, make_state

USER_KEY, ADMIN_KEY = "user-key", "admin-key"


def test_serve_refuses_a_public_api_without_a_key(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "app.py"), "serve", "--listen", "--gradio-auth", "u:p",
                          "--api", "--api-port", str(free_port()), "--models-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "without a key: pass --api-key" in run.stderr


def test_exposure_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    with pytest.raises(ApiConfigError, match="--api-key"):
        ApiServer(make_state(REPO / "models"), ApiConfig(host="0.0.0.0", port=free_port()))


def test_a_taken_port_is_a_clear_error(models_dir):
    state = make_state(models_dir)
    first = ApiServer(state, ApiConfig(port=free_port())).start()
    try:
        with pytest.raises(ApiConfigError, match="--api-port"):
            ApiServer(state, ApiConfig(port=first.config.port)).start(timeout=10)
    finally:
        first.stop()


def test_admin_key_loads_and_unloads_models(models_dir):
    state = make_state(models_dir)
    server = ApiServer(state, ApiConfig(port=free_port(), api_key=USER_KEY, admin_key=ADMIN_KEY)).start()
    try:
        user = openai.OpenAI(base_url=server.url, api_key=USER_KEY, max_retries=0, timeout=120)
        admin = openai.OpenAI(base_url=server.url, api_key=ADMIN_KEY, max_retries=0, timeout=120)
        assert user.models.list().data == []
        with pytest.raises(openai.BadRequestError, match="no model is loaded"):
            user.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.PermissionDeniedError):
            user.post("/internal/model/load", cast_to=dict, body={"model_name": DEFAULT_MODEL})
        unauthenticated = httpx.post(server.url + "/internal/model/unload", timeout=30)
        assert unauthenticated.status_code == 401
        with pytest.raises(openai.BadRequestError, match="no model named 'missing'"):
            admin.post("/internal/model/load", cast_to=dict, body={"model_name": "missing"})
        assert user.get("/internal/model/list", cast_to=dict)["model_names"] == [DEFAULT_MODEL]

        info = admin.post("/internal/model/load", cast_to=dict, body={"model_name": DEFAULT_MODEL})
        assert info["model_name"] == DEFAULT_MODEL and info["context_length"] == 8192
        assert [m.id for m in user.models.list().data] == [DEFAULT_MODEL]
        assert admin.post("/internal/model/unload", cast_to=dict) == {"unloaded": True, "stopped_generations": 0}
        assert state.model is None and user.models.list().data == []
    finally:
        server.stop()
        state.unload_model()


def test_unknown_routes_answer_in_openai_shape(models_dir):
    server = ApiServer(make_state(models_dir), ApiConfig(port=free_port())).start()
    try:
        missing = httpx.get(server.url + "/engines", timeout=30)
        assert missing.status_code == 404 and "GET /v1/engines" in missing.json()["error"]["message"]
        wrong_method = httpx.get(server.url + "/chat/completions", timeout=30)
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    finally:
        server.stop()
