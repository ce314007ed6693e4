"""What a prompt asks of a chat template beyond the messages: the tool list and the thinking switch.

Model templates take optional variables: Qwen2.5/Qwen3, Llama 3.x, Mistral and Hermes-style templates render
a `tools` list (and the tool calls and `role: "tool"` results of a tool loop) in the form the model was
trained on; Qwen3's takes `enable_thinking`. A template only gets a variable it names, found once per template
source with jinja2.meta (`referenced_variables`), so templates that name neither render as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, meta


@dataclass(frozen=True)
class TemplateOptions:
    """The template variables of one prompt (the default: none, the template's own defaults apply).

    tools: OpenAI tool definitions as a request sends them, `{"type": "function", "function": {"name",
        "description", "parameters"}}` each. A template that names `tools` gets them and renders the
        conversation's tool calls and tool results itself; any other template gets them written into the
        system message in the Hermes convention (prompts.tool_prompt). Empty: no tools offered.
    enable_thinking: Qwen3's switch for its reasoning block: True or False goes to a template that names
        `enable_thinking`; None leaves the variable undefined (the template's default, thinking on for
        Qwen3). Templates that do not name it have no such switch and are rendered as always (ask
        `ChatTemplate.takes("enable_thinking")` to know whether the switch does anything).
    """
    tools: tuple[dict, ...] = ()
    enable_thinking: bool | None = None

    def variables(self, referenced: frozenset[str]) -> dict[str, Any]:
        """The variables to render with, for a template that references the names in `referenced`."""
        out: dict[str, Any] = {}
        if self.tools and "tools" in referenced:
            out["tools"] = [dict(tool) for tool in self.tools]
        if self.enable_thinking is not None and "enable_thinking" in referenced:
            out["enable_thinking"] = self.enable_thinking
        return out


NO_OPTIONS = TemplateOptions()


@lru_cache(maxsize=64)
def referenced_variables(source: str) -> frozenset[str]:
    """The undeclared names Jinja `source` reads (jinja2.meta), worked out once per template source. A
    template that does not parse references nothing here; rendering it reports the syntax error."""
    try:
        return frozenset(meta.find_undeclared_variables(Environment().parse(source)))
    except TemplateSyntaxError:
        return frozenset()
