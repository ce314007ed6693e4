"""Time to fit a long chat history into the context on the default model (issue 14, item 9), printed as JSON.

    .venv/bin/python bench/prompt_fitting.py [--turns 200 800] [--max-new-tokens 256]

Renders and tokenizes through the model's own template, as a chat request does; the figure is the whole
`AppState.chat_prompt` call (fitting plus the final render). Timings are never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO_ROOT)   # not bench/, whose engine.py would shadow the engine package

from app_settings import AppSettings  # noqa: E402
from app_state import AppState  # noqa: E402
from hub.default_model import DEFAULT_MODEL_NAME as DEFAULT_MODEL, install_default_model, is_installed  # noqa: E402


def history(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}: " + "tell me more " * 8},
                     {"role": "assistant", "content": f"answer {i}: " + "here is more " * 12}]
    return messages + [{"role": "user", "content": "and now?"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, nargs="+", default=[200, 800])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    models = REPO_ROOT / "models"
    if not is_installed(models):
        install_default_model(models)
    state = AppState(AppSettings(models_dir=models))
    state.load_model(DEFAULT_MODEL)
    rows = []
    for turns in args.turns:
        messages = history(turns)
        start = time.perf_counter()
        prompt = state.chat_prompt(messages, max_new_tokens=args.max_new_tokens)
        rows.append({"turns": turns, "seconds": round(time.perf_counter() - start, 3),
                     "dropped_turns": prompt.dropped_turns, "prompt_tokens": prompt.n_tokens,
                     "context_length": state.model.context_length})
    print(json.dumps({"model": DEFAULT_MODEL, "max_new_tokens": args.max_new_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
