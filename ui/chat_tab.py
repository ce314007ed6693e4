"""Text Generation tab: a streamed chat through the model's template, with Stop and the usual edits."""
from __future__ import annotations

import gradio as gr

from engine.sampling import GenerationParams
from loaders.base import LoadError
from loaders.options import OptionError
from prompts import chat_session
from ui.widgets import values_from, widgets_for


def build_chat_tab(state) -> dict:
    with gr.Tab("Text Generation", elem_id="tab-chat"):
        chatbot = gr.Chatbot(elem_id="chatbot", height=480, label="Chat")
        with gr.Row():
            message = gr.Textbox(placeholder="Send a message (Enter)", show_label=False, elem_id="chat-input",
                                 scale=6, autofocus=True)
            send_btn = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
            stop_btn = gr.Button("Stop", variant="stop", elem_id="chat-stop", scale=1)
        with gr.Row():
            regen_btn = gr.Button("Regenerate", elem_id="chat-regenerate")
            continue_btn = gr.Button("Continue", elem_id="chat-continue")
            remove_btn = gr.Button("Remove last", elem_id="chat-remove-last")
            clear_btn = gr.Button("Clear", elem_id="chat-clear")
        status = gr.Markdown("", elem_id="chat-status")
        system_message = gr.Textbox(label="System message", lines=2, elem_id="system-message",
                                    placeholder="Leave empty to use the template's default")
        with gr.Accordion("Generation parameters", open=False):
            param_widgets = widgets_for(GenerationParams, state.settings.generation, elem_prefix="gen-")
    params_in = list(param_widgets.values())

    def params_of(values) -> GenerationParams:
        return state.generation_params(**values_from(GenerationParams, list(values)))

    def run(action, history, *args, request: gr.Request | None = None):
        """Stream an action from prompts.chat_session into the chatbot and the status line."""
        key = request.session_hash if request is not None else "default"
        try:
            for new_history, reply in action(history, key, *args):
                yield new_history, reply.text if not reply.error else f"⚠️ {reply.text}"
        except (LoadError, OptionError, ValueError) as exc:
            yield history, f"⚠️ {exc}"

    def on_send(text, history, system, *values, request: gr.Request):
        if not text or not text.strip():
            yield history, "", "Type a message first."
            return
        params = None
        try:
            params = params_of(values)
        except OptionError as exc:
            yield history, text, f"⚠️ {exc}"
            return
        yield history + [{"role": "user", "content": text}], "", "queued…"
        for h, s in run(lambda hist, key: chat_session.send(state, hist, text, params, key, system or None),
                        history, request=request):
            yield h, "", s

    def on_regenerate(history, system, *values, request: gr.Request):
        params = params_of(values)
        yield from run(lambda hist, key: chat_session.regenerate(state, hist, params, key, system or None),
                       history, request=request)

    def on_continue(history, system, *values, request: gr.Request):
        params = params_of(values)
        yield from run(lambda hist, key: chat_session.continue_reply(state, hist, params, key, system or None),
                       history, request=request)

    def on_stop(request: gr.Request):
        return "stopping…" if state.stop(request.session_hash) else "nothing is generating"

    send_args = dict(inputs=[message, chatbot, system_message, *params_in], outputs=[chatbot, message, status],
                     concurrency_id="generate", concurrency_limit=None)
    message.submit(on_send, **send_args)
    send_btn.click(on_send, **send_args)
    regen_btn.click(on_regenerate, [chatbot, system_message, *params_in], [chatbot, status],
                    concurrency_id="generate")
    continue_btn.click(on_continue, [chatbot, system_message, *params_in], [chatbot, status],
                       concurrency_id="generate")
    stop_btn.click(on_stop, None, [status], queue=False)
    remove_btn.click(chat_session.remove_last, [chatbot], [chatbot], queue=False)
    clear_btn.click(lambda: ([], ""), None, [chatbot, status], queue=False)
    return {"chatbot": chatbot}
