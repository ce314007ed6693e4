"""The Gradio app: assembles the tabs around one AppState and serves it behind web/'s Host and Origin checks."""
from __future__ import annotations

import socket
import sys
import threading
import time

import gradio as gr
import uvicorn
from fastapi import FastAPI
from starlette.middleware import Middleware

from app_state import StartupLoad
from ui.chat_tab import build_chat_tab
from ui.download_tab import build_download_tab
from ui.model_tab import build_model_tab
from web.guard import OriginPolicy, guard_middleware
from web.throttle import FailureThrottle, LoginThrottle

LOGIN_PATHS = ("/login", "/login/")   # where Gradio's login form posts
SERVER_START_WAIT_S = 60.0            # the start-up load begins then even if the server never said it started


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
        chat_tab["page_load"](demo)
        _follow_startup_load(state, demo, page_load, page_outputs, chat_tab)
    return demo


def _follow_startup_load(state, demo: gr.Blocks, page_load, page_outputs, chat_tab: dict) -> None:
    """While the start-up model loads, its progress shows in the Model tab's status and the chat header,
    updated every second; when the load ends both tabs show the loaded model (or why it failed) and the
    timer stops."""
    if state.startup is None:
        return
    # Inactive until a page that opens during the load starts it: a page opened later must not get the final
    # refresh, which would reset what the user set meanwhile (the sliders of a preset picked at once).
    timer = gr.Timer(1.0, active=False)
    demo.load(lambda: gr.Timer(active=not state.startup.finished.is_set()), None, [timer], queue=False)
    refresh_outputs = chat_tab["refresh_outputs"]   # the chat header (template line) comes first

    def tick():
        startup = state.startup
        line = startup.line()
        if not startup.finished.is_set():
            return gr.Timer(active=True), gr.skip(), line, line, *[gr.skip()] * (len(refresh_outputs) - 1)
        dropdown, status = page_load()
        return (gr.Timer(active=False), dropdown, f"{line}<br>{status}" if line else status,
                *chat_tab["refresh"]())

    timer.tick(tick, None, [timer, *page_outputs, *refresh_outputs], queue=False, show_progress="hidden")


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
    """Serve the UI on settings.host:settings.port until stopped, behind a login when `auth` lists (user,
    password) pairs. The start-up model (if any) loads in the background once the server answers, so the
    page is there at once and shows the load's progress."""
    state.file_problems()   # logs each problem with a user file once (core.diagnostics); the UI lists them too
    if state.settings.model:   # set before the UI is built, so the pages know a load is coming
        state.startup = StartupLoad(state.settings.model)
    demo = build_ui(state)
    # Generation is serialized by AppState; the queue lets many sessions wait without holding threads.
    demo.queue(default_concurrency_limit=4)
    app = build_app(state, demo, auth)
    host, port = state.settings.host, state.settings.port
    sock = _listening_socket(host, port)
    print(f"Hearth UI on http://{host}:{port}", file=sys.stderr)
    # Open streams would hold a graceful shutdown forever; a few seconds lets finished replies go out.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    if state.settings.model:
        print(f"start-up model {state.settings.model}: loading in the background", file=sys.stderr)
        threading.Thread(target=_load_when_serving, args=(state, server), name="hearth-startup",
                         daemon=True).start()
    server.run(sockets=[sock])


def _load_when_serving(state, server: uvicorn.Server) -> None:
    """Start the start-up load once the server accepts connections: on a busy machine both compete for the
    same cores, and the page comes first."""
    deadline = time.monotonic() + SERVER_START_WAIT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    name = state.settings.model
    startup = state.load_at_startup(name, lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr))
    startup.finished.wait()
    if startup.error is None:
        print(f"loaded {state.model.name} ({state.model.runtime})", file=sys.stderr)
    else:  # the UI shows it too; the user can pick another model
        print(f"error: could not load {name}: {startup.error}", file=sys.stderr)
