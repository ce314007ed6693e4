"""Decode attention alone (engine.decode_attention), the fused one-launch kernel against the earlier split
kernel plus combine kernel (issue 21); prints one JSON line per case as it is measured. Never run inside tests.

  python bench/attention_step.py [--layers 16] [--replays 50] [--span N]

Each case: one CUDA graph holding the attention of `--layers` layers, each over a cache of its own (so the
cache is read from memory, not L2, as in a real step), the engine's cache layout ([rows, kv heads, 8192, 128]
bf16 cut to the engine's bucket: a power of two >= the length, at least 256), every row at position
context - 1. Shapes: 7B's 32 query heads over 32 kv heads, and GQA 32 over 8; rows 1 and 8; contexts 128,
300 (issue 21's profiled step), 1024, 4096 and 8192. Per path: us per layer call (mean over the replays),
the GB/s of K/V bytes read (the attention's floor: rows x kv heads x context x 128 x 2 bytes x 2), the
largest difference of the two paths' outputs, and the speedup (two-kernel us / fused us). A failing case is
printed with its error and the rest go on. Without CUDA it prints one line saying so. `--span N` sets the
keys per split program for both paths (default: each path's own choice).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)   # this script's folder off the path: the repo's packages on it

from engine.decode_attention import decode_attention  # noqa: E402

MAX_LEN, HEAD_DIM, HEADS = 8192, 128, 32
PATHS = {"fused": False, "two_kernels": True}


def bucket(length: int) -> int:
    """engine.runtime.Engine.bucket's cache length for `length` keys (MIN_BUCKET 256, at most the cache)."""
    b = 256
    while b < length:
        b *= 2
    return min(b, MAX_LEN)


def run_case(rows: int, kv_heads: int, context: int, layers: int, replays: int, span: int | None) -> dict:
    T = bucket(context)
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = [(torch.randn(rows, kv_heads, MAX_LEN, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16),
               torch.randn(rows, kv_heads, MAX_LEN, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16))
              for _ in range(layers)]
    q = torch.randn(rows, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    positions = torch.full((rows,), context - 1, device="cuda")
    row = {"rows": rows, "q_heads": HEADS, "kv_heads": kv_heads, "head_dim": HEAD_DIM, "context": context,
           "bucket": T, "layers": layers}
    outs = {}
    for name, two in PATHS.items():
        def step():
            return [decode_attention(q, k[:, :, :T], v[:, :, :T], positions, HEAD_DIM ** -0.5, span=span,
                                     two_kernels=two) for k, v in caches]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()   # compiles outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1000 / (replays * layers)
        kv_bytes = rows * kv_heads * context * HEAD_DIM * 2 * 2
        row[f"{name}_us"] = round(us, 2)
        row[f"{name}_kv_GBps"] = round(kv_bytes / us / 1e3, 1)
        outs[name] = torch.stack(out).float()
        del graph
    row["fused_vs_two_kernels_max_abs_diff"] = (outs["fused"] - outs["two_kernels"]).abs().max().item()
    row["speedup"] = round(row["two_kernels_us"] / row["fused_us"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--span", type=int, default=None, help="keys per split program (default: the engine's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: this benchmark times GPU kernels"}), flush=True)
        return
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": __import__("triton").__version__}), flush=True)
    for kv_heads in (32, 8):
        for rows in (1, 8):
            for context in (128, 300, 1024, 4096, 8192):
                t = time.perf_counter()
                try:
                    row = run_case(rows, kv_heads, context, args.layers, args.replays, args.span)
                except Exception as exc:   # one failing case is reported and the others still run
                    row = {"rows": rows, "kv_heads": kv_heads, "context": context,
                           "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
                row["seconds"] = round(time.perf_counter() - t, 1)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
