"""GPTQ 2, 3 and 8-bit and GGUF 2-8-bit weights kept packed: engine.lowbit_mma's layout (on CPU, by reading
the packed words back exactly as the CUDA kernel does), the scales and float offsets both kernels keep
(exactly the QuantWeight's), the kernels against an fp64 reference at every launch shape (GPU, skipped
without CUDA), the layers make_quant_linear picks, and the CPU int8 path."""
from __future__ import annotations

import struct

import pytest
import torch

from engine import int4_mma, lowbit_mma
from engine.quant_linear import DequantLinear, Int4Linear, Int8Linear, LowBitLinear, QuantWeight, make_quant_linear
from engine.weights import load_transformer
from tests.quant_fixtures import quantize_model_dir, tiny_llama_dir

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def k_quant_values(G: int, N: int, span: int, low: int, high: int) -> torch.Tensor:
    """[G, N] fp32 as a K-quant's scales are: an fp16 d a span of groups (of either sign) times integers in
    low .. high, so that fp16 rounds most of them."""
    d = (torch.randn(G // span, N) * 1e-3).half().float().repeat_interleave(span, 0)
    return d * torch.randint(low, high + 1, (G, N)).float()


def random_quant(K: int, N: int, group_size: int, bits: int, act_order: bool = False, uniform_zero: bool = False,
                 device: str = "cpu", offsets: bool = False, fp32_scales: bool = False,
                 k_quant: bool = False) -> QuantWeight:
    """GPTQ-like (fp16 scales, integer zeros), or with `offsets` GGUF-like (W = s * q + m); fp32_scales: scales
    (and offsets) that fp16 would round; k_quant: such scales (and offsets) made as the K-quants' are, an fp16
    d per 256 inputs times small integers (int8 ones for the scales, as Q6_K's)."""
    G = K // group_size
    g_idx = torch.arange(K) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K)]
    zeros = (torch.full((G, N), 1 << (bits - 1), dtype=torch.uint8) if uniform_zero
             else torch.randint(0, 2**bits, (G, N), dtype=torch.uint8))
    scales = (torch.rand(G, N) * 0.02 + 0.001)
    scales = scales if fp32_scales else scales.half()
    span = max(1, 256 // group_size)
    if k_quant:
        scales = k_quant_values(G, N, span, -128, 127)
    m = None
    if offsets:
        zeros, m = None, -scales.float() * 2 ** (bits - 1) * (torch.rand(G, N) + 0.5)
        m = m if fp32_scales else m.half().float()
        if k_quant:
            m = -k_quant_values(G, N, span, 0, 63)
    return QuantWeight(q=torch.randint(0, 2**bits, (K, N), dtype=torch.uint8).to(device), scales=scales.to(device),
                       g_idx=g_idx.to(device), bits=bits, group_size=group_size,
                       zeros=None if zeros is None else zeros.to(device), offsets=None if m is None else m.to(device))


FACTORED = (int4_mma.FACTORED_HALF, int4_mma.FACTORED_FLOAT)
UNSIGNED_FACTORED = (int4_mma.UFACTORED_HALF, int4_mma.UFACTORED_FLOAT)


def untiled(a: torch.Tensor) -> torch.Tensor:
    """The kernels' [N/16, G, 8, 2] scales/offsets back to [G, N] fp32."""
    T, G = a.shape[:2]
    return a.float().permute(1, 0, 3, 2).reshape(G, T * 16)


def stored_values(store: int4_mma.ScaleStore) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales and offsets [G, N] the kernels compute from a ScaleStore, as group_values does: the stored
    values, or a factored form's byte - 128 (unsigned: the byte) times its span's factor, in fp32."""
    if store.supers is None:
        return untiled(store.scales), None if store.offsets is None else untiled(store.offsets)
    d = store.supers.float().repeat_interleave(1 << store.span_shift, dim=1)             # [T, G, 8, 2 or 4]
    values = d * (store.scales.float() - (0 if store.unsigned else 128))
    return untiled(values[..., :2]), untiled(values[..., 2:]) if values.shape[-1] == 4 else None


def bf16_value(bits16: torch.Tensor) -> torch.Tensor:
    """The bf16 numbers whose bit patterns are bits16 (int64 holding 16 bits), as float64."""
    return bits16.to(torch.int32).to(torch.int16).view(torch.bfloat16).double()


def mantissa_field_pair(words: torch.Tensor, lane: torch.Tensor, i: int, p: int) -> list[torch.Tensor]:
    """The 3-bit levels of A register p of mma step i, read as lowbit_mma's raw3 does: one LOP3 makes each half
    a bf16 128 + q (steps 0-4) or 128 + 8q (steps 5-7, the eighths); the last two pairs of steps 0-4 gather
    their three bits from bit 15 (31) of three words."""
    word = lambda j: words[:, :, 4 * lane + j] if j < 4 else words[:, :, 128 + 2 * lane + j - 4]
    if i >= 5:
        n = 4 * (i - 5) + p
        v, mask = word(n // 2) >> (6 * (n % 2)), 0x38
    elif 4 * i + p < 18:
        n = 4 * i + p
        v, mask = word(n // 3) >> (6 * (n % 3)), 0x7
    else:
        s = 4 * i + p - 18
        v, mask = ((word(3 * s) >> 15) & 0x10001) | ((word(3 * s + 1) >> 14) & 0x20002) \
            | ((word(3 * s + 2) >> 13) & 0x40004), 0x7
    raws = [bf16_value(((v >> 16 * h) & mask) | 0x4300) for h in (0, 1)]
    levels = [(raw - 128) / (8 if i >= 5 else 1) for raw in raws]
    assert all(torch.equal(lv, lv.round()) for lv in levels)                # whole levels, exactly
    return [lv.long() for lv in levels]


def six_bit_field_pair(words: torch.Tensor, lane: torch.Tensor, i: int, p: int) -> list[torch.Tensor]:
    """The 6-bit levels of A register p of mma step i, read as lowbit_mma's a_pair<6> does: pair n = 4i + p is
    word n's bit-0 field (n < 6) or word n - 6's bit-6 field (n < 12), else a spare nibble of word n - 12 with
    its upper bits from bits 12 + 2 (n % 2) of word 4 + (n - 12) / 2; one LOP3 makes each half 128 + q."""
    word = lambda j: words[:, :, 4 * lane + j] if j < 4 else words[:, :, 128 + 2 * lane + j - 4]
    n = 4 * i + p
    if n < 12:
        v = ((word(n % 6) >> 6 * (n // 6)) & 0x003F003F) | 0x43004300
    else:
        s = n - 12
        v = (((word(s) >> 12) & 0x000F000F) | 0x43004300) | ((word(4 + s // 2) >> (8 + 2 * (s % 2))) & 0x00300030)
    levels = [bf16_value((v >> 16 * h) & 0xFFFF) - 128 for h in (0, 1)]
    assert all(torch.equal(lv, lv.round()) and bool((lv >= 0).all() and (lv < 64).all()) for lv in levels)
    return [lv.long() for lv in levels]


def kernel_view(packed: lowbit_mma.PackedLowBit) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [K, N], z [K, N]) read out of the packed tensors the way lowbit_mma's CUDA code reads them
    (a_pair's bit positions, row_bias's zeros): a CPU emulation of the kernel's dequantization."""
    bits, K, N = packed.width, packed.k, packed.n
    CH = lowbit_mma.CHUNK[bits]
    T, C, S = N // 16, K // CH, CH // 16
    seg = packed.segment   # mma step i = seg s + j takes inputs 16 seg s + 4 seg t + 4 j .. + 3 of its chunk
    words = packed.words.to(torch.int64) & 0xFFFFFFFF                                   # [T, C, bytes/4]
    lane = torch.arange(32)
    q = torch.empty(N, K, dtype=torch.int64)
    rows, cols = torch.arange(T)[:, None, None] * 16, torch.arange(C)[None, :, None] * CH
    for i in range(S):
        for p in range(4):
            if bits == 8:
                w = words[:, :, (i >> 1) * 128 + 4 * lane + 2 * (i & 1) + (p >> 1)]
                pair = [(w >> 8 * ((p & 1) + 2 * h)) & 255 for h in (0, 1)]
            elif bits == 6:
                pair = six_bit_field_pair(words, lane, i, p)
            elif bits == 3:
                pair = mantissa_field_pair(words, lane, i, p)
            else:
                w = words[:, :, 4 * lane + (i >> 1)]
                shift = 2 * p + 8 * (i & 1)
                pair = [(w >> (shift + 16 * h)) & 3 for h in (0, 1)]
            row = rows + (lane >> 2) + 8 * (p & 1)                                        # [T, 1, 32]
            for h in (0, 1):
                k = cols + 16 * seg * (i // seg) + 4 * seg * (lane & 3) + 4 * (i % seg) + 2 * (p >> 1) + h
                q[row.expand(T, C, 32), k.expand(T, C, 32)] = pair[h]
    G = packed.store.scales.shape[1]
    if packed.zmode == int4_mma.OFFSETS:      # levels go in as q (zero 0); the offsets are added apart
        z = torch.zeros(G, N)
    elif packed.zeros is None:
        z = torch.full((G, N), float(packed.uniform_zero))
    else:
        stored = packed.zeros.view(torch.float16 if bits == 8 else torch.bfloat16).float()   # [T, G, r, h]
        stored = stored.permute(1, 0, 3, 2).reshape(G, N)
        z = stored if bits == 8 else -stored - 128
    g = torch.arange(K) // packed.group_size if packed.group_size != K else torch.zeros(K, dtype=torch.long)
    return q.t(), z[g]


@pytest.mark.parametrize("bits", [2, 3, 6, 8])
@pytest.mark.parametrize("uniform_zero", [True, False])
def test_packed_layout_reads_back_every_level_and_zero(bits, uniform_zero):
    qw = random_quant(256, 48, 32, bits, uniform_zero=uniform_zero)
    packed = lowbit_mma.pack(qw.q, qw.scales, None if uniform_zero else qw.zeros, 32, bits)
    assert (packed.zeros is None) == uniform_zero
    q, z = kernel_view(packed)
    assert torch.equal(q, qw.q.long())
    assert torch.equal(z, qw.zeros[qw.g_idx].float())
    # At rest: the packed bits plus fp16 scales, nothing wider.
    assert packed.words.numel() * 4 == 256 * 48 * bits // 8
    scales = untiled(packed.store.scales)
    assert torch.equal(scales, qw.scales.float())
    torch.testing.assert_close(((q.double() - z.double()) * scales[qw.g_idx].double()).t(),
                               qw.dequantize(torch.float64), rtol=0, atol=0)


def test_packing_in_slices_of_rows_gives_the_same_words():
    qw = random_quant(256, 80, 128, 3)
    whole = lowbit_mma.pack(qw.q, qw.scales, qw.zeros, 128, 3)
    sliced = lowbit_mma.pack(qw.q, qw.scales, qw.zeros, 128, 3, slice_levels=256 * 32)   # 32 rows at a time
    assert torch.equal(whole.words, sliced.words) and torch.equal(whole.zeros, sliced.zeros)


@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("zero", ["uniform", "offsets"])   # Q5_0 / Q6_K: one zero; Q5_1 / Q5_K: float offsets
def test_5_and_6_bit_levels_pack_losslessly_into_the_6bit_layout(bits, zero):
    qw = random_quant(256, 48, 32, bits, uniform_zero=True, offsets=zero == "offsets", fp32_scales=True)
    packed = lowbit_mma.pack(qw.q, qw.scales, qw.zeros, 32, bits, offsets=qw.offsets)
    assert packed.width == 6 and packed.words.numel() * 4 == 256 * 48 * 6 // 8
    q, z = kernel_view(packed)
    assert torch.equal(q, qw.q.long())
    assert torch.equal(untiled(packed.store.scales), qw.scales.float())
    if zero == "offsets":
        assert packed.zmode == int4_mma.OFFSETS and torch.equal(untiled(packed.store.offsets), qw.offsets)
        assert torch.equal(z, torch.zeros(256, 48))
    else:
        assert packed.zmode == int4_mma.UNIFORM and packed.uniform_zero == 1 << (bits - 1)
        bias = torch.tensor([packed.uniform_bias & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        assert bias.item() == -(128 + 2 ** (bits - 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fp32_scales", [False, True])
def test_scales_and_offsets_are_stored_fp16_only_where_that_is_exact(bits, fp32_scales):
    qw = random_quant(256, 32, 32, bits, offsets=True, fp32_scales=fp32_scales)
    packed = (int4_mma.pack(qw.q, qw.scales, None, 32, offsets=qw.offsets) if bits == 4
              else lowbit_mma.pack(qw.q, qw.scales, None, 32, bits, offsets=qw.offsets))
    # (random fp32 values have no common factor: stored as they are)
    assert packed.form == (int4_mma.FLOAT if fp32_scales else int4_mma.HALF)
    st = packed.store
    assert st.scales.dtype == st.offsets.dtype == (torch.float32 if fp32_scales else torch.float16)
    # Lossless: the stored values are the QuantWeight's, and the levels go in as q (a uniform zero of 0).
    assert torch.equal(untiled(st.scales), qw.scales.float())
    assert torch.equal(untiled(st.offsets), qw.offsets.float())
    assert packed.zmode == int4_mma.OFFSETS and packed.uniform_zero == 0


def test_every_gguf_type_reaches_the_kernels_losslessly():
    # Every GGUF type's repacked weight, packed for the CUDA kernels (plain torch: runs on CPU): levels read
    # back as the kernel reads them, scales/offsets/zero exactly the QuantWeight's, so the kernels compute
    # W = s * (q - z) or s * q + m with gguf's own values. fp16 storage for the per-block fp16 types; the
    # K-quants (and IQ4_XS) keep their two levels, a byte a group and row times the super-block's d, dmin.
    from loaders.gguf_repack import BLOCK_TYPES, repack
    from tests.test_gguf_engine import random_blocks

    fp16_exact = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"}
    for type_name, kind in BLOCK_TYPES.items():
        qw = repack(torch.from_numpy(random_blocks(type_name, 32, 512 // kind.block, 0)), type_name, 512)
        packed = (int4_mma.pack(qw.q, qw.scales, qw.zeros, qw.group_size, offsets=qw.offsets) if qw.bits == 4
                  else lowbit_mma.pack(qw.q, qw.scales, qw.zeros, qw.group_size, qw.bits, offsets=qw.offsets))
        assert packed.form in ((int4_mma.HALF,) if type_name in fp16_exact
                               else FACTORED + UNSIGNED_FACTORED), type_name
        # unsigned bytes where the format's integers are: Q4_K's, Q5_K's and Q2_K's scales and mins
        assert (packed.form in UNSIGNED_FACTORED) == (type_name in ("Q4_K", "Q5_K", "Q2_K")), type_name
        scales, offsets = stored_values(packed.store)
        assert torch.equal(scales, qw.scales.float()), type_name
        if type_name not in fp16_exact:   # a byte a group and row, a factor (2 or 4 bytes) per 256 inputs
            per_group = 2 if qw.offsets is not None else 1
            assert packed.store.scales.numel() == qw.scales.numel() * per_group, type_name
            assert packed.store.supers.numel() == qw.scales.numel() * per_group // (256 // qw.group_size)
        if qw.offsets is not None:
            assert torch.equal(offsets, qw.offsets.float()), type_name
        else:
            assert packed.zmode == int4_mma.UNIFORM and packed.uniform_zero == int(qw.zeros[0, 0]), type_name
        if qw.bits != 4:
            q, _ = kernel_view(packed)
            assert torch.equal(q, qw.q.long()), type_name


@pytest.mark.parametrize("span", [2, 8, 16])
def test_k_quant_scales_factor_exactly_into_bytes_and_a_factor_per_span(span):
    # Each K-quant scale is the super-block's fp16 d times a small integer; factor recovers a d' and integers
    # whose fp32 products are the scales bit for bit, Q6_K's int8 -128 under a negative d included.
    G, N = 4 * span, 48
    values = k_quant_values(G, N, span, -128, 127)
    values[:span, 0] = 0                                                    # an all-zero span: d = 0
    values[:span, 1] = -0.5 * torch.tensor([-128.0] + [3.0] * (span - 1))   # d = -0.5 with a -128
    d, ints = int4_mma.factor(values, span)
    assert d.shape == (G // span, N) and ints.shape == (G, N)
    assert int(ints.min()) >= -128 and int(ints.max()) <= 127
    assert torch.equal(d.repeat_interleave(span, 0) * ints.float(), values)
    assert d[0, 0] == 0 and not ints[:span, 0].any()
    assert d[0, 1] == -0.5 and ints[0, 1] == -128 and ints[1, 1] == 3      # 64 = -0.5 x -128, -1.5 = -0.5 x 3
    # Random fp32 values share no such factor; nor do spans that do not divide the groups.
    assert int4_mma.factor(torch.rand(G, N) * 0.01, span) is None
    assert int4_mma.factor(values[:span + 1], span) is None


def test_factored_scales_are_a_byte_a_group_and_equal_the_quant_weights():
    # Q4_K-like: scales and offsets factored (one byte each a group and row, fp16 d/dmin a 256-input span);
    # the kernels' values (stored_values emulates group_values) are the QuantWeight's exactly.
    qw = random_quant(512, 48, 32, 4, offsets=True, k_quant=True)
    packed = int4_mma.pack(qw.q, qw.scales, None, 32, offsets=qw.offsets)
    st = packed.store
    assert packed.zmode == int4_mma.OFFSETS and packed.form == int4_mma.FACTORED_HALF and st.span_shift == 3
    assert st.scales.dtype == torch.uint8 and st.scales.shape == (3, 16, 8, 4) and st.offsets is None
    assert st.supers.dtype == torch.float16 and st.supers.shape == (3, 2, 8, 4)
    scales, offsets = stored_values(st)
    assert torch.equal(scales, qw.scales) and torch.equal(offsets, qw.offsets)
    # Q6_K-like in the 8-bit layout: a uniform zero and int8 scales per 16 inputs.
    qw6 = random_quant(512, 48, 16, 6, uniform_zero=True, k_quant=True)
    p6 = lowbit_mma.pack(qw6.q, qw6.scales, None, 16, 6)
    assert p6.zmode == int4_mma.UNIFORM and p6.form in FACTORED and p6.store.span_shift == 4
    assert p6.store.scales.shape == (3, 32, 8, 2) and torch.equal(stored_values(p6.store)[0], qw6.scales)
    # Per-group integer zeros keep values per group (the factors would take the zeros' argument).
    qz = random_quant(512, 48, 32, 4, k_quant=True)
    assert int4_mma.pack(qz.q, qz.scales, qz.zeros, 32).form == int4_mma.FLOAT


def test_one_signed_k_quant_integers_are_stored_as_unsigned_bytes():
    # Q4_K's scales (0..63 times d) and mins (0..63 times dmin, stored negated as offsets): every span's
    # integers have one sign, so they are kept as the bytes themselves (the kernels then make each value in one
    # FMA), d negated where a span's are all <= 0; values still the QuantWeight's exactly. A span with both
    # signs (Q6_K's int8 scales) keeps the biased bytes.
    K, N, G = 512, 48, 16
    d = (torch.randn(G // 8, N) * 1e-3).half().float().repeat_interleave(8, 0)            # either sign
    scales, offsets = d * torch.randint(0, 64, (G, N)).float(), -d.abs() * torch.randint(0, 64, (G, N)).float()
    q = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    st = int4_mma.pack(q, scales, None, 32, offsets=offsets).store
    assert st.unsigned and st.supers is not None
    assert int4_mma.pack(q, scales, None, 32, offsets=offsets).form in UNSIGNED_FACTORED
    got_scales, got_offsets = stored_values(st)
    assert torch.equal(got_scales, scales) and torch.equal(got_offsets, offsets)
    assert int(st.scales.max()) <= 63                                  # the integers, not integers + 128
    signed = scales.clone()
    signed[0, 0], signed[1, 0] = d[0, 0] * 5, d[0, 0] * -7             # one span with both signs
    st = int4_mma.pack(q, signed, None, 32, offsets=offsets).store
    assert not st.unsigned and torch.equal(stored_values(st)[0], signed)


def test_uniform_bias_is_what_the_kernel_subtracts():
    assert lowbit_mma.pack(torch.zeros(128, 16, dtype=torch.uint8), torch.ones(1, 16), None, 128, 8).uniform_bias \
        == struct.unpack("<i", struct.pack("<f", 2.0**23 + 128))[0]
    b3 = lowbit_mma.pack(torch.zeros(128, 16, dtype=torch.uint8), torch.ones(1, 16), None, 128, 3).uniform_bias
    assert torch.tensor([b3 & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item() == -(128 + 4)


def test_refusals_name_the_shape():
    assert lowbit_mma.refusal(4096, 4096, 128, 3) is None and lowbit_mma.refusal(11008, 4096, 11008, 2) is None
    assert lowbit_mma.refusal(4096, 4096, 32, 8) is None and lowbit_mma.refusal(4096, 12288, 4096, 8) is None
    assert "128-input chunks" in lowbit_mma.refusal(192, 64, 32, 3)
    assert "16-row tiles" in lowbit_mma.refusal(256, 40, 32, 2)
    assert "group size 192" in lowbit_mma.refusal(1152, 64, 192, 8)
    assert "no kernel" in lowbit_mma.refusal(256, 64, 32, 7)
    assert lowbit_mma.refusal(256, 64, 16, 6) is None and "64-input chunks" in lowbit_mma.refusal(96, 64, 32, 5)


@pytest.mark.parametrize("zeros", ["sym", "asym", "offsets"])
def test_cpu_8bit_one_group_stays_int8(zeros):
    qw = random_quant(256, 96, 256, 8, uniform_zero=zeros == "sym")
    if zeros == "offsets":      # W = s * q + m, as GGUF-style weights give it
        qw = QuantWeight(q=qw.q, scales=qw.scales.float(), g_idx=qw.g_idx, bits=8, group_size=256,
                         offsets=torch.randn(1, 96) * 0.1)
    bias = torch.randn(96)
    layer = make_quant_linear(qw, bias, CPU, torch.float32)
    assert isinstance(layer, Int8Linear) and layer.kernel == "int8 weight-only"
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.numel() == 256 * 96
    assert (layer.offset is None) == (zeros == "sym")
    x = torch.randn(2, 3, 256)
    ref = x.double() @ qw.dequantize(torch.float64).t() + bias.double()
    assert layer(x).shape == (2, 3, 96) and rel_err(layer(x), ref) < 1e-2    # bf16 activations and scales


def test_cpu_layers_that_no_kernel_takes_say_why():
    grouped8 = make_quant_linear(random_quant(256, 64, 128, 8), None, CPU, torch.float32)
    assert isinstance(grouped8, DequantLinear) and "one scale per output row" in grouped8.kernel
    three = make_quant_linear(random_quant(256, 64, 32, 3), None, CPU, torch.float32)
    assert three.kernel == "dequantized (no CPU kernel for 3-bit weights)"
    # torch's int8 kernel crashes or sums wrongly unless K % 16 = 0 (torch 2.13): such widths are dequantized
    narrow8 = make_quant_linear(random_quant(24, 64, 24, 8), None, CPU, torch.float32)
    assert isinstance(narrow8, DequantLinear) and "K % 16 = 0" in narrow8.kernel


def test_cpu_engine_runs_a_gptq_8bit_folder_on_the_int8_kernel(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_llama_dir(tmp_path / "fp", hidden=64, intermediate=128, vocab_size=96)
    packed = quantize_model_dir(src, tmp_path / "q", bits=8, group_size=-1, sym=False, keep_reference=True)
    hf = AutoModelForCausalLM.from_pretrained(src).eval()
    hf.load_state_dict(packed.reference, strict=False)
    ids = torch.randint(0, 96, (12,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    model, kinds = load_transformer(tmp_path / "q", [CPU], torch.float32)
    assert kinds == {"8-bit int8 weight-only"}
    model.setup_caches(32, torch.float32)
    with torch.no_grad():
        out = model(ids[None], torch.arange(12), kv_len=12)[0]
    assert rel_err(out, ref) < 2e-2


# --- CUDA ---------------------------------------------------------------------------------------------

# (warps, unroll, min_blocks): the shapes config_for picks (8 warps at four blocks an SM, 20 and 24 warps at
# two) and others.
LAUNCH_SHAPES = [(8, 1, 0), (8, 1, 2), (8, 1, 4), (16, 1, 0), (16, 1, 2), (16, 2, 0), (20, 1, 0), (24, 1, 2),
                 (32, 1, 0)]


# symmetric GPTQ (one z), asym (a z per group), GGUF-style float offsets with fp16-exact or fp32 scales
# and the K-quants' scales (and offsets), kept factored where a group divides 256 inputs
ZERO_KINDS = {"uniform": {"uniform_zero": True}, "per-group": {}, "offsets-fp16": {"offsets": True},
              "offsets-fp32": {"offsets": True, "fp32_scales": True},
              "uniform-kquant": {"uniform_zero": True, "k_quant": True}, "offsets-kquant": {"offsets": True, "k_quant": True}}


def expected_forms(zero: str, group_size: int, fp32_scales: bool = False) -> tuple[int, ...]:
    if "kquant" in zero:
        return FACTORED if 256 % group_size == 0 else (int4_mma.FLOAT,)
    return (int4_mma.FLOAT,) if fp32_scales or zero == "offsets-fp32" else (int4_mma.HALF,)


@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 5, 6, 8])            # 5, 6: GGUF Q5_*/Q6_K's levels, the 6-bit layout
@pytest.mark.parametrize("warps,unroll,min_blocks", LAUNCH_SHAPES)
@pytest.mark.parametrize("zero", sorted(ZERO_KINDS))
def test_lowbit_mma_matches_fp64_at_every_launch_shape(bits, warps, unroll, min_blocks, zero):
    K, N = 1024, 1008
    config = lowbit_mma.MmaConfig(warps, unroll, min_blocks)
    # Gathering x in the kernel needs warps x unroll x 128-input chunks of shared memory: 2/3 bits cap it at 16.
    gather = lowbit_mma.CHUNK[lowbit_mma.WIDTH[bits]] == 64 or warps * unroll <= 16
    for group_size in (16, 32, 64, 128, K):                 # 16: GGUF's K-quants; K: GPTQ group_size -1
        qw = random_quant(K, N, group_size, bits, act_order=True, **ZERO_KINDS[zero])
        qw, order = qw.sorted_by_group()
        if order is None:                                   # one group: any input order is already sorted
            order = torch.arange(K)
        cuda = lambda t: None if t is None else t.cuda()
        packed = lowbit_mma.pack(qw.q.cuda(), qw.scales.cuda(), cuda(qw.zeros), group_size, bits,
                                 offsets=cuda(qw.offsets))
        assert packed.form in expected_forms(zero, group_size)
        w = qw.dequantize(torch.float64).cuda()                                           # [N, K], sorted K
        torch.testing.assert_close(lowbit_mma.dequantize(packed).double(), w, rtol=1e-2, atol=1e-6)
        order = order.cuda()
        for rows in (1, 3, 8):
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            ref = x[:, order].double() @ w.t()
            outs = [lowbit_mma.matmul(x[:, order].contiguous(), packed, config)]
            if gather:
                outs.append(lowbit_mma.matmul(x, packed, config, order.to(torch.int32)))
            for y in outs:
                assert y.shape == (rows, N) and torch.isfinite(y).all()
                assert rel_err(y, ref) < 5e-3, (group_size, rows)


@needs_cuda
@pytest.mark.parametrize("warps,unroll,min_blocks", LAUNCH_SHAPES)
def test_3bit_mantissa_fields_take_v1_zeros_up_to_8(warps, unroll, min_blocks):
    # GPTQ v1 files store zero - 1, so a 3-bit file's zeros reach 8, one past the levels: the kernel's bias
    # -(128 + z) and the eighths' -(16 + z) must stay exact for them too.
    K, N, gs = 1024, 1008, 64
    q = torch.randint(0, 8, (K, N), dtype=torch.uint8, device="cuda")
    zeros = torch.randint(0, 9, (K // gs, N), dtype=torch.uint8, device="cuda")
    zeros[0] = 8
    scales = (torch.rand(K // gs, N, device="cuda") * 0.02 + 0.001).half()
    packed = lowbit_mma.pack(q, scales, zeros, gs, 3)
    g = torch.arange(K, device="cuda") // gs
    w = (q.double() - zeros.double()[g]) * scales.double()[g]                             # [K, N]
    torch.testing.assert_close(lowbit_mma.dequantize(packed).double().t(), w, rtol=1e-2, atol=1e-6)
    for rows in (1, 8):
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        assert rel_err(lowbit_mma.matmul(x, packed, lowbit_mma.MmaConfig(warps, unroll, min_blocks)), x.double() @ w) < 5e-3


@needs_cuda
@pytest.mark.parametrize("warps,unroll,min_blocks", LAUNCH_SHAPES + [(32, 2, 0)])
@pytest.mark.parametrize("zero", ["per-group", "offsets-fp16", "offsets-fp32", "offsets-kquant"])
def test_int4_mma_with_offsets_and_fp32_scales_matches_fp64_at_every_launch_shape(warps, unroll, min_blocks, zero):
    # The 4-bit kernel's GGUF forms (Q4_1: fp16 offsets; Q4_K: factored scales and offsets; fp32 ones where
    # they do not factor), and fp32 scales with per-group zeros, next to its GPTQ forms (tests/test_engine.py).
    K, N = 1024, 1008
    config = int4_mma.MmaConfig(warps, unroll, min_blocks)
    for group_size in (32, 64, 128, K):
        fp32_scales = zero in ("per-group", "offsets-fp32")
        qw = random_quant(K, N, group_size, 4, act_order=True, fp32_scales=fp32_scales,
                          **{k: v for k, v in ZERO_KINDS[zero].items() if k != "fp32_scales"})
        qw, order = qw.sorted_by_group()
        order = torch.arange(K) if order is None else order
        cuda = lambda t: None if t is None else t.cuda()
        packed = int4_mma.pack(qw.q.cuda(), qw.scales.cuda(), cuda(qw.zeros), group_size, offsets=cuda(qw.offsets))
        assert packed.form in expected_forms(zero, group_size, fp32_scales)
        w = qw.dequantize(torch.float64).cuda()
        torch.testing.assert_close(int4_mma.dequantize(packed).double(), w, rtol=1e-2, atol=1e-6)
        order = order.cuda()
        for rows in (1, 3, 8):
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            ref = x[:, order].double() @ w.t()
            outs = [int4_mma.matmul(x[:, order].contiguous(), packed, config)]
            if warps * unroll <= 32:    # x gathered in the kernel: warps x unroll x 1 KB of shared memory
                outs.append(int4_mma.matmul(x, packed, config, order.to(torch.int32)))
            for y in outs:
                assert y.shape == (rows, N) and torch.isfinite(y).all()
                assert rel_err(y, ref) < 5e-3, (group_size, rows)


@needs_cuda
@pytest.mark.parametrize("form", ["fp16", "kquant"])
def test_int4_offsets_keep_bf16_accuracy_when_x_has_a_large_common_part(form):
    # With float offsets the kernel feeds the mma 128 + q and takes 128 s sum(x) back once a group (no bf16
    # subtraction a pair). The fp32 sums then carry 128 s sum(x), far more than the result when x is mostly
    # one sign and every group's weights are centred (m = -7.5 s): the worst case for that cancellation, at
    # a 7B K. It must still be within the bf16 output's rounding of fp64.
    K, N, gs = 4096, 256, 32
    G = K // gs
    if form == "kquant":   # Q4_K: d per 256 inputs times 0..8, and m = -7.5 s = (d / 2) * -(15 sc): factored
        d = (torch.rand(G // 8, N) * 1e-3 + 1e-4).half().float().repeat_interleave(8, 0)
        sc = torch.randint(0, 9, (G, N)).float()
        scales, offsets = d * sc, d / 2 * -(15 * sc)
    else:                  # Q4_1: fp16 s and m
        scales = (torch.rand(G, N) * 0.02 + 0.001).half().float()
        offsets = (-7.5 * scales).half().float()
    q = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    packed = int4_mma.pack(q.cuda(), scales.cuda(), None, gs, offsets=offsets.cuda())
    assert packed.zmode == int4_mma.OFFSETS
    assert packed.form in (UNSIGNED_FACTORED if form == "kquant" else (int4_mma.HALF,))
    g = torch.arange(K) // gs
    w = (q.double() * scales.double()[g] + offsets.double()[g]).t().cuda()                 # [N, K]
    for config in [int4_mma.MmaConfig(32, 1), int4_mma.MmaConfig(16, 1, 2), int4_mma.MmaConfig(8, 2),
                   int4_mma.MmaConfig(8, 1, 2), int4_mma.config_for(N, factored=True)]:
        for rows in (1, 8):
            x = (1 + 0.05 * torch.randn(rows, K, device="cuda")).to(torch.bfloat16)
            y = int4_mma.matmul(x, packed, config)
            assert rel_err(y, x.double() @ w.t()) < 5e-3, (config, rows)


@needs_cuda
def test_every_gguf_type_runs_packed_on_cuda():
    # What a GGUF load builds: each type's repacked weight becomes a tensor-core layer (never dequantized), at
    # decode sizes and through the prompt path (dequantize + cuBLAS), against gguf's values in fp64.
    from loaders.gguf_repack import BLOCK_TYPES, repack
    from tests.test_gguf_engine import random_blocks

    K, N = 512, 64
    for type_name, kind in BLOCK_TYPES.items():
        qw = repack(torch.from_numpy(random_blocks(type_name, N, K // kind.block, 1)), type_name, K)
        layer = make_quant_linear(qw, None, torch.device("cuda"), torch.bfloat16)
        assert isinstance(layer, Int4Linear if qw.bits == 4 else LowBitLinear), type_name
        assert layer.kernel == "hearth tensor-core", type_name
        w = qw.dequantize(torch.float64).cuda()
        for rows in (1, 5, 300):
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            assert rel_err(layer(x), x.double() @ w.t()) < 5e-3, (type_name, rows)


@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 300])               # 300: dequantize into a scratch + cuBLAS
def test_lowbit_linear_on_cuda_stays_packed(bits, act_order, rows):
    K, N = 1152, 528
    qw = random_quant(K, N, 128 if bits != 8 else 64, bits, act_order=act_order)
    layer = make_quant_linear(qw, torch.randn(N), torch.device("cuda"), torch.bfloat16)
    assert isinstance(layer, LowBitLinear) and layer.kernel == "hearth tensor-core"
    assert (layer.perm is not None) == act_order
    # At rest: packed levels + fp16 scales + the zeros, no bf16 copy of W.
    assert layer.packed.words.numel() * 4 == K * N * bits // 8
    assert sum(b.numel() for b in layer.buffers()) < K * N // 64
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qw.dequantize(torch.float64).cuda().t() + layer.bias.double()
    assert rel_err(layer(x), ref) < 5e-3


@needs_cuda
def test_cuda_shapes_the_lowbit_kernel_cannot_take_fall_back_with_the_reason():
    layer = make_quant_linear(random_quant(192, 64, 32, 3), None, torch.device("cuda"), torch.bfloat16)
    assert isinstance(layer, DequantLinear) and "128-input chunks" in layer.kernel


@needs_cuda
@pytest.mark.parametrize("bits,group_size,sym,fmt", [(2, 32, False, "gptq"), (3, 128, True, "gptq"),
                                                     (3, -1, False, "gptq_v2"), (8, 32, True, "gptq")])
def test_gptq_lowbit_folders_run_packed_on_the_cuda_engine(tmp_path, bits, group_size, sym, fmt):
    # The load path a user gets: the folder's 2/3/8-bit layers become LowBitLinear, act-order folded as at
    # 4 bits, and the logits agree with the exact dequantized model on CPU.
    src = tiny_llama_dir(tmp_path / "fp", hidden=256, intermediate=512, vocab_size=128)
    quantize_model_dir(src, tmp_path / "q", bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt,
                       desc_act=True, order_by_input=True)
    model, kinds = load_transformer(tmp_path / "q", [torch.device("cuda")], torch.bfloat16)
    assert kinds == {f"{bits}-bit hearth tensor-core"}
    ref_model, _ = load_transformer(tmp_path / "q", [CPU], torch.float32)
    ids = torch.randint(0, 128, (20,))
    model.setup_caches(32, torch.bfloat16)
    ref_model.setup_caches(32, torch.float32)
    with torch.no_grad():
        for rows in (20, 1):    # a prompt (dequantize + cuBLAS: more than 8 rows), then a decode-sized input
            got = model(ids[None, :rows].cuda(), torch.arange(rows, device="cuda"), kv_len=rows)[0]
            ref = ref_model(ids[None, :rows], torch.arange(rows), kv_len=rows)[0]
            assert rel_err(got.float().cpu(), ref) < 3e-2
