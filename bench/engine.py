"""Benchmark Hearth's engine; prints one JSON object. Never run inside tests.

  python bench/engine.py --gpu [--work DIR] [--exllamav2]   Llama-2-7B-shaped random GPTQ 4-bit g128, GPTQ 4-bit
                                                             g32 act-order, AWQ 4-bit g128, GPTQ 3-bit g128 and
                                                             GPTQ 8-bit g128 checkpoints, and 70B-shaped GPTQ 4-bit
                                                             and 3-bit g128 models built on the GPU, and 7B-shaped
                                                             GGUF Q4_K_M-style, Q8_0 and Q6_K models built on the
                                                             GPU from random blocks; side by side
                                                             HF transformers fp16 generate(), exllamav2 (its own
                                                             generator, same GPTQ folder) and the copy ceiling;
                                                             and today's families at their shapes, 4-bit, built on
                                                             the GPU (bench/families.py): Qwen3-8B AWQ, Gemma-3-12B,
                                                             Phi-4, Mixtral-8x7B, Qwen3-30B-A3B, and transformers
                                                             generate() on the Qwen3-8B shape.
                                                             --only ROWS: just the rows whose names contain one of
                                                             these (comma-separated), e.g.
                                                             hearth_7b_gptq_3bit_g128,hearth_70b_gptq_3bit.
                                                             Each Hearth row: weights GiB on the GPU next to the
                                                             packed bytes (the checkpoint's, or counted for 70B and
                                                             GGUF: the blocks' bytes plus a bf16 embedding).
  python bench/engine.py --gemv [--sweep int4,...,step]      our 4-bit (engine.int4_mma) and 2/3/8-bit
                                                             (engine.lowbit_mma) matmuls over launch configs vs
                                                             tinygemm, bf16 cuBLAS and the copy bandwidth on the
                                                             7B/70B layer shapes; gguf: the GGUF forms (Q4_K, Q8_0,
                                                             Q6_K) at the default launch shape; step: the 7B step's
                                                             128 matmuls (every weight its own, as in the model) in
                                                             one graph, by form, against the copy bandwidth.
  python bench/engine.py --cpu [--trials N]                 the default model on CPU: llama.cpp (original Q4_1
                                                             GGUF, and an F16 copy written to --work) vs Hearth's
                                                             engine vs transformers (converted folder); load s,
                                                             peak RSS, prompt and decode tok/s at 64 and 256 new
                                                             tokens, greedy texts compared, the golden reply.

Decode: 128-token prompt, 256 new tokens, greedy, through the same stream() the app uses (one host sync per
token). Prefill: one 2048-token prompt. Random weights never hit EOS: eos ids are left empty.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Replace this script's folder on the path: bench/engine.py would shadow the engine package otherwise.
sys.path[0] = str(REPO)

from engine import int4_mma, lowbit_mma  # noqa: E402
from engine.generation import collect, stream  # noqa: E402
from engine.llama import KVCache, ModelArgs, Rotary, Transformer  # noqa: E402
from engine.quant_linear import QuantWeight, make_quant_linear  # noqa: E402
from engine.runtime import Engine, EngineModel, EngineStepper, load_engine_model  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402
from engine.weights import SideBySide  # noqa: E402
from bench.families import QWEN3_8B, family_rows  # noqa: E402
from loaders.gguf_repack import BLOCK_TYPES, repack  # noqa: E402

PROMPT, NEW, PREFILL = 128, 256, 2048
TOKENIZER = REPO / "models" / "SmolLM2-135M-Instruct"   # --tokenizer overrides (models/ does not travel)
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                 architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2, torch_dtype="float16")
LLAMA2_70B = dict(LLAMA2_7B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
# Scale of random weights: keeps activations in range through the layers ((q - 8) has std ~4.6).
SCALE = 0.003


def timed(fn, repeat: int = 3) -> float:
    """Median wall seconds of fn() with the GPU drained before and after."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s): the ceiling for streaming weights."""
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    t = timed(lambda: b.copy_(a), 10)
    return 2 * a.numel() * 2 / t / 1e12


def linears(cfg: dict) -> dict[str, tuple[int, int]]:
    """HF linear name suffix -> (in, out) of one decoder layer."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
            "self_attn.o_proj": (d, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}


def step_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of one decoder layer's matmuls as the engine fuses them: q/k/v, o, gate/up, down."""
    args = ModelArgs.from_config(cfg)
    d, kv, f = args.dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    return {"wqkv": (d, d + 2 * kv), "wo": (d, d), "w13": (d, 2 * f), "w2": (f, d)}


def rand_int32(*shape) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device="cuda")


def sym_v1_qzeros(groups: int, n: int, bits: int) -> torch.Tensor:
    """qzeros of a symmetric GPTQ v1 file: every stored zero is 2^(bits-1) - 1, packed along N as a bit
    stream (32 values a block of `bits` words; 4-bit: 0x77777777)."""
    stream = sum(((1 << (bits - 1)) - 1) << (bits * j) for j in range(32))
    block = [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(bits)]
    block = torch.tensor([w - 2**32 if w >= 2**31 else w for w in block], dtype=torch.int32, device="cuda")
    return block.repeat(groups, n // 32)


def write_checkpoint(out: Path, cfg: dict, method: str, group_size: int, act_order: bool, bits: int = 4) -> float:
    """A random GPTQ (sym, v1, `bits` wide) or AWQ (GEMM) checkpoint in the AutoGPTQ/AutoAWQ layouts of
    FORMATS.md; returns the seconds it took."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    d, V = cfg["hidden_size"], cfg["vocab_size"]
    fp16 = lambda *s: (torch.randn(*s, device="cuda") * 0.02).half()
    tensors = {"model.embed_tokens.weight": fp16(V, d), "lm_head.weight": fp16(V, d),
               "model.norm.weight": torch.ones(d, dtype=torch.float16, device="cuda")}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{name}.weight"] = torch.ones(d, dtype=torch.float16, device="cuda")
        # GPTQ's act-order orders a matrix's inputs by its input's Hessian: q, k and v share one order, gate
        # and up another (same input); o and down each have their own.
        orders: dict[str, torch.Tensor] = {}
        for name, (k, n) in linears(cfg).items():
            g = k // group_size
            scales = (torch.rand(g, n, device="cuda") * SCALE + SCALE / 2).half()
            if method == "gptq":
                g_idx = torch.arange(k, device="cuda", dtype=torch.int32) // group_size
                if act_order:
                    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                              "up_proj": "gate_up"}.get(name.split(".")[-1], name)
                    order = orders.setdefault(shared, torch.randperm(k, device="cuda"))
                    g_idx = g_idx[order]
                tensors.update({f"{p}.{name}.qweight": rand_int32(k * bits // 32, n),
                                f"{p}.{name}.qzeros": sym_v1_qzeros(g, n, bits),
                                f"{p}.{name}.scales": scales, f"{p}.{name}.g_idx": g_idx,
                                f"{p}.{name}.bias": torch.zeros(n, dtype=torch.float16, device="cuda")})
            else:
                tensors.update({f"{p}.{name}.qweight": rand_int32(k, n // 8),
                                f"{p}.{name}.qzeros": rand_int32(g, n // 8), f"{p}.{name}.scales": scales})
    save_file({k: v.cpu() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (out / "config.json").write_text(json.dumps(cfg))
    if method == "gptq":
        qc = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": True, "quant_method": "gptq",
              "damp_percent": 0.1, "static_groups": False, "true_sequential": True, "model_file_base_name": "model"}
        (out / "quantize_config.json").write_text(json.dumps(qc))
    else:
        (out / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": group_size,
                                                           "w_bit": 4, "version": "GEMM"}))
    # A real tokenizer for exllamav2's generator and the stream's text; prompts stay below the 32000 vocab.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, out / name)
    return round(time.perf_counter() - start, 1)


def prompt_ids(n: int) -> list[int]:
    return torch.randint(100, 30000, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def bench_engine_model(model: EngineModel) -> dict:
    greedy = GenerationParams(max_new_tokens=NEW, temperature=0, top_k=0, top_p=1.0)
    # What model.generate runs for a prompt of these ids, called on ids directly (the Prompt type around them
    # is the app's business, not the engine's speed).
    generate = lambda: stream(EngineStepper(model.engine), model.tokenizer, prompt_ids(PROMPT), greedy,
                              model.eos_token_ids, None, model.context_length)
    t = time.perf_counter()
    collect(generate())  # captures (and compiles) the graphs it needs
    first_s = time.perf_counter() - t
    runs = [collect(generate())[2] for _ in range(3)]
    stats = sorted(runs, key=lambda s: s.tokens_per_second)[1]
    engine = model.engine
    tok = torch.tensor(5, device="cuda")
    # The decode step alone (graph replay, no sampling or host sync): what the stream loop adds on top.
    step = timed(lambda: [engine.decode(tok, PROMPT + i) for i in range(NEW)]) / NEW
    long = prompt_ids(PREFILL)
    engine.prefill(long)  # first use of the 2048-row shapes (cuBLAS heuristics, kernel builds) not timed
    prefill = timed(lambda: engine.prefill(long), 5)
    return {"decode_tok_s": round(stats.tokens_per_second, 1), "new_tokens": stats.new_tokens,
            "decode_step_only_tok_s": round(1 / step, 1), "first_generation_s": round(first_s, 2),
            "ttft_ms_128": round(stats.time_to_first_token * 1e3, 2),
            "prefill_tok_s_2048": round(PREFILL / prefill, 0),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "runtime": model.runtime}


def bench_samplers(folder: Path) -> dict:
    """Greedy and chat-sampler decode (temperature 0.7, top_p 0.9, top_k 20, repetition_penalty 1.15) and min_p
    0.05 alone, through model.generate as the app runs them (the sampler inside the captured step); the chat
    sampler also through the shared sampler after the step, the path every request took before. Median of 3."""
    from transformers import AutoTokenizer

    from engine.model import Prompt

    model = load_engine_model(folder, tokenizer=AutoTokenizer.from_pretrained(folder), eos_token_ids=[],
                              context_length=4096, loader="bench")
    ids = prompt_ids(PROMPT)
    runs = {"greedy": GenerationParams(max_new_tokens=NEW, temperature=0, top_k=0, top_p=1.0, seed=1),
            "chat_sampler": GenerationParams(max_new_tokens=NEW, temperature=0.7, top_p=0.9, top_k=20,
                                             repetition_penalty=1.15, seed=1),
            "min_p_0.05": GenerationParams(max_new_tokens=NEW, temperature=1.0, top_k=0, top_p=1.0, min_p=0.05,
                                           seed=1)}

    def tok_s(generate) -> float:
        collect(generate())  # captures the graphs this plan needs
        return round(sorted(collect(generate())[2].tokens_per_second for _ in range(3))[1], 1)

    result = {"runtime": model.runtime,
              "in_step": {name: model.engine.sampling_plan(p) is not None for name, p in runs.items()}}
    for name, p in runs.items():
        result[f"{name}_tok_s"] = tok_s(lambda: model.generate(Prompt(text="", ids=ids), p))
    result["chat_sampler_after_the_step_tok_s"] = tok_s(lambda: stream(
        EngineStepper(model.engine), model.tokenizer, ids, runs["chat_sampler"], [], None, model.context_length))
    result["chat_over_greedy"] = round(result["chat_sampler_tok_s"] / result["greedy_tok_s"], 3)
    model.unload()
    return result


def bench_long_context(folder: Path, bandwidth_tb_s: float) -> dict:
    """Decode at long contexts (issue 21): the 7B folder as an 8k model (LLongMA-style linear RoPE x2, a config
    written beside it, the other files linked), greedy and chat-sampler decode of NEW tokens after 4 000- and
    7 800-token prompts, each against its bytes-read ceiling: the bytes a decode step reads (weights less the
    embedding table, of which a step reads one row, plus the KV cache up to the run's average position) over
    the copy bandwidth. TTFT after 128 and 7 800 prompt tokens. Median of 3, after a run that captures graphs."""
    from transformers import AutoTokenizer

    from engine.model import Prompt

    long = folder.with_name(folder.name + "_8k")
    shutil.rmtree(long, ignore_errors=True)
    long.mkdir()
    for f in folder.iterdir():
        if f.name != "config.json":
            (long / f.name).symlink_to(f.resolve())
    config = json.loads((folder / "config.json").read_text())
    config.update(max_position_embeddings=8192, rope_scaling={"rope_type": "linear", "factor": 2.0})
    (long / "config.json").write_text(json.dumps(config))
    model = load_engine_model(long, tokenizer=AutoTokenizer.from_pretrained(long), eos_token_ids=[],
                              context_length=8192, loader="bench")
    net = model.engine.model
    a = net.args
    kv_per_position = 2 * a.n_layers * a.n_kv_heads * a.head_dim * net.tok_embeddings.weight.element_size()
    weights = weight_bytes(net) - net.tok_embeddings.weight.nbytes
    samplers = {"greedy": GenerationParams(max_new_tokens=NEW, temperature=0, top_k=0, top_p=1.0, seed=1),
                "chat_sampler": GenerationParams(max_new_tokens=NEW, temperature=0.7, top_p=0.9, top_k=20,
                                                 repetition_penalty=1.15, seed=1)}

    def median_run(n: int, params: GenerationParams):
        ids = prompt_ids(n)
        generate = lambda: model.generate(Prompt(text="", ids=ids), params)
        collect(generate())
        return sorted((collect(generate())[2] for _ in range(3)), key=lambda s: s.tokens_per_second)[1]

    result = {"runtime": model.runtime, "rope_scaling": a.rope_scaling, "new_tokens": NEW,
              "weights_read_gb": round(weights / 1e9, 3), "kv_bytes_per_position": kv_per_position}
    for n in (4000, 7800):
        ceiling = bandwidth_tb_s * 1e12 / (weights + kv_per_position * (n + NEW / 2))
        result[f"ceiling_tok_s_{n}"] = round(ceiling, 1)
        for name, params in samplers.items():
            stats = median_run(n, params)
            result[f"{name}_tok_s_{n}"] = round(stats.tokens_per_second, 1)
            result[f"{name}_of_ceiling_{n}"] = round(stats.tokens_per_second / ceiling, 3)
            if name == "greedy" and n == 7800:
                result["ttft_ms_7800"] = round(stats.time_to_first_token * 1e3, 1)
    result["ttft_ms_128"] = round(median_run(PROMPT, samplers["greedy"]).time_to_first_token * 1e3, 2)
    model.unload()
    shutil.rmtree(long, ignore_errors=True)
    return result


def bench_concurrent_streams(folder: Path) -> dict:
    """Several streams at once (issue 21, engine.batch): 1, 4 and 8 greedy generations of NEW tokens after
    PROMPT-token prompts, started together on one model as concurrent requests are; aggregate tok/s (all new
    tokens over the wall time) and per-stream decode tok/s (min and median), each against the single-stream
    figure; then the time to first token of a newcomer while 7 streams decode (twice: the first time also waits
    on the graphs of cache buckets the runners reach first, reported apart). After a run per count that
    captures its graphs. Each measured window also reports the streams that ended early and the graphs
    captured and Triton kernels compiled inside it (one-off costs a figure would otherwise hide)."""
    import threading

    from transformers import AutoTokenizer

    from engine.model import Prompt

    model = load_engine_model(folder, tokenizer=AutoTokenizer.from_pretrained(folder), eos_token_ids=[],
                              context_length=4096, loader="bench")
    slots = model.concurrent_generations

    def together(n: int, new: int = NEW, started: threading.Barrier | None = None) -> tuple[float, list]:
        """n generations in threads of their own; (wall seconds, their StatsEvents)."""
        params = GenerationParams(max_new_tokens=new, temperature=0, top_k=0, top_p=1.0)
        stats: list = [None] * n

        def one(i: int) -> None:
            stats[i] = collect(model.generate(Prompt(text="", ids=prompt_ids(PROMPT + i)), params))[2]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        t = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - t, stats

    triton_cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")

    def one_offs() -> dict:
        """Counts of what may cost once inside a measured window: CUDA graphs captured (single-stream and
        batched steps) and Triton kernels compiled into the disk cache."""
        batched = model.batch.step.graphs if model.batch is not None else {}
        graphs = len(model.engine.graphs) + len(batched)
        return {"graphs": graphs, "triton": sum(1 for _ in triton_cache.iterdir()) if triton_cache.is_dir() else 0}

    def new_since(before: dict) -> dict:
        return {k: v - before[k] for k, v in one_offs().items()}

    result = {"runtime": model.runtime, "slots": slots, "new_tokens": NEW, "prompt_tokens": PROMPT}
    for n in (1, 4, 8):
        if n > slots:
            result[f"streams_{n}"] = f"skipped: {slots} slots"
            continue
        together(n)   # captures the graphs of this many rows
        before = one_offs()
        wall, stats = together(n)
        per_stream = sorted(s.tokens_per_second for s in stats)
        result[f"streams_{n}"] = {"aggregate_tok_s": round(n * NEW / wall, 1),
                                  "per_stream_min_tok_s": round(per_stream[0], 1),
                                  "per_stream_median_tok_s": round(per_stream[len(per_stream) // 2], 1),
                                  "ended_early": sum(1 for s in stats if s.new_tokens < NEW),
                                  "made_during_the_run": new_since(before)}
    single = result["streams_1"]["aggregate_tok_s"]
    for n in (4, 8):
        if isinstance(result[f"streams_{n}"], dict):
            row = result[f"streams_{n}"]
            row["aggregate_over_single"] = round(row["aggregate_tok_s"] / single, 2)
            row["min_stream_over_single"] = round(row["per_stream_min_tok_s"] / single, 2)
    if slots >= 8:
        def newcomer_while_seven_run() -> tuple[float, dict]:
            """Seven long streams decode; once they all have, a newcomer's prompt joins them. Its TTFT (ms) and
            the one-off work done meanwhile."""
            runners = threading.Thread(target=lambda: together(7, new=4 * NEW))
            runners.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum(1 for s in list(model.batch.slots) if s.filled > PROMPT + 8) < 7:
                time.sleep(0.01)
            before = one_offs()
            params = GenerationParams(max_new_tokens=16, temperature=0, top_k=0, top_p=1.0)
            newcomer = collect(model.generate(Prompt(text="", ids=prompt_ids(PROMPT + 64)), params))[2]
            made = new_since(before)
            runners.join()
            return round(newcomer.time_to_first_token * 1e3, 2), made

        # The runners' caches grow through cache buckets the runs above never reached: the first time, the
        # newcomer waits on those captures too (reported), the second is the figure.
        first_ttft, first_made = newcomer_while_seven_run()
        result["newcomer_ttft_ms_while_7_run_first_time"] = first_ttft
        result["made_the_first_time"] = first_made
        result["newcomer_ttft_ms_while_7_run"], result["made_while_the_newcomer_started"] = newcomer_while_seven_run()
        batch = model.batch
        result["widest_step"] = batch.widest
        result["widest_prefill"] = batch.widest_prefill
    model.unload()
    return result


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights on the GPU: parameters, buffers (not the KV cache) and the packed kernels' tensors,
    each storage counted once (a tied head shares the embedding's)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, KVCache):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        packed = getattr(module, "packed", None)
        if packed is not None:
            tensors += [t for t in vars(packed).values() if isinstance(t, torch.Tensor)]
            store = getattr(packed, "store", None)       # the kernels' scales (engine.int4_mma.ScaleStore)
            tensors += store.tensors() if store is not None else []
        # MoE layers on CUDA keep their experts stacked, plus slot workspace, outside parameters and buffers.
        tensors += (getattr(module, "stacked", None) or []) + (getattr(module, "slot_tensors", None) or [])
        for t in tensors:
            if t is not None and t.is_cuda:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def packed_bytes_70b(cfg: dict, bits: int, group_size: int) -> int:
    """What a GPTQ file of this shape holds: levels, fp16 scales, packed zeros, int32 g_idx, fp16 embedding
    and head (what write_checkpoint writes for 7B, counted)."""
    per_layer = sum(k * n * bits // 8 + (k // group_size) * n * (2 + bits / 8) + 4 * k
                    for k, n in linears(cfg).values())
    return int(cfg["num_hidden_layers"] * per_layer + 2 * cfg["vocab_size"] * cfg["hidden_size"] * 2)


def bench_folder(folder: Path, **options) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = load_engine_model(folder, tokenizer=tokenizer, eos_token_ids=[], context_length=4096, loader="bench",
                              **options)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    packed = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    weights = weight_bytes(model.engine.model)
    result = {"load_s": round(load_s, 1), "weights_gib": round(weights / 2**30, 2),
              "packed_gib": round(packed / 2**30, 2), "weights_over_packed": round(weights / packed, 3),
              **bench_engine_model(model)}
    model.unload()
    return result


def random_lora(args: ModelArgs, rank: int, seed: int = 0):
    """One random rank-`rank` adapter on every decoder linear (q, k, v, o, gate, up, down), by Hugging Face name
    as loaders.lora reads one from disk (A [r, K], B [N, r], scaling 2)."""
    from engine.lora import LoraWeights

    g = torch.Generator().manual_seed(seed)
    d, q, kv, f = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    shapes = {"self_attn.q_proj": (d, q), "self_attn.k_proj": (d, kv), "self_attn.v_proj": (d, kv),
              "self_attn.o_proj": (q, d), "mlp.gate_proj": (d, f), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}
    layers = {f"model.layers.{i}.{name}": (torch.randn(rank, k, generator=g) * 0.01,
                                           torch.randn(n, rank, generator=g) * 0.01, 2.0)
              for i in range(args.n_layers) for name, (k, n) in shapes.items()}
    return LoraWeights(f"random-r{rank}", layers)


def bench_lora_folder(folder: Path, plain: dict | None, rank: int = 16) -> dict:
    """The folder's model with one random rank-`rank` adapter on every linear, applied through engine.lora (the
    low-rank products beside the 4-bit layers, inside the captured decode graph); decode_vs_plain: its decode
    tok/s over the plain row's (issue 22's bar: >= 0.85)."""
    from transformers import AutoTokenizer

    from engine import lora

    model = load_engine_model(folder, tokenizer=AutoTokenizer.from_pretrained(folder), eos_token_ids=[],
                              context_length=4096, loader="bench")
    torch.cuda.reset_peak_memory_stats()
    lora.apply(model.engine.model, [(random_lora(model.engine.model.args, rank), 1.0)])
    model.drop_graphs()   # as loaders.lora_apply does: the next decode step captures with the adapter
    result = {"lora_rank": rank, **bench_engine_model(model)}
    model.unload()
    if isinstance(plain, dict) and plain.get("decode_tok_s"):
        result["decode_vs_plain"] = round(result["decode_tok_s"] / plain["decode_tok_s"], 3)
    return result


def build_on_gpu(cfg: dict, tokenizer, linear, head=None) -> EngineModel:
    """An engine model made on the GPU directly (too big to write to disk quickly): linear(layer index,
    name, k, n) makes each decoder linear (wqkv, wo, w13, w2), head(k, n) the output head (None: bf16)."""
    args = ModelArgs.from_config(cfg)
    with torch.device("meta"):
        model = Transformer(args)
    dev = torch.device("cuda")
    d, shapes = args.dim, step_shapes(cfg)
    param = lambda t: torch.nn.Parameter(t, requires_grad=False)
    for i, layer in enumerate(model.layers):
        layer.attention.wqkv, layer.attention.wo = linear(i, "wqkv", *shapes["wqkv"]), linear(i, "wo", *shapes["wo"])
        layer.feed_forward.w13, layer.feed_forward.w2 = linear(i, "w13", *shapes["w13"]), linear(i, "w2", *shapes["w2"])
        layer.attention_norm.weight = param(torch.ones(d, dtype=torch.bfloat16, device=dev))
        layer.ffn_norm.weight = param(torch.ones(d, dtype=torch.bfloat16, device=dev))
    model.tok_embeddings.weight = param(torch.randn(args.vocab_size, d, device=dev, dtype=torch.bfloat16) * 0.02)
    if head is None:
        model.output.weight = param(torch.randn(args.vocab_size, d, device=dev, dtype=torch.bfloat16) * 0.02)
    else:
        model.output = head(d, args.vocab_size)
    model.norm.weight = param(torch.ones(d, dtype=torch.bfloat16, device=dev))
    model.rotary = Rotary(args).to(dev)
    engine = Engine(model.eval(), 4096, use_graphs=True)
    kinds = sorted({f"{m.kind_name}" for m in model.modules() if hasattr(m, "kind_name")})
    return EngineModel(Path("random-on-gpu"), engine, tokenizer, [], 4096, "bench",
                       f"hearth engine (cuda, {', '.join(kinds)}, CUDA graph)")


def named(layer: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Tag a layer with the runtime line's name for it (as engine.weights' loader describes a load)."""
    layer.kind_name = kind
    return layer


def build_random_on_gpu(cfg: dict, group_size: int, tokenizer, bits: int = 4) -> EngineModel:
    """A symmetric GPTQ-shaped engine model of `bits`, its layers made by make_quant_linear as a load would."""
    dev = torch.device("cuda")

    def quant(i: int, name: str, k: int, n: int) -> torch.nn.Module:
        g = k // group_size
        # Scaled so that the spread of s * (q - z) is 4-bit's whatever the width (keeps activations in range).
        scale = SCALE * 4.6 / (2**bits / 12**0.5)
        qw = QuantWeight(q=torch.randint(0, 2**bits, (k, n), dtype=torch.uint8, device=dev),
                         scales=(torch.rand(g, n, device=dev) * scale + scale / 2).half(),   # fp16, as GPTQ's
                         g_idx=torch.arange(k, device=dev) // group_size, bits=bits, group_size=group_size,
                         zeros=torch.full((g, n), 1 << (bits - 1), dtype=torch.uint8, device=dev))
        layer = make_quant_linear(qw, None, dev, torch.bfloat16)
        return named(layer, f"{bits}-bit {layer.kernel}")

    return build_on_gpu(cfg, tokenizer, quant)


# Byte offsets of the fp16 fields (d, dmin) in each benched GGUF block, and their spread: random bits there
# could be inf/NaN, and this keeps s * q + m about as wide as the GPTQ rows' weights (activations in range).
GGUF_FP16 = {"Q4_K": ([0, 2], 1e-4), "Q6_K": ([208], 1e-5), "Q8_0": ([0], 2e-4)}


def random_gguf_weight(type_name: str, k: int, n: int, device: torch.device, counted: list[int]) -> QuantWeight:
    """Random GGUF blocks of `type_name` [n, k] (their fp16 fields finite and small), repacked as a GGUF load
    does (loaders.gguf_repack); their bytes are added to counted."""
    kind = BLOCK_TYPES[type_name]
    blocks = torch.randint(0, 256, (n, k // kind.block, kind.size), dtype=torch.uint8, device=device)
    fields, spread = GGUF_FP16[type_name]
    for at in fields:
        d = (torch.randn(n, k // kind.block, 1, device=device) * spread).half()
        blocks[..., at:at + 2] = d.view(torch.uint8)
    counted.append(blocks.numel())
    return repack(blocks.reshape(n, -1), type_name, k)


def gguf_linear(type_name: str, k: int, n: int, counted: list[int]) -> torch.nn.Module:
    """A CUDA layer from random GGUF blocks (random_gguf_weight), made by make_quant_linear as a GGUF load
    does."""
    dev = torch.device("cuda")
    layer = make_quant_linear(random_gguf_weight(type_name, k, n, dev, counted), None, dev, torch.bfloat16)
    return named(layer, f"{type_name} {layer.kernel}")


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down Q4_K_M stores as Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def build_gguf_on_gpu(cfg: dict, tokenizer, mix: str) -> tuple[EngineModel, int]:
    """A 7B-shaped GGUF model of random blocks: "Q4_K_M" mixes as llama.cpp's quantizer does (Q4_K; Q6_K for
    the output head, and attn_v and ffn_down in more_bits layers: v then sits beside the Q4_K q/k as a
    loader would place it), else every linear and the head in that type. Returns it and the bytes a GGUF
    file's tensors would hold (the blocks, plus the embedding counted as bf16, as it is held)."""
    counted: list[int] = []
    n_layers, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]

    def linear(i: int, name: str, k: int, n: int) -> torch.nn.Module:
        if mix != "Q4_K_M":
            return gguf_linear(mix, k, n, counted)
        six = more_bits(i, n_layers)
        if name == "wqkv" and six:
            return SideBySide([gguf_linear("Q4_K", k, n - kv, counted), gguf_linear("Q6_K", k, kv, counted)])
        return gguf_linear("Q6_K" if name == "w2" and six else "Q4_K", k, n, counted)

    head = lambda k, n: gguf_linear("Q6_K" if mix == "Q4_K_M" else mix, k, n, counted)
    model = build_on_gpu(cfg, tokenizer, linear, head)
    embedding = cfg["vocab_size"] * d * 2
    return model, sum(counted) + embedding


def bench_hf_fp16(cfg: dict) -> dict:
    """transformers generate() on an fp16 random model of this config.json shape (64 new tokens: it is slow)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    new = 64
    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items()
                                                         if k not in ("model_type", "torch_dtype")})
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.tensor([prompt_ids(PROMPT)], device="cuda")
    gen = lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    gen()
    t = timed(gen, 1)
    result = {"decode_tok_s": round(new / t, 1), "new_tokens": new, "note": "generate(), incl. prefill"}
    del model
    torch.cuda.empty_cache()
    return result


EXL2_SCRIPT = r"""
import json, sys, time, torch
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
folder, prompt, new, prefill_len = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = ExLlamaV2Config(folder); config.max_seq_len = 4096
t = time.perf_counter()
model = ExLlamaV2(config); cache = ExLlamaV2Cache(model, max_seq_len=4096, lazy=True); model.load_autosplit(cache)
load_s = time.perf_counter() - t
tokenizer = ExLlamaV2Tokenizer(config)
gen = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=False)
settings = ExLlamaV2Sampler.Settings.greedy()
def run(n):
    job = ExLlamaV2DynamicJob(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                              gen_settings=settings, stop_conditions=[])
    gen.enqueue(job); t0 = time.perf_counter(); first = None; count = 0
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r.get("stage") == "streaming" and "token_ids" in r and r["token_ids"].numel():
                count += r["token_ids"].numel()
                if first is None: first = time.perf_counter()
    end = time.perf_counter()
    return count, first - t0, (count - 1) / (end - first)
run(8)
runs = sorted(run(new) for _ in range(3))
count, ttft, tps = sorted(runs, key=lambda r: r[2])[1]
ids = torch.randint(100, 30000, (1, prefill_len))
times = []
for _ in range(3):
    cache.current_seq_len = 0; torch.cuda.synchronize(); t = time.perf_counter()
    model.forward(ids, cache, last_id_only=True); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
print("EXL2JSON" + json.dumps({"decode_tok_s": round(tps, 1), "new_tokens": count, "ttft_ms_128": round(ttft * 1e3, 2),
                               "prefill_tok_s_2048": round(prefill_len / sorted(times)[1]), "load_s": round(load_s, 1),
                               "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                               "generator": "ExLlamaV2DynamicGenerator(paged=False)"}))
"""


def bench_exllamav2(folder: Path, build: subprocess.Popen) -> dict:
    if build.wait():
        return {"error": f"exllamav2 extension build failed ({build.returncode})"}
    proc = subprocess.run([sys.executable, "-c", EXL2_SCRIPT, str(folder), json.dumps(prompt_ids(PROMPT)),
                           str(NEW), str(PREFILL)], capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("EXL2JSON"):
            return json.loads(line[len("EXL2JSON"):])
    return {"error": (proc.stdout + proc.stderr)[-1500:]}


def section(results: dict, name: str, fn) -> None:
    """Run one measurement; a failure is recorded, not fatal, so one run still reports the rest."""
    t = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # report and go on: the device time is spent either way
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
    print(f"[{time.perf_counter() - t:6.1f}s] {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    torch.cuda.empty_cache()


def gpu(work: Path, with_exllamav2: bool, only: list[str] | None = None) -> dict:
    """only: run just the rows whose names contain one of these (e.g. hearth_7b_gptq_3bit), to spend a lease's
    minutes on the rows a change touches; the copy bandwidth is always measured."""
    from transformers import AutoTokenizer

    def wanted(name: str) -> bool:   # a row `only` keeps ("name$": that row alone)
        return not only or any(name == o[:-1] if o.endswith("$") else o in name for o in only)

    def measure(results: dict, name: str, fn) -> None:   # section(), for the rows `only` keeps
        if wanted(name):
            section(results, name, fn)

    build = None
    if with_exllamav2:  # its extension compiles at first import: start that now, on the CPUs
        build = subprocess.Popen([sys.executable, "-c", "import exllamav2.ext"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    section(results, "copy_bandwidth_tb_s", lambda: round(copy_bandwidth(), 3))
    weights_gb = 3.5  # 7B: 6.5e9 params at 4 bits + fp16 embedding/head and scales
    results["ceiling_tok_s_7b_4bit"] = round(results["copy_bandwidth_tb_s"] * 1e3 / weights_gb, 0) \
        if isinstance(results["copy_bandwidth_tb_s"], float) else None
    variants = {"gptq_4bit_g128": ("gptq", 128, False, 4), "gptq_4bit_g32_actorder": ("gptq", 32, True, 4),
                "awq_4bit_g128": ("awq", 128, False, 4), "gptq_3bit_g128": ("gptq", 128, False, 3),
                "gptq_8bit_g128": ("gptq", 128, False, 8)}
    for i, (name, (method, gs, act, bits)) in enumerate(variants.items()):
        folder = work / name
        rows = ("", "_samplers", "_lora_r16", "_long_context", "_concurrent") if name == "gptq_4bit_g128" else ("",)
        if not any(wanted(f"hearth_7b_{name}{row}") for row in rows):   # the rows that read this checkpoint
            continue
        section(results, f"write_{name}_s", lambda: write_checkpoint(folder, LLAMA2_7B, method, gs, act, bits))
        if i == 0 and build is not None:
            build.wait()  # the extension build takes every CPU core: let it finish before timing anything
        measure(results, f"hearth_7b_{name}", lambda: bench_folder(folder))
        if name != "gptq_4bit_g128":
            shutil.rmtree(folder, ignore_errors=True)
    measure(results, "hearth_7b_gptq_4bit_g128_samplers", lambda: bench_samplers(work / "gptq_4bit_g128"))
    measure(results, "hearth_7b_gptq_4bit_g128_lora_r16",
            lambda: bench_lora_folder(work / "gptq_4bit_g128", results.get("hearth_7b_gptq_4bit_g128")))
    measure(results, "hearth_7b_gptq_4bit_g128_long_context",
            lambda: bench_long_context(work / "gptq_4bit_g128", results["copy_bandwidth_tb_s"]))
    measure(results, "hearth_7b_gptq_4bit_g128_concurrent",
            lambda: bench_concurrent_streams(work / "gptq_4bit_g128"))
    # the checkpoints' tokenizer (copied from TOKENIZER when they were written)
    tokenizer = AutoTokenizer.from_pretrained(work / "gptq_4bit_g128" if (work / "gptq_4bit_g128").is_dir()
                                              else TOKENIZER)

    def seventy(bits: int):
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model = build_random_on_gpu(LLAMA2_70B, 128, tokenizer, bits)
        return built_on_gpu(model, packed_bytes_70b(LLAMA2_70B, bits, 128), t)

    def built_on_gpu(model: EngineModel, packed: int, t: float) -> dict:
        build_s = time.perf_counter() - t
        build_peak = torch.cuda.max_memory_allocated()
        # The run's own peak (weights, the 4096-token cache, activations), apart from the build's (random
        # levels drawn a matrix at a time, as a load unpacks them).
        torch.cuda.reset_peak_memory_stats()
        weights = weight_bytes(model.engine.model)
        result = {"build_on_gpu_s": round(build_s, 1), "build_peak_gib": round(build_peak / 2**30, 2),
                  "weights_gib": round(weights / 2**30, 2), "packed_gib": round(packed / 2**30, 2),
                  "weights_over_packed": round(weights / packed, 3), **bench_engine_model(model)}
        model.unload()
        return result

    def gguf(mix: str) -> dict:
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model, packed = build_gguf_on_gpu(LLAMA2_7B, tokenizer, mix)
        return built_on_gpu(model, packed, t)

    for mix in ("Q4_K_M", "Q8_0", "Q6_K"):
        measure(results, f"hearth_7b_gguf_{mix.lower()}", lambda: gguf(mix))
    family_rows(results, measure, tokenizer, built_on_gpu)
    measure(results, "hearth_70b_gptq_4bit_g128", lambda: seventy(4))
    measure(results, "hearth_70b_gptq_3bit_g128", lambda: seventy(3))

    measure(results, "hf_transformers_fp16_7b", lambda: bench_hf_fp16(LLAMA2_7B))
    measure(results, "hf_transformers_fp16_qwen3_8b", lambda: bench_hf_fp16(QWEN3_8B))
    if with_exllamav2:
        measure(results, "exllamav2_7b_gptq_4bit_g128", lambda: bench_exllamav2(work / "gptq_4bit_g128", build))
    return results


# --gemv's launch shapes: warps x unroll, and the shapes config_for picks (with min_blocks, blocks an SM).
SWEPT_SHAPES = [int4_mma.MmaConfig(w, u) for w in (8, 16, 32) for u in (1, 2)] + [
    int4_mma.MmaConfig(8, 1, 2), int4_mma.MmaConfig(8, 1, 4), int4_mma.MmaConfig(8, 1, 6),
    int4_mma.MmaConfig(16, 1, 2), int4_mma.MmaConfig(20, 1), int4_mma.MmaConfig(24, 1, 2)]


def launch_shapes(matmul, x, packed: list, nbytes: int, error) -> tuple[dict, list]:
    """--gemv: each launch shape's TB/s, relative error (error(out) against the fp64 reference) and us for
    matmul(x, packed[i], cfg), the copies rotated so the weights stream from memory. Returns ({"warps/unroll":
    [TB/s, error, us] or the failure}, [(TB/s, cfg) of the accurate shapes, fastest first])."""
    row, ranked = {}, []
    for cfg in SWEPT_SHAPES:
        try:
            e = error(matmul(x, packed[0], cfg))
            t = rotating_graph_time(lambda i: (lambda: matmul(x, packed[i], cfg)), nbytes)
        except Exception as exc:  # a shape that cannot launch is reported, the sweep goes on
            row[shape_name(cfg)] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        tbs = nbytes / t / 1e12
        row[shape_name(cfg)] = [round(tbs, 2), f"{e:.1e}", round(t * 1e6, 1)]
        if e < 1e-2:
            ranked.append((tbs, cfg))
    ranked.sort(key=lambda r: -r[0])
    return row, ranked


def shape_name(cfg) -> str:
    """warps/unroll, and /min_blocks where one is given."""
    return f"{cfg.warps}/{cfg.unroll}" + (f"/{cfg.min_blocks}" if cfg.min_blocks else "")


def graph_time(fn, calls: int = 20) -> float:
    """Seconds per fn() replayed inside one CUDA graph of `calls` calls (no launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, 10) / calls


GEMV_SHAPES = {"wo 4096x4096": (4096, 4096), "w2 11008x4096": (11008, 4096), "wqkv 4096x12288": (4096, 12288),
               "w13 4096x22016": (4096, 22016), "w13 70b 8192x57344": (8192, 57344)}


def rotating_graph_time(make_call, nbytes: int, calls: int = 24) -> float:
    """Seconds per call of make_call(i) (i = which of several weight copies), replayed in one CUDA graph. The
    copies together exceed the 50 MB L2, so every call streams its weights from memory as in a real step."""
    copies = max(1, -(-256 * 2**20 // nbytes))
    fns = [make_call(i) for i in range(copies)]
    return graph_time(lambda: [fns[i % copies]() for i in range(calls)], 1) / calls


def gemv_sweep() -> dict:
    """Hearth's tensor-core int4 matmul (engine.int4_mma) over launch configs, against tinygemm and bf16 cuBLAS,
    at M=1 on the 7B/70B layer shapes (act-order: also with x gathered first); effective TB/s counts 4-bit
    weights plus scales. Every config's result is checked against an fp64 reference, and the default config
    also at 3 and 8 rows, with per-group zeros, and through `dequantize`."""
    res = {}
    cases = [(name, shape, 128, False) for name, shape in GEMV_SHAPES.items()] + \
            [("wo 4096x4096 g32 act", (4096, 4096), 32, True), ("w2 11008x4096 g32 act", (11008, 4096), 32, True),
             ("w13 4096x22016 g32 act", (4096, 22016), 32, True), ("wqkv 4096x12288 g32 act", (4096, 12288), 32, True)]
    for name, (k, n), gs, act in cases:
        copies = max(1, -(-256 * 2**20 // (k * n // 2)))
        qs = [torch.randint(0, 16, (k, n), dtype=torch.uint8, device="cuda") for _ in range(copies)]
        scales = [(torch.rand(k // gs, n, device="cuda") * 0.01 + 0.001).half() for _ in qs]
        perm = torch.randperm(k, device="cuda") if act else None
        packed = [int4_mma.pack(q, s, None, gs) for q, s in zip(qs, scales)]
        g = torch.arange(k, device="cuda") // gs
        w_ref = (qs[0].double() - 8) * scales[0].double()[g]                                   # [K, N]
        x8 = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
        default = int4_mma.config_for(n)
        xs = x8[:, perm] if act else x8
        ref8 = xs.double() @ w_ref
        err = lambda out, rows: ((out.double() - ref8[:rows]).norm() / ref8[:rows].norm()).item()
        x = xs[:1].contiguous()
        nbytes = k * n // 2 + scales[0].numel() * 2
        entry = {"checks": {
            "rows3": f"{err(int4_mma.matmul(xs[:3].contiguous(), packed[0], default), 3):.1e}",
            "rows8": f"{err(int4_mma.matmul(xs.contiguous(), packed[0], default), 8):.1e}",
            "dequantize": f"{((int4_mma.dequantize(packed[0]).double().t() - w_ref).norm() / w_ref.norm()).item():.1e}",
        }}
        zeros = torch.randint(0, 16, (k // gs, n), dtype=torch.uint8, device="cuda")
        pz = int4_mma.pack(qs[0], scales[0], zeros, gs)
        wz = (qs[0].double() - zeros.double()[g]) * scales[0].double()[g]
        entry["checks"]["zeros_rows1"] = f"{((int4_mma.matmul(x, pz, default).double() - xs[:1].double() @ wz).norm() / (xs[:1].double() @ wz).norm()).item():.1e}"
        t_deq = rotating_graph_time(lambda i: (lambda: int4_mma.dequantize(packed[i])), nbytes, calls=8)
        entry["dequantize_write_tb_s"] = round((nbytes + 2 * k * n) / t_deq / 1e12, 2)
        entry["checks"]["zeros_dequantize"] = f"{((int4_mma.dequantize(pz).double().t() - wz).norm() / wz.norm()).item():.1e}"
        del pz
        row, ranked = launch_shapes(int4_mma.matmul, x, packed, nbytes, lambda out: err(out, 1))
        entry.update(best_tb_s=round(ranked[0][0], 2) if ranked else None,
                     best_config=ranked[0][1].__dict__ if ranked else None, all=row)
        if act:  # a weight whose order the layer before cannot produce: gathered by index_select or in the kernel
            cfg = int4_mma.config_for(n, gathers=True)
            x_orig, p32 = x8[:1].contiguous(), perm.to(torch.int32)
            entry["checks"]["gather_in_kernel"] = f"{err(int4_mma.matmul(x_orig, packed[0], cfg, p32), 1):.1e}"
            t = rotating_graph_time(lambda i: (lambda: int4_mma.matmul(x_orig.index_select(1, perm), packed[i], cfg)),
                                    nbytes)
            entry["with_index_select_tb_s"] = round(nbytes / t / 1e12, 2)
            t = rotating_graph_time(lambda i: (lambda: int4_mma.matmul(x_orig, packed[i], cfg, p32)), nbytes)
            entry["gather_in_kernel_tb_s"] = round(nbytes / t / 1e12, 2)
        else:
            sz = torch.rand(k // gs, n, 2, device="cuda").to(torch.bfloat16)
            tg = [torch.ops.aten._convert_weight_to_int4pack(((q.t()[:, 0::2] << 4) | q.t()[:, 1::2]).contiguous(), 8)
                  for q in qs]
            t = rotating_graph_time(lambda i: (lambda: torch.ops.aten._weight_int4pack_mm(x, tg[i], gs, sz)), nbytes)
            entry["tinygemm_tb_s"] = round(nbytes / t / 1e12, 2)
            del tg
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(-(-copies // 4))]
            t = rotating_graph_time(lambda i: (lambda: x @ ws[i % len(ws)].t()), 2 * k * n)
            entry["cublas_bf16_tb_s"] = round(2 * k * n / t / 1e12, 2)
            del ws
        res[name] = entry
        print(name, entry["best_tb_s"], entry["best_config"], entry.get("tinygemm_tb_s"), entry.get("cublas_bf16_tb_s"),
              entry.get("with_index_select_tb_s"), entry.get("gather_in_kernel_tb_s"), entry.get("dequantize_write_tb_s"),
              entry["checks"], file=sys.stderr, flush=True)
        del qs, packed, scales
        torch.cuda.empty_cache()
    return res


def lowbit_sweep(widths: tuple[int, ...] = (3, 8, 2)) -> dict:
    """engine.lowbit_mma (GPTQ 2/3/8-bit) over launch configs at M=1 on the 7B/70B layer shapes, g128 and
    symmetric, against the copy bandwidth: effective TB/s counts the packed levels plus fp16 scales. Every
    config is checked against an fp64 reference; the default config also at 3 and 8 rows, with per-group
    zeros, and through `dequantize` (whose rate counts the bf16 it writes)."""
    res = {"copy_tb_s": round(copy_bandwidth(), 3)}
    cases = [(bits, name, shape) for bits in widths for name, shape in GEMV_SHAPES.items()
             if bits == 3 or "70b" not in name]
    for bits, name, (k, n) in cases:
        gs = 128
        nbytes = k * n * bits // 8 + (k // gs) * n * 2
        copies = max(1, -(-256 * 2**20 // nbytes))
        qs = [torch.randint(0, 2**bits, (k, n), dtype=torch.uint8, device="cuda") for _ in range(copies)]
        scales = [(torch.rand(k // gs, n, device="cuda") * 0.01 + 0.001).half() for _ in qs]
        packed = [lowbit_mma.pack(q, s_, None, gs, bits) for q, s_ in zip(qs, scales)]
        g = torch.arange(k, device="cuda") // gs
        w_ref = (qs[0].double() - 2 ** (bits - 1)) * scales[0].double()[g]                   # [K, N]
        x8 = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
        ref8 = x8.double() @ w_ref
        err = lambda out, rows: ((out.double() - ref8[:rows]).norm() / ref8[:rows].norm()).item()
        default = lowbit_mma.config_for(n, lowbit_mma.WIDTH[bits])
        x = x8[:1].contiguous()
        zeros = torch.randint(0, 2**bits, (k // gs, n), dtype=torch.uint8, device="cuda")
        pz = lowbit_mma.pack(qs[0], scales[0], zeros, gs, bits)
        wz = (qs[0].double() - zeros.double()[g]) * scales[0].double()[g]
        entry = {"checks": {
            "rows3": f"{err(lowbit_mma.matmul(x8[:3].contiguous(), packed[0], default), 3):.1e}",
            "rows8": f"{err(lowbit_mma.matmul(x8, packed[0], default), 8):.1e}",
            "dequantize": f"{((lowbit_mma.dequantize(packed[0]).double().t() - w_ref).norm() / w_ref.norm()).item():.1e}",
            "zeros_rows1": f"{((lowbit_mma.matmul(x, pz, default).double() - x.double() @ wz).norm() / (x.double() @ wz).norm()).item():.1e}",
            "zeros_dequantize": f"{((lowbit_mma.dequantize(pz).double().t() - wz).norm() / wz.norm()).item():.1e}",
        }}
        del pz
        t_deq = rotating_graph_time(lambda i: (lambda: lowbit_mma.dequantize(packed[i])), nbytes, calls=8)
        entry["dequantize_write_tb_s"] = round((nbytes + 2 * k * n) / t_deq / 1e12, 2)
        row, ranked = launch_shapes(lowbit_mma.matmul, x, packed, nbytes, lambda out: err(out, 1))
        best = ranked[0][0] if ranked else None
        entry.update(best_tb_s=round(best, 2) if best else None,
                     best_config=ranked[0][1].__dict__ if ranked else None,
                     default_config=default.__dict__, all=row,
                     best_of_copy=round(best / res["copy_tb_s"], 2) if best else None)
        res[f"{bits}-bit {name}"] = entry
        print(f"{bits}-bit", name, entry["best_tb_s"], entry["best_config"], entry["best_of_copy"],
              entry["dequantize_write_tb_s"], entry["checks"], file=sys.stderr, flush=True)
        del qs, packed, scales
        torch.cuda.empty_cache()
    return res


def gguf_sweep() -> dict:
    """The GGUF forms on the 7B layer shapes at M=1 and the default launch shape: Q4_K (4-bit, scales and
    offsets per 32 factored: a byte each times the super-block's d, dmin), Q8_0 (8-bit, fp16 scale per 32),
    Q6_K (6-bit levels in the 8-bit layout, a byte a 16 times d), each from random blocks through loaders.gguf_repack. Rates count the bytes the kernel reads (its
    stored layout) and the GGUF blocks' bytes; checked against fp64."""
    res = {"copy_tb_s": round(copy_bandwidth(), 3)}
    for type_name in ("Q4_K", "Q8_0", "Q6_K"):
        for name, (k, n) in GEMV_SHAPES.items():
            if "70b" in name:
                continue
            counted: list[int] = []
            copies = max(1, -(-256 * 2**20 // (k * n // 2)))
            layers = [gguf_linear(type_name, k, n, counted) for _ in range(copies)]
            packed = layers[0].packed
            stored = packed.nbytes()
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            y = layers[0](x).double()
            w = (int4_mma.dequantize(packed) if type_name == "Q4_K" else lowbit_mma.dequantize(packed)).double()
            ref = x.double() @ w.t()
            t = rotating_graph_time(lambda i: (lambda: layers[i](x)), stored)
            entry = {"us": round(t * 1e6, 1), "stored_tb_s": round(stored / t / 1e12, 2),
                     "gguf_tb_s": round(counted[0] / t / 1e12, 2),
                     "stored_over_gguf": round(stored / counted[0], 3), "form": packed.form,
                     "err_vs_dequantized": f"{((y - ref).norm() / ref.norm()).item():.1e}"}
            res[f"{type_name} {name}"] = entry
            print(type_name, name, entry, file=sys.stderr, flush=True)
            del layers, packed
            torch.cuda.empty_cache()
    return res


def step_form(form: str, k: int, n: int) -> tuple:
    """(y = f(x) through the engine's kernel at its launch rule, the weight's stored bytes, its packed 4-bit
    weight or None) for one random layer of `form`."""
    dev = torch.device("cuda")
    rand = lambda high, rows: torch.randint(0, high, (rows, n), dtype=torch.uint8, device=dev)
    scales = (torch.rand(k // 128, n, device=dev) * 0.01 + 0.001).half()
    if form in ("gptq_4bit_g128", "awq_4bit_g128"):
        p = int4_mma.pack(rand(16, k), scales, rand(16, k // 128) if form.startswith("awq") else None, 128)
        return (lambda x, p=p: int4_mma.matmul(x, p, int4_mma.config_for(n))), p.nbytes(), p
    if form in ("gptq_3bit_g128", "gptq_8bit_g128"):
        bits = int(form[5])
        p = lowbit_mma.pack(rand(2**bits, k), scales, None, 128, bits)
        return (lambda x, p=p: lowbit_mma.matmul(x, p, lowbit_mma.config_for(n, bits))), p.nbytes(), None
    layer = gguf_linear(form[len("gguf_"):].upper(), k, n, [])
    return layer, layer.packed.nbytes(), None


def matmul_step() -> dict:
    """The 7B decode step's 128 quantized matmuls alone (32 layers of wqkv, wo, w13 and w2, every weight its own:
    the model's working set, not a few copies rotating) in one CUDA graph with PDL, at M = 1 and each form's
    launch rules: us a step, us a call by shape, and the weights' TB/s against the copy bandwidth. The single-shape
    sweeps (int4, lowbit, gguf) rotate a few copies of one shape and missed what the model's working set costs:
    AWQ's scale records cost 2% there and 8% here (bench/NOTES-engine.md). The 4-bit forms run again with every
    layer reading layer 0's scales, which then stay in L2: the difference is what reading scales costs."""
    shapes, n_layers = step_shapes(LLAMA2_7B), LLAMA2_7B["num_hidden_layers"]
    copy = copy_bandwidth()
    res = {"copy_tb_s": round(copy, 3)}
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k, _ in shapes.values()}
    step = lambda calls, only=shapes: (lambda: [layer[sh](xs[k]) for layer in calls for sh, (k, _) in only.items()])
    for form in ("gptq_4bit_g128", "awq_4bit_g128", "gptq_3bit_g128", "gptq_8bit_g128", "gguf_q4_k"):
        layers = [{sh: step_form(form, k, n) for sh, (k, n) in shapes.items()} for _ in range(n_layers)]
        calls = [{sh: fn for sh, (fn, _, _) in layer.items()} for layer in layers]
        nbytes = sum(nb for layer in layers for _, nb, _ in layer.values())
        t = graph_time(step(calls), 3)
        entry = {"step_us": round(t * 1e6, 1), "weights_gib": round(nbytes / 2**30, 2),
                 "tb_s": round(nbytes / t / 1e12, 2), "of_copy": round(nbytes / t / 1e12 / copy, 3),
                 "us_by_shape": {sh: round(graph_time(step(calls, {sh: shapes[sh]}), 3) / n_layers * 1e6, 2)
                                 for sh in shapes}}
        if layers[0]["wo"][2] is not None:   # 4-bit: every layer on layer 0's scales
            def on_first(sh: str, p: int4_mma.PackedInt4):
                p = dataclasses.replace(p, store=dataclasses.replace(p.store, scales=layers[0][sh][2].store.scales))
                return lambda x: int4_mma.matmul(x, p, int4_mma.config_for(p.n))
            shared = [{sh: on_first(sh, packed) for sh, (_, _, packed) in layer.items()} for layer in layers]
            entry["scales_in_l2_step_us"] = round(graph_time(step(shared), 3) * 1e6, 1)
        res[form] = entry
        print(form, entry, file=sys.stderr, flush=True)
        del layers, calls
        torch.cuda.empty_cache()
    return res


CPU_RUNTIMES = {   # name: (models/ folder, loader, loader options)
    "llama.cpp": ("SmolLM2-135M-Instruct-GGUF", "llama.cpp", {}),
    "llama.cpp_f16": ("SmolLM2-135M-Instruct-F16", "llama.cpp", {}),
    "hearth_engine": ("SmolLM2-135M-Instruct", "transformers", {"runtime": "engine"}),
    "transformers": ("SmolLM2-135M-Instruct", "transformers", {"runtime": "transformers"}),
}
CPU_PROMPT = [{"role": "user", "content": "Explain gravity to a child."}]
GOLDEN = [{"role": "user", "content": "What is the capital of France?"}]


def cpu_models(work: Path) -> Path:
    """A models/ folder for --cpu: the installed default model's two folders, linked, and SmolLM2-135M-Instruct-F16
    beside them: the Q4_1 file's weights dequantized to F16, for llama.cpp. On quantized weights llama.cpp rounds
    activations to 8 bits, which turns the default model's golden reply away from Paris (tests/test_llamacpp.py);
    on F16 weights it does not, so this row is llama.cpp on the weights the engine runs."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    models = work / "cpu-models"
    models.mkdir(parents=True, exist_ok=True)
    for name in ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-GGUF"):
        if not (models / name).exists():
            (models / name).symlink_to(REPO / "models" / name, target_is_directory=True)
    target = models / "SmolLM2-135M-Instruct-F16" / "SmolLM2-135M-Instruct.F16.gguf"
    if target.is_file():
        return models
    target.parent.mkdir(exist_ok=True)
    reader = GGUFReader(next((REPO / "models" / "SmolLM2-135M-Instruct-GGUF").glob("*.gguf")))
    writer = GGUFWriter(str(target) + ".tmp", reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        value = 1 if key == "general.file_type" else field.contents()      # 1: "mostly F16"
        writer.add_key_value(key, value, field.types[0],
                             field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        if tensor.tensor_type == GGMLQuantizationType.F32:     # norms stay F32, as llama.cpp's converter keeps them
            writer.add_tensor(tensor.name, np.array(tensor.data))
        else:
            writer.add_tensor(tensor.name, quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(target) + ".tmp", target)
    return models


def cpu_one(runtime: str, models: Path) -> dict:
    """One runtime in this process (so its peak RSS is its own): load, then greedy replies of 64 and 256 new
    tokens to the same chat prompt, through the app's own path (AppState: template, prompt, Model.generate), and
    its greedy reply to the golden question."""
    import resource

    from app_settings import AppSettings
    from app_state import AppState

    folder, loader, options = CPU_RUNTIMES[runtime]
    state = AppState(AppSettings(models_dir=models))
    t = time.perf_counter()
    model = state.load_model(folder, loader, options)
    load_s = time.perf_counter() - t
    prompt = state.chat_prompt(CPU_PROMPT)
    result = {"load_s": round(load_s, 2), "runtime": model.runtime, "prompt_tokens": len(prompt.ids)}
    greedy = dict(temperature=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    for new in (64, 256):
        text, done, stats = collect(state.generate(prompt, state.generation_params(max_new_tokens=new, **greedy)))
        assert done.error is None, done.error
        decode_s = stats.seconds - stats.time_to_first_token
        result[f"new_{new}"] = {"new_tokens": stats.new_tokens, "end": done.reason,
                                "prompt_tok_s": round(stats.prompt_tokens / stats.time_to_first_token, 1),
                                "decode_tok_s": round((stats.new_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
                                "text": text}
    result["golden"] = collect(state.generate(state.chat_prompt(GOLDEN),
                                              state.generation_params(max_new_tokens=16, **greedy)))[0]
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    state.unload_model()
    return result


def cpu(work: Path, trials: int = 3) -> dict:
    """The default model on this CPU: llama.cpp on the original Q4_1 GGUF and on its F16 copy, Hearth's engine and
    transformers on the converted folder; same chat prompt, greedy. Each run is a fresh process (load time and
    peak RSS are its own) and the runtimes alternate (llama.cpp, llama.cpp_f16, engine, transformers, llama.cpp,
    ...) so that load from other processes hits all alike; medians of `trials`. decode tok/s excludes the prompt
    (time to first token). The load average is read before and after."""
    models = cpu_models(work)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in CPU_RUNTIMES}
    for _ in range(trials):
        for name in CPU_RUNTIMES:
            out = subprocess.run([sys.executable, __file__, "--cpu-one", name, "--work", str(work)],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed: {out.stderr[-2000:]}")
            runs[name].append(json.loads(out.stdout))
    median = lambda xs: sorted(xs)[len(xs) // 2]
    summary = {}
    for name, results in runs.items():
        row = {"runtime": results[0]["runtime"], "load_s": median([r["load_s"] for r in results]),
               "peak_rss_mib": median([r["peak_rss_mib"] for r in results])}
        for new in (64, 256):
            key = f"new_{new}"
            row[f"prompt_tok_s_{new}"] = median([r[key]["prompt_tok_s"] for r in results])
            row[f"decode_tok_s_{new}"] = median([r[key]["decode_tok_s"] or 0.0 for r in results])
            row[f"new_tokens_{new}"] = results[0][key]["new_tokens"]
        row["golden_reply"] = results[0]["golden"]
        summary[name] = row
    texts = {name: results[0]["new_256"]["text"] for name, results in runs.items()}
    reference = texts["transformers"]
    return {"device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__, "trials": trials,
            "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": os.getloadavg(),
            "prompt_tokens": runs["llama.cpp"][0]["prompt_tokens"], **summary,
            "greedy_text_matches_transformers": {name: text == reference for name, text in texts.items()},
            "greedy_texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--cpu", action="store_true")
    mode.add_argument("--gemv", action="store_true", help="GPU: our int4 kernel's launch configs vs tinygemm")
    mode.add_argument("--cpu-one", choices=list(CPU_RUNTIMES), help="--cpu's runs: one runtime, in this process")
    ap.add_argument("--sweep", default="int4,lowbit,gguf,step",
                    help="--gemv: which sweeps, comma-separated (lowbit3: the low-bit sweep's 3-bit rows only; step: "
                         "the 7B step's 128 matmuls in one graph)")
    ap.add_argument("--only", help="--gpu: only the rows whose names contain one of these (comma-separated; a "
                                   "trailing $ asks for that name exactly), e.g. hearth_7b_gptq_4bit_g128$,hearth_70b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/hearth-bench"), help="where checkpoints are written")
    ap.add_argument("--exllamav2", action="store_true", help="also run exllamav2 (must be importable)")
    ap.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json for the random checkpoints")
    ap.add_argument("--threads", type=int, help="CPU mode: torch threads for both runtimes")
    ap.add_argument("--trials", type=int, default=3, help="CPU mode: runs of each runtime (the median is shown)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer:
        global TOKENIZER
        TOKENIZER = args.tokenizer
    if args.cpu_one:
        print(json.dumps(cpu_one(args.cpu_one, args.work / "cpu-models")))
        return
    if args.gpu:
        results = gpu(args.work, args.exllamav2, args.only.split(",") if args.only else None)
    else:
        sweeps = {"int4": gemv_sweep, "lowbit": lowbit_sweep, "lowbit3": lambda: lowbit_sweep((3,)), "gguf": gguf_sweep,
                  "step": matmul_step}
        results = {name: sweeps[name]() for name in args.sweep.split(",")} if args.gemv else cpu(args.work, args.trials)
    text = json.dumps(results, indent=1)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "bench.json").write_text(text)


if __name__ == "__main__":
    main()
