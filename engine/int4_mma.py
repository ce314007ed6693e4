"""Hearth's 4-bit matmul for few rows on CUDA: the weights stream through the tensor cores.

Batch-1 decode is bound by reading the weights, and the work per weight decides whether a kernel keeps up
with memory: a plain GEMV spends ~4 instructions a weight (extract, convert, subtract, multiply-add), and at
~3 TB/s that is most of what an H100 can issue. Here each 16-byte load per lane is dequantized two weights
per instruction into bf16 pairs (the level is OR-ed into the mantissa of 128.0, then 128 + z is subtracted
by one bf16x2 FMA: exact, since q - z is a small integer) and fed to `mma.sync m16n8k16` as the A operand,
16 output rows at a time; x (up to 8 rows, one per B column) is the B operand. The tensor core does the
multiply-adds in fp32, and each group's partial sums are scaled by that group's fp32 scale, so the result
equals the dequantized reference's up to fp32 summation order. Measured on an H100: bench/NOTES-engine.md.

Layout (made once at load, `pack`): 16 output rows form a tile; K is cut in chunks of 64. For tile T, chunk
c and lane L = 4 r + t, the lane's 16 bytes hold four words, word i for mma i, so that a warp reads 512
contiguous bytes a chunk. With SEG = group size / 16 mma steps a group (at most 4: a chunk), step
i = SEG s + j takes inputs k .. k + 3, k = c*64 + 16 SEG s + 4 SEG t + 4 j: each group keeps whole steps, and
a lane's B values for a group's steps are 4 SEG contiguous inputs of its x row (for SEG >= 2 one 16-byte
load per two steps instead of an 8-byte load per step: with 8 x rows, a warp's loads then touch 4x fewer
cache lines, which L1 had been too slow for). Each word's nibbles, by position:
0: (row r, k) 1: (row r+8, k) 2: (r, k+2) 3: (r+8, k+2) 4: (r, k+1) 5: (r+8, k+1) 6: (r, k+3) 7: (r+8, k+3).
Shifting a word right by 4 p puts the pair for A register p in bits 0-3 and 16-19. (mma's fragment k order
is a fixed permutation of the physical one, the same for A and B.)
Scales and zero biases (bf16 -(128 + z)) are [N/16, G, 8, 2]: a tile's rows r and r + 8 of one group
side by side, so that a lane reads both of its rows' values in one load.

Float offsets (GGUF Q4_1/Q4_K: W = s * q + m) are a third form of zero point: the levels go into the mma raw,
as 128 + q (no subtraction a pair), and the group's sum of x is taken by one more mma with A all ones (the
sum is the same for every row, the instruction costs one issue slot and reuses the B registers), so the group
adds s * sum((128 + q) x) + (m - 128 s) * sum(x) = s * sum(q x) + m * sum(x), exact up to fp32 rounding.
Scales and offsets are kept fp16 where every value converts exactly (GPTQ's and GGUF's per-block fp16
values do); the K-quants' d * sub-scale products (up to 17 significant bits) are kept factored again, a byte
a group and row times the super-block's d (`scale_storage`; the byte is the integer itself where the format's
integers are unsigned, Q4_K's, else integer + 128); anything else fp32. The layer always equals
its QuantWeight's dequantize up to summation order.

Compiled at first use by NVRTC, the runtime compiler CUDA builds of torch ship and load: no nvcc or CUDA
toolkit is needed where Hearth runs. Needs compute capability 8.0+ (bf16 mma).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from engine.cuda_launch import launch

MAX_ROWS = 8          # the B operand's 8 columns: inputs with more rows dequantize and use cuBLAS
TILE, CHUNK = 16, 64  # output rows per mma tile; inputs per 16-byte lane load

# Types and device functions the kernels here and in engine.lowbit_mma share.
DEVICE_HELPERS = r"""
typedef unsigned int u32;
typedef unsigned short u16;
struct __align__(16) Words { u32 w[4]; };
struct __align__(8) Pair { u32 lo, hi; };

__device__ __forceinline__ float bits_to_float(u32 u) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
    return f;
}

__device__ __forceinline__ Words load_streaming(const Words* p) {
    // Weights are read once a step: keep them out of L1 so x and the scales stay there.
    Words v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
    return v;
}

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 float_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// (a & MASK) | 0x43004300 in one LOP3: written in C, the compiler spends two (one immediate an instruction,
// sm_90 SASS). A bf16 with 128's exponent is 128 + m for any 7-bit mantissa m: this is 128 + each level.
template <u32 MASK> __device__ __forceinline__ u32 mantissa(u32 a) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK), "n"(0x43004300u));
    return d;
}

// (a & MASK) | c in one LOP3 (see mantissa).
template <u32 MASK> __device__ __forceinline__ u32 or_masked(u32 a, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(MASK), "r"(c));
    return d;
}

// bf16x2 a * b + c
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// bf16 pair (128 + q_lo, 128 + q_hi) from the levels in bits 0-3 and 16-19 of w: exact (bf16 steps by 1 in
// [128, 256)).
__device__ __forceinline__ u32 raw_levels(u32 w) { return mantissa<0x000F000Fu>(w); }

// bf16 pair (q_lo - z, q_hi - z). bias = bf16x2 -(128 + z); one bf16x2 add, exact (q - z is a small integer).
__device__ __forceinline__ u32 levels(u32 w, u32 bias) { return fma2(raw_levels(w), 0x3F803F80u, bias); }

__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// fp32 values of the fp16 pair (row r, row r + 8) in one 32-bit word.
__device__ __forceinline__ void half_pair(u32 v, float& lo, float& hi) {
    lo = half_to_float((u16)(v & 0xFFFFu));
    hi = half_to_float((u16)(v >> 16));
}

// Scales and offsets are pairs (row r, row r + 8) of fp16 (F32 false) or fp32: the pair at p as two floats.
template <bool F32> __device__ __forceinline__ void value_pair(const char* p, float& lo, float& hi) {
    if (F32) {
        const float2 v = *reinterpret_cast<const float2*>(p);
        lo = v.x;
        hi = v.y;
    } else {
        half_pair(*reinterpret_cast<const u32*>(p), lo, hi);
    }
}

// Zero-point modes: one zero for every group (uniform_bias), a zero per group and row, float offsets.
enum ZeroMode { UNIFORM = 0, ZEROS = 1, OFFSETS = 2 };
enum : u32 { ONES = 0x3F803F80u };   // bf16x2 (1, 1): the A operand that sums x over a k-step

// Scale forms: fp16 or fp32 values per group and row, or factored: per group and row a byte (an integer
// + 128, or UFACTORED: the integer itself, where every span's integers have one sign), times one fp16 or
// fp32 value per row for a span of groups (a GGUF K-quant's super-block d). HALF_BIASED (per-group zeros
// with fp16 scales, AWQ's and asymmetric GPTQ's): an 8-byte record per group and row pair, the fp16 scales
// then the bf16 zero biases, read by one load.
enum ScaleForm { HALF = 0, FLOAT = 1, FACTORED_HALF = 2, FACTORED_FLOAT = 3, UFACTORED_HALF = 4, UFACTORED_FLOAT = 5,
                 HALF_BIASED = 6 };

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// 2^23 + byte i of v, exactly: the byte goes into the mantissa of 2^23 (one permute; full-rate, unlike an
// int-to-float convert).
__device__ __forceinline__ float byte_float(u32 v, int i) { return bits_to_float(prmt(v, 0x4B000000u, 0x7540u + i)); }

// Byte i of v, stored as integer + 128, as that integer in fp32 (2^23 + 128 subtracted: exact).
__device__ __forceinline__ float byte_int(u32 v, int i) { return byte_float(v, i) - 8388736.f; }

// Bytes of one pair (row r, row r + 8) in the scales tensor and in the values tensor (the offsets, or a
// factored form's factors), by form. A lane's pointers into both start at its tile's row r (`lane_pairs`).
template <int FORM, bool OFFS> struct Pairs {
    static constexpr bool unsigned_ints = FORM == UFACTORED_HALF || FORM == UFACTORED_FLOAT;
    static constexpr bool factored = FORM == FACTORED_HALF || FORM == FACTORED_FLOAT || unsigned_ints;
    static constexpr bool wide = FORM == FLOAT || FORM == FACTORED_FLOAT || FORM == UFACTORED_FLOAT;   // fp32
    static constexpr int scale = FORM == FLOAT || FORM == HALF_BIASED ? 8 : FORM == HALF ? 4 : OFFS ? 4 : 2;
    static constexpr int value = (wide ? 8 : 4) * (factored && OFFS ? 2 : 1);
};

// The pointers group_values reads through, set once per lane: tensors [N/16, G, 8, ...] (a factored form's
// factors [N/16, G >> span_shift, 8, ...]) at tile `tile`, group 0 (span 0), row r. Every later index is a
// small int from there, not 64-bit arithmetic per group.
template <int FORM, bool OFFS> __device__ __forceinline__ void lane_pairs(
        const void* scales, const void* values, int tile, int G, int span_shift, int r,
        const char*& lane_scales, const char*& lane_values) {
    typedef Pairs<FORM, OFFS> P;
    // 32-bit indices (a matrix has fewer than 2^32 scale pairs), widened once: 64-bit products cost more.
    lane_scales = reinterpret_cast<const char*>(scales) + (size_t)(u32)(tile * G * 8 + r) * P::scale;
    lane_values = reinterpret_cast<const char*>(values)
                + (size_t)(u32)(tile * (P::factored ? G >> span_shift : G) * 8 + r) * P::value;
}

// A factored form's factors (d_r, d_r8 [, dmin_r, dmin_r8]) of span `span` (inputs 256 span .. + 255), in
// fp32, and (UFACTORED) d[4 + i] = -2^23 d[i]; read once a chunk, for all of its groups (a chunk never
// straddles a span). Other forms: unused.
template <int FORM, bool OFFS> __device__ __forceinline__ void span_factors(const char* values, int span,
                                                                            float (&d)[8]) {
    typedef Pairs<FORM, OFFS> P;
    const char* p = values + span * 8 * P::value;
    if (!P::factored) return;
    if (P::wide && OFFS) {
        const float4 v = *reinterpret_cast<const float4*>(p);
        d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
    } else if (P::wide) {
        const float2 v = *reinterpret_cast<const float2*>(p);
        d[0] = v.x; d[1] = v.y;
    } else if (OFFS) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        half_pair(v.x, d[0], d[1]);
        half_pair(v.y, d[2], d[3]);
    } else {
        half_pair(*reinterpret_cast<const u32*>(p), d[0], d[1]);
    }
    if (P::unsigned_ints)
        for (int i = 0; i < 4; ++i) d[4 + i] = -8388608.f * d[i];   // exact: a power of two
}

// Scales s and (OFFS) offsets m of rows r and r + 8 for group g; scales and values from lane_pairs, d from
// span_factors for g's span. HALF/FLOAT: the values themselves, scales in `scales`, offsets in `values`.
// Factored: `scales` holds a byte a row (s's, or s's and then m's), times the span's factors d; the product
// is exactly the QuantWeight's value (pack checks that every one is), as the integer and the factor both are.
// UFACTORED: (2^23 + i) d - 2^23 d in one FMA: the product is exact inside it, so its one rounding gives the
// exact d i (one permute and one FMA a value; the biased byte takes a subtraction and a multiply).
template <int FORM, bool OFFS> __device__ __forceinline__ void group_values(
        const char* scales, const char* values, int g, const float (&d)[8], float (&s)[2], float (&m)[2]) {
    typedef Pairs<FORM, OFFS> P;
    const char* sp = scales + g * 8 * P::scale;
    if (P::factored) {
        const u32 ints = OFFS ? *reinterpret_cast<const u32*>(sp) : (u32)*reinterpret_cast<const u16*>(sp);
#pragma unroll
        for (int i = 0; i < (OFFS ? 4 : 2); ++i) {
            const float v = P::unsigned_ints ? fmaf(byte_float(ints, i), d[i], d[4 + i]) : d[i] * byte_int(ints, i);
            if (i < 2) s[i] = v;
            else m[i - 2] = v;
        }
    } else {
        value_pair<FORM == FLOAT>(sp, s[0], s[1]);
        if (OFFS) value_pair<FORM == FLOAT>(values + g * 8 * P::value, m[0], m[1]);
    }
}

// Programmatic dependent launch (engine.cuda_launch; sm_90+, no-ops below): a kernel launched early waits for
// the kernel before it (its writes visible) with wait_for_prerequisites, and lets the kernel after it launch
// with let_dependents_launch.
__device__ __forceinline__ void wait_for_prerequisites() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_dependents_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Weights, scales and zeros are the model's: no kernel of a step writes them. So a kernel launched early may
// read them before it waits, and its first chunk's loads overlap the end of the kernel before. x, the
// experts chosen and every write wait for it (`meet`). x is no `const __restrict__` pointer in the kernels: its
// loads would be read-only-cache loads the compiler may move above the wait (graph vs eager then differed).
// Measured on an H200, 7B 4-bit decode: 532.3 -> 591.7 tok/s (bench/NOTES-engine.md).
struct Prerequisites {
    bool met;
    __device__ __forceinline__ explicit Prerequisites(bool early) : met(!early) {
        if (!early) wait_for_prerequisites();
    }
    __device__ __forceinline__ void meet() {
        if (!met) {
            wait_for_prerequisites();
            met = true;
        }
    }
};

// Group of segment seg (SEG mma steps of 16 inputs) of chunk c (CH inputs). Groups smaller than a chunk are
// exactly one segment (refusal: powers of two), so the group is known without the runtime shift.
template <int CH, int SEG> __device__ __forceinline__ int group_of(int c, int seg, int group_shift) {
    return SEG * 16 < CH ? c * (CH / (SEG * 16)) + seg : (c * CH) >> group_shift;
}

// The first of the four inputs mma step i takes from lanes t (t = lane % 4), within its chunk: the segment
// layout (engine.int4_mma's docstring), steps i = SEG s + j of group s at 16 SEG s + 4 SEG t + 4 j.
template <int SEG> __device__ __forceinline__ int step_input(int i, int t) {
    return 16 * SEG * (i / SEG) + 4 * SEG * t + 4 * (i % SEG);
}

// A lane's B operands for the SEG mma steps of one group: its x row's 4 SEG contiguous inputs at p (x at the
// group's first step_input), b[2 j], b[2 j + 1] for step j; 16-byte loads where there are two steps or more.
template <int SEG> __device__ __forceinline__ void segment_b(const u16* p, u32 (&b)[2 * SEG]) {
    if (SEG == 1) {
        const Pair v = *reinterpret_cast<const Pair*>(p);
        b[0] = v.lo;
        b[1] = v.hi;
    } else {
#pragma unroll
        for (int h = 0; h < SEG / 2; ++h) {
            const Words v = reinterpret_cast<const Words*>(p)[h];
            b[4 * h] = v.w[0];
            b[4 * h + 1] = v.w[1];
            b[4 * h + 2] = v.w[2];
            b[4 * h + 3] = v.w[3];
        }
    }
}
"""

SOURCE = DEVICE_HELPERS + r"""

// y[M, N] = x[M, K] @ W^T for M <= 8. One block per 16-row tile; its WARPS warps take every WARPS-th chunk
// of 64 inputs, U chunks in flight per lane, and meet in shared memory at the end. MIN_BLOCKS: blocks an SM
// must hold at once, which caps registers a thread (0: no cap; see MmaConfig).
// SEG = mmas per scale (group / 16, at most 4): one group's partial sums are scaled together.
// ZMODE: UNIFORM, ZEROS (zero_bias: bf16 -(128 + z) pairs) or OFFSETS; FORM: how scales (and offsets) are
// stored (group_values: zero_bias holds the offsets, or a factored form's factors; span_shift: log2 of the
// groups a factor spans).
// PERM (act-order whose order the layer before could not produce): x[m, perm[k]] is read instead of x[m, k];
// each warp gathers a chunk's 64 inputs once into shared memory (2 a lane), and the lanes read their B
// values from there.
// EXPERTS (a mixture-of-experts decode step): blockIdx.y is a slot j; the weight, scales and zero biases are
// expert experts[j]'s of tensors stacked [E, ...] (byte strides w_stride, s_stride, z_stride), x and y are
// offset by j * x_stride and j * y_stride elements. The chosen experts are read in place, with no copy.
template <int WARPS, int MIN_BLOCKS, int U, int SEG, int ZMODE, int FORM, bool PERM, bool EXPERTS>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
int4_mma(const u16* x, const int* __restrict__ perm, const Words* __restrict__ w,
         const void* __restrict__ scales, const void* __restrict__ zero_bias, u16* __restrict__ y,
         int M, int N, int K, int G, int group_shift, u32 uniform_bias, int span_shift,
         const long long* __restrict__ experts, int w_stride, int s_stride, int z_stride, int x_stride, int y_stride) {
    static_assert(ZMODE != ZEROS || FORM < FACTORED_HALF || FORM == HALF_BIASED,
                  "factored scales come with no zeros or offsets");
    static_assert(FORM != HALF_BIASED || ZMODE == ZEROS, "the biased record holds the zeros");
    Prerequisites ready(!EXPERTS);   // the experts chosen and x: written by earlier kernels
    if (EXPERTS) {
        const int slot = blockIdx.y;
        const long long e = experts[slot];
        w = reinterpret_cast<const Words*>(reinterpret_cast<const char*>(w) + e * w_stride);
        scales = reinterpret_cast<const char*>(scales) + e * s_stride;
        zero_bias = reinterpret_cast<const char*>(zero_bias) + e * z_stride;
        x += (size_t)slot * x_stride;
        y += (size_t)slot * y_stride;
    }
    __shared__ float partial[WARPS][8][16];
    __shared__ __align__(16) u32 gathered[PERM ? WARPS : 1][PERM ? U : 1][8][32];   // [warp][u][x row][input pair]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x;
    const int chunks = K >> 6;
    const int xrow = min(r, M - 1);                          // B column r: x row r (unused columns repeat)
    const u16* xr = x + (u32)(xrow * K);
    const Words* wt = w + (u32)(tile * chunks * 32 + lane);
    const char *lane_scales, *lane_values;
    lane_pairs<FORM, ZMODE == OFFSETS>(scales, zero_bias, tile, G, span_shift, r, lane_scales, lane_values);
    const u32* lane_zeros = reinterpret_cast<const u32*>(zero_bias) + (u32)(tile * G * 8 + r);   // ZEROS
    // Cursors at this warp's chunk c0, advanced with it, so that a chunk's loads take constant offsets
    // instead of 64-bit index arithmetic: x, the weights, a factored form's span factors (4 chunks a span),
    // and where groups are below a chunk (LINEAR: chunk c's are GPC c .. + GPC - 1) the scales, offsets and
    // zeros; larger groups are found by group_of from the lane's first pair.
    typedef Pairs<FORM, ZMODE == OFFSETS> P;
    constexpr bool LINEAR = SEG < 4;
    constexpr int GPC = LINEAR ? 4 / SEG : 0, STEP = WARPS * U;
    static_assert(WARPS % 4 == 0, "a span's 4 chunks: the factor cursor advances by whole spans");
    const u16* xc = xr + warp * 64;
    const Words* wc = wt + warp * 32;
    const char* sc = lane_scales + warp * GPC * 8 * P::scale;
    const char* vc = lane_values + (P::factored ? (warp >> 2) * 8 * P::value : warp * GPC * 8 * P::value);
    const u32* zc = lane_zeros + warp * GPC * 8;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // Not unrolled: one chunk's loads in flight a lane, as measured best (bench/NOTES-engine.md); left to
    // itself the compiler unrolls some instantiations by two, issuing the next chunk's load mid-loop.
#pragma unroll 1
    for (int c0 = warp; c0 < chunks; c0 += STEP, xc += STEP * 64, wc += STEP * 32, sc += STEP * GPC * 8 * P::scale,
         vc += P::factored ? STEP / 4 * 8 * P::value : STEP * GPC * 8 * P::value, zc += STEP * GPC * 8) {
        Words q[U];
        // Per segment: the scales s of rows r and r + 8, and (OFFSETS) the offsets less 128 s, as the levels
        // go into the mma raw (128 + q) there: s sum((128 + q) x) + (m - 128 s) sum(x) = s sum(q x) + m sum(x).
        float s[U][4 / SEG][2], off[ZMODE == OFFSETS ? U : 1][4 / SEG][2];
        u32 bias[U][4 / SEG][2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * WARPS;
            if (c < chunks) {
                q[u] = load_streaming(wc + u * WARPS * 32);
                float d[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                span_factors<FORM, ZMODE == OFFSETS>(vc, u * WARPS / 4, d);
#pragma unroll
                for (int seg = 0; seg < 4 / SEG; ++seg) {
                    // the group: from the cursors (LINEAR), else from the lane's first pair
                    const int g = LINEAR ? u * WARPS * GPC + seg : group_of<64, SEG>(c, seg, group_shift);
                    float sv[2], mv[2] = {0.f, 0.f};
                    u32 b = 0;   // ZEROS: the pair of bf16 zero biases (row r, row r + 8)
                    if (FORM == HALF_BIASED) {   // scales and biases in one 8-byte load
                        const uint2 rec = *reinterpret_cast<const uint2*>((LINEAR ? sc : lane_scales) + g * 8 * P::scale);
                        half_pair(rec.x, sv[0], sv[1]);
                        b = rec.y;
                    } else {
                        group_values<FORM, ZMODE == OFFSETS>(LINEAR ? sc : lane_scales, LINEAR ? vc : lane_values, g,
                                                             d, sv, mv);
                        if (ZMODE == ZEROS) b = (LINEAR ? zc : lane_zeros)[g * 8];
                    }
                    s[u][seg][0] = sv[0];
                    s[u][seg][1] = sv[1];
                    if (ZMODE == ZEROS) {   // each row's bias in both halves: one permute each
                        bias[u][seg][0] = prmt(b, 0u, 0x1010u);
                        bias[u][seg][1] = prmt(b, 0u, 0x3232u);
                    } else {
                        bias[u][seg][0] = bias[u][seg][1] = uniform_bias;
                    }
                    if (ZMODE == OFFSETS) {
                        off[ZMODE == OFFSETS ? u : 0][seg][0] = fmaf(-128.f, sv[0], mv[0]);
                        off[ZMODE == OFFSETS ? u : 0][seg][1] = fmaf(-128.f, sv[1], mv[1]);
                    }
                }
                if (PERM) {
                    ready.meet();
                    const int k0 = perm[c * 64 + 2 * lane], k1 = perm[c * 64 + 2 * lane + 1];
                    for (int m = 0; m < M; ++m)
                        gathered[PERM ? warp : 0][u][m][lane] = (u32)x[(size_t)m * K + k0]
                                                               | ((u32)x[(size_t)m * K + k1] << 16);
                }
            }
        }
        ready.meet();
        if (PERM) __syncwarp();
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * WARPS;
            if (c < chunks) {
#pragma unroll
                for (int seg = 0; seg < 4 / SEG; ++seg) {
                    float part[4] = {0.f, 0.f, 0.f, 0.f}, xsum[4] = {0.f, 0.f, 0.f, 0.f};
                    // B: this lane's x row at the segment's inputs (the fragment's k order, see the layout)
                    u32 b[2 * SEG];
                    segment_b<SEG>((PERM ? reinterpret_cast<const u16*>(gathered[PERM ? warp : 0][u][xrow])
                                         : xc + u * WARPS * 64) + step_input<SEG>(seg * SEG, t), b);
#pragma unroll
                    for (int j = 0; j < SEG; ++j) {
                        const u32 wd = q[u].w[seg * SEG + j];
                        const u32 b_r = bias[u][seg][0], b_r8 = bias[u][seg][1];
                        if (ZMODE == OFFSETS) {   // raw 128 + q (see off above): no bf16 subtraction a pair
                            mma(part, raw_levels(wd), raw_levels(wd >> 4), raw_levels(wd >> 8), raw_levels(wd >> 12),
                                b[2 * j], b[2 * j + 1]);
                            mma(xsum, ONES, ONES, ONES, ONES, b[2 * j], b[2 * j + 1]);
                        } else {
                            mma(part, levels(wd, b_r), levels(wd >> 4, b_r8), levels(wd >> 8, b_r),
                                levels(wd >> 12, b_r8), b[2 * j], b[2 * j + 1]);
                        }
                    }
                    acc[0] += s[u][seg][0] * part[0];
                    acc[1] += s[u][seg][0] * part[1];
                    acc[2] += s[u][seg][1] * part[2];
                    acc[3] += s[u][seg][1] * part[3];
                    if (ZMODE == OFFSETS) {   // C fragment: xsum[0], [2] are x row 2t's sum, [1], [3] row 2t + 1's
                        const float m_r = off[ZMODE == OFFSETS ? u : 0][seg][0];
                        const float m_r8 = off[ZMODE == OFFSETS ? u : 0][seg][1];
                        acc[0] += m_r * xsum[0];
                        acc[1] += m_r * xsum[1];
                        acc[2] += m_r8 * xsum[2];
                        acc[3] += m_r8 * xsum[3];
                    }
                }
            }
        }
        if (PERM) __syncwarp();   // every lane has read this round's gathered x before the next overwrites it
    }
    let_dependents_launch();   // its blocks fill the SMs this kernel's last blocks leave
    ready.meet();              // a warp with no chunk: before the writes
    // C fragment: (row r, columns 2t and 2t+1) in acc[0..1], row r + 8 in acc[2..3]; a column is an x row.
    partial[warp][2 * t][r] = acc[0];
    partial[warp][2 * t + 1][r] = acc[1];
    partial[warp][2 * t][r + 8] = acc[2];
    partial[warp][2 * t + 1][r + 8] = acc[3];
    __syncthreads();
    if (threadIdx.x < 8 * 16) {
        const int m = threadIdx.x >> 4, row = threadIdx.x & 15;
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) sum += partial[v][m][row];
        const int n = tile * 16 + row;
        if (m < M && n < N) y[(size_t)m * N + n] = float_to_bf16(sum);
    }
}

// W [N, K] bf16 from the packed layout (prompts then run through cuBLAS). One warp a (tile, chunk): each
// lane dequantizes its 16 bytes into shared memory, then the warp writes the 16 x 64 block row by row
// (16-byte stores, 128 contiguous bytes a row: stores straight from the fragment layout would scatter).
template <int SEG, int ZMODE, int FORM>
__global__ void __launch_bounds__(256)
int4_dequant(const Words* __restrict__ w, const void* __restrict__ scales, const void* __restrict__ zero_bias,
             Words* __restrict__ out, int N, int K, int G, int group_shift, u32 uniform_bias, int span_shift) {
    __shared__ u32 block[8][16][33];                    // [warp][row][k pair], padded against bank conflicts
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = K >> 6;
    const long long unit = (long long)blockIdx.x * 8 + warp;     // tile * chunks + chunk
    if (unit >= (long long)(N / 16) * chunks) return;
    const int c = (int)(unit % chunks), tile = (int)(unit / chunks);
    const int r = lane >> 2, t = lane & 3;
    const Words q = w[unit * 32 + lane];
    const char *lane_scales, *lane_values;
    lane_pairs<FORM, ZMODE == OFFSETS>(scales, zero_bias, tile, G, span_shift, r, lane_scales, lane_values);
    float d[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    span_factors<FORM, ZMODE == OFFSETS>(lane_values, c >> 2, d);
#pragma unroll
    for (int word = 0; word < 4; ++word) {
        const int k = step_input<SEG>(word, t);         // within the chunk
        const int g = (c * 64 + k) >> group_shift;
        float sv[2], mv[2] = {0.f, 0.f};
        group_values<FORM, ZMODE == OFFSETS>(lane_scales, lane_values, g, d, sv, mv);
#pragma unroll
        for (int p = 0; p < 4; ++p) {                   // A register p: row r or r+8, inputs k, k+1 or k+2, k+3
            const int h = p & 1;
            const size_t at = (((size_t)tile * G + g) * 8 + r) * 2 + h;   // pairs (row r, row r + 8)
            const u32 zb = ZMODE != ZEROS ? (uniform_bias & 0xFFFFu)
                         : FORM == HALF_BIASED   // the record's biases follow its scales
                             ? (u32)reinterpret_cast<const u16*>(scales)[(at & ~(size_t)1) * 2 + 2 + h]
                         : (u32)reinterpret_cast<const u16*>(zero_bias)[at];
            const u32 lv = levels(q.w[word] >> (4 * p), zb | (zb << 16));
            float lo = bits_to_float(lv << 16) * sv[h], hi = bits_to_float(lv & 0xFFFF0000u) * sv[h];
            if (ZMODE == OFFSETS) {
                lo += mv[h];
                hi += mv[h];
            }
            block[warp][r + 8 * h][(k >> 1) + (p >> 1)] = (u32)float_to_bf16(lo) | ((u32)float_to_bf16(hi) << 16);
        }
    }
    __syncwarp();
    // 16 rows x 32 pairs = 128 stores of 16 bytes: lane writes rows lane/8 + 4 j, pairs 4 (lane % 8) .. + 3
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int row = (lane >> 3) + 4 * j, pair = 4 * (lane & 7);
        Words v;
        v.w[0] = block[warp][row][pair];
        v.w[1] = block[warp][row][pair + 1];
        v.w[2] = block[warp][row][pair + 2];
        v.w[3] = block[warp][row][pair + 3];
        out[(((size_t)tile * 16 + row) * K + c * 64) / 8 + (pair >> 2)] = v;
    }
}
"""


@dataclass(frozen=True)
class MmaConfig:
    """A launch shape. min_blocks (0: none) is the kernel's launch bound: blocks an SM must hold at once. It
    caps the registers a thread, and it changes how ptxas schedules the loop even where the cap is above what
    the kernel uses (measured: bench/NOTES-engine.md). A kernel over 32 registers at 32 warps fits one block
    an SM: the N = 4096 shapes' 256 tiles then run in two waves on 132 SMs."""
    warps: int           # warps a block (one 16-row tile), splitting K between them
    unroll: int          # 16-byte loads in flight per lane
    min_blocks: int = 0  # __launch_bounds__' minimum blocks an SM (0: not given)


def config_for(n: int, factored: bool = False, experts: bool = False, gathers: bool = False) -> MmaConfig:
    """Launch shape for N outputs, by form. One 16-byte load in flight per lane is best (more warps hide the
    latency better than unrolling). Measured on an H200 kernel by kernel on the 7B shapes (M = 1, weights
    streamed from memory) and as whole 7B decode steps (bench/NOTES-engine.md):
    - below N = 8192 (few tiles: 256 at N = 4096) 24 warps, two blocks an SM. Only the symmetric g128 form fits
      32 warps in 32 registers (two blocks an SM); every other form held one, and its N = 4096 matmuls ran in
      two waves: AWQ g128 wo 5.57 -> 4.43 us, w2 11.15 -> 9.27; act-order g32 wo 5.47 -> 4.24, w2 10.96 ->
      8.66; symmetric g128 4.29 / 8.76 either way;
    - x gathered in the kernel (act-order whose order the layer before cannot produce): 16 warps, 7.19 -> 5.97;
    - from N = 8192 8 warps (16 before: 607.2 against 591.0 tok/s), at least six blocks an SM (registers capped
      at 40; g32 had taken 44 with the segment layout: wqkv 12.34 -> 8.99 us, w13 18.35 -> 15.81; g128 w13 15.48
      -> 14.87);
    - factored scales (GGUF K-quants: Q4_K): 16 warps below N = 8192 and 8 from it, both at least two blocks
      an SM: wo 6.65 -> 5.24, w2 13.83 -> 11.18, w13 24.96 -> 21.89, wqkv 14.26 -> 14.0;
    - the experts' kernel (it waits before its first read: it needs the experts chosen): 16 warps."""
    if experts:
        return MmaConfig(16, 1)
    if factored:
        return MmaConfig(16 if n < 8192 else 8, 1, 2)
    if n >= 8192:
        return MmaConfig(8, 1, 6)
    return MmaConfig(16, 1) if gathers else MmaConfig(24, 1, 2)


def supported(device: torch.device) -> bool:
    """bf16 mma needs compute capability 8.0+ (Ampere, Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def refusal(k: int, n: int, group_size: int, chunk: int = CHUNK) -> str | None:
    """Why the kernel cannot take a [n, k] weight with this group size (None: it can). It needs whole 16-row
    tiles, K in whole chunks, and groups of 16-input mma steps that either divide a chunk or are whole
    chunks, found by a shift (a power of two, or one group for all of K)."""
    if n % TILE:
        return f"{n} outputs are not whole {TILE}-row tiles"
    if k % chunk:
        return f"{k} inputs are not whole {chunk}-input chunks"
    if (k % group_size or group_size % 16
            or not (group_size <= chunk and chunk % group_size == 0 or group_size % chunk == 0)
            or not (group_size & (group_size - 1) == 0 or group_size == k)):
        return f"group size {group_size} is not a power of two dividing {chunk}-input chunks or made of them"
    return None


def fits(k: int, n: int, group_size: int) -> bool:
    return refusal(k, n, group_size) is None


@functools.cache
def compiled(source: str, name: str):
    """One instantiation `name` of `source`'s templates, compiled for this GPU. torch.cuda._compile_kernel
    would do the same but insists on a CUDA toolkit's include folder, which pip-installed torch lacks; the
    sources need no header, so NVRTC is called directly (through torch's own handle to it)."""
    from torch.cuda._utils import _cuda_load_module, _get_gpu_rtc_library

    nvrtc = _get_gpu_rtc_library()
    major, minor = torch.cuda.get_device_capability()
    options = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"-std=c++17"]
    prog = ctypes.c_void_p()

    def check(status: int, what: str) -> None:
        if status != 0:
            log = b""
            size = ctypes.c_size_t()
            if nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0 and size.value > 1:
                buf = ctypes.create_string_buffer(size.value)
                nvrtc.nvrtcGetProgramLog(prog, buf)
                log = buf.value
            raise RuntimeError(f"NVRTC {what} failed ({status}) for {name}: {log.decode(errors='replace')}")

    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"hearth.cu", 0, None, None), "create")
    try:
        check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), "name")
        check(nvrtc.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options)), "compile")
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "size")
        cubin = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = ctypes.c_char_p()
        check(nvrtc.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)), "lowered name")
        mangled = lowered.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return _cuda_load_module(cubin.raw, [mangled])[mangled]


def _kernel(name: str):
    return compiled(SOURCE, name)


@functools.cache   # asked at every launch (uniform_bias): one small tensor made per value, not per call
def bf16_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _as_int32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


UNIFORM, ZEROS, OFFSETS = 0, 1, 2   # the kernels' zero-point modes (ZMODE)


def tiled(a: torch.Tensor) -> torch.Tensor:
    """[G, N] -> [N/16, G, 8, 2]: row 16 T + 8 h + r of group g at [T, g, r, h] (a lane's two rows side by side)."""
    G, N = a.shape
    return a.t().reshape(N // TILE, 2, 8, G).permute(0, 3, 2, 1).contiguous()


def exact_in_fp16(*tensors: torch.Tensor | None) -> bool:
    """Whether every value converts to fp16 and back unchanged (then fp16 storage is lossless)."""
    return all(t is None or torch.equal(t.to(torch.float16).float(), t.float()) for t in tensors)


HALF, FLOAT, FACTORED_HALF, FACTORED_FLOAT, UFACTORED_HALF, UFACTORED_FLOAT, HALF_BIASED = range(7)   # kernels' FORM
FACTOR_INPUTS = 256   # inputs one factor of a factored form spans: a GGUF K-quant's super-block


def factor(values: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """values [G, N] as d [G / span, N] fp32 times integers [G, N] in -128 .. 127, exactly (every d * i in
    fp32 equals its value), or None. A K-quant's scale is its super-block's fp16 d times a 4-8-bit integer:
    each value's integer mantissa, brought to the span's smallest exponent, is a multiple of d's, and their
    gcd gives d * gcd(integers), of which the integers are small multiples."""
    G, N = values.shape
    if G % span:
        return None
    v = values.float().reshape(G // span, span, N)
    mant, exp = torch.frexp(v)
    m = (mant.double() * 2**24).to(torch.int64)                    # v = m * 2^(exp - 24), m an exact integer
    e = exp.to(torch.int64) - 24
    nonzero = m != 0
    e_min = torch.where(nonzero, e, torch.full_like(e, 1 << 20)).amin(1, keepdim=True)
    e_min = torch.where(e_min == 1 << 20, torch.zeros_like(e_min), e_min)   # an all-zero span: d = 0
    shift = torch.where(nonzero, e - e_min, torch.zeros_like(e))
    if shift.numel() and int(shift.max()) > 38:                    # not one d's multiples (and int64 would overflow)
        return None
    ints = m * torch.bitwise_left_shift(torch.ones_like(shift), shift)
    g = ints[:, 0].abs()
    for j in range(1, span):
        g = torch.gcd(g, ints[:, j].abs())
    g = g[:, None]
    q = torch.div(ints, torch.where(g == 0, torch.ones_like(g), g), rounding_mode="trunc")
    flip = (q > 127).any(1, keepdim=True)                          # a negative d: its -128 reads 128 with d > 0
    q = torch.where(flip, -q, q)
    if q.numel() and (int(q.min()) < -128 or int(q.max()) > 127):
        return None
    d = (torch.where(flip, -g, g).double() * torch.pow(2.0, e_min.double())).float()
    if not torch.equal(d * q.float(), v):
        return None
    return d.reshape(G // span, N), q.reshape(G, N)


def one_signed(d: torch.Tensor, q: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A factorisation (d [G / span, N], integers q [G, N]) with every span's integers made >= 0, d and q
    negated together (exactly) where they are all <= 0; None where a span's integers have both signs. The
    K-quants' unsigned scales and mins are such (Q4_K, Q5_K, Q2_K); Q6_K's and Q3_K's signed ones are not."""
    G, N = q.shape
    spans = q.reshape(G // span, span, N)
    negative = (spans <= 0).all(1) & (spans < 0).any(1)                                   # [G / span, N]
    if not (negative | (spans >= 0).all(1)).all():
        return None
    sign = 1 - 2 * negative.to(q.dtype)
    return d * sign.to(d.dtype), (spans * sign[:, None]).reshape(G, N)


@dataclass
class ScaleStore:
    """Scales and offsets as the kernels read them (group_values): `scales` fp16/fp32 [N/16, G, 8, 2] and
    `offsets` likewise, or factored: `scales` uint8 integers + 128 (`unsigned`: the integers themselves, all
    >= 0) [N/16, G, 8, 2], or [.., 4] with the offsets' after the scales', `offsets` None, and `supers` their
    factors [N/16, G / 2^span_shift, 8, 2 or 4] fp16 (where exact) or fp32. `biased`: `scales` int16
    [N/16, G, 8, 4], each record the fp16 scales of rows r and r + 8 then their bf16 zero biases (HALF_BIASED,
    made by `pack` for per-group zeros)."""
    scales: torch.Tensor
    offsets: torch.Tensor | None = None
    supers: torch.Tensor | None = None
    span_shift: int = 0
    unsigned: bool = False
    biased: bool = False

    @property
    def factored(self) -> bool:
        """Scales as byte integers and a factor a span (K-quants); config_for launches these apart."""
        return self.supers is not None

    @property
    def form(self) -> int:
        if self.biased:
            return HALF_BIASED
        wide = (self.supers if self.supers is not None else self.scales).dtype == torch.float32
        factored = (UFACTORED_HALF if self.unsigned else FACTORED_HALF) if self.supers is not None else HALF
        return factored + int(wide)

    @property
    def with_offsets(self) -> bool:
        return self.offsets is not None or (self.supers is not None and self.scales.shape[-1] == 4)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.scales, self.offsets, self.supers) if t is not None]


def scale_storage(scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int,
                  zeros_per_group: bool = False) -> ScaleStore:
    """Scales and offsets [G, N], losslessly in the fewest bytes the kernels take: fp16 when every value
    converts exactly (GPTQ's, GGUF's per-block d), else factored over FACTOR_INPUTS inputs where they factor
    (the K-quants: one byte a group and row instead of fp32's four; not with per-group zeros, whose
    argument slot the factors take; unsigned bytes where every span's integers have one sign, which the
    kernels turn into values with one FMA instead of a subtraction and a multiply), else fp32."""
    if exact_in_fp16(scales, offsets):
        return ScaleStore(tiled(scales.half()), None if offsets is None else tiled(offsets.half()))
    span = FACTOR_INPUTS // group_size if FACTOR_INPUTS % group_size == 0 and not zeros_per_group else 1
    parts = [factor(t, span) for t in (scales, offsets) if t is not None] if span > 1 else [None]
    if all(p is not None for p in parts):
        signed = [one_signed(d, q, span) for d, q in parts]
        unsigned = all(p is not None for p in signed)
        parts = signed if unsigned else parts
        factors = [p[0] for p in parts]
        dtype = torch.float16 if exact_in_fp16(*factors) else torch.float32
        ints = torch.cat([tiled((p[1] + (0 if unsigned else 128)).to(torch.uint8)) for p in parts], -1)
        return ScaleStore(ints, None, torch.cat([tiled(f.to(dtype)) for f in factors], -1), span.bit_length() - 1,
                          unsigned)
    return ScaleStore(tiled(scales.float()), None if offsets is None else tiled(offsets.float()))


@dataclass
class PackedInt4:
    """A 4-bit weight [N, K] in this module's layout, ready for `matmul` and `dequantize`."""
    words: torch.Tensor              # int32 [N/16 * K/64 * 32 * 4]
    store: ScaleStore                # scales, and float offsets (W = s * q + m) if any
    zero_bias: torch.Tensor | None   # bf16 bits int16 [N/16, G, 8, 2], or None (one zero for all groups, or the
                                     # zeros in the scales' records: store.biased)
    uniform_zero: float
    n: int
    k: int
    group_size: int

    @property
    def zmode(self) -> int:
        if self.store.with_offsets:
            return OFFSETS
        return ZEROS if self.zero_bias is not None or self.store.biased else UNIFORM

    @property
    def form(self) -> int:
        return self.store.form

    @property
    def zero_arg(self) -> torch.Tensor:
        """The kernels' zero_bias argument: the factors, offsets, the per-group zeros, or (unread: none, or
        they are in the scales' records) the scales."""
        st = self.store
        return next(t for t in (st.supers, st.offsets, self.zero_bias, st.scales) if t is not None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.words, self.zero_bias, *self.store.tensors()]
                   if t is not None)

    @property
    def segment(self) -> int:
        return segment(self.group_size)

    @property
    def group_shift(self) -> int:
        """k >> group_shift is k's group: log2 of a power-of-two group size, 31 (always 0) for one group."""
        return 31 if self.group_size == self.k else self.group_size.bit_length() - 1

    @property
    def uniform_bias(self) -> int:
        b = bf16_bits(-(128.0 + self.uniform_zero))
        return _as_int32(b | (b << 16))


def segment(group_size: int, chunk: int = CHUNK) -> int:
    """mma steps of 16 inputs a group, at most a chunk's (the kernels' SEG; it shapes the layout)."""
    return min(chunk // 16, group_size // 16)


def aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself, or a copy where its start is not 16-byte aligned: the kernels read x 16 bytes at a time."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
         offsets: torch.Tensor | None = None) -> PackedInt4:
    """q: levels uint8 [K, N] with groups contiguous along K (act-order: sorted, and x gathered to match by
    the caller), scales [G, N], zeros [G, N] integer zero points (None: 8, symmetric GPTQ), or instead float
    offsets [G, N] (W = s * q + m)."""
    K, N = q.shape
    T, C, SEG = N // TILE, K // CHUNK, segment(group_size)
    # [N, K] -> [T, h, r, C, s, t, j, kk] with row = 16 T + 8 h + r and k = 64 C + 16 SEG s + 4 SEG t + 4 j + kk,
    # then [T, C, r, t, i, h, kk] with mma step i = SEG s + j
    levels = (q.t().reshape(T, 2, 8, C, 4 // SEG, 4, SEG, 4).permute(0, 3, 2, 5, 4, 6, 1, 7)
              .reshape(T, C, 8, 4, 4, 2, 4).to(torch.int64))
    h = torch.arange(2, device=q.device)[:, None]
    kk = torch.arange(4, device=q.device)[None, :]
    shifts = 4 * (h + 2 * (kk >> 1) + 4 * (kk & 1))                                           # [2, 4]
    words = (levels << shifts).sum((-2, -1))                                                  # [T,C,r,t,i]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(-1)
    if offsets is not None:   # the levels go in as q: a uniform zero of 0
        zeros = torch.zeros(1, 1, dtype=torch.uint8, device=q.device)
    uniform = zeros is None or bool((zeros == zeros.flatten()[0]).all())
    zero = 8.0 if zeros is None else float(zeros.flatten()[0])
    bias = None
    if not uniform:
        bias = tiled((-(128.0 + zeros.float())).to(torch.bfloat16).view(torch.int16))
    store = scale_storage(scales, offsets, group_size, bias is not None)
    if bias is not None and store.form == HALF:   # one 8-byte load a group for scales and zeros: HALF_BIASED
        store, bias = ScaleStore(torch.cat([store.scales.view(torch.int16), bias], -1), biased=True), None
    return PackedInt4(words=words, store=store, zero_bias=bias,
                      uniform_zero=zero, n=N, k=K, group_size=group_size)


def kernel_name(w: PackedInt4, config: MmaConfig, gathers: bool = False, experts: bool = False) -> str:
    """The int4_mma instantiation that runs w at this launch shape (x gathered through perm, or the experts')."""
    flag = lambda b: str(b).lower()
    return (f"int4_mma<{config.warps},{config.min_blocks},{config.unroll},{w.segment},{w.zmode},{w.form},"
            f"{flag(gathers)},{flag(experts)}>")


def matmul(x: torch.Tensor, w: PackedInt4, config: MmaConfig, perm: torch.Tensor | None = None) -> torch.Tensor:
    """x: bf16 [M, K] contiguous, M <= 8 -> y: bf16 [M, N]. perm: int32 [K], read x[:, perm] instead."""
    M = x.shape[0]
    x = aligned(x)
    y = torch.empty(M, w.n, dtype=torch.bfloat16, device=x.device)
    launch(_kernel(kernel_name(w, config, gathers=perm is not None)), (w.n // TILE, 1, 1), (32 * config.warps, 1, 1),
           [x, perm if perm is not None else w.words, w.words, w.store.scales, w.zero_arg, y, M, w.n, w.k,
            w.k // w.group_size, w.group_shift, w.uniform_bias, w.store.span_shift, w.words, 0, 0, 0, 0, 0])
    return y


def expert_matmul(x: torch.Tensor, stacked: PackedInt4, experts: torch.Tensor, config: MmaConfig) -> torch.Tensor:
    """One decode row through each chosen expert of a mixture-of-experts layer, the experts read where they
    lie. stacked: every expert's weight, each tensor stacked [E, ...] (`stack`); experts: int32 [S] on the
    GPU, expert ids; x: bf16 [1, K] (the same input for every slot) or [S, K] (slot j's own row).
    Returns y [S, N]: slot j is x's row through expert experts[j]."""
    S = experts.shape[0]
    x = aligned(x)
    y = torch.empty(S, stacked.n, dtype=torch.bfloat16, device=x.device)
    stride = lambda t: t.stride(0) * t.element_size()
    launch(_kernel(kernel_name(stacked, config, experts=True)), (stacked.n // TILE, S, 1), (32 * config.warps, 1, 1),
           [x, stacked.words, stacked.words, stacked.store.scales, stacked.zero_arg, y, 1, stacked.n, stacked.k,
            stacked.k // stacked.group_size, stacked.group_shift, stacked.uniform_bias, stacked.store.span_shift,
            experts, stride(stacked.words), stride(stacked.store.scales), stride(stacked.zero_arg),
            0 if x.shape[0] == 1 else x.shape[1], stacked.n])
    return y


def dequantize(w: PackedInt4) -> torch.Tensor:
    """W bf16 [N, K] (in the packed weight's input order: act-order's sorted K)."""
    out = torch.empty(w.n, w.k, dtype=torch.bfloat16, device=w.words.device)
    units = w.n // TILE * (w.k // CHUNK)                                                  # a warp each
    launch(_kernel(f"int4_dequant<{w.segment},{w.zmode},{w.form}>"), (-(-units // 8), 1, 1), (256, 1, 1),
           [w.words, w.store.scales, w.zero_arg, out, w.n, w.k, w.k // w.group_size, w.group_shift,
            w.uniform_bias, w.store.span_shift], pdl=False)   # it does not wait for the kernel before
    return out
