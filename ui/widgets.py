"""Gradio widgets built from option declarations (core.options), so no parameter is listed twice."""
from __future__ import annotations

from typing import Any

import gradio as gr

from core.options import OptionSpec, specs


def widget_for(spec: OptionSpec, value: Any = None, elem_prefix: str = "") -> gr.components.Component:
    value = spec.default if value is None else value
    common = dict(label=spec.label, info=spec.description, elem_id=f"{elem_prefix}{spec.name}" if elem_prefix else None)
    if spec.type is bool:
        return gr.Checkbox(value=bool(value), **common)
    if spec.choices:
        return gr.Dropdown(choices=spec.choices, value=value, **common)
    if spec.type in (int, float) and spec.minimum is not None and spec.maximum is not None \
            and spec.maximum - spec.minimum <= 100000:
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step or (1 if spec.type is int else 0.01),
                         value=value, **common)
    if spec.type in (int, float):
        return gr.Number(value=value, precision=0 if spec.type is int else None, minimum=spec.minimum,
                         maximum=spec.maximum, **common)
    if spec.type is list:
        return gr.Textbox(value="\n".join(value or []), lines=2, **common)
    return gr.Textbox(value=value, **common)


def widgets_for(options_cls: type, values: Any = None, elem_prefix: str = "") -> dict[str, gr.components.Component]:
    """One widget per declared option, keyed by option name, in declaration order."""
    return {s.name: widget_for(s, getattr(values, s.name, None) if values is not None else None, elem_prefix)
            for s in specs(options_cls)}


def values_from(options_cls: type, raw: list[Any]) -> dict[str, Any]:
    """Widget values (in declaration order) back into option values; list options come from textboxes."""
    out = {}
    for spec, value in zip(specs(options_cls), raw):
        if spec.type is list and isinstance(value, str):
            value = [line for line in value.splitlines() if line]
        out[spec.name] = value
    return out
