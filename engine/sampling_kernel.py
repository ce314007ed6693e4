"""The in-step sampler's pick as two Triton kernels (engine.graph_sampling runs them on CUDA).

The torch ops of GraphSampler.pick are ~35 small kernels inside the captured step, ~0.15 ms on an H200 for the
chat sampler, torch.topk over the whole vocabulary on one row (a single-block radix select) among them. Here:
- `candidates_kernel`, one program per BLOCK logits: the penalties from the count buffer and the temperature,
  then the block's `bound` largest values, written as int64 keys. A key packs the fp32 value (its bits turned
  into an integer of the same order) above the id (inverted, so that among equal values the smaller id is the
  larger key: torch.argmax's first-index rule), so one integer sort orders values and breaks ties alike.
- `choose_kernel`, one program: the blocks' keys merged into the `bound` largest of the row (each of those is
  among its own block's `bound` largest), then top_k (keeping ties with the k-th), top_p, typical_p, min_p,
  the softmax and the exponential race with the noise row, and the chosen id appended to the history and
  counts as GraphSampler._append does. Greedy is bound 1: the blocks' argmax, then the row's.
The grids depend on the vocabulary and the bound only, the parameters are read from the sampler's device
scalars, and nothing is read back: a CUDA graph holds both launches. The kernels are built on first use
(CPU installs may lack Triton); tests run them on CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from engine.cuda_launch import triton_pdl as pdl

# Logits a candidates program reads: BLOCK, or 32 keys for every one it keeps beyond that (top_k past 32),
# so the choosing program merges at most vocab / 32 keys (bench/sampling_step.py measures other blocks).
BLOCK = 2048
CHOOSE_WARPS = 8    # the choosing program's warps (8192 keys at a 262144 vocabulary; the bench measures others)
# Below every real value's key (-inf's is about -2^63 + 2^55): padding that is never chosen over a real logit.
PAD_KEY = -(2 ** 63) + 1


@functools.cache
def _kernels():
    """The Triton kernels (imported late: CPU-only installs may have no Triton)."""
    import triton
    import triton.language as tl

    # tl.topk came with Triton 3.4 (older ones sort the whole row and keep its head).
    has_topk = hasattr(tl, "topk")

    @triton.jit
    def candidates_kernel(logits_ptr, counts_ptr, rep_ptr, pres_ptr, freq_ptr, temp_ptr, keys_ptr, V,
                          BLOCK: tl.constexpr, BOUND: tl.constexpr, PENALTIES: tl.constexpr,
                          SCALE: tl.constexpr, HAS_TOPK: tl.constexpr, PAD: tl.constexpr, PDL: tl.constexpr):
        # keys[pid * BOUND: + BOUND] = the keys of the BOUND largest of logits [pid * BLOCK, + BLOCK) after the
        # penalties and (SCALE) the temperature; the same fp32 ops in the same order as GraphSampler.distribution.
        if PDL:   # engine.cuda_launch: launched while the logits are still being written, it waits for them
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        ids = pid * BLOCK + tl.arange(0, BLOCK)
        ok = ids < V
        x = tl.load(logits_ptr + ids, mask=ok, other=0.0).to(tl.float32)
        if PENALTIES:
            counts = tl.load(counts_ptr + ids, mask=ok, other=0.0)
            seen = counts > 0
            rep = tl.load(rep_ptr)
            # div_rn: IEEE division as torch's (Triton's `/` is an approximate one on the GPU)
            x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
            x = x - (tl.load(freq_ptr) * counts + tl.load(pres_ptr) * seen.to(tl.float32))
        if SCALE:
            x = tl.math.div_rn(x, tl.load(temp_ptr))
        x = tl.where(x == 0.0, 0.0, x)   # -0.0 ties with 0.0, as in torch's comparisons
        bits = x.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)   # negative floats: larger magnitude, smaller integer
        keys = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)
        keys = tl.where(ok, keys, PAD)
        if BOUND == 1:
            tl.store(keys_ptr + pid, tl.max(keys, axis=0))
        else:
            if HAS_TOPK:
                top = tl.topk(keys, BOUND)
            else:   # the whole block sorted, its head kept
                rows = tl.reshape(tl.sort(keys, descending=True), (BLOCK // BOUND, BOUND))
                top = tl.sum(tl.where((tl.arange(0, BLOCK // BOUND) == 0)[:, None], rows, 0), axis=0)
            tl.store(keys_ptr + pid * BOUND + tl.arange(0, BOUND), top)

    @triton.jit
    def choose_kernel(keys_ptr, noise_ptr, row_ptr, top_k_ptr, top_p_ptr, typical_ptr, min_p_ptr,
                      history_ptr, length_ptr, counts_ptr, window_ptr, out_ptr, probs_ptr, ids_ptr, V, N,
                      N_PAD: tl.constexpr, BOUND: tl.constexpr, PENALTIES: tl.constexpr, TOP_K: tl.constexpr,
                      TOP_P: tl.constexpr, TYPICAL: tl.constexpr, MIN_P: tl.constexpr,
                      HAS_TOPK: tl.constexpr, PAD: tl.constexpr, STORE_PROBS: tl.constexpr, PDL: tl.constexpr):
        # keys: [N] the blocks' candidates; out: the chosen id (0-d int64); STORE_PROBS: also the candidates'
        # final probabilities and ids (probs, ids: [BOUND]).
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        i = tl.arange(0, N_PAD)
        keys = tl.load(keys_ptr + i, mask=i < N, other=PAD)
        neg_inf = float("-inf")
        if BOUND == 1:   # greedy: the largest key is the first id of the largest value
            chosen = 0x7FFFFFFF - (tl.max(keys, axis=0) & 0x7FFFFFFF).to(tl.int32)
        else:
            if HAS_TOPK:
                top = tl.topk(keys, BOUND)                                    # [BOUND], largest first
            else:
                rows = tl.reshape(tl.sort(keys, descending=True), (N_PAD // BOUND, BOUND))
                top = tl.sum(tl.where((tl.arange(0, N_PAD // BOUND) == 0)[:, None], rows, 0), axis=0)
            ids = 0x7FFFFFFF - (top & 0x7FFFFFFF).to(tl.int32)
            ordered = (top >> 32).to(tl.int32)
            x = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            j = tl.arange(0, BOUND)
            if TOP_K:   # keep the k largest and every value equal to the k-th
                kth = tl.max(tl.where(j == tl.load(top_k_ptr) - 1, x, neg_inf), axis=0)
                x = tl.where(x < kth, neg_inf, x)
            if TOP_P:   # keep a token while the mass before it is < top_p; the first always stays
                e = tl.exp(x - tl.max(x, axis=0))
                probs = e / tl.sum(e, axis=0)
                before = tl.cumsum(probs, axis=0) - probs
                x = tl.where((before >= tl.load(top_p_ptr)) & (j > 0), neg_inf, x)
            if TYPICAL:   # the same in the order of |surprise - entropy|, ties by position (torch's argsort)
                z = x - tl.max(x, axis=0)
                logp = z - tl.log(tl.sum(tl.exp(z), axis=0))
                probs = tl.exp(logp)
                entropy = -tl.sum(probs * tl.where(logp == neg_inf, 0.0, logp), axis=0)
                gap = tl.abs(-logp - entropy)
                # earlier[a, b]: a comes before b in that order (a [BOUND, BOUND] table: BOUND <= 256)
                earlier = (gap[:, None] < gap[None, :]) | ((gap[:, None] == gap[None, :]) & (j[:, None] < j[None, :]))
                before = tl.sum(tl.where(earlier, probs[:, None], 0.0), axis=0)
                first = tl.sum(earlier.to(tl.int32), axis=0) == 0
                x = tl.where((before >= tl.load(typical_ptr)) & (first == 0), neg_inf, x)
            if MIN_P:
                e = tl.exp(x - tl.max(x, axis=0))
                probs = e / tl.sum(e, axis=0)
                x = tl.where(probs < tl.load(min_p_ptr) * tl.max(probs, axis=0), neg_inf, x)
            e = tl.exp(x - tl.max(x, axis=0))
            probs = e / tl.sum(e, axis=0)
            if STORE_PROBS:
                tl.store(probs_ptr + j, probs)
                tl.store(ids_ptr + j, ids.to(tl.int64))
            # The exponential race: argmax p / E, E the noise row's entry of each token id (first index on ties)
            row = tl.load(row_ptr)
            ratio = probs / tl.load(noise_ptr + row * V + ids)
            at = tl.min(tl.where(ratio == tl.max(ratio, axis=0), j, BOUND), axis=0)
            chosen = tl.sum(tl.where(j == at, ids, 0), axis=0)
            tl.store(row_ptr, row + 1)
        tl.store(out_ptr, chosen.to(tl.int64))
        if PENALTIES:   # count the id into the window and drop the one that leaves it (GraphSampler._append)
            length = tl.load(length_ptr)
            window = tl.load(window_ptr)
            leaving = tl.load(history_ptr + tl.maximum(length - window, 0))
            tl.atomic_add(counts_ptr + leaving, -(length >= window).to(tl.float32))
            tl.atomic_add(counts_ptr + chosen, 1.0)
            tl.store(history_ptr + length, chosen.to(tl.int64))
            tl.store(length_ptr, length + 1)

    return triton, has_topk, candidates_kernel, choose_kernel


def pick(logits: torch.Tensor, s, plan, block: int | None = None, choose_warps: int = CHOOSE_WARPS,
         distribution: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """GraphSampler `s`'s pick of the next id from logits [V] under `plan` (plan.bound > 0), by the kernels:
    returns it (0-d long) and appends it as GraphSampler.pick does. distribution: (probs fp32, ids long), both
    [plan.bound], to receive the candidates' final probabilities (sampling plans; the tests and
    bench/sampling_step.py compare them with the torch ops')."""
    triton, has_topk, candidates_kernel, choose_kernel = _kernels()
    V = s.vocab
    bound = plan.bound
    block = max(block or max(BLOCK, 32 * bound), bound)
    blocks = triton.cdiv(V, block)
    keys = torch.empty(blocks * bound, dtype=torch.int64, device=logits.device)
    out = torch.empty((), dtype=torch.long, device=logits.device)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        candidates_kernel[(blocks,)](logits, s.counts, s.repetition, s.presence, s.frequency, s.temperature, keys,
                                    V, BLOCK=block, BOUND=bound, PENALTIES=plan.penalties, SCALE=not plan.greedy,
                                    HAS_TOPK=has_topk, PAD=PAD_KEY, **pdl(logits))
        choose_kernel[(1,)](keys, s.noise, s.row, s.top_k, s.top_p, s.typical_p, s.min_p, s.history, s.length,
                            s.counts, s.window, out, *(distribution or (out, out)), V, blocks * bound,
                            N_PAD=triton.next_power_of_2(blocks * bound), BOUND=bound, PENALTIES=plan.penalties,
                            TOP_K=plan.top_k, TOP_P=plan.top_p, TYPICAL=plan.typical_p, MIN_P=plan.min_p,
                            HAS_TOPK=has_topk, PAD=PAD_KEY, STORE_PROBS=distribution is not None,
                            num_warps=choose_warps, **pdl(logits))
    return out
