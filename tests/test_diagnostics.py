"""One diagnostics channel for problems with the user's files (issue 15, item 7): every reader reports into it,
the UI's list reads it, and the log hears each problem once."""
from __future__ import annotations

import logging

from conftest import make_state
from core.diagnostics import Diagnostics


def test_each_problem_is_logged_once_and_fixed_files_leave_the_list(caplog):
    channel = Diagnostics()
    with caplog.at_level(logging.WARNING, logger="hearth.files"):
        channel.report("presets", ["Broken.yaml: skipped, not valid YAML"])
        channel.report("presets", ["Broken.yaml: skipped, not valid YAML"])     # read again: not logged again
        channel.report("templates", ["Empty.yaml: has no instruction_template"])
    assert [r.getMessage() for r in caplog.records] == ["presets/Broken.yaml: skipped, not valid YAML",
                                                        "templates/Empty.yaml: has no instruction_template"]
    assert channel.problems() == ["presets/Broken.yaml: skipped, not valid YAML",
                                  "templates/Empty.yaml: has no instruction_template"]
    channel.report("presets", [])                                                # the file was fixed
    assert channel.problems() == ["templates/Empty.yaml: has no instruction_template"]


def test_the_apps_problem_list_is_the_channels_and_a_bad_settings_file_is_logged(models_dir, caplog):
    (models_dir / "config-user.yaml").write_text("SmolLM2-135M-Instruct$: [unclosed\n")
    state = make_state(models_dir)
    with caplog.at_level(logging.WARNING, logger="hearth.files"):
        problems = state.file_problems()
        again = state.file_problems()
    assert problems == again == state.diagnostics.problems()
    assert any("config-user.yaml" in p for p in problems)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(set(logged)) and any("config-user.yaml" in line for line in logged)
