"""Model names from the UI, the API and the CLI: a plain folder name inside models/, nothing else (issue 14)."""
from __future__ import annotations

import pytest

from conftest import make_state
from loaders.base import LoadError


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct\n", "a" * 300, "../etc", ".hidden", "a/b", ""])
def test_names_that_are_not_a_plain_folder_name_are_refused(models_dir, name):
    state = make_state(models_dir)
    with pytest.raises(LoadError, match="not a valid model name"):
        state.model_dir(name)


def test_a_plain_folder_name_is_found(models_dir):
    assert make_state(models_dir).model_dir("SmolLM2-135M-Instruct") == models_dir / "SmolLM2-135M-Instruct"
