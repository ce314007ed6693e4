"""engine.decode_attention (CUDA decode's flash-decoding kernel) against SDPA's math in fp64: on CPU through
Triton's interpreter (TRITON_INTERPRET=1 runs the same @triton.jit kernels with numpy), on a GPU compiled, at
long contexts and replayed from a CUDA graph. The engine's GPU tests (test_engine.py, test_families.py: graph
decode against the CPU engine for GQA, windows and Gemma 2's soft-capping) cover it inside the model. The
interpreter checks run in a child process (tests/triton_interpreter.py says why)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")   # CUDA torch ships it; on CPU requirements-test.txt installs it for the interpreter

from engine import decode_attention as module  # noqa: E402
from engine.decode_attention import decode_attention  # noqa: E402
from tests.triton_interpreter import InterpreterChecks  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CHECKS = InterpreterChecks()
check = CHECKS.check
TOL = dict(atol=2e-6, rtol=2e-6)   # fp32 kernel against the fp64 reference


def reference(q, k, v, positions, scale, softcap=None, window=None) -> torch.Tensor:
    """SDPA's math in fp64, slot by slot: a bool mask over the whole cache (keys 0..pos, and within the window),
    grouped heads through enable_gqa; with softcap the same math written out (SDPA has no hook for it)."""
    B, H, D = q.shape
    T = k.shape[2]
    out = []
    for b in range(B):
        j = torch.arange(T, device=q.device)
        mask = j <= positions[b]
        if window:
            mask &= j > positions[b] - window
        qb, kb, vb = q[b, :, None].double()[None], k[b].double()[None], v[b].double()[None]   # [1, H|H_kv, 1|T, D]
        if softcap is None:
            y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[None], scale=scale, enable_gqa=True)
        else:
            kb, vb = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (kb, vb))
            scores = torch.tanh(qb @ kb.transpose(-1, -2) * scale / softcap) * softcap
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vb
        out.append(y[0, :, 0])
    return torch.stack(out)                                                               # [B, H, D]


def inputs(B, H, H_kv, T, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, D, generator=g, device=device).to(dtype)
    k = torch.randn(B, H_kv, T, D, generator=g, device=device).to(dtype)
    v = torch.randn(B, H_kv, T, D, generator=g, device=device).to(dtype)
    return q, k, v


@check("every_length_mha", H=4, H_kv=4)   # query heads a kv head: 1, 4, 8
@check("every_length_gqa4", H=8, H_kv=2)
@check("every_length_gqa8", H=16, H_kv=2)
def every_length_matches_sdpa(H, H_kv):
    """Slot b decodes at position b, so one call covers every length 1..T; spans of 16 keys over T = 45 leave a
    short last span, and the default span (one block here) is checked too."""
    T, D = 45, 32
    q, k, v = inputs(T, H, H_kv, T, D)
    positions = torch.arange(T)
    want = reference(q, k, v, positions, D ** -0.5)
    for span in (16, None):
        got = decode_attention(q, k, v, positions, D ** -0.5, span=span)
        assert got.shape == (T, H, D) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, **TOL)


@check("sliding_window")
def sliding_window_masks_keys_older_than_it():
    """Window 7 over spans of 8: early spans lie wholly before the window of later positions (no keys read)."""
    T, D, window = 40, 32, 7
    q, k, v = inputs(T, 8, 2, T, D, seed=1)
    positions = torch.arange(T)
    got = decode_attention(q, k, v, positions, D ** -0.5, window=window, span=8)
    torch.testing.assert_close(got.double(), reference(q, k, v, positions, D ** -0.5, window=window), **TOL)
    unwindowed = reference(q, k, v, positions, D ** -0.5)
    assert (got[window:].double() - unwindowed[window:]).abs().max() > 0.1   # the window changed the answer
    torch.testing.assert_close(got[:window].double(), unwindowed[:window], **TOL)


@check("gemma2_softcap_and_scale")
def gemma2_softcap_and_query_scale():
    """Gemma 2: scores scaled by query_pre_attn_scalar ** -0.5 (not head_dim's), then cap * tanh(s / cap)."""
    T, D, cap = 50, 64, 3.0
    q, k, v = inputs(6, 8, 4, T, D, seed=2)
    q = q * 4   # scores of several units, so the cap bends them
    positions = torch.tensor([0, 9, 17, 31, 48, 49])
    scale = 224 ** -0.5
    got = decode_attention(q, k, v, positions, scale, softcap=cap, span=16)
    torch.testing.assert_close(got.double(), reference(q, k, v, positions, scale, softcap=cap), **TOL)
    assert (got.double() - reference(q, k, v, positions, scale)).abs().max() > 0.05   # the cap mattered
    windowed = decode_attention(q, k, v, positions, scale, softcap=cap, window=10, span=16)
    torch.testing.assert_close(windowed.double(), reference(q, k, v, positions, scale, softcap=cap, window=10),
                               **TOL)


@check("head_size_8", D=8)       # below tl.dot's smallest side (tiny test models)
@check("head_size_96", D=96)     # Phi-3's head size (not a power of two)
@check("head_size_256", D=256)   # Gemma's (smaller blocks of keys)
def head_sizes(D):
    q, k, v = inputs(3, 8, 2, 70, D, seed=3)
    positions = torch.tensor([69, 0, 33])
    got = decode_attention(q, k, v, positions, D ** -0.5, span=32)
    torch.testing.assert_close(got.double(), reference(q, k, v, positions, D ** -0.5), **TOL)


@check("cache_views_and_stale_tail")
def reads_views_of_the_cache_and_never_its_stale_tail():
    """The engine passes the cache cut to its bucket ([:, :, :kv_len] of [B, H_kv, max_len, D]); keys past each
    slot's position are stale (an earlier generation's) and must not be read: NaN there would show."""
    B, H_kv, max_len, T, D = 2, 2, 96, 64, 32
    q, k_all, v_all = inputs(B, 8, H_kv, max_len, D, seed=4)
    positions = torch.tensor([5, 40])
    clean_k, clean_v = k_all[:, :, :T].clone(), v_all[:, :, :T].clone()
    for b, pos in enumerate(positions.tolist()):
        k_all[b, :, pos + 1:] = float("nan")
        v_all[b, :, pos + 1:] = float("nan")
    got = decode_attention(q, k_all[:, :, :T], v_all[:, :, :T], positions, D ** -0.5, span=16)
    torch.testing.assert_close(got.double(), reference(q, clean_k, clean_v, positions, D ** -0.5), **TOL)


@check("shared_position_and_idle_slot")
def one_position_for_every_slot_and_an_idle_slot():
    """An expanded [1] position (stride 0: what batch-1 decode passes) serves every slot; position -1 (no keys:
    a slot with nothing to do) gives zeros, not NaN."""
    q, k, v = inputs(3, 4, 2, 30, 16, seed=5)
    got = decode_attention(q, k, v, torch.tensor([12]).expand(3), 0.25, span=8)
    torch.testing.assert_close(got.double(), reference(q, k, v, torch.tensor([12, 12, 12]), 0.25), **TOL)
    got = decode_attention(q, k, v, torch.tensor([-1, 29, 3]), 0.25, span=8)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    torch.testing.assert_close(got[1:].double(), reference(q[1:], k[1:], v[1:], torch.tensor([29, 3]), 0.25),
                               **TOL)


@check("one_launch_spans_and_counts")
def one_launch_combines_in_its_last_program_and_leaves_counts_at_zero():
    """The fused kernel, called again and again with the same shapes (as a graph replays it) at lengths that
    take one span (written directly), several (the last program to count in combines) and windows that skip
    the first spans: each call right, and every arrival count back at 0 after each (else the next call's last
    program would never see its turn). The default span reads these short ranges in one pass (program 0 alone,
    from the window's first key)."""
    T, D = 48, 16
    q, k, v = inputs(3, 8, 2, T, D, seed=9)
    for positions, window in (([3, 47, 20], None), ([47, 9, 0], 12), ([-1, 30, 47], 40), ([5, 6, 7], None)):
        positions = torch.tensor(positions)
        valid = positions >= 0
        want = reference(q[valid], k[valid], v[valid], positions[valid], 0.25, window=window)
        for span in (8, None):
            got = decode_attention(q, k, v, positions, 0.25, window=window, span=span, two_kernels=False)
            torch.testing.assert_close(got[valid].double(), want, **TOL)
            assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
            assert not module._counters(torch.device("cpu"), 3 * 2).any()


@check("two_kernels_path")
def the_earlier_two_kernel_path_still_answers():
    """HEARTH_DECODE_ATTENTION=two_kernels (or two_kernels=True): the split and combine kernels, kept for
    bench/attention_step.py, give the same answer."""
    T, D = 40, 16
    q, k, v = inputs(4, 8, 2, T, D, seed=10)
    positions = torch.tensor([39, 0, 17, 8])
    got = decode_attention(q, k, v, positions, 0.25, window=20, span=8, two_kernels=True)
    torch.testing.assert_close(got.double(), reference(q, k, v, positions, 0.25, window=20), **TOL)


@check("placed_output")
def places_write_each_value_where_the_output_projection_reads_it():
    """places (an act-order wo's input order, inverted): value (h, d) of each slot lands at places[h * D + d],
    on both of the fused kernel's store paths (one span written directly; several, combined by the last
    program) and on the two-kernel path; without places the output keeps head order."""
    T, D, H = 40, 16, 8
    q, k, v = inputs(3, H, 2, T, D, seed=11)
    positions = torch.tensor([39, 2, 25])
    order = torch.randperm(H * D, generator=torch.Generator().manual_seed(0))    # wo reads x[..., order]
    places = torch.argsort(order).to(torch.int32)
    want = reference(q, k, v, positions, 0.25).reshape(3, H * D)[:, order]
    for span, two_kernels in ((8, False), (None, False), (8, True)):
        got = decode_attention(q, k, v, positions, 0.25, span=span, two_kernels=two_kernels, places=places)
        assert got.shape == (3, H, D)
        torch.testing.assert_close(got.reshape(3, H * D).double(), want, **TOL)
    plain = decode_attention(q, k, v, positions, 0.25, span=8)
    assert not torch.allclose(plain.reshape(3, H * D).double(), want)

@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """{check name: "ok" or its traceback}, from one child process running every check under the interpreter."""
    return CHECKS.run_child(__file__, tmp_path_factory.mktemp("interpreter"))


@pytest.mark.parametrize("name", list(CHECKS.checks))
def test_kernel_under_the_interpreter(interpreted, name):
    assert interpreted[name] == "ok", interpreted[name]


def test_interpreter_ran_the_kernels(interpreted):
    """The child really interpreted Triton (not a silent fallback), and ran every check."""
    CHECKS.assert_all_ran(interpreted)


def test_refuses_heads_that_do_not_group_evenly():
    q, k, v = inputs(1, 6, 4, 8, 16)
    with pytest.raises(ValueError, match="group evenly"):
        decode_attention(q, k, v, torch.tensor([3]), 0.25)


def test_span_fills_the_gpu_and_depends_on_shapes_only():
    """Batch-1 7B (32 kv heads) at an 8k bucket: 8 spans of 1024 keys; 8 kv heads: 32 spans of 256; a short
    bucket still gets whole blocks; 8 slots of 32 kv heads: 1 span. The two-kernel path keeps its 512 programs
    (16 spans of 512 for 7B)."""
    assert module.default_span(32, 8192, 64) == 1024
    assert module.default_span(8, 8192, 64) == 256
    assert module.default_span(32, 256, 64) == 64
    assert module.default_span(8 * 32, 8192, 64) == 8192
    assert module.default_span(32, 8192, 64, module.TWO_KERNEL_TARGET) == 512


@needs_cuda
@pytest.mark.parametrize("B,H_kv", [(1, 32), (1, 8), (8, 8)])
def test_cuda_kernel_at_long_contexts(B, H_kv):
    """bf16 on the GPU at an 8k bucket (7B's 32 heads of 128, MHA and GQA, up to 8 slots), a 7 800-token
    position among them, within bf16's rounding of the fp64 reference."""
    T, D = 8192, 128
    q, k, v = inputs(B, 32, H_kv, T, D, dtype=torch.bfloat16, device="cuda", seed=6)
    positions = torch.tensor([7799, 8191, 0, 4000, 257, 1, 6000, 3333][:B], device="cuda")
    got = decode_attention(q, k, v, positions, D ** -0.5)
    torch.testing.assert_close(got.double(), reference(q, k, v, positions, D ** -0.5), atol=2e-2, rtol=2e-2)
    got = decode_attention(q, k, v, positions, D ** -0.5, softcap=3.0, window=4096)
    want = reference(q, k, v, positions, D ** -0.5, softcap=3.0, window=4096)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


@needs_cuda
def test_cuda_kernel_writes_placed_outputs():
    """places on the GPU: 7B's 32 heads of 128 at a long and a short position (combined and direct stores)."""
    T, D, H = 2048, 128, 32
    q, k, v = inputs(2, H, 32, T, D, dtype=torch.bfloat16, device="cuda", seed=12)
    positions = torch.tensor([2000, 40], device="cuda")
    order = torch.randperm(H * D, device="cuda")
    got = decode_attention(q, k, v, positions, D ** -0.5, places=torch.argsort(order).to(torch.int32))
    want = reference(q, k, v, positions, D ** -0.5).reshape(2, H * D)[:, order]
    torch.testing.assert_close(got.reshape(2, H * D).double(), want, atol=2e-2, rtol=2e-2)

@needs_cuda
def test_cuda_fp32_matches_in_full_precision():
    """fp32 on the GPU keeps IEEE products (not TF32): the CUDA family tests compare fp32 decode at 2e-3."""
    q, k, v = inputs(2, 8, 2, 300, 64, device="cuda", seed=8)
    positions = torch.tensor([299, 77], device="cuda")
    got = decode_attention(q, k, v, positions, 0.125, window=100)
    torch.testing.assert_close(got.double(), reference(q, k, v, positions, 0.125, window=100), atol=1e-5,
                               rtol=1e-5)


@needs_cuda
def test_cuda_graph_replays_for_new_positions():
    """Captured once for a bucket, the kernels read the positions from the device on every replay: a new
    position per slot needs no new graph and no host read."""
    T, D = 1024, 128
    q, k, v = inputs(4, 32, 8, T, D, dtype=torch.bfloat16, device="cuda", seed=7)
    positions = torch.tensor([10, 500, 1023, 0], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_attention(q, k, v, positions, D ** -0.5)   # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, positions, D ** -0.5)
    for new in ([11, 700, 3, 1000], [1023, 1, 511, 64]):
        positions.copy_(torch.tensor(new))
        graph.replay()
        torch.testing.assert_close(out.double(), reference(q, k, v, positions, D ** -0.5), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("H_kv", [32, 8])
def test_cuda_graph_one_launch_at_short_and_long_lengths(H_kv):
    """One graph captured at an 8k bucket, replayed at lengths from 1 key (one span: the program writes the
    output itself) to the whole bucket (many spans: the last program of each head combines), with windows:
    right at every replay, equal to the two-kernel path, and the arrival counts back at 0 after each."""
    T, D = 8192, 128
    q, k, v = inputs(2, 32, H_kv, T, D, dtype=torch.bfloat16, device="cuda", seed=11)
    positions = torch.tensor([0, 8191], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_attention(q, k, v, positions, D ** -0.5, window=3000)
        decode_attention(q, k, v, positions, D ** -0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        windowed = decode_attention(q, k, v, positions, D ** -0.5, window=3000)
        whole = decode_attention(q, k, v, positions, D ** -0.5)
    for new in ([0, 8191], [100, 5000], [8191, 63], [511, 512], [-1, 4096], [2999, 3000]):
        positions.copy_(torch.tensor(new))
        graph.replay()
        torch.cuda.synchronize()
        assert not module._counters(q.device, 2 * H_kv).any()
        for got, window in ((whole, None), (windowed, 3000)):
            ok = positions >= 0
            want = reference(q[ok], k[ok], v[ok], positions[ok], D ** -0.5, window=window)
            torch.testing.assert_close(got[ok].double(), want, atol=2e-2, rtol=2e-2)
            assert torch.equal(got[~ok], torch.zeros_like(got[~ok]))
            old = decode_attention(q, k, v, positions, D ** -0.5, window=window, two_kernels=True)
            torch.testing.assert_close(got.float(), old.float(), atol=1e-2, rtol=1e-2)


if __name__ == "__main__":   # the child of `interpreted`
    CHECKS.child_main()
