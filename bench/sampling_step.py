"""The in-step sampler's cost: engine.graph_sampling's torch ops against engine.sampling_kernel's Triton kernels,
per pick; prints one JSON line per row as it is measured. Never run inside tests.

  python bench/sampling_step.py [--vocabs 32000,151936] [--blocks 1024,2048,4096,8192] [--warps 4,8,16]
                                [--calls 20]

On CUDA, for each vocabulary and plan (greedy, greedy with a repetition penalty, the chat sampler: temperature
0.7, top_p 0.9, top_k 20, repetition_penalty 1.15, min_p 0.05 alone, top_p 0.9 alone): microseconds a pick
costs inside a CUDA graph of --calls picks (median of 10 replays; the noise row and history length are put
back between replays, outside the timing), by the torch ops and by the kernels: at each --blocks block size,
and at the default block with each --warps count for the choosing program. Plans the kernels do not take say
so; greedy without penalties is also timed with the kernels forced (bound 1), to show whether they would win
there. same_ids: how many of 64 eager picks over random logits rows the kernels choose as the torch ops do,
with one seed (so the same noise), history and counts (all 64 expected).
Without CUDA it runs the same rows eagerly on the CPU, the kernels only under TRITON_INTERPRET=1 (slow: use
a small vocabulary), to check that the script works; its times mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Replace this script's folder on the path: bench/engine.py would shadow the engine package otherwise.
sys.path[0] = str(REPO)

from engine import sampling_kernel  # noqa: E402
from engine.graph_sampling import GraphSampler, Plan  # noqa: E402
from engine.sampling import GenerationParams  # noqa: E402

HISTORY = 1000   # ids already generated (the penalty window, 1024 by default, nearly full)


def params(**kw) -> GenerationParams:
    return GenerationParams(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, **kw})


PLANS = {
    "greedy": params(temperature=0.0),
    "greedy_penalty": params(temperature=0.0, repetition_penalty=1.15),
    "chat": params(temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.15),
    "min_p_0.05": params(min_p=0.05),
    "top_p_0.9": params(top_p=0.9),
}


def emit(name: str, fn) -> None:
    """Print {name: fn()} as one JSON line at once; a failure prints its error instead."""
    t = time.perf_counter()
    try:
        row = fn()
    except Exception as exc:  # report and go on: the device time is spent either way
        row = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
    print(json.dumps({name: {**row, "seconds": round(time.perf_counter() - t, 1)}}), flush=True)


def sampler_for(p: GenerationParams, plan: Plan, vocab: int, device: torch.device, kernels: bool,
                rows: int) -> GraphSampler:
    """A started sampler whose noise buffer holds `rows` rows (one per pick between refills)."""
    s = GraphSampler(vocab, HISTORY + 4096, device, kernels=kernels)
    s.noise = torch.ones(rows, vocab, device=device)
    history = torch.randint(0, vocab, (HISTORY,), generator=torch.Generator().manual_seed(0)).to(device)
    s.start(p, plan, history, seed=0)
    s.noise.exponential_(generator=s.generator).clamp_(min=torch.finfo(torch.float32).tiny)
    return s


def pick_fn(s: GraphSampler, plan: Plan, logits: torch.Tensor, block: int | None,
            warps: int | None = None):
    """One pick by the torch ops (warps None) or the kernels at `block` (None: their default) with `warps` for
    the choosing program."""
    if warps is None:
        return lambda: s.pick(logits, plan)
    return lambda: sampling_kernel.pick(logits, s, plan, block=block, choose_warps=warps)


def us_per_pick(s: GraphSampler, fn, calls: int, cuda: bool) -> float:
    """Microseconds a pick: inside one CUDA graph of `calls` picks (median of 10 replays), or eagerly on CPU."""
    def reset():
        s.row.zero_()
        s.length.fill_(HISTORY)
    if not cuda:
        reset()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()   # compiles the kernels, allocates outside the capture
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(10):
        reset()
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / calls * 1e6


def same_ids(p: GenerationParams, plan: Plan, vocab: int, device: torch.device, picks: int) -> str:
    """How many of `picks` eager picks the kernels choose as the torch ops do (one seed: the same noise)."""
    torch_ops = sampler_for(p, plan, vocab, device, False, picks)
    kernels = sampler_for(p, plan, vocab, device, True, picks)
    g = torch.Generator().manual_seed(1)
    equal = 0
    for _ in range(picks):
        logits = (torch.randn(vocab, generator=g) * 3).to(device)
        equal += int(torch_ops.pick(logits, plan)) == int(sampling_kernel.pick(logits, kernels, plan))
    return f"{equal}/{picks}"


def row(name: str, vocab: int, blocks: list[int], warps: list[int], calls: int, device: torch.device) -> dict:
    p = PLANS[name]
    plan = Plan.of(p, vocab)
    cuda = device.type == "cuda"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    logits = (torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 3).to(device)
    out = {"plan": dataclasses.asdict(plan)}
    s = sampler_for(p, plan, vocab, device, False, calls)
    out["torch_ops_us"] = round(us_per_pick(s, pick_fn(s, plan, logits, None), calls, cuda), 2)
    forced = plan if plan.bound else dataclasses.replace(plan, bound=1) if plan.greedy else None
    if forced is None:
        out["kernels"] = "not taken: full-vocabulary plans keep the torch ops"
        return out
    if forced is not plan:
        out["kernels"] = "not taken (plain argmax): timed with bound 1 forced"
    if not cuda and not interpret:
        out["kernels_us"] = "skipped: no CUDA (set TRITON_INTERPRET=1 to run them interpreted)"
        return out
    for block in blocks:
        s = sampler_for(p, forced, vocab, device, True, calls)
        fn = pick_fn(s, forced, logits, block, sampling_kernel.CHOOSE_WARPS)
        out[f"kernels_us_block{block}"] = round(us_per_pick(s, fn, calls, cuda), 2)
    for w in warps:
        s = sampler_for(p, forced, vocab, device, True, calls)
        fn = pick_fn(s, forced, logits, None, w)
        out[f"kernels_us_choose_warps{w}"] = round(us_per_pick(s, fn, calls, cuda), 2)
    out["same_ids"] = same_ids(p, forced, vocab, device, 64 if cuda else 2)
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocabs", default="32000,151936" if cuda else "3000")
    ap.add_argument("--blocks", default="1024,2048,4096,8192" if cuda else str(sampling_kernel.BLOCK))
    ap.add_argument("--warps", default="4,8,16" if cuda else "")
    ap.add_argument("--calls", type=int, default=20 if cuda else 2)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                      "default_block": sampling_kernel.BLOCK,
                      "default_choose_warps": sampling_kernel.CHOOSE_WARPS}), flush=True)
    blocks = [int(b) for b in args.blocks.split(",")]
    warps = [int(w) for w in args.warps.split(",") if w]
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for name in PLANS:
            emit(f"{name} vocab={vocab}", lambda: row(name, vocab, blocks, warps, args.calls, device))


if __name__ == "__main__":
    main()
