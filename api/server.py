"""Run the API with uvicorn in a background thread, beside the Gradio UI in the same process and AppState."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from api.auth import ApiConfigError, KeyCheck, check_exposure
from api.routes import create_app
from web.guard import OriginPolicy


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    api_key: str | None = None
    admin_key: str | None = None    # loads and unloads models; defaults to api_key
    allowed_hosts: tuple[str, ...] = ()   # Host names besides loopback and `host` (web/guard.py)
    cors_origins: tuple[str, ...] = ()    # browser origins that may call the API


class ApiServer:
    """One uvicorn server over `state`. Refuses (ApiConfigError) to listen beyond loopback without a key."""

    def __init__(self, state, config: ApiConfig):
        check_exposure(config.host, config.api_key)
        self.config = config
        try:
            policy = OriginPolicy.build(config.host, config.allowed_hosts, config.cors_origins)
        except ValueError as exc:
            raise ApiConfigError(str(exc)) from None
        app = create_app(state, KeyCheck(config.api_key, config.admin_key), policy)
        # Each streaming request ends with a client that may idle; the short keep-alive frees its socket soon.
        self._server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                                     access_log=False, timeout_keep_alive=5, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.config.port}/v1"

    def _bind(self) -> socket.socket:
        """Bind here rather than inside uvicorn, so a taken port is an error the caller sees, not a dead thread."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise ApiConfigError(f"the API cannot listen on {self.config.host}:{self.config.port} ({exc.strerror}); "
                                 "pick another port with --api-port") from None
        return sock

    def start(self, timeout: float = 30.0) -> "ApiServer":
        """Serve in a daemon thread; returns once the socket listens, ApiConfigError when it cannot."""
        sock = self._bind()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="hearth-api")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ApiConfigError(f"the API did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
