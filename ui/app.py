"""The Gradio app: assembles the tabs around one AppState and serves it behind web/'s Host and Origin checks."""
from __future__ import annotations

import socket
import sys

import gradio as gr
import uvicorn
from fastapi import FastAPI
from starlette.middleware import Middleware

from loaders.base import LoadError
from ui.chat_tab import build_chat_tab
from ui.download_tab import build_download_tab
from ui.model_tab import build_model_tab
from web.guard import OriginPolicy, guard_middleware
from web.throttle import FailureThrottle, LoginThrottle

LOGIN_PATHS = ("/login", "/login/")   # where Gradio's login form posts


def build_ui(state) -> gr.Blocks:
    with gr.Blocks(title="Hearth") as demo:
        gr.Markdown("# 🔥 Hearth")
        chat_tab = build_chat_tab(state)
        model_tab = build_model_tab(state)
        build_download_tab(state, on_models_changed=model_tab["model_dropdown"])
        # A newly loaded model brings its own template, system message and saved preset to the chat tab.
        for event in model_tab["model_changed"]:
            event.then(chat_tab["refresh"], None, chat_tab["refresh_outputs"], queue=False)
        # Every page load (a second browser tab, a reload) shows the app's state now, not the page's at start.
        page_load, page_outputs = model_tab["page_load"]
        demo.load(page_load, None, page_outputs, queue=False)
        demo.load(chat_tab["refresh"], None, chat_tab["refresh_outputs"], queue=False)
    return demo


def build_app(state, demo: gr.Blocks, auth: list[tuple[str, str]] | None) -> FastAPI:
    """Gradio mounted on an app of ours, so that our middleware runs first: `demo.launch` puts Gradio's own
    CORS layer outermost, and that layer answers foreign origins. With a CORSMiddleware on the parent app
    Gradio adds no CORS headers of its own (documented in gr.mount_gradio_app)."""
    settings = state.settings
    policy = OriginPolicy.build(settings.host, settings.allowed_hosts, settings.cors_origins)
    # Outermost first: refused Hosts and Origins never reach the login throttle or Gradio.
    middleware = [*guard_middleware(policy, credentials=True),
                  Middleware(LoginThrottle, throttle=FailureThrottle("UI login"), paths=LOGIN_PATHS)]
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, middleware=middleware)
    return gr.mount_gradio_app(app, demo, path="/", server_name=settings.host, server_port=settings.port,
                               auth=auth, auth_message="Hearth: log in" if auth else None, ssr_mode=False,
                               show_error=False)


def _listening_socket(host: str, port: int) -> socket.socket:
    """Bind before serving, so a taken port is one clear line rather than a uvicorn traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"error: the UI cannot listen on {host}:{port} ({exc.strerror}); pick another port "
                         "with --port")
    return sock


def launch(state, auth: list[tuple[str, str]] | None = None) -> None:
    """Load the start-up model (if any), then serve the UI on settings.host:settings.port until stopped,
    behind a login when `auth` lists (user, password) pairs."""
    if state.settings.model:
        try:
            model = state.load_model(state.settings.model,
                                     progress=lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr))
            print(f"loaded {model.name} ({model.runtime})", file=sys.stderr)
        except LoadError as exc:  # the UI still starts, so the user can pick another model
            print(f"error: could not load {state.settings.model}: {exc}", file=sys.stderr)
    for problem in state.file_problems():  # shown in the UI too; the log is for users who read the terminal
        print(f"warning: {problem}", file=sys.stderr)
    demo = build_ui(state)
    # Generation is serialized by AppState; the queue lets many sessions wait without holding threads.
    demo.queue(default_concurrency_limit=4)
    app = build_app(state, demo, auth)
    host, port = state.settings.host, state.settings.port
    sock = _listening_socket(host, port)
    print(f"Hearth UI on http://{host}:{port}", file=sys.stderr)
    # Open streams would hold a graceful shutdown forever; a few seconds lets finished replies go out.
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])
