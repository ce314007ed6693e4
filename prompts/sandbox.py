"""Running chat templates safely: a sandboxed Jinja environment with bounded output.

Templates come from downloaded tokenizers, model cards and user files, so they are untrusted code: the
immutable sandbox refuses attribute tricks (`''.__class__.__mro__`) and mutation of our objects, and the
output (including any single string built by `*`) is capped so a hostile template cannot exhaust memory.
"""
from __future__ import annotations

import json
import operator
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT_CHARS = 4_000_000


class TemplateRenderError(ValueError):
    """A template failed to compile or render; the message says why."""


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment whose `*` and `**` cannot build values beyond the output cap."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, max_chars: int = MAX_OUTPUT_CHARS):
        # trim_blocks/lstrip_blocks: the settings transformers and text-generation-webui render templates with.
        super().__init__(trim_blocks=True, lstrip_blocks=True, autoescape=False, keep_trailing_newline=False)
        self.max_chars = max_chars
        self.globals["raise_exception"] = _raise_exception
        # Jinja's own tojson sorts keys and escapes <>&' for HTML; model templates (tool lists) were written
        # for transformers' plain json.dumps, which keeps the order the tool definitions came in.
        self.filters["tojson"] = _tojson

    def call_binop(self, context, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise TemplateRenderError("template uses an exponent above 64")
            return operator.pow(left, right)
        sized = left if isinstance(left, (str, list, tuple)) else right if isinstance(right, (str, list, tuple)) else None
        if sized is not None:
            times = right if sized is left else left
            if isinstance(times, int) and len(sized) * times > self.max_chars:
                raise TemplateRenderError(f"template builds a value over {self.max_chars} characters")
        return operator.mul(left, right)


def _raise_exception(message: str):
    raise TemplateRenderError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render_template(source: str, max_chars: int = MAX_OUTPUT_CHARS, **context: Any) -> str:
    """Render Jinja `source` in the sandbox; TemplateRenderError when it is broken, refuses or grows too large."""
    env = BoundedSandbox(max_chars)
    try:
        compiled = env.from_string(source)
        parts: list[str] = []
        size = 0
        for chunk in compiled.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise TemplateRenderError(f"template output exceeds {max_chars} characters")
            parts.append(chunk)
    except TemplateRenderError:
        raise
    except TemplateError as exc:  # syntax errors, undefined names, sandbox SecurityError
        raise TemplateRenderError(f"{type(exc).__name__}: {exc}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        raise TemplateRenderError(f"template failed: {type(exc).__name__}: {exc}") from None
    return "".join(parts)
