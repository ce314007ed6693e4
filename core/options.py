"""Options declared once, read everywhere.

A loader's or sampler's parameters are a dataclass whose fields carry their description and bounds in
`metadata`. The UI builds its widgets, the CLI its flags, the settings store its YAML and the API its fields
from that one declaration, so a parameter is never listed twice.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Sequence


def option(default: Any, description: str, *, minimum: float | None = None, maximum: float | None = None,
           step: float | None = None, choices: Sequence[Any] | None = None, label: str | None = None) -> Any:
    """A dataclass field with the facts a widget, a flag or a validator needs."""
    meta = {"description": description, "minimum": minimum, "maximum": maximum, "step": step,
            "choices": list(choices) if choices is not None else None, "label": label}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: type
    default: Any
    description: str
    label: str
    minimum: float | None
    maximum: float | None
    step: float | None
    choices: list[Any] | None


_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "list[str]": list}


def _field_type(field: dataclasses.Field) -> type:
    t = field.type
    if isinstance(t, str):  # annotations are strings under `from __future__ import annotations`
        t = t.replace(" | None", "").strip()
        return _TYPE_NAMES.get(t, list if t.startswith("list[") else str)
    origin = typing.get_origin(t)
    if origin is list:
        return list
    return t if isinstance(t, type) else str


def specs(options_cls: type) -> Iterator[OptionSpec]:
    """The declared options of a dataclass, in declaration order."""
    for f in dataclasses.fields(options_cls):
        meta = f.metadata
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        yield OptionSpec(name=f.name, type=_field_type(f), default=default,
                         description=meta.get("description", ""),
                         label=meta.get("label") or f.name.replace("_", " "),
                         minimum=meta.get("minimum"), maximum=meta.get("maximum"), step=meta.get("step"),
                         choices=meta.get("choices"))


class OptionError(ValueError):
    """A value that does not fit its declaration; the message names the option and the bounds, `option`
    its name (None when the error is not about one option), so callers can say where the value came from."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def _shown(value: Any) -> str:
    """A value for a message: a 400-digit number from a client is cut short."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(spec: OptionSpec, value: Any) -> Any:
    """Turn a value from YAML, a flag, a widget or JSON into the declared type, checking the bounds."""
    if value is None:
        return None
    try:
        if spec.type is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = low in ("true", "1", "yes")
            else:
                value = bool(value)
        elif spec.type is int:
            if isinstance(value, float) and not value.is_integer():  # also NaN and the infinities
                raise ValueError(value)
            value = int(value)
        elif spec.type is float:
            value = float(value)
        elif spec.type is list:
            if isinstance(value, str):
                value = [value] if value else []
            value = [str(v) for v in value]
        else:
            value = str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float() of an integer beyond 1e308
        raise OptionError(f"{spec.label}: {_shown(value)} is not a valid {spec.type.__name__}", spec.name) from None
    # NaN passes every bounds check below (all its comparisons are False) and then poisons the sampler's
    # softmax; infinities slip through options without a bound the same way.
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"{spec.label}: {value} is not a finite number", spec.name)
    if spec.minimum is not None and value < spec.minimum:
        raise OptionError(f"{spec.label} must be at least {spec.minimum} (got {_shown(value)})", spec.name)
    if spec.maximum is not None and value > spec.maximum:
        raise OptionError(f"{spec.label} must be at most {spec.maximum} (got {_shown(value)})", spec.name)
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(f"{spec.label} must be one of {spec.choices} (got {_shown(value)})", spec.name)
    return value


def validate(options: Any) -> None:
    """Coerce and check every field of a declared dataclass in place (for its __post_init__), so values set
    directly in code meet the same bounds as those read from YAML, flags, widgets or JSON."""
    for spec in specs(type(options)):
        setattr(options, spec.name, coerce(spec, getattr(options, spec.name)))


def build(options_cls: type, values: dict[str, Any] | None = None, *, strict: bool = True):
    """An instance of `options_cls` from loose values; unknown keys are an error when strict."""
    values = dict(values or {})
    known = {s.name: s for s in specs(options_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown and strict:
        raise OptionError(f"unknown option(s): {', '.join(unknown)}")
    kwargs = {name: coerce(known[name], v) for name, v in values.items() if name in known and v is not None}
    return options_cls(**kwargs)


def to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)
