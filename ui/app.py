"""The Gradio app: assembles the tabs around one AppState and launches it."""
from __future__ import annotations

import sys

import gradio as gr

from loaders.base import LoadError
from ui.chat_tab import build_chat_tab
from ui.download_tab import build_download_tab
from ui.model_tab import build_model_tab


def build_ui(state) -> gr.Blocks:
    with gr.Blocks(title="Hearth") as demo:
        gr.Markdown("# 🔥 Hearth")
        chat_tab = build_chat_tab(state)
        model_tab = build_model_tab(state)
        build_download_tab(state, on_models_changed=model_tab["model_dropdown"])
        # A newly loaded model brings its own template, system message and saved preset to the chat tab.
        for event in model_tab["model_changed"]:
            event.then(chat_tab["refresh"], None, chat_tab["refresh_outputs"], queue=False)
    return demo


def launch(state, block: bool = True, auth: list[tuple[str, str]] | None = None):
    """Load the start-up model (if any), then serve the UI on settings.host:settings.port, behind a login
    when `auth` lists (user, password) pairs."""
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
    print(f"Hearth UI on http://{state.settings.host}:{state.settings.port}", file=sys.stderr)
    demo.launch(server_name=state.settings.host, server_port=state.settings.port, share=False, ssr_mode=False,
                inbrowser=False, prevent_thread_lock=not block, quiet=True, auth=auth,
                auth_message="Hearth: log in" if auth else None)
    return demo
