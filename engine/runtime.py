"""Hearth's engine as a loaded Model: chunked prefill, a static KV cache and, on one GPU, the decode step
replayed as a CUDA graph.

Batch-1 decode on a GPU is launch-bound when run eagerly (hundreds of small kernels a token, ~7 us each),
so each decode step is captured once as a CUDA graph and replayed. Attention reads the cache only up to a
power-of-two bucket of the current length (one graph per bucket, sharing one memory pool): reading the
whole static cache every token would cost as much as the weights at long contexts.
On CPU there are no graphs; attention reads exactly the filled part of the cache.
Under graphs the step also samples (engine.graph_sampling) for every generation whose parameters that sampler
expresses, so the host reads back only the chosen id; the others keep the shared sampler after the step.
"""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from engine.batch import Batch
from engine.generation import GenerationEvent, stream
from engine.graph_sampling import GraphSampler, Plan, unsupported
from engine.llama import ACTIVATIONS, SUPPORTED_MODEL_TYPES, ModelArgs, Transformer
from engine.model import Model, Prompt, prompt_ids
from engine.sampling import GenerationParams
from engine.weights import load_transformer

MIN_BUCKET = 256
MAX_SLOTS = 8   # the int4 kernel reads each weight once for up to 8 rows
GPU_HEADROOM = 2 * 2**30   # bytes left free after the KV cache's extra rows (at least a tenth of the GPU)


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

    def __init__(self, model: Transformer, max_seq_len: int, use_graphs: bool, prefill_chunk: int = 2048,
                 sample_in_step: bool | None = None, slots: int = 1):
        """sample_in_step: pick tokens inside the decode step (engine.graph_sampling); None: when graphs are
        used (on CPU it only serves tests: the same ops, eagerly). slots: generations that decode at once
        (engine.batch), each with its own row of the KV cache; on a GPU fewer when their caches do not fit."""
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.use_graphs = use_graphs and self.device.type == "cuda"
        dtype = model.tok_embeddings.weight.dtype
        self.slots = self._setup_caches(max_seq_len, dtype, slots)
        # Static inputs the graphs read: overwrite them in place, then replay.
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # One graph per cache bucket and sampling plan (None: the step returns logits only).
        self.graphs: dict[tuple[int, Plan | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        in_step = self.use_graphs if sample_in_step is None else sample_in_step
        self.sampler = GraphSampler(model.args.vocab_size, max_seq_len, self.device) if in_step else None

    def _setup_caches(self, max_seq_len: int, dtype: torch.dtype, slots: int) -> int:
        """Allocate the KV cache with up to `slots` rows: on a GPU only as many as leave GPU_HEADROOM free (a
        batch of streams is worth less than room for activations and graphs); returns the rows allocated."""
        a = self.model.args
        row = 2 * a.n_layers * a.n_kv_heads * a.head_dim * max_seq_len * dtype.itemsize
        if slots > 1 and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            slots = max(1, min(slots, (free - max(GPU_HEADROOM, total // 10)) // row))
        try:
            self.model.setup_caches(max_seq_len, dtype, slots)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # CPU allocation failures are RuntimeErrors
            raise ValueError(f"the KV cache for a context of {max_seq_len} tokens ({row / 2**30:.1f} GiB) does "
                             f"not fit on {self.device}; a smaller context_length would "
                             f"({str(exc).splitlines()[0][:120]})") from None
        return slots

    def prefill(self, prompt_ids: Sequence[int], cancel: threading.Event | None = None) -> torch.Tensor:
        """Run the prompt in chunks (bounded activation memory); returns fp32 logits [V] after it. A set
        `cancel` ends it after the chunk in progress (Stop during a long prompt): the logits are then the
        last chunk's, and the generation loop, which checks `cancel` after its first token, ends the reply."""
        for start in range(0, len(prompt_ids), self.prefill_chunk):
            logits = self.prefill_chunk_at(prompt_ids[start:start + self.prefill_chunk], start)
            if cancel is not None and cancel.is_set():
                break
        return logits

    def prefill_chunk_at(self, ids: Sequence[int], start: int, row: int = 0) -> torch.Tensor:
        """Run prompt ids that start at position `start` into KV-cache row `row`; fp32 logits [V] after them."""
        input_pos = torch.arange(start, start + len(ids), device=self.device)
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        with self._cache_rows_from(row):
            return self.model(tokens, input_pos, kv_len=start + len(ids), last_only=True)[0, -1]

    @contextlib.contextmanager
    def _cache_rows_from(self, row: int) -> Iterator[None]:
        """Calls inside use KV-cache rows from `row` on (KVCache.use_row); row 0 again after."""
        caches = [layer.attention.kv_cache for layer in self.model.layers]
        for cache in caches:
            cache.use_row(row)
        try:
            yield
        finally:
            for cache in caches:
                cache.use_row(0)

    def prefill_rows(self, chunks: Sequence[tuple[Sequence[int], int]], first_row: int) -> list[torch.Tensor]:
        """Prompt chunks of several generations in one forward pass: chunks[b] = (ids, start) runs into KV-cache
        row first_row + b at positions start.. (rows in a row). Returns each chunk's fp32 logits [V] after it.
        The weights are read (a quantized layer dequantized) once for all of them, which is most of a short
        prompt's cost. Shorter chunks are padded to the longest; their padding writes the cache beyond the
        chunk, where the row's own later tokens overwrite it before any query reads it (at most at the last
        position, the junk slot padding rows of a batched step write too)."""
        if len(chunks) == 1:
            ids, start = chunks[0]
            return [self.prefill_chunk_at(ids, start, first_row)]
        width = max(len(ids) for ids, _ in chunks)
        tokens = torch.tensor([list(ids) + [ids[-1]] * (width - len(ids)) for ids, _ in chunks], dtype=torch.long,
                              device=self.device)
        starts = torch.tensor([start for _, start in chunks], device=self.device)
        positions = (starts[:, None] + torch.arange(width, device=self.device)).clamp(max=self.max_seq_len - 1)
        last = torch.tensor([len(ids) - 1 for ids, _ in chunks], device=self.device)
        with self._cache_rows_from(first_row):
            logits = self.model(tokens, positions, kv_len=max(start + len(ids) for ids, start in chunks), last=last)
        return list(logits[:, 0])

    def bucket(self, length: int) -> int:
        b = MIN_BUCKET
        while b < length:
            b *= 2
        return min(b, self.max_seq_len)

    def drop_graphs(self) -> None:
        """Forget the decode graphs (the layers they were captured over changed, e.g. LoRA adapters): the next
        steps capture anew, into a fresh memory pool. Capturing into the pool of graphs already freed trips the
        caching allocator's `use_count > 0` assert."""
        self.graphs.clear()
        if self.use_graphs:
            self.pool = torch.cuda.graph_pool_handle()

    def decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Append `token` (0-d, on device) at position `pos`; returns fp32 logits [V]. Under graphs the
        result is a static buffer that the next call overwrites: read it before then."""
        self.token.copy_(token.view(1, 1))
        return self._run(pos, None)[0, -1]

    def sampling_plan(self, params: GenerationParams) -> Plan | None:
        """How the decode step samples a generation with these params, or None when the shared sampler must
        (engine.graph_sampling.unsupported names why): the one place that chooses."""
        if self.sampler is None or unsupported(params) is not None:
            return None
        return Plan.of(params, self.sampler.vocab)

    def pick(self, logits: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Pick the token after the prompt from its logits [V] (eagerly; `self.sampler` started). Returns the
        static token buffer (0-d), which the next decode_and_pick reads and overwrites."""
        self.sampler.before_pick(plan)
        self.token.copy_(self.sampler.pick(logits, plan).view(1, 1))
        return self.token.view(())

    def decode_and_pick(self, pos: int, plan: Plan) -> torch.Tensor:
        """Append the token in the token buffer at position `pos` and pick the next into it, in one step (one
        graph replay); returns the buffer as `pick` does."""
        self.sampler.before_pick(plan)
        self._run(pos, plan)
        return self.token.view(())

    def _step(self, kv_len: int, plan: Plan | None) -> torch.Tensor:
        """One decode step over the static inputs: logits [1, 1, V]; with a plan it also writes the picked
        token into the token buffer."""
        logits = self.model(self.token, self.pos, kv_len=kv_len)
        if plan is not None:
            self.token.copy_(self.sampler.pick(logits[0, -1], plan).view(1, 1))
        return logits

    def _run(self, pos: int, plan: Plan | None) -> torch.Tensor:
        """The step at position `pos`: eagerly, or by replaying (first capturing) its graph."""
        self.pos.fill_(pos)
        if not self.use_graphs:
            return self._step(pos + 1, plan)
        key = (self.bucket(pos + 1), plan)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _capture(self, kv_len: int, plan: Plan | None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # A picking step also changes the token and the sampler's buffers: the warm-up puts them back.
        kept = [self.token, *self.sampler.state()] if plan is not None else []
        return self.capture(lambda: self._step(kv_len, plan), kept)

    def capture(self, step, kept: Sequence[torch.Tensor] = ()) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture `step()` (a decode step over static inputs; returns its output) as a graph in the engine's
        pool. Warm up on a side stream (lazy inits, workspace allocations) before capturing. Both runs write
        the current tokens' K/V into their own places, which the replay then rewrites with the same values;
        `kept`: other buffers the step changes, put back after each run."""
        saved = [t.clone() for t in kept]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
                for t, copy in zip(kept, saved):
                    t.copy_(copy)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: generations run in threads of their own (engine.batch), and their sampling may launch
        # kernels while this thread captures; only this thread's calls must keep off the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = step()
        return graph, out


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

    def sampling(self, params: GenerationParams) -> "InStepSampling | None":
        """This generation's sampling inside the decode step (engine.generation.StepSampler), or None when the
        shared sampler takes it."""
        plan = self.engine.sampling_plan(params)
        return None if plan is None else InStepSampling(self, params, plan)


class InStepSampling:
    """engine.generation.StepSampler over an EngineStepper: the engine's GraphSampler picks each token inside
    the decode step."""

    def __init__(self, stepper: EngineStepper, params: GenerationParams, plan: Plan):
        self.stepper, self.params, self.plan = stepper, params, plan

    def first(self, logits: torch.Tensor, history: torch.Tensor, seed: int) -> torch.Tensor:
        engine = self.stepper.engine
        engine.sampler.start(self.params, self.plan, history, seed)
        return engine.pick(logits, self.plan)

    def step(self) -> torch.Tensor:
        token = self.stepper.engine.decode_and_pick(self.stepper.pos, self.plan)
        self.stepper.pos += 1
        return token


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
        # Several slots: concurrent generations share each decode step (engine.batch); one: one at a time.
        self.batch = Batch(engine) if engine.slots > 1 else None
        self.concurrent_generations = engine.slots

    def generate(self, prompt: Prompt, params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """With several slots, safe from several threads at once: their decode steps are shared."""
        if self.batch is not None:
            return self.batch.stream(self.tokenizer, prompt_ids(prompt), params, self.eos_token_ids, cancel,
                                     self.context_length)
        stepper = EngineStepper(self.engine, cancel)
        return stream(stepper, self.tokenizer, prompt_ids(prompt), params, self.eos_token_ids, cancel,
                      self.context_length, stepper.sampling(params))

    def drop_graphs(self) -> None:
        """Forget every captured decode graph, the batched steps' too (they share the engine's pool)."""
        if self.batch is not None:
            self.batch.step.graphs.clear()
        self.engine.drop_graphs()

    def unload(self) -> None:
        device = self.engine.device
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        self.engine = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def batch_slots(model: Transformer, device: str) -> int:
    """How many generations a model on `device` ("cuda" or "cpu") decodes at once by default: MAX_SLOTS on
    CUDA; 1 on CPU (a step there costs about its rows' worth, so generations take turns) and for
    mixture-of-experts models (MoE layers gather one token's experts in the captured step; several rows take
    their prompt path, whose shapes follow the router's choice and cannot be captured)."""
    return MAX_SLOTS if device == "cuda" and not model.args.has_moe else 1


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
                      memory: str = "", progress=None, slots: int | None = None) -> EngineModel:
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
    slots: generations decoding at once (engine.batch; 1 for MoE models whatever is asked); None:
        batch_slots (fewer on a GPU when their KV caches do not fit).
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
    # A chosen number stands (tests batch on CPU too), except for MoE models, which decode one row a step.
    if slots is None or model.args.has_moe:
        slots = batch_slots(model, device)
    engine = Engine(model, context_length, use_graphs=graphs, prefill_chunk=2048 if device == "cuda" else 512,
                    slots=slots)
    where = f"cuda x{len(devices)}" if len(devices) > 1 else device
    streams = f"{engine.slots} streams batched" if engine.slots > 1 else "one stream at a time"
    runtime = (f"hearth engine ({where}, {', '.join(sorted(kinds))}"
               f"{', CUDA graph with sampling in it' if graphs else ''}, {streams})")
    if progress:
        progress(1.0, "ready")
    return EngineModel(model_dir, engine, tokenizer, eos_token_ids, context_length, loader, runtime, memory)
