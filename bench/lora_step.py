"""Decode speed of a LoRA on Hearth's engine (issue 22's bar: a rank-16 adapter on every linear costs at most
15% of decode speed); prints one JSON line per row as it is measured. Never run inside tests.

  python bench/lora_step.py [--rank 16] [--steps 256]

On CUDA: the Llama-2-7B-shaped GPTQ 4-bit g128 model built on the GPU (bench/engine.py's builder), decode step
tok/s (CUDA graph replay, as bench/engine.py's decode_step_only_tok_s; median of 3 runs of --steps steps) with
no adapter, then with bench/engine.py's random adapter on q, k, v, o, gate, up and down through each path
LoraLinear has: torch's two matmuls after the base layer, and engine.lora_kernel's Triton kernels beside it
(on a side stream). Each adapter row also gives vs_plain (its tok/s over the plain row's: the bar is >= 0.85),
extra_us_per_adapted_layer, and the largest logit difference of one step against the torch path. Then the
adapter alone (no base layer to run beside: the kernels and the add one after another) at the 7B layer shapes,
1 and 8 rows, per call inside one CUDA graph. A failing row is printed with its error and the rest go on.
Without CUDA it prints one line saying so.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Replace this script's folder on the path: bench/engine.py would shadow the engine package otherwise.
sys.path[0] = str(REPO)

from bench.engine import LLAMA2_7B, build_random_on_gpu, graph_time, random_lora, timed  # noqa: E402
from engine import lora, lora_kernel  # noqa: E402

PROMPT = 128   # decode positions start here (within the first cache bucket, as bench/engine.py's step row)
PATHS = {"torch_matmuls": False, "triton_kernels": True}


def emit(name: str, fn) -> dict | None:
    """Print {name: fn()} as one JSON line at once; a failure prints its error instead and returns None."""
    t = time.perf_counter()
    try:
        row = fn()
    except Exception as exc:  # report and go on: the device time is spent either way
        row = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
    row = {**row, "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps({name: row}), flush=True)
    return None if "error" in row else row


def step_seconds(engine, steps: int) -> float:
    """Seconds a decode step (graph replay), median of 3 runs of `steps` steps; the first run captures."""
    tok = torch.tensor(5, device="cuda")
    run = lambda: [engine.decode(tok, PROMPT + i) for i in range(steps)]
    run()
    return timed(run, 3) / steps


def adapted_layers(model) -> list[lora.LoraLinear]:
    return [m for m in model.modules() if isinstance(m, lora.LoraLinear)]


def model_rows(rank: int, steps: int) -> None:
    built = build_random_on_gpu(LLAMA2_7B, 128, None, 4)
    engine, model = built.engine, built.engine.model
    plain = emit("plain", lambda: {"runtime": built.runtime, "step_ms": round(step_seconds(engine, steps) * 1e3, 4)})
    lora.apply(model, [(random_lora(model.args, rank), 1.0)])
    layers = adapted_layers(model)
    tok = torch.tensor(7, device="cuda")
    reference = {}

    def path(kernel: bool) -> dict:
        for layer in layers:
            layer.kernel = kernel
        built.drop_graphs()   # the next step captures through this path
        step = step_seconds(engine, steps)
        logits = engine.decode(tok, PROMPT).clone()
        if kernel is False:
            reference["logits"] = logits
        row = {"rank": rank, "adapted_layers": len(layers), "step_ms": round(step * 1e3, 4),
               "decode_step_tok_s": round(1 / step, 1)}
        if "logits" in reference:
            row["max_logit_diff_vs_torch"] = (logits - reference["logits"]).abs().max().item()
        if plain:
            base = plain["step_ms"] / 1e3
            row.update(vs_plain=round(base / step, 3),
                       extra_us_per_adapted_layer=round((step - base) / len(layers) * 1e6, 2))
        return row

    for name, kernel in PATHS.items():
        emit(f"lora_r{rank}_{name}", lambda: path(kernel))
    built.unload()


def layer_rows(rank: int) -> None:
    """The adapter alone on one layer of each 7B shape, 128 copies of each (more than the 60 MB L2 holds: A and
    B come from DRAM, as in the model), called in a row inside one CUDA graph; microseconds a call."""
    shapes = {"wqkv": (4096, 12288), "wo": (4096, 4096), "w13": (4096, 22016), "w2": (11008, 4096)}
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g, device="cuda") * 0.05).bfloat16()
    for rows in (1, 8):
        layers = [(rnd(rows, k), rnd(rank, k), rnd(n, rank), rnd(rows, n)) for _ in range(128)
                  for k, n in shapes.values()]

        def torch_path(x, a, b, y):
            return torch.addmm(y, x @ a.t(), b.t())

        def kernels(x, a, b, y):
            return lora_kernel.add_delta(y, lora_kernel.low_rank_delta(x, a, b))

        calls = {"torch_matmuls": torch_path, "triton_kernels": kernels}
        for name, call in calls.items():
            emit(f"layer_r{rank}_rows{rows}_{name}", lambda: {
                "us_per_call": round(graph_time(lambda: [call(*t) for t in layers], 1) / len(layers) * 1e6, 2)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: this bench measures the decode step on a GPU"}), flush=True)
        return
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    model_rows(args.rank, args.steps)
    layer_rows(args.rank)


if __name__ == "__main__":
    main()
