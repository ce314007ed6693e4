"""Hearth's entry point: `python app.py [serve|generate|inspect|download|install-default-model] ...`.

Each verb parses its flags, builds an AppState from settings.yaml plus those flags, and calls into the
packages. Errors a user can cause end with one clear line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from core.options import OptionSpec, specs


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", type=Path, help="settings file (default: settings.yaml beside app.py)")
    p.add_argument("--models-dir", type=Path, help="folder holding the models (default from settings.yaml)")
    p.add_argument("--data-dir", type=Path, help="folder for saved conversations (default from settings.yaml: "
                                                 "user_data beside it)")


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
    from hub.cli import add_download_arguments

    parser = argparse.ArgumentParser(prog="app.py", description="Hearth: a local web UI for language models.")
    verbs = parser.add_subparsers(dest="verb")

    serve = verbs.add_parser("serve", help="launch the web UI (the default verb)")
    _add_common(serve)
    serve.add_argument("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1")
    serve.add_argument("--port", type=int, help="UI port (default 7860)")
    serve.add_argument("--model", help="load this model (a folder name in models/) at start")
    serve.add_argument("--gradio-auth", metavar="USER:PASS", help="require this login for the UI")
    serve.add_argument("--gradio-auth-path", type=Path, metavar="FILE",
                       help="require a login from FILE (one user:pass per line or comma-separated)")
    serve.add_argument("--insecure-listen", action="store_true",
                       help="allow --listen (or a non-loopback host in settings.yaml) without a UI login "
                            "(anyone on the network can use Hearth)")
    serve.add_argument("--allowed-hosts", metavar="NAME[,NAME...]",
                       help="host names the UI and API answer besides localhost, 127.0.0.1, ::1 and the bound "
                            "address (e.g. mybox.local); requests naming any other Host get 403")
    serve.add_argument("--cors-origins", metavar="ORIGIN[,ORIGIN...]",
                       help="web pages (origins such as http://localhost:3000; '*' wildcards) allowed to call "
                            "the UI and API from a browser; default none: only Hearth's own page")
    # the OpenAI-compatible API beside the UI (code in api/)
    serve.add_argument("--api", action="store_true", help="also serve the OpenAI-compatible API (/v1)")
    serve.add_argument("--api-port", type=int, default=5000, help="API port (default 5000)")
    serve.add_argument("--api-key", help="key clients must send as 'Authorization: Bearer KEY'; required "
                                         "with --listen")
    serve.add_argument("--api-admin-key", help="key for loading/unloading models via the API (default: --api-key)")

    gen = verbs.add_parser("generate", help="generate text once and print it (stats on stderr)")
    _add_common(gen)
    gen.add_argument("--model", required=True, help="model folder name in models/")
    gen.add_argument("--loader", help="loader name (default: detected from the files)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="raw text sent as is")
    what.add_argument("--chat", help="a user message, formatted with the model's chat template")
    gen.add_argument("--lora", action="append", default=[], metavar="ADAPTER[:WEIGHT]",
                     help="apply this LoRA adapter (a folder in models/) at this weight (default 1); repeatable")
    add_option_flags(gen, GenerationParams, "generation")

    inspect = verbs.add_parser("inspect", help="print as JSON what Hearth knows about a model")
    _add_common(inspect)
    inspect.add_argument("--model", required=True, help="model folder name in models/")

    download = verbs.add_parser("download", help="download a model from the Hugging Face Hub into models/")
    _add_common(download)
    add_download_arguments(download, with_models_dir=False)

    install = verbs.add_parser("install-default-model", help="install SmolLM2-135M-Instruct into models/")
    _add_common(install)
    install.add_argument("--force", action="store_true", help="convert again even when already installed")
    return parser


def make_state(args: argparse.Namespace, **overrides):
    from app_settings import load_settings
    from app_state import AppState

    settings = load_settings(args.settings, {"models_dir": getattr(args, "models_dir", None),
                                             "data_dir": getattr(args, "data_dir", None), **overrides})
    return AppState(settings)


def cmd_install_default_model(args) -> int:
    from hub.default_model import install_default_model

    state = make_state(args)
    install_default_model(state.models_dir, lambda f, m: print(f"[{f:4.0%}] {m}", file=sys.stderr), args.force)
    return 0


def cmd_generate(args) -> int:
    from core.errors import LoadError
    from engine.generation import DoneEvent, StatsEvent, TextEvent
    from engine.sampling import GenerationParams
    from loaders.lora import parse_lora_arg

    state = make_state(args)
    state.load_model(args.model, args.loader)
    runtime = state.model.runtime
    try:
        if args.lora:   # replaces any adapters saved for the model
            loras = dict(parse_lora_arg(text) for text in args.lora)
            runtime += "; LoRA " + ", ".join(f"{k} x{v:g}" for k, v in state.set_loras(loras).items())
        if args.chat is not None:
            prompt = state.chat_prompt([{"role": "user", "content": args.chat}])
        else:
            prompt = state.raw_prompt(args.prompt)
    except (ValueError, LoadError) as exc:  # an empty --prompt; an adapter that does not fit the model
        state.unload_model()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    params = state.generation_params(**option_values(args, GenerationParams))
    done = None
    for event in state.generate(prompt, params):
        if isinstance(event, TextEvent):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, StatsEvent):
            # The runtime beside the figures: which engine, device and kernels they were measured on.
            print(f"\n[{event.new_tokens} tokens, {event.tokens_per_second:.1f} tok/s, prompt {event.prompt_tokens}"
                  f" tokens, first token after {event.time_to_first_token:.2f} s; {runtime}]", file=sys.stderr)
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
    from core.folder import read_json
    from loaders.metadata import context_length_of

    folder = state.model_dir(name)
    detections = state.detect(name)
    config = read_json(folder / "config.json") or {}
    template = state.resolve_template(name=name)  # the resolution order of prompts/templates.py
    return {
        "model": name,
        "path": str(folder),
        "loader": detections[0].loader if detections else None,
        "reason": detections[0].reason if detections else "no loader can read this folder",
        "candidates": [{"loader": d.loader, "score": d.score, "reason": d.reason} for d in detections],
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "context_length": context_length_of(config),
        "template": template.name,
        "template_source": template.source,
        "template_reason": template.reason,
        **({"template_warning": template.warning} if template.warning else {}),
        **_loader_facts(state, name, detections),
        # every adapter in models/ with the base it was trained on (`generate --lora NAME` applies one)
        "loras": [info.describe() for info in state.list_loras()],
    }


def _loader_facts(state, name: str, detections) -> dict:
    """quantization parameters, metadata and every effective setting with its source."""
    from loaders.metadata import read_metadata
    from loaders.model_settings import as_json

    folder = state.model_dir(name)
    metadata = read_metadata(folder)
    effective = state.effective_settings(name, detections=detections) if detections else None
    facts = {
        "quantization": next((d.details["quantization"] for d in detections if "quantization" in d.details), None),
        "gguf": next((d.details["gguf"] for d in detections if "gguf" in d.details), None),
        "problems": state.registry.problems(folder),
        "metadata": {"context_length": metadata.context_length, "context_source": metadata.context_source,
                     "rope_scaling": metadata.rope_scaling, "dtype": metadata.dtype,
                     "generation_config": metadata.generation},
        "saved": state.settings_store.get(name),
        "settings": as_json(effective) if effective else None,
        "settings_problems": list(state.settings_store.problems),
    }
    if effective is not None:  # the context the loader will use, rope scaling included
        facts["context_length"] = effective["context_length"].value
        facts["context_source"] = effective["context_length"].source
        if (folder / "config.json").is_file():  # weights and KV cache estimate, or why a load would refuse
            from loaders.config_check import memory_report
            facts["memory"] = memory_report(folder, facts["context_length"], facts["context_source"])
    return facts


def cmd_download(args) -> int:
    from app_settings import load_settings
    from hub.cli import run_download

    # Settings only (no AppState): a download needs the models folder, not torch or the loaders.
    return run_download(args, models_dir=load_settings(args.settings, {"models_dir": args.models_dir}).models_dir)


def cmd_inspect(args) -> int:
    from core.folder import reading_once

    state = make_state(args)
    with reading_once():   # detection, settings and template each ask for the same files: read them once
        facts = inspect_model(state, args.model)
    print(json.dumps(facts, indent=2))
    return 0


def parse_auth(args) -> list[tuple[str, str]] | None:
    """Logins from --gradio-auth and --gradio-auth-path; None when neither is given."""
    entries: list[str] = []
    if args.gradio_auth:
        entries.append(args.gradio_auth)
    if args.gradio_auth_path:
        try:
            text = args.gradio_auth_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"error: cannot read --gradio-auth-path {args.gradio_auth_path}: {exc.strerror}")
        entries.extend(e.strip() for line in text.splitlines() for e in line.split(",") if e.strip())
    logins = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise SystemExit("error: a login must look like user:password (both parts non-empty)")
        logins.append((user, password))
    return logins or None


def exposure_problem(host: str, listen: bool, source: Path | None) -> str:
    """Why serving on `host` without a login is refused, naming where that host came from."""
    where = "--listen" if listen else f"host: {host} in {source}"
    return (f"error: {where} exposes Hearth to your network; add --gradio-auth USER:PASS (or --gradio-auth-path "
            "FILE), or --insecure-listen if you really want no login"
            + ("" if listen else " (or set host: 127.0.0.1)"))


class _LogLine(logging.Formatter):
    """'warning: ...' on stderr, like every other line Hearth writes for a person reading the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogLine())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def cmd_serve(args) -> int:
    from ui.app import launch
    from web.guard import is_loopback

    log_to_stderr()
    auth = parse_auth(args)
    state = make_state(args, host="0.0.0.0" if args.listen else None, port=args.port, model=args.model,
                       allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins)
    # The rule follows the address actually bound, whether --listen or settings.yaml chose it.
    if not is_loopback(state.settings.host) and auth is None and not args.insecure_listen:
        print(exposure_problem(state.settings.host, args.listen, state.settings.source), file=sys.stderr)
        return 2
    if args.api:  # the API shares the UI's AppState, host and Host/Origin rules; it starts before the model loads
        from api.auth import ApiConfigError
        from api.server import ApiConfig, ApiServer

        settings = state.settings
        try:
            api = ApiServer(state, ApiConfig(settings.host, args.api_port, args.api_key, args.api_admin_key,
                                             settings.allowed_hosts, settings.cors_origins)).start()
        except ApiConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"Hearth API on {api.url}", file=sys.stderr)
    launch(state, auth=auth)
    return 0


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "inspect": cmd_inspect, "download": cmd_download,
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
    from core.options import OptionError

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
