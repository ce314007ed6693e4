"""What the gptq and awq loaders share: options, detection from the quantization config, load on CPU."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.quant_linear import DequantLinear, Int4Linear
from loaders.base import Detection, LoadError, Progress, no_progress
from loaders.engine_choice import RuntimeOptions, load_on_engine
from core.folder import read_json, require_dir
from loaders.config_check import check_model
from loaders.metadata import context_choice
from core.options import option
from loaders.quant.build import KERNELS, load_quantized
from core.quant_formats import QuantSpec, read_quant_spec
from core.safetensors_index import quantized_prefixes, tensor_index
from loaders.transformers_loader import TransformersModel, eos_ids, load_tokenizer


@dataclass
class QuantOptions(RuntimeOptions):
    dtype: str = option("float32", "Compute dtype on CPU for activations and dequantized weights.",
                        choices=["float32", "bfloat16"])
    cpu_kernel: str = option("dequantize", "dequantize = unpack every layer once at load (exact, full-size "
                                           "weights); int4 = torch's CPU int4 kernel for 4-bit layers with "
                                           "group 32/64/128/256 (smaller, approximate: bf16 scales).",
                             choices=list(KERNELS))
    context_length: int = option(0, "Context length in tokens; 0 = the model's own (max_position_embeddings "
                                    "times any rope scaling factor).", minimum=0, maximum=1048576, step=256)
    trust_remote_code: bool = option(False, "Run Python code shipped with the model. Only for repos you trust.")


class QuantizedModelLoader:
    """A loader for one quantization method; subclasses set `name`, `method` and `config_file` (the method's own
    config file; config.json's quantization_config is read for every method). On a GPU the model runs on
    Hearth's engine (4-bit layers on its tensor-core kernel); on CPU it is dequantized once at load, or uses
    torch's int4 kernel."""
    name = ""
    method = ""
    config_file = ""
    options_type = QuantOptions
    score = 0.9

    @property
    def description(self) -> str:
        return (f"{self.method.upper()} checkpoints ({self.config_file} or config.json quantization_config); "
                "Hearth's engine on a GPU, transformers on CPU.")

    def spec(self, model_dir: Path) -> QuantSpec | None:
        spec = read_quant_spec(model_dir)
        return spec if spec is not None and spec.method == self.method else None

    def detect(self, model_dir: Path) -> Detection | None:
        """LoadError for a malformed config or weight file: the registry reports it as the folder's problem."""
        spec = self.spec(model_dir)
        if spec is None:
            return None
        layers = quantized_prefixes(tensor_index(model_dir))
        if not layers:
            raise LoadError(f"{model_dir.name} says it is {spec.describe()} but its safetensors files hold no "
                            "quantized (.qweight) tensors")
        return Detection(self.name, self.score, spec.describe(),
                         {"quantization": {**vars(spec), "quantized_layers": len(layers)}})

    def load(self, model_dir: Path, options: QuantOptions, progress: Progress = no_progress):
        require_dir(model_dir)
        spec = self.spec(model_dir)
        if spec is None:
            raise LoadError(f"{model_dir.name} has no {self.method.upper()} quantization config "
                            "(quantize_config.json, quant_config.json or config.json quantization_config)")
        dtype = getattr(torch, options.dtype)
        progress(0.05, "reading config and tokenizer")
        config = read_json(model_dir / "config.json") or {}
        tokenizer = load_tokenizer(model_dir, options.trust_remote_code, config)
        context, context_source = context_choice(config, options.context_length)
        on_gpu = torch.cuda.is_available()
        # Before anything is built: the config's sizes against the weights, the KV cache against memory
        # (the engine computes in bf16 on a GPU).
        memory = check_model(model_dir, context_length=context, context_source=context_source,
                             device="cuda" if on_gpu else "cpu", dtype=torch.bfloat16 if on_gpu else dtype)
        progress(0.04, memory.describe())
        # On a GPU Hearth's engine runs the quantized weights with its int4 kernels; on CPU (runtime auto) the
        # exact dequantize-once path below is the tested default, the engine only when asked for.
        if on_gpu or options.runtime == "engine":
            engine_model = load_on_engine(self.name, model_dir, config, options,
                                          device="cuda" if on_gpu else "cpu",
                                          tokenizer=tokenizer, eos_token_ids=eos_ids(model_dir, tokenizer),
                                          context_length=context, memory=memory.describe(), progress=progress)
            if engine_model is not None:
                return engine_model
        try:
            model = load_quantized(model_dir, spec, dtype, options.cpu_kernel, progress, options.trust_remote_code)
        except torch.OutOfMemoryError:
            raise LoadError(f"out of memory loading {model_dir.name}") from None
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise LoadError(f"could not load the weights of {model_dir.name}: {exc}") from None
        progress(1.0, "ready")
        # The cpu_kernel option's names for what each layer became (int4 falls back where it does not fit).
        kernels = sorted({"int4" if isinstance(m, Int4Linear) else "dequantize" for m in model.modules()
                          if isinstance(m, (Int4Linear, DequantLinear))})
        runtime = (f"hearth {spec.method} on transformers (cpu, {options.dtype}, "
                   f"{spec.bits}-bit, kernel {'/'.join(kernels)})")
        return TransformersModel(model_dir, model, tokenizer, torch.device("cpu"), dtype, context, loader=self.name,
                                 runtime=runtime, memory=memory.describe())
