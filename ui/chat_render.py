"""The Text Generation tab's thinking switch: Qwen3's enable_thinking, saved per model like its other settings.

A chat's thinking parts themselves are drawn by prompts.reasoning.shown (Gradio's thought messages).
"""
from __future__ import annotations

import gradio as gr

from loaders.base import LoadError

SWITCH_INFO = {True: "this model's template takes it (unticked: it answers without a thinking block)",
               False: "this model's template has no thinking switch; ticking it changes nothing"}


def enable_thinking(state) -> bool | None:
    """The loaded model's setting: True/False when saved, None (the template's own default) when not."""
    settings = state.model_settings
    return settings["enable_thinking"].value if settings and "enable_thinking" in settings else None


def switch_update(state):
    """The switch as the loaded model has it (unset shows ticked: templates that take it think by default)."""
    if state.model is None:
        return gr.update(value=True, info="no model loaded")
    try:
        takes = state.resolve_template().takes("enable_thinking")
    except (LoadError, ValueError):
        takes = False
    return gr.update(value=enable_thinking(state) is not False, info=SWITCH_INFO[takes])


def save_switch(state, value: bool) -> str:
    """Save the switch for the loaded model (config-user.yaml, with its other saved settings); a line saying so."""
    model = state.model
    if model is None or model.model_dir is None:
        return "⚠️ thinking switch: no model with a folder is loaded, so there is nowhere to save it"
    try:
        state.save_model_settings(model.name, {**state.saved_model_settings(model.name),
                                               "enable_thinking": bool(value)})
    except (LoadError, ValueError, OSError) as exc:
        return f"⚠️ could not save the thinking switch: {exc}"
    return f"thinking {'on' if value else 'off'} for **{model.name}** (saved in config-user.yaml)"
