"""Model tab: pick a model, see which loader fits and why, set its options, load / unload / reload, and
save per-model settings that are re-applied whenever the model is selected or loaded.

What it shows is the app's state, not what the page held when it was built: every page load (a new
browser tab, a reload) selects the loaded model and shows its runtime (`page_load`)."""
from __future__ import annotations

import gradio as gr

from loaders.base import LoadError
from loaders.model_settings import describe_sources, settings_to_save
from core.options import OptionError
from ui.lora_panel import applied_line, build_lora_panel
from ui.widgets import values_from, widgets_for


def _preset_names() -> list[str]:
    from prompts.presets import load_presets

    return load_presets().names()


def build_model_tab(state) -> dict:
    """Returns the components other tabs need (the model dropdown, to refresh after a download), the events
    after which the loaded model or its settings may differ, and `page_load` (fn, outputs) for ui/app.py to
    run on every page load."""
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
        lora_refresh, lora_outputs = build_lora_panel(state, status_md, lambda: _status(state))["refresh"]
        # per-model settings, saved to models/config-user.yaml.
        with gr.Accordion("Per-model settings", open=True, elem_id="model-settings"):
            gr.Markdown("Context length is the loader option above; saving stores it for this model too.")
            with gr.Row():
                template_dd = gr.Dropdown(choices=[""] + state.template_library.names(), value="", allow_custom_value=True,
                                          label="Instruction template",
                                          info="empty = the model's own chat template", elem_id="model-template")
                preset_dd = gr.Dropdown(choices=[""] + _preset_names(), value="", label="Preset",
                                        info="empty = settings.yaml generation values", elem_id="model-preset")
            system_tb = gr.Textbox(value="", lines=2, label="System message", info="empty = the template's default",
                                   elem_id="model-system-message")
            save_btn = gr.Button("Save settings for this model", elem_id="model-save-settings")
            save_md = gr.Markdown("", elem_id="model-save-status")
            sources_md = gr.Markdown("", elem_id="model-settings-sources")

    flat_widgets = [w for name in loader_names for w in option_widgets[name].values()]
    settings_widgets = [template_dd, preset_dd, system_tb]

    def sources_table(name: str) -> str:
        rows = describe_sources(state.effective_settings(name))
        problems = "".join(f"\n\n⚠️ {p}" for p in state.settings_store.problems)
        return ("| setting | value | from |\n|---|---|---|\n"
                + "\n".join(f"| {k} | {'' if v is None else str(v).replace('|', '/')} | {s} |" for k, v, s in rows)
                + problems)

    def on_select(name):
        unchanged = [gr.update()] * (len(flat_widgets) + len(settings_widgets) + 1)
        if not name:
            return [gr.update(), "Pick a model to see which loader fits it.", *unchanged]
        try:
            found = state.detect(name)
            if not found:
                problems = "; ".join(state.registry.problems(state.model_dir(name)))
                return [gr.update(), f"⚠️ No loader can read this folder. {problems}{_unavailable(state)}",
                        *unchanged]
            effective = state.effective_settings(name)
        except LoadError as exc:
            return [gr.update(), f"⚠️ {exc}", *unchanged]
        best = found[0]
        others = "".join(f"<br>also possible: {d.loader} ({d.reason})" for d in found[1:])
        chosen = effective["loader"].value
        # Re-apply the effective (saved > metadata > default) values to the chosen loader's widgets.
        option_updates = [gr.update(value=effective["loader_options"][opt].value)
                          if n == chosen and opt in effective["loader_options"] else gr.update()
                          for n in loader_names for opt in option_widgets[n]]
        saved = state.settings_store.get(name)
        return [gr.update(value=chosen), f"**{best.loader}** picked: {best.reason}{others}{_unavailable(state)}",
                *option_updates,
                gr.update(value=saved.get("instruction_template", "")),
                gr.update(value=saved.get("preset", "")), gr.update(value=saved.get("system_message", "")),
                sources_table(name)]

    def on_loader(name):
        return [gr.update(visible=(n == name)) for n in loader_names]

    def options_of(loader, values):
        offset = 0
        for name in loader_names:
            n = len(option_widgets[name])
            if name == loader:
                return values_from(state.registry.get(name).options_type, list(values[offset:offset + n]))
            offset += n
        return {}

    def on_load(name, loader, *values, progress=gr.Progress()):
        if not name and state.needs_model_folder(loader):  # the remote loader needs no local folder
            return "⚠️ Pick a model first."
        try:
            state.load_model(name, loader, options_of(loader, values), lambda f, m: progress(f, desc=m))
        except (LoadError, OptionError) as exc:
            return f"⚠️ {exc}"
        return _status(state)   # the model just loaded, with the adapters saved for it

    def on_unload():
        stopped = state.unload_model()   # generations on the model end first
        return _status(state) + (f" (stopped {stopped} running generation(s) first)" if stopped else "")

    def on_reload(loader, *values, progress=gr.Progress()):
        current = state.model
        if current is None:
            return "⚠️ No model is loaded."
        return on_load(current.name, loader, *values, progress=progress)

    def on_save(name, loader, *values):
        if not name:
            return "⚠️ Pick a model first.", gr.update()
        option_values, (template, preset, system) = values[:len(flat_widgets)], values[len(flat_widgets):]
        try:
            entry = settings_to_save(loader, options_of(loader, option_values), template, preset, system,
                                     state.settings_store.get(name), state.effective_settings(name)["context_length"])
            if state.model is not None and state.model.name == name:   # the adapters applied now are saved too
                entry["loras"] = state.applied_loras() or None
            state.save_model_settings(name, entry)
        except (LoadError, ValueError, OSError) as exc:
            return f"⚠️ could not save: {exc}", gr.update()
        return f"✅ Saved settings for **{name}** in config-user.yaml", sources_table(name)

    # Quick handlers skip Gradio's queue: its browser client can lose a queued event's result when the event
    # joins just as the session's stream closes (a page's load events had just finished), leaving the
    # dropdown under a spinner for good. Loads, unloads and saves stay queued, one at a time.
    model_dd.change(on_select, [model_dd], [loader_dd, reason_md, *flat_widgets, *settings_widgets, sources_md],
                    api_name="select_model", queue=False)
    model_dd.change(lora_refresh, None, lora_outputs, queue=False)   # also on each page load (selects the loaded model)
    loader_dd.change(on_loader, [loader_dd], list(option_groups.values()), queue=False)
    refresh_btn.click(lambda: gr.update(choices=state.list_models()), None, [model_dd], queue=False)
    loaded = [
        load_btn.click(on_load, [model_dd, loader_dd, *flat_widgets], [status_md], concurrency_id="model",
                       api_name="load_model"),
        unload_btn.click(on_unload, None, [status_md], concurrency_id="model", api_name="unload_model"),
        reload_btn.click(on_reload, [loader_dd, *flat_widgets], [status_md], concurrency_id="model"),
    ]
    for event in loaded:   # a load applies the adapters saved for the model; an unload drops them
        event.then(lora_refresh, None, lora_outputs, queue=False)
    saved = save_btn.click(on_save, [model_dd, loader_dd, *flat_widgets, *settings_widgets], [save_md, sources_md],
                           api_name="save_model_settings")

    def page_load():
        """The loaded model selected (which fills the loader, its options and the settings table through
        the dropdown's change event) and its status line."""
        model = state.model
        names = state.list_models()
        selected = model.name if model is not None and model.model_dir is not None and model.name in names else None
        return gr.update(choices=names, value=selected), _status(state)

    # `model_changed`: events after which the loaded model or its settings may differ (other tabs chain their
    # refresh on them).
    return {"model_dropdown": model_dd, "status": status_md, "model_changed": [*loaded, saved],
            "page_load": (page_load, [model_dd, status_md])}


def _unavailable(state) -> str:
    """Loaders that cannot load anything yet, and why (llama.cpp while llama-cpp-python builds in the background:
    shown again at each pick, so the elapsed time moves on)."""
    lines = []
    for name in state.registry.names():
        why = getattr(state.registry.get(name), "unavailable", lambda: None)()
        if why:
            lines.append(f"<br>⏳ {name}: {why}")
    return "".join(lines)


def _status(state) -> str:
    model = state.model
    if model is None:
        return "No model loaded."
    applied = state.applied_loras()
    return _loaded_line(model) + (" · LoRA " + applied_line(applied).removeprefix("Applied: ") if applied else "")


def _loaded_line(model) -> str:
    # model.memory: the loader's KV cache and weights estimate ("" for a model that holds nothing here).
    return (f"✅ Loaded **{model.name}** · {model.runtime} · context {model.context_length} tokens"
            + (f" · {model.memory}" if model.memory else ""))
