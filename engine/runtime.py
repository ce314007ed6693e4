"""Hearth's engine as a loaded Model: chunked prefill, a static KV cache and, on one GPU, the decode step
replayed as a CUDA graph.

Batch-1 decode on a GPU is launch-bound when run eagerly (hundreds of small kernels a token, ~7 us each),
so each decode step is captured once as a CUDA graph and replayed. Attention reads the cache only up to a
power-of-two bucket of the current length (one graph per bucket, sharing one memory pool): reading the
whole static cache every token would cost as much as the weights at long contexts.
On CPU there are no graphs; attention reads exactly the filled part of the cache.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from engine.generation import GenerationEvent, stream
from engine.llama import ACTIVATIONS, SUPPORTED_MODEL_TYPES, ModelArgs, Transformer
from engine.model import Model, Prompt, prompt_ids
from engine.sampling import GenerationParams
from engine.weights import load_transformer

MIN_BUCKET = 256


def unsupported_reason(config: dict) -> str | None:
    """Why the engine cannot run a model with this config.json, or None when it can."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        if model_type == "gemma3" and isinstance(config.get("text_config"), dict):
            return "Gemma 3 with its vision tower (model_type 'gemma3'): the engine runs the text-only gemma3_text"
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    try:
        args = ModelArgs.from_config(config)   # refuses RoPE types it does not implement
    except KeyError as exc:
        return f"config.json lacks {exc}"
    except (TypeError, ValueError) as exc:
        return f"config.json is not one the engine reads: {exc}"
    if args.hidden_act not in ACTIVATIONS:
        return f"activation {args.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}"
    return None


class Engine:
    """A Transformer with its KV cache, the prefill/decode calls, and the decode graphs."""

    def __init__(self, model: Transformer, max_seq_len: int, use_graphs: bool, prefill_chunk: int = 2048):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.use_graphs = use_graphs and self.device.type == "cuda"
        dtype = model.tok_embeddings.weight.dtype
        try:
            model.setup_caches(max_seq_len, dtype)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # CPU allocation failures are RuntimeErrors
            a = model.args
            size = 2 * a.n_layers * a.n_kv_heads * a.head_dim * max_seq_len * dtype.itemsize
            raise ValueError(f"the KV cache for a context of {max_seq_len} tokens ({size / 2**30:.1f} GiB) does "
                             f"not fit on {self.device}; a smaller context_length would "
                             f"({str(exc).splitlines()[0][:120]})") from None
        # Static inputs the graphs read: overwrite them in place, then replay.
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def prefill(self, prompt_ids: Sequence[int], cancel: threading.Event | None = None) -> torch.Tensor:
        """Run the prompt in chunks (bounded activation memory); returns fp32 logits [V] after it. A set
        `cancel` ends it after the chunk in progress (Stop during a long prompt): the logits are then the
        last chunk's, and the generation loop, which checks `cancel` after its first token, ends the reply."""
        ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        for start in range(0, len(ids), self.prefill_chunk):
            end = min(start + self.prefill_chunk, len(ids))
            input_pos = torch.arange(start, end, device=self.device)
            logits = self.model(ids[None, start:end], input_pos, kv_len=end, last_only=True)
            if cancel is not None and cancel.is_set():
                break
        return logits[0, -1]

    def bucket(self, length: int) -> int:
        b = MIN_BUCKET
        while b < length:
            b *= 2
        return min(b, self.max_seq_len)

    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Append `token` (0-d, on device) at position `pos`; returns fp32 logits [V]. Under graphs the
        result is a static buffer that the next call overwrites: read it before then."""
        self.token.copy_(token.view(1, 1))
        self.pos.fill_(pos)
        if not self.use_graphs:
            return self.model(self.token, self.pos, kv_len=pos + 1)[0, -1]
        kv_len = self.bucket(pos + 1)
        if kv_len not in self.graphs:
            self.graphs[kv_len] = self._capture(kv_len)
        graph, logits = self.graphs[kv_len]
        graph.replay()
        return logits[0, -1]

    def _capture(self, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (lazy inits, workspace allocations) before capturing. Both runs write
        # the current token's K/V into its own slot, which the replay then rewrites with the same values.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(self.token, self.pos, kv_len=kv_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(self.token, self.pos, kv_len=kv_len)
        return graph, logits


class EngineStepper:
    """One generation's view of the engine (engine.generation.Stepper)."""

    def __init__(self, engine: Engine, cancel: threading.Event | None = None):
        self.engine = engine
        self.device = engine.device
        self.pos = 0
        self.cancel = cancel   # checked between prefill chunks

    def start(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        if not prompt_ids:
            raise ValueError("the prompt is empty: the model needs at least one token to continue from")
        if len(prompt_ids) >= self.engine.max_seq_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) does not fit the context "
                             f"({self.engine.max_seq_len} tokens)")
        self.pos = len(prompt_ids)
        return self.engine.prefill(prompt_ids, self.cancel)

    def step(self, token_id: torch.Tensor) -> torch.Tensor:
        logits = self.engine.decode(token_id, self.pos)
        self.pos += 1
        return logits


class EngineModel(Model):
    """A loaded model run by Hearth's engine (the engine.model.Model contract)."""

    def __init__(self, model_dir: Path, engine: Engine, tokenizer, eos_token_ids: list[int],
                 context_length: int, loader: str, runtime: str, memory: str = ""):
        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.context_length = context_length
        self.loader = loader
        self.runtime = runtime
        self.memory = memory   # the loader's estimate (loaders.config_check), shown beside the runtime

    def generate(self, prompt: Prompt, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        return stream(EngineStepper(self.engine, cancel), self.tokenizer, prompt_ids(prompt), params, self.eos_token_ids,
                      cancel, self.context_length)

    def unload(self) -> None:
        device = self.engine.device
        self.engine = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def parse_gpu_split(value: str | Sequence[float] | None) -> list[float] | None:
    """"20,24" (GB per GPU, text-generation-webui style) -> [20.0, 24.0]; empty -> None."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    split = [float(p) for p in parts]
    if any(p <= 0 for p in split):
        raise ValueError("gpu_split takes positive GB figures, one per GPU, e.g. 20,24")
    return split


def load_engine_model(model_dir: Path, *, tokenizer, eos_token_ids: list[int], context_length: int,
                      loader: str, device: str = "auto", gpu_split: str | Sequence[float] | None = None,
                      cuda_graph: bool = True, repack_int4: bool = True, config: dict | None = None,
                      memory: str = "", progress=None) -> EngineModel:
    """Load a Llama-family folder (fp16/bf16/fp32, GPTQ or AWQ safetensors) into the engine.

    model_dir: folder with config.json and *.safetensors (quantization read from config.json's
        quantization_config, quantize_config.json or quant_config.json).
    tokenizer, eos_token_ids: from the calling loader; passed through to the Model.
    context_length: tokens the static KV cache holds (prompt + reply).
    loader: the calling loader's name, shown as Model.loader.
    device: "auto" (first CUDA GPU if any, else CPU), "cuda" or "cpu". Weights run in bf16 on CUDA (the
        int4 kernel's activation type), fp32 on CPU.
    gpu_split: GB per GPU, e.g. "20,24": layers are spread across GPUs in that proportion (no CUDA graph
        then). None: everything on the first GPU.
    cuda_graph: capture the decode step as CUDA graphs (single GPU only).
    repack_int4: on CPU, store float weights that already lie exactly on a 4-bit grid (GGUF Q4 conversions
        such as the default model) as int4 for tinygemm's CPU kernel: a quarter of the bytes per token.
    config: config.json's content when the caller has read it already (read here otherwise).
    memory: the caller's estimate of what the load holds, shown beside the runtime.
    progress: callable(fraction, message) or None.
    Returns an EngineModel whose `runtime` names device, kernels and graph use.
    Raises ValueError for configs the engine cannot run (see unsupported_reason).
    """
    model_dir = Path(model_dir)
    if config is None:
        config = json.loads((model_dir / "config.json").read_text())
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"the engine cannot run {model_dir.name}: {reason}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        split = parse_gpu_split(gpu_split)
        count = len(split) if split else 1
        if count > torch.cuda.device_count():
            raise ValueError(f"gpu_split names {count} GPUs but {torch.cuda.device_count()} are present")
        devices = [torch.device("cuda", i) for i in range(count)]
        dtype = torch.bfloat16
    else:
        split, devices, dtype = None, [torch.device("cpu")], torch.float32
    model, kinds = load_transformer(model_dir, devices, dtype, split, repack_int4=repack_int4 and device == "cpu",
                                    progress=progress, config=config)
    graphs = cuda_graph and len(devices) == 1 and device == "cuda"
    engine = Engine(model, context_length, use_graphs=graphs, prefill_chunk=2048 if device == "cuda" else 512)
    where = f"cuda x{len(devices)}" if len(devices) > 1 else device
    runtime = (f"hearth engine ({where}, {', '.join(sorted(kinds))}"
               f"{', CUDA graph' if graphs else ''})")
    if progress:
        progress(1.0, "ready")
    return EngineModel(model_dir, engine, tokenizer, eos_token_ids, context_length, loader, runtime, memory)
