"""Option declarations: one declaration drives validation, flags and widgets."""
from dataclasses import dataclass

import pytest

from engine.sampling import GenerationParams
from core.options import OptionError, build, option, specs, to_dict


@dataclass
class Example:
    count: int = option(3, "How many.", minimum=1, maximum=10)
    ratio: float = option(0.5, "A ratio.", minimum=0.0, maximum=1.0)
    mode: str = option("a", "Which mode.", choices=["a", "b"])
    enabled: bool = option(False, "On or off.")
    words: list[str] = option([], "Some words.")


def test_specs_follow_declaration_order_and_carry_metadata():
    names = [s.name for s in specs(Example)]
    assert names == ["count", "ratio", "mode", "enabled", "words"]
    count = next(specs(Example))
    assert (count.type, count.default, count.minimum, count.maximum) == (int, 3, 1, 10)
    assert count.description == "How many."


def test_build_coerces_strings_from_flags_and_yaml():
    opts = build(Example, {"count": "7", "ratio": "0.25", "mode": "b", "enabled": "yes", "words": "hi"})
    assert to_dict(opts) == {"count": 7, "ratio": 0.25, "mode": "b", "enabled": True, "words": ["hi"]}


@pytest.mark.parametrize("values, message", [
    ({"count": 0}, "count must be at least 1"),
    ({"count": 11}, "count must be at most 10"),
    ({"count": 2.5}, "not a valid int"),
    ({"mode": "c"}, "must be one of"),
    ({"enabled": "maybe"}, "not a valid bool"),
    ({"colour": "red"}, "unknown option(s): colour"),
])
def test_bad_values_are_refused_with_the_option_named(values, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(Example, values)


def test_list_defaults_are_not_shared_between_instances():
    a, b = Example(), Example()
    a.words.append("x")
    assert b.words == []


def test_generation_params_declare_bounds_for_every_field():
    for spec in specs(GenerationParams):
        assert spec.description, spec.name
        if spec.type in (int, float):
            assert spec.minimum is not None and spec.maximum is not None, spec.name
