"""Presets in text-generation-webui's YAML keys: load, list, save, malformed files reported and skipped."""
from __future__ import annotations

import pytest

from prompts.presets import PRESETS_DIR, load_presets, save_preset


def test_shipped_presets_load_cleanly():
    catalog = load_presets(PRESETS_DIR)
    assert catalog.problems == []
    assert {"Default", "Deterministic", "min_p", "Creative"} <= set(catalog.names())
    assert catalog.presets["Deterministic"]["temperature"] == 0.0
    assert catalog.presets["min_p"]["min_p"] == 0.05


def test_malformed_and_unknown_keys_are_reported(tmp_path):
    (tmp_path / "good.yaml").write_text("temperature: 0.5\ntfs: 1\ntop_a: 0\n")
    (tmp_path / "bad_yaml.yaml").write_text("temperature: [0.5\n")
    (tmp_path / "bad_value.yaml").write_text("top_p: 7\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    catalog = load_presets(tmp_path)
    assert catalog.names() == ["good"]
    assert catalog.presets["good"] == {"temperature": 0.5}
    text = "\n".join(catalog.problems)
    for name in ("bad_yaml.yaml", "bad_value.yaml", "list.yaml"):
        assert f"{name}: skipped" in text
    assert "tfs" in text and "top_a" in text


def test_save_as_new_preset_round_trips_atomically(tmp_path):
    path = save_preset(tmp_path, "My preset", {"temperature": 0.3, "min_p": 0.1, "max_new_tokens": 99})
    assert path.name == "My preset.yaml"
    assert load_presets(tmp_path).presets["My preset"] == {"temperature": 0.3, "min_p": 0.1}
    assert [p.name for p in tmp_path.iterdir()] == ["My preset.yaml"]   # no temp files left
    with pytest.raises(ValueError):
        save_preset(tmp_path, "../escape", {"temperature": 0.3})


@pytest.mark.parametrize("name", ["Default", "default", "DETERMINISTIC", " min_P "])
def test_a_user_preset_never_replaces_a_shipped_one(tmp_path, name):
    shipped = tmp_path / "Default.yaml"
    shipped.write_text("temperature: 0.7\n")
    with pytest.raises(ValueError, match="shipped with Hearth and is read-only"):
        save_preset(tmp_path, name, {"temperature": 1.9})
    assert shipped.read_text() == "temperature: 0.7\n"
    assert [p.name for p in tmp_path.iterdir()] == ["Default.yaml"]   # no case-twin, no temp file


def test_the_shipped_presets_are_the_read_only_ones():
    from prompts.presets import SHIPPED_PRESETS
    assert all((PRESETS_DIR / f"{name}.yaml").is_file() for name in SHIPPED_PRESETS)


def test_saving_never_replaces_a_user_preset_or_makes_a_case_twin(tmp_path):
    save_preset(tmp_path, "Mine", {"temperature": 0.3})
    for name in ("Mine", "mine", "MINE"):
        with pytest.raises(ValueError, match="'Mine' already exists"):
            save_preset(tmp_path, name, {"temperature": 1.5})
    assert load_presets(tmp_path).presets == {"Mine": {"temperature": 0.3}}
