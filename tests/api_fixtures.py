"""An API server over the shared loaded default model, with the openai client and raw HTTP against it.

Test modules import the fixtures by name: `from api_fixtures import api, client, http  # noqa: F401`; each module
gets its own server (module scope)."""
from __future__ import annotations

import httpx
import openai
import pytest

from api.server import ApiConfig, ApiServer
from conftest import free_port


@pytest.fixture(scope="module")
def api(loaded_state):
    server = ApiServer(loaded_state, ApiConfig(port=free_port())).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(api):
    with httpx.Client(base_url=api.url.removesuffix("/v1"), timeout=300) as client:
        yield client
