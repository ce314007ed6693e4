"""Model tab: pick a model, see which loader fits and why, set its options, load / unload / reload."""
from __future__ import annotations

import gradio as gr

from loaders.base import LoadError
from loaders.options import OptionError
from ui.widgets import values_from, widgets_for


def build_model_tab(state) -> dict:
    """Returns the components other tabs need (the model dropdown, to refresh after a download)."""
    loader_names = state.registry.names()
    with gr.Tab("Model", elem_id="tab-model"):
        with gr.Row():
            model_dd = gr.Dropdown(choices=state.list_models(), value=None, label="Model", elem_id="model-select",
                                   scale=4)
            refresh_btn = gr.Button("🔄 Refresh", elem_id="model-refresh", scale=0, min_width=100)
        with gr.Row():
            loader_dd = gr.Dropdown(choices=loader_names, value=loader_names[0] if loader_names else None,
                                    label="Loader", elem_id="loader-select", scale=1)
            reason_md = gr.Markdown("Pick a model to see which loader fits it.", elem_id="loader-reason")
        option_groups, option_widgets = {}, {}
        for name in loader_names:
            loader = state.registry.get(name)
            with gr.Group(visible=(name == loader_names[0])) as group:
                gr.Markdown(f"**{name}**: {loader.description}")
                option_widgets[name] = widgets_for(loader.options_type, elem_prefix=f"opt-{name}-")
            option_groups[name] = group
        with gr.Row():
            load_btn = gr.Button("Load", variant="primary", elem_id="model-load")
            unload_btn = gr.Button("Unload", elem_id="model-unload")
            reload_btn = gr.Button("Reload", elem_id="model-reload")
        status_md = gr.Markdown(_status(state), elem_id="model-status")

    def on_select(name):
        if not name:
            return gr.update(), "Pick a model to see which loader fits it."
        try:
            found = state.detect(name)
        except LoadError as exc:
            return gr.update(), f"⚠️ {exc}"
        if not found:
            return gr.update(), "⚠️ No loader can read this folder."
        best = found[0]
        others = "".join(f"<br>also possible: {d.loader} ({d.reason})" for d in found[1:])
        return gr.update(value=best.loader), f"**{best.loader}** picked: {best.reason}{others}"

    def on_loader(name):
        return [gr.update(visible=(n == name)) for n in loader_names]

    flat_widgets = [w for name in loader_names for w in option_widgets[name].values()]

    def options_of(loader, values):
        offset = 0
        for name in loader_names:
            n = len(option_widgets[name])
            if name == loader:
                return values_from(state.registry.get(name).options_type, list(values[offset:offset + n]))
            offset += n
        return {}

    def on_load(name, loader, *values, progress=gr.Progress()):
        if not name:
            return "⚠️ Pick a model first."
        try:
            model = state.load_model(name, loader, options_of(loader, values),
                                     lambda f, m: progress(f, desc=m))
        except (LoadError, OptionError) as exc:
            return f"⚠️ {exc}"
        return f"✅ Loaded **{model.name}** · {model.runtime} · context {model.context_length} tokens"

    def on_unload():
        state.unload_model()
        return _status(state)

    def on_reload(loader, *values, progress=gr.Progress()):
        current = state.model
        if current is None:
            return "⚠️ No model is loaded."
        return on_load(current.name, loader, *values, progress=progress)

    model_dd.change(on_select, [model_dd], [loader_dd, reason_md])
    loader_dd.change(on_loader, [loader_dd], list(option_groups.values()))
    refresh_btn.click(lambda: gr.update(choices=state.list_models()), None, [model_dd])
    load_btn.click(on_load, [model_dd, loader_dd, *flat_widgets], [status_md], concurrency_id="model")
    unload_btn.click(on_unload, None, [status_md], concurrency_id="model")
    reload_btn.click(on_reload, [loader_dd, *flat_widgets], [status_md], concurrency_id="model")
    return {"model_dropdown": model_dd, "status": status_md}


def _status(state) -> str:
    model = state.model
    if model is None:
        return "No model loaded."
    return f"✅ Loaded **{model.name}** · {model.runtime} · context {model.context_length} tokens"
