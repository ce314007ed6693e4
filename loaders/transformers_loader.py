"""The `transformers` loader: any local causal-LM folder with safetensors weights, run by HF transformers.

It is the generic fallback: whatever architecture transformers knows. Pickled weights (.bin/.pt) are
refused unless the user opts in, and remote code never runs unless opted in.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from engine.generation import GenerationEvent, stream
from engine.model import Model, Prompt, prompt_ids
from engine.sampling import GenerationParams
from loaders.base import Detection, LoadError, Progress, no_progress
from loaders.engine_choice import RuntimeOptions, load_on_engine
from loaders.config_check import check_model
from loaders.metadata import context_choice
from core.folder import pickle_files, read_json, require_dir, safetensors_files
from core.options import option

QUANTIZATION_FILES = ("quantize_config.json", "quant_config.json")


@dataclass
class TransformersOptions(RuntimeOptions):
    dtype: str = option("auto", "Weight dtype; auto = bfloat16 on CUDA (float16 where bf16 is unsupported), "
                                "float32 on CPU.", choices=["auto", "float32", "bfloat16", "float16"])
    device: str = option("auto", "Where to run; auto = the first CUDA GPU when one answers, else CPU.",
                         choices=["auto", "cpu", "cuda"])
    context_length: int = option(0, "Context length in tokens; 0 = the model's own (max_position_embeddings).",
                                 minimum=0, maximum=1048576, step=256)
    allow_pickle: bool = option(False, "Allow loading pickled .bin/.pt weights. Pickles can run code: only "
                                       "for files you trust.")
    trust_remote_code: bool = option(False, "Run Python code shipped with the model. Only for repos you trust.")


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LoadError("device 'cuda' was asked for but no CUDA GPU is available")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def eos_ids(model_dir: Path, tokenizer) -> list[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, merged."""
    ids: list[int] = []
    for cfg in (read_json(model_dir / "generation_config.json"), read_json(model_dir / "config.json")):
        value = (cfg or {}).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))


class HFStepper:
    """Next-token logits from a transformers model with its own KV cache (see engine.generation.Stepper)."""

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.past = None

    def start(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1]

    def step(self, token_id: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token_id.view(1, 1), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1]


class TransformersModel(Model):
    """A model run by HF transformers (plain weights, or Hearth's GPTQ/AWQ/GGUF layers put into one)."""

    def __init__(self, model_dir: Path, model, tokenizer, device: torch.device, dtype: torch.dtype,
                 context_length: int, loader: str = "transformers", runtime: str = "", memory: str = ""):
        self.model_dir = model_dir
        self.name = model_dir.name
        self.hf_model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.context_length = context_length
        self.eos_token_ids = eos_ids(model_dir, tokenizer)
        self.loader = loader
        self.runtime = runtime or f"transformers ({device.type}, {str(dtype).removeprefix('torch.')})"
        self.memory = memory   # the loader's estimate (loaders.config_check), shown beside the runtime

    def generate(self, prompt: Prompt, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        return stream(HFStepper(self.hf_model, self.device), self.tokenizer, prompt_ids(prompt), params,
                      self.eos_token_ids, cancel, self.context_length)

    def unload(self) -> None:
        self.hf_model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False, config: dict | None = None):
    """The folder's tokenizer. `config` (config.json's content, already read) spares transformers reading
    config.json again to learn the model type; remote code always gets the file itself."""
    from transformers import AutoConfig, AutoTokenizer

    hf_config = None
    if config and not trust_remote_code:
        try:
            hf_config = AutoConfig.for_model(**config)
        except (ValueError, TypeError, KeyError):   # a model_type transformers does not know: it reads the file
            hf_config = None
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code,
                                             **({"config": hf_config} if hf_config is not None else {}))
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise LoadError(f"could not read the tokenizer in {model_dir.name}: {exc}") from None


class TransformersLoader:
    name = "transformers"
    description = "Hugging Face transformers: any causal LM with safetensors weights (CPU or GPU)."
    options_type = TransformersOptions

    def detect(self, model_dir: Path) -> Detection | None:
        config = read_json(model_dir / "config.json")  # LoadError for broken JSON: the registry reports it
        if config is None or "quantization_config" in config:
            return None
        if any((model_dir / f).exists() for f in QUANTIZATION_FILES):
            return None
        weights = safetensors_files(model_dir)
        arch = ", ".join(config.get("architectures") or [config.get("model_type", "unknown architecture")])
        if weights:
            return Detection(self.name, 0.5, f"unquantized {arch}, {len(weights)} safetensors file(s) "
                                             f"(config.json)", {"architecture": arch})
        if pickle_files(model_dir):
            return Detection(self.name, 0.3, f"unquantized {arch}, pickled .bin weights only (needs "
                                             f"allow_pickle)", {"architecture": arch, "pickle": True})
        return None

    def load(self, model_dir: Path, options: TransformersOptions, progress: Progress = no_progress):
        from transformers import AutoConfig, AutoModelForCausalLM

        require_dir(model_dir)
        config = read_json(model_dir / "config.json")
        if config is None:
            raise LoadError(f"{model_dir.name} has no config.json, so it is not a transformers model folder")
        use_safetensors = bool(safetensors_files(model_dir))
        if not use_safetensors:
            if not pickle_files(model_dir):
                raise LoadError(f"{model_dir.name} has no weight files (*.safetensors)")
            if not options.allow_pickle:
                raise LoadError(f"{model_dir.name} only has pickled weights (.bin/.pt), which can run code "
                                "when loaded; enable allow_pickle for this model if you trust its source")
        device = pick_device(options.device)
        dtype = pick_dtype(options.dtype, device)
        context, context_source = context_choice(config, options.context_length)
        # Before anything is built: the config's sizes against the weights, the KV cache against memory.
        memory = check_model(model_dir, context_length=context, context_source=context_source,
                             device=device.type, dtype=dtype)
        progress(0.02, memory.describe())
        if use_safetensors and not options.trust_remote_code:
            progress(0.05, "reading tokenizer")
            tokenizer = load_tokenizer(model_dir, config=config)
            engine_model = load_on_engine(self.name, model_dir, config, options, device=device.type,
                                          tokenizer=tokenizer, eos_token_ids=eos_ids(model_dir, tokenizer),
                                          context_length=context, memory=memory.describe(), progress=progress)
            if engine_model is not None:
                return engine_model
        progress(0.05, "reading config and tokenizer")
        try:
            hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                   trust_remote_code=options.trust_remote_code)
        except Exception as exc:
            raise LoadError(f"config.json of {model_dir.name} is not usable: {exc}") from None
        tokenizer = load_tokenizer(model_dir, options.trust_remote_code, config)
        progress(0.2, f"loading weights ({str(dtype).removeprefix('torch.')}, {device.type})")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, config=hf_config, dtype=dtype, local_files_only=True, use_safetensors=use_safetensors,
                trust_remote_code=options.trust_remote_code)
        except torch.OutOfMemoryError:
            raise LoadError(f"out of memory loading {model_dir.name}; try a smaller dtype or model") from None
        except (OSError, ValueError, KeyError) as exc:  # anything else (e.g. a failed allocation): AppState says
            raise LoadError(f"could not load the weights of {model_dir.name}: {exc}") from None
        model.to(device).eval()
        progress(1.0, "ready")
        return TransformersModel(model_dir, model, tokenizer, device, dtype, context, memory=memory.describe())
