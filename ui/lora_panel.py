"""The Model tab's LoRA section: the adapters in models/ with their base model and whether they fit the loaded
model, a weight for each adapter picked, Apply / Remove, and the set applied now.

Applying changes the loaded model in place (no reload). "Save settings for this model" stores the applied set
with the model's other settings (ui/model_tab.py), to be applied again at each load."""
from __future__ import annotations

import gradio as gr

from loaders.base import LoadError
from loaders.lora_apply import fit_problems


def applied_line(applied: dict[str, float]) -> str:
    if not applied:
        return "No LoRA adapters applied."
    return "Applied: " + ", ".join(f"**{name}** ×{weight:g}" for name, weight in applied.items())


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def build_lora_panel(state, status_md: gr.Markdown, status_line) -> dict:
    """The section, inside the Model tab. status_md / status_line(): the tab's status line, shown anew after
    Apply and Remove (it names the applied adapters). Returns `refresh` (fn, outputs) for the tab to run
    whenever the model or the models folder may have changed."""
    with gr.Accordion("LoRA adapters", open=True, elem_id="lora-panel"):
        table_md = gr.Markdown("", elem_id="lora-list")
        select = gr.Dropdown(choices=[], value=[], multiselect=True, label="Adapters to apply",
                             info="applied together, each at its own weight (0 = none of it)", elem_id="lora-select")

        # One weight box per picked adapter; the listeners that read them are attached here too, since the
        # boxes exist only from one render to the next.
        @gr.render(inputs=[select], queue=False)   # quick handlers skip the queue (ui/model_tab.py says why)
        def weight_boxes(names):
            applied = state.applied_loras()
            # interactive stated: Gradio does not count a listener attached to an outer button as a use of them
            boxes = [gr.Number(value=applied.get(name, 1.0), label=f"{name} weight", key=f"lora-weight-{name}",
                               step=0.1, interactive=True, elem_id=f"lora-weight-{i}")
                     for i, name in enumerate(names or [])]
            apply_btn.click(on_apply, [select, *boxes], [applied_md]).then(status_line, None, [status_md], queue=False)

        with gr.Row():
            apply_btn = gr.Button("Apply", variant="primary", elem_id="lora-apply")
            remove_btn = gr.Button("Remove all", elem_id="lora-remove")
            refresh_btn = gr.Button("🔄 Refresh", elem_id="lora-refresh")
        applied_md = gr.Markdown(applied_line({}), elem_id="lora-applied")

    def table() -> str:
        infos = state.list_loras()
        if not infos:
            return ("No LoRA adapters in the models folder (a folder with adapter_config.json and "
                    "adapter_model.safetensors, or a GGUF adapter).")
        model = state.model
        rows = []
        for info in infos:
            if model is None:
                fit = "no model loaded"
            else:
                problems = fit_problems(info, model)
                fit = "⚠️ " + "; ".join(problems) if problems else "✅ fits"
            size = f"r {info.rank} / α {info.alpha:g}" if info.rank is not None else (
                f"α {info.alpha:g}" if info.alpha is not None else "")
            rows.append(f"| {_cell(info.name)} | {_cell(info.base_model or '?')} | {info.kind} | {size} | "
                        f"{_cell(', '.join(info.target_modules))} | {_cell(fit)} |")
        return ("| adapter | base model | kind | rank / alpha | adapts | with the loaded model |\n"
                "|---|---|---|---|---|---|\n" + "\n".join(rows))

    def refresh():
        applied = state.applied_loras()
        names = [info.name for info in state.list_loras()]
        return table(), gr.update(choices=names, value=[n for n in applied if n in names]), applied_line(applied)

    def on_apply(names, *weights):
        if not names:
            return "⚠️ Pick one or more adapters first (Remove all takes them off)."
        if any(w is None for w in weights):
            return "⚠️ Every adapter picked needs a weight."
        try:
            return applied_line(state.set_loras(dict(zip(names, (float(w) for w in weights)))))
        except LoadError as exc:
            return f"⚠️ {exc}<br>{applied_line(state.applied_loras())}"

    def on_remove():
        try:
            state.set_loras({})
        except LoadError as exc:
            return gr.update(), f"⚠️ {exc}"
        return gr.update(value=[]), applied_line({})

    outputs = [table_md, select, applied_md]
    refresh_btn.click(refresh, None, outputs, queue=False)
    remove_btn.click(on_remove, None, [select, applied_md]).then(status_line, None, [status_md], queue=False)
    return {"refresh": (refresh, outputs)}
