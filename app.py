"""Hearth's entry point: `python app.py [serve|generate|inspect|download|install-default-model] ...`.

Each verb parses its flags, builds an AppState from settings.yaml plus those flags, and calls into the
packages. Errors a user can cause end with one clear line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loaders.options import OptionSpec, specs


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=Path, help="settings file (default: settings.yaml beside app.py)")
    p.add_argument("--models-dir", type=Path, help="folder holding the models (default from settings.yaml)")


def _flag(spec: OptionSpec) -> str:
    return "--" + spec.name.replace("_", "-")


def add_option_flags(p: argparse.ArgumentParser, options_cls: type, title: str) -> None:
    """CLI flags derived from an options declaration; each flag's help is the option's description."""
    group = p.add_argument_group(title)
    for spec in specs(options_cls):
        if spec.type is bool:
            group.add_argument(_flag(spec), dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                               help=spec.description)
        elif spec.type is list:
            group.add_argument(_flag(spec), dest=spec.name, action="append", default=None, help=spec.description)
        else:
            group.add_argument(_flag(spec), dest=spec.name, type=spec.type, default=None, choices=spec.choices,
                               help=spec.description)


def option_values(args: argparse.Namespace, options_cls: type) -> dict:
    return {s.name: getattr(args, s.name) for s in specs(options_cls) if getattr(args, s.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from engine.sampling import GenerationParams

    parser = argparse.ArgumentParser(prog="app.py", description="Hearth: a local web UI for language models.")
    verbs = parser.add_subparsers(dest="verb")

    serve = verbs.add_parser("serve", help="launch the web UI (the default verb)")
    _add_common(serve)
    serve.add_argument("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1")
    serve.add_argument("--port", type=int, help="UI port (default 7860)")
    serve.add_argument("--model", help="load this model (a folder name in models/) at start")

    gen = verbs.add_parser("generate", help="generate text once and print it (stats on stderr)")
    _add_common(gen)
    gen.add_argument("--model", required=True, help="model folder name in models/")
    gen.add_argument("--loader", help="loader name (default: detected from the files)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="raw text sent as is")
    what.add_argument("--chat", help="a user message, formatted with the model's chat template")
    add_option_flags(gen, GenerationParams, "generation")

    inspect = verbs.add_parser("inspect", help="print as JSON what Hearth knows about a model")
    _add_common(inspect)
    inspect.add_argument("--model", required=True, help="model folder name in models/")

    install = verbs.add_parser("install-default-model", help="install SmolLM2-135M-Instruct into models/")
    _add_common(install)
    install.add_argument("--force", action="store_true", help="convert again even when already installed")
    return parser


def make_state(args: argparse.Namespace, **overrides):
    from app_settings import load_settings
    from app_state import AppState

    settings = load_settings(args.settings, {"models_dir": getattr(args, "models_dir", None), **overrides})
    return AppState(settings)


def cmd_install_default_model(args) -> int:
    from hub.default_model import install_default_model

    state = make_state(args)
    install_default_model(state.models_dir, lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr), args.force)
    return 0


def cmd_generate(args) -> int:
    from engine.generation import DoneEvent, StatsEvent, TextEvent
    from engine.sampling import GenerationParams

    state = make_state(args)
    state.load_model(args.model, args.loader)
    if args.chat is not None:
        prompt = state.chat_prompt([{"role": "user", "content": args.chat}])
    else:
        prompt = state.raw_prompt(args.prompt)
    params = state.generation_params(**option_values(args, GenerationParams))
    done = None
    for event in state.generate(prompt, params):
        if isinstance(event, TextEvent):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, StatsEvent):
            print(f"\n[{event.new_tokens} tokens, {event.tokens_per_second:.1f} tok/s, prompt {event.prompt_tokens}"
                  f" tokens, first token after {event.time_to_first_token:.2f} s]", file=sys.stderr)
        elif isinstance(event, DoneEvent):
            done = event
    sys.stdout.write("\n")
    state.unload_model()
    if done is not None and done.reason == "error":
        print(f"error: {done.error}", file=sys.stderr)
        return 1
    return 0


def inspect_model(state, name: str) -> dict:
    """What Hearth would do with model `name`, without loading its weights."""
    from loaders.transformers_loader import load_tokenizer
    from loaders.folder import read_json
    from loaders.transformers_loader import context_length_of

    folder = state.model_dir(name)
    detections = state.detect(name)
    config = read_json(folder / "config.json") or {}
    tokenizer_config = read_json(folder / "tokenizer_config.json") or {}
    has_template = bool(tokenizer_config.get("chat_template")) or (folder / "chat_template.jinja").exists()
    return {
        "model": name,
        "path": str(folder),
        "loader": detections[0].loader if detections else None,
        "reason": detections[0].reason if detections else "no loader can read this folder",
        "candidates": [{"loader": d.loader, "score": d.score, "reason": d.reason} for d in detections],
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "context_length": context_length_of(config),
        "template_source": "tokenizer chat_template" if has_template else "none",
    }


def cmd_inspect(args) -> int:
    state = make_state(args)
    print(json.dumps(inspect_model(state, args.model), indent=2))
    return 0


def cmd_serve(args) -> int:
    from ui.app import launch

    state = make_state(args, host="0.0.0.0" if args.listen else None, port=args.port, model=args.model)
    launch(state)
    return 0


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "inspect": cmd_inspect,
            "install-default-model": cmd_install_default_model}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    from app_settings import SettingsError
    from loaders.base import LoadError
    from loaders.options import OptionError

    try:
        return COMMANDS[args.verb](args)
    except (LoadError, SettingsError, OptionError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
