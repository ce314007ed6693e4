"""Hearth's 2, 3, 6 and 8-bit matmul on CUDA: GPTQ weights of those widths, and GGUF's 2, 3, 5, 6 and 8-bit
blocks, stay packed on the GPU.

The same scheme as engine.int4_mma (read it first): each lane loads its share of a 16-row tile's chunk of
inputs, turns the levels into bf16 pairs (q - z) with a few instructions per pair, and feeds them to
`mma.sync m16n8k16` as the A operand with x (up to 8 rows) as B; each group's fp32 partial sums are scaled
by that group's scale. What changes with the width is how many inputs a chunk holds and how a pair of
levels is made:

- 2-bit: a chunk is 128 inputs, one 16-byte load per lane (word j holds mma steps 2j and 2j + 1). The pair
  for A register p of step i sits in bits 2p + 8(i % 2) and 16 + 2p + 8(i % 2); OR-ed into the mantissa of
  128.0 and shifted by one bf16x2 FMA, as at 4 bits.
- 3-bit ("mantissa fields"): a chunk is 128 inputs, six words a lane (16 bytes at 16 lane, 8 at 512 + 8 lane).
  A bf16 with 128's exponent is 128 + m for any 7-bit mantissa m, so each 16-bit half holds five 3-bit fields
  (bits 0, 3, 6, 9, 12) that one LOP3 (mask | 0x4300, after a shift of 0, 6 or 12) turns into 128 + q (a field
  at bit 0) or 128 + 8q (at bit 3), both halves of a pair at once. Steps 0-4 take the bit-0 fields (18 pairs)
  and two pairs made of the halves' spare bit 15 (bit b of such a level: word 3s + b); steps 5-7, the
  "eighths", take the bit-3 fields. One bf16x2 FMA then gives q - z exactly: (128 + q) - (128 + z), or for the
  eighths (128 + 8q) / 8 - (16 + z). Measured on an H200 (bench/NOTES-engine.md), that FMA a pair costs less
  than feeding the raw values to the mma and taking the zeros off after it through a second mma (A all ones)
  that sums x per step class: twice the mmas, and 64 registers against 54 (wo 4.40 -> 3.97 us, w2 8.72 ->
  7.97; w13 15.35 -> 14.41 at eight warps, four blocks an SM). The mantissa fields themselves replaced a 2-bit
  plane plus a plane of third bits (~5 instructions a pair), which had left 3-bit instruction-bound below
  4-bit's speed.
- 8-bit: a chunk is 64 inputs, two 16-byte loads per lane (plane i / 2, word 2(i % 2) + p / 2, the pair's
  levels in bytes p % 2 and 2 + p % 2). 128 + q needs 8 mantissa bits, which bf16 lacks, so each level is
  placed in the mantissa of 2^23 as an fp32 (one byte permute), 2^23 + z is subtracted (exact), and the
  two results' upper halves are the bf16 pair (q - z is an integer of at most 8 significant bits: exact).
- 6-bit ("6-bit mantissa fields", as 3-bit's): a chunk is 64 inputs, six words a lane (16 bytes at 16 lane,
  8 at 512 + 8 lane), each 16-bit half holding two 6-bit fields (bits 0 and 6) and a spare nibble (12-15).
  Pair n = 4i + p: n < 6 is word n's bit-0 field (one LOP3 makes the bf16 pair 128 + q: q < 64 is exact),
  6 <= n < 12 word n - 6's bit-6 field (a shift more); the last four take their low nibble from word n - 12's
  spare nibble and their upper two bits from bits 12 + 2 (n % 2) of word 4 + (n - 12) / 2's. One bf16x2 add
  of -(128 + z) then gives q - z, as at 4 bits: ~3 instructions a pair (~4.6 for the low nibbles in
  int4_mma's word layout plus a plane of upper bits this replaced). GGUF's 5 and 6-bit levels (Q5_*, Q6_K)
  use it, at 6 bits a level.

Wider chunks for 2/3 bits keep as many bytes in flight a lane as the 4-bit kernel (16-24 bytes a load
round), which is what its speed was found to depend on (bench/NOTES-engine.md). Scales and zeros are
[N/16, G, 8, 2] as at 4 bits; the zeros are bf16 -(128 + z) for 2/3/6 bits and fp16 z for 8 bits. Float
offsets (W = s * q + m) and scales fp16 would round (fp32, or the K-quants' factored form) are as in engine.int4_mma:
one more mma with A all ones sums x over each group, and the group adds s * sum(q x) + m * sum(x).
Prompts longer than MAX_ROWS dequantize the packed weight into a bf16 scratch for cuBLAS; no bf16 copy is
kept. Needs compute capability 8.0+.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from engine.cuda_launch import launch
from engine.int4_mma import (DEVICE_HELPERS, MAX_ROWS, OFFSETS, TILE, UNIFORM, ZEROS, MmaConfig, ScaleStore,
                             aligned, bf16_bits, compiled, refusal as shape_refusal, scale_storage, segment, tiled)

BITS = (2, 3, 5, 6, 8)
WIDTH = {2: 2, 3: 3, 5: 6, 6: 6, 8: 8}         # the layout (and kernel) each width's levels use
CHUNK = {2: 128, 3: 128, 6: 64, 8: 64}         # inputs a chunk, by layout width
CHUNK_BYTES = {2: 512, 3: 768, 6: 768, 8: 1024}   # bytes of one 16-row tile's chunk, by layout width

__all__ = ["BITS", "MAX_ROWS", "MmaConfig", "PackedLowBit", "config_for", "dequantize", "kernel_name", "matmul",
           "pack", "refusal"]

SOURCE = DEVICE_HELPERS + r"""
__device__ __forceinline__ Pair load_streaming_pair(const Pair* p) {
    Pair v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.lo), "=r"(v.hi) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 float_bits(float f) {
    u32 u;
    asm("mov.b32 %0, %1;" : "=r"(u) : "f"(f));
    return u;
}

template <int BITS> struct Width {
    static constexpr int inputs = BITS >= 6 ? 64 : 128;                 // a chunk
    static constexpr int steps = inputs / 16;                           // mma k-steps a chunk
    static constexpr int planes = BITS == 8 ? 2 : 1;                    // 16-byte lane loads a chunk
    static constexpr bool split = BITS == 3 || BITS == 6;               // and an 8-byte plane of upper bits
    static constexpr int bytes = 512 * planes + (split ? 256 : 0);      // a tile's chunk
};

// One lane's share of a tile's chunk: `planes` 16-byte loads, and for 3 and 6 bits the 8-byte plane of
// upper bits.
template <int BITS> struct Chunk {
    Words w[Width<BITS>::planes];
    Pair hi;
};

template <int BITS> __device__ __forceinline__ Chunk<BITS> load_chunk(const char* base, int lane) {
    Chunk<BITS> d;
#pragma unroll
    for (int j = 0; j < Width<BITS>::planes; ++j)
        d.w[j] = load_streaming(reinterpret_cast<const Words*>(base + 512 * j) + lane);
    if (Width<BITS>::split) d.hi = load_streaming_pair(reinterpret_cast<const Pair*>(base + 512) + lane);
    return d;
}

// A row's per-group bias from its stored zero: bf16x2 -(128 + z) for 2/3 bits, fp32 2^23 + z for 8 bits.
// (BITS is the layout's width from here on: 5-bit levels use the 6-bit one.)
template <int BITS> __device__ __forceinline__ u32 row_bias(u32 stored) {
    if (BITS == 8) return float_bits(8388608.f + half_to_float((u16)stored));
    return stored * 0x10001u;
}

// The 3-bit layout's mantissa fields (see the module docstring): A register p of mma step i as the bf16 pair
// of raw values 128 + q (steps 0-4: fields at bit 0 of a half after a shift of 0, 6 or 12) or 128 + 8q (steps
// 5-7, the "eighths": fields at bit 3 after a shift of 0 or 6), one LOP3 each; steps 0-4's last two pairs
// come from the six words' spare top bits. Every value is exact in bf16 (steps of 1 in [128, 256)).
__device__ __forceinline__ constexpr bool eighths(int i) { return i >= 5; }

// Word j of a 3 or 6-bit lane's six: four from the 16-byte plane, two from the 8-byte one.
template <int BITS> __device__ __forceinline__ u32 split_word(const Chunk<BITS>& d, int j) {
    return j < 4 ? d.w[0].w[j] : j == 4 ? d.hi.lo : d.hi.hi;
}

__device__ __forceinline__ u32 raw3(const Chunk<3>& d, int i, int p) {
    if (eighths(i)) {
        const int n = 4 * (i - 5) + p;
        return mantissa<0x00380038u>(split_word<3>(d, n / 2) >> (6 * (n % 2)));
    }
    const int n = 4 * i + p;
    if (n < 18) return mantissa<0x00070007u>(split_word<3>(d, n / 3) >> (6 * (n % 3)));
    const int s = n - 18;                           // a spare pair: bit b of its levels is bit 15 (31) of word 3s + b
    return mantissa<0x00070007u>(((split_word<3>(d, 3 * s) >> 15) & 0x00010001u)
                                 | ((split_word<3>(d, 3 * s + 1) >> 14) & 0x00020002u)
                                 | ((split_word<3>(d, 3 * s + 2) >> 13) & 0x00040004u));
}

// A register p of mma step i as the bf16 pair (q - z): row r + 8 (p & 1), inputs k + 2 (p >> 1) and + 1
// (k = chunk start + 16 i + 4 t). The bit positions are the layout described in the module docstring.
template <int BITS> __device__ __forceinline__ u32 a_pair(const Chunk<BITS>& d, int i, int p, u32 bias) {
    if (BITS == 8) {
        const u32 w = d.w[i >> 1].w[2 * (i & 1) + (p >> 1)];
        const u32 sel = 0x7650u + (p & 1);          // byte p & 1 (and 2 + p & 1) into the mantissa of 2^23
        const float z = bits_to_float(bias);
        const float lo = bits_to_float(prmt(w, 0x4B000000u, sel)) - z;
        const float hi = bits_to_float(prmt(w, 0x4B000000u, sel + 2)) - z;
        return prmt(float_bits(lo), float_bits(hi), 0x7632u);   // the upper halves: exact bf16
    }
    if constexpr (BITS == 6) {
        // the 6-bit mantissa fields (module docstring): 128 + q in one LOP3 (a shift more for bit-6 fields,
        // two more LOP3s and shifts for the four spare pairs), then -(128 + z) in one bf16x2 add, exact
        const int n = 4 * i + p;
        u32 raw;
        if (n < 6) {
            raw = mantissa<0x003F003Fu>(split_word<6>(d, n));
        } else if (n < 12) {
            raw = mantissa<0x003F003Fu>(split_word<6>(d, n - 6) >> 6);
        } else {
            const int s = n - 12;
            raw = or_masked<0x00300030u>(split_word<6>(d, 4 + (s >> 1)) >> (8 + 2 * (s & 1)),
                                         mantissa<0x000F000Fu>(split_word<6>(d, s) >> 12));
        }
        return fma2(raw, 0x3F803F80u, bias);
    }
    if constexpr (BITS == 3) {
        const u32 raw = raw3(d, i, p);
        // (128 + 8q) / 8 - (16 + z), with -(16 + z) = -(128 + z) + 112: every step exact
        return eighths(i) ? fma2(raw, 0x3E003E00u, fma2(bias, 0x3F803F80u, 0x42E042E0u)) : fma2(raw, 0x3F803F80u, bias);
    }
    return fma2(mantissa<0x00030003u>(d.w[0].w[i >> 1] >> (2 * p + 8 * (i & 1))), 0x3F803F80u, bias);   // as `levels`
}

// y[M, N] = x[M, K] @ W^T for M <= 8, as int4_mma (one block a 16-row tile, WARPS warps splitting the
// chunks, MIN_BLOCKS the launch bound, U chunks in flight a lane, SEG mma steps a scale, ZMODE, FORM and
// span_shift as there, PERM: x read through perm).
template <int BITS, int WARPS, int MIN_BLOCKS, int U, int SEG, int ZMODE, int FORM, bool PERM>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
lowbit_mma(const u16* x, const int* __restrict__ perm, const char* __restrict__ w,
           const void* __restrict__ scales, const void* __restrict__ zeros, u16* __restrict__ y,
           int M, int N, int K, int G, int group_shift, u32 uniform_bias, int span_shift) {
    static_assert(ZMODE != ZEROS || FORM < FACTORED_HALF, "factored scales come with no zeros or offsets");
    constexpr int CH = Width<BITS>::inputs, STEPS = Width<BITS>::steps, SEGS = STEPS / SEG;
    Prerequisites ready(true);   // x: written by the kernel before (engine.cuda_launch)
    __shared__ float partial[WARPS][8][16];
    __shared__ __align__(16) u32 gathered[PERM ? WARPS : 1][PERM ? U : 1][8][PERM ? CH / 2 : 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x;
    const int chunks = K / CH;
    const int xrow = min(r, M - 1);
    const u16* xr = x + (u32)(xrow * K);
    const char* wt = w + (size_t)(u32)(tile * chunks) * Width<BITS>::bytes;
    const char *lane_scales, *lane_values;
    lane_pairs<FORM, ZMODE == OFFSETS>(scales, zeros, tile, G, span_shift, r, lane_scales, lane_values);
    const u32* lane_zeros = reinterpret_cast<const u32*>(zeros) + (u32)(tile * G * 8 + r);   // ZEROS
    // Cursors at this warp's chunk c0, advanced with it, as in int4_mma (CPS chunks a factored span).
    typedef Pairs<FORM, ZMODE == OFFSETS> P;
    constexpr bool LINEAR = SEG < STEPS;
    constexpr int GPC = LINEAR ? SEGS : 0, STEP = WARPS * U, CPS = 256 / CH;
    static_assert(WARPS % CPS == 0, "a span's chunks: the factor cursor advances by whole spans");
    const u16* xc = xr + warp * CH;
    const char* wc = wt + warp * Width<BITS>::bytes;
    const char* sc = lane_scales + warp * GPC * 8 * P::scale;
    const char* vc = lane_values + (P::factored ? warp / CPS * 8 * P::value : warp * GPC * 8 * P::value);
    const u32* zc = lane_zeros + warp * GPC * 8;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // Not unrolled: one chunk's loads in flight a lane, as measured best (bench/NOTES-engine.md); left to
    // itself the compiler unrolls some instantiations by two, issuing the next chunk's load mid-loop.
#pragma unroll 1
    for (int c0 = warp; c0 < chunks; c0 += STEP, xc += STEP * CH, wc += STEP * Width<BITS>::bytes,
         sc += STEP * GPC * 8 * P::scale, vc += P::factored ? STEP / CPS * 8 * P::value : STEP * GPC * 8 * P::value,
         zc += STEP * GPC * 8) {
        Chunk<BITS> q[U];
        float s[U][SEGS][2], off[ZMODE == OFFSETS ? U : 1][SEGS][2];
        u32 bias[U][SEGS][2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * WARPS;
            if (c < chunks) {
                q[u] = load_chunk<BITS>(wc + u * WARPS * Width<BITS>::bytes, lane);
                float d[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                span_factors<FORM, ZMODE == OFFSETS>(vc, u * WARPS / CPS, d);
#pragma unroll
                for (int seg = 0; seg < SEGS; ++seg) {
                    const int g = LINEAR ? u * WARPS * GPC + seg : group_of<CH, SEG>(c, seg, group_shift);
                    float sv[2], mv[2] = {0.f, 0.f};
                    group_values<FORM, ZMODE == OFFSETS>(LINEAR ? sc : lane_scales, LINEAR ? vc : lane_values, g, d,
                                                         sv, mv);
                    s[u][seg][0] = sv[0];
                    s[u][seg][1] = sv[1];
                    if (ZMODE == ZEROS) {
                        const u32 b = (LINEAR ? zc : lane_zeros)[g * 8];
                        bias[u][seg][0] = row_bias<BITS>(b & 0xFFFFu);
                        bias[u][seg][1] = row_bias<BITS>(b >> 16);
                    } else {
                        bias[u][seg][0] = bias[u][seg][1] = uniform_bias;
                    }
                    if (ZMODE == OFFSETS) {
                        off[ZMODE == OFFSETS ? u : 0][seg][0] = mv[0];
                        off[ZMODE == OFFSETS ? u : 0][seg][1] = mv[1];
                    }
                }
                if (PERM) {
                    ready.meet();
#pragma unroll
                    for (int j = 0; j < CH / 64; ++j) {
                        const int pair = lane + 32 * j;
                        const int k0 = perm[c * CH + 2 * pair], k1 = perm[c * CH + 2 * pair + 1];
                        for (int m = 0; m < M; ++m)
                            gathered[PERM ? warp : 0][u][m][PERM ? pair : 0] =
                                (u32)x[(size_t)m * K + k0] | ((u32)x[(size_t)m * K + k1] << 16);
                    }
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
                for (int seg = 0; seg < SEGS; ++seg) {
                    float part[4] = {0.f, 0.f, 0.f, 0.f}, xsum[4] = {0.f, 0.f, 0.f, 0.f};
                    const u32 b_r = bias[u][seg][0], b_r8 = bias[u][seg][1];
                    // B: this lane's x row at the segment's inputs (int4_mma's segment layout)
                    u32 xb[2 * SEG];
                    segment_b<SEG>((PERM ? reinterpret_cast<const u16*>(gathered[PERM ? warp : 0][u][xrow])
                                         : xc + u * WARPS * CH) + step_input<SEG>(seg * SEG, t), xb);
#pragma unroll
                    for (int j = 0; j < SEG; ++j) {
                        const int i = seg * SEG + j;
                        mma(part, a_pair<BITS>(q[u], i, 0, b_r), a_pair<BITS>(q[u], i, 1, b_r8),
                            a_pair<BITS>(q[u], i, 2, b_r), a_pair<BITS>(q[u], i, 3, b_r8), xb[2 * j], xb[2 * j + 1]);
                        if (ZMODE == OFFSETS) mma(xsum, ONES, ONES, ONES, ONES, xb[2 * j], xb[2 * j + 1]);
                    }
                    acc[0] += s[u][seg][0] * part[0];
                    acc[1] += s[u][seg][0] * part[1];
                    acc[2] += s[u][seg][1] * part[2];
                    acc[3] += s[u][seg][1] * part[3];
                    if (ZMODE == OFFSETS) {
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
        if (PERM) __syncwarp();
    }
    let_dependents_launch();
    ready.meet();   // a warp with no chunk: before the writes
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

// W [N, K] bf16 from the packed layout, one warp a (tile, chunk), written row by row through shared memory
// in 16-byte stores (as int4_dequant).
template <int BITS, int SEG, int ZMODE, int FORM>
__global__ void __launch_bounds__(256)
lowbit_dequant(const char* __restrict__ w, const void* __restrict__ scales, const void* __restrict__ zeros,
               Words* __restrict__ out, int N, int K, int G, int group_shift, u32 uniform_bias, int span_shift) {
    constexpr int CH = Width<BITS>::inputs;
    __shared__ u32 block[8][16][CH / 2 + 1];            // [warp][row][k pair], padded against bank conflicts
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = K / CH;
    const long long unit = (long long)blockIdx.x * 8 + warp;     // tile * chunks + chunk
    if (unit >= (long long)(N / 16) * chunks) return;
    const int c = (int)(unit % chunks), tile = (int)(unit / chunks);
    const int r = lane >> 2, t = lane & 3;
    const Chunk<BITS> q = load_chunk<BITS>(w + unit * Width<BITS>::bytes, lane);
    const char *lane_scales, *lane_values;
    lane_pairs<FORM, ZMODE == OFFSETS>(scales, zeros, tile, G, span_shift, r, lane_scales, lane_values);
    float d[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    span_factors<FORM, ZMODE == OFFSETS>(lane_values, (c * CH) >> 8, d);
#pragma unroll
    for (int i = 0; i < Width<BITS>::steps; ++i) {
        const int k = step_input<SEG>(i, t);            // within the chunk
        const int g = (c * CH + k) >> group_shift;
        float sv[2], mv[2] = {0.f, 0.f};
        group_values<FORM, ZMODE == OFFSETS>(lane_scales, lane_values, g, d, sv, mv);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const int h = p & 1;
            const size_t at = (((size_t)tile * G + g) * 8 + r) * 2 + h;
            const u32 bias = ZMODE == ZEROS ? row_bias<BITS>(reinterpret_cast<const u16*>(zeros)[at]) : uniform_bias;
            const u32 lv = a_pair<BITS>(q, i, p, bias);
            float lo = bits_to_float(lv << 16) * sv[h], hi = bits_to_float(lv & 0xFFFF0000u) * sv[h];
            if (ZMODE == OFFSETS) {
                lo += mv[h];
                hi += mv[h];
            }
            block[warp][r + 8 * h][(k >> 1) + (p >> 1)] = (u32)float_to_bf16(lo) | ((u32)float_to_bf16(hi) << 16);
        }
    }
    __syncwarp();
    // 16 rows x CH / 8 stores of 16 bytes: CH / 16 a lane
#pragma unroll
    for (int j = 0; j < CH / 16; ++j) {
        const int idx = lane + 32 * j, row = idx / (CH / 8), q16 = idx % (CH / 8);
        Words v;
        v.w[0] = block[warp][row][4 * q16];
        v.w[1] = block[warp][row][4 * q16 + 1];
        v.w[2] = block[warp][row][4 * q16 + 2];
        v.w[3] = block[warp][row][4 * q16 + 3];
        out[(((size_t)tile * 16 + row) * K + (size_t)c * CH) / 8 + q16] = v;
    }
}
"""


def config_for(n: int, width: int = 3, factored: bool = False) -> MmaConfig:
    """Launch shape for N outputs of a layout `width` bits wide. Measured on an H200 kernel by kernel on the 7B
    shapes (M = 1, weights streamed from memory) and as the 7B step's 128 matmuls in one graph
    (bench/NOTES-engine.md):
    - below N = 8192: 16 warps; 8 bits 20 (wo 6.6 -> 5.79 us, w2 14.48 -> 12.29 against 16); factored scales
      (Q6_K) and 3 bits at least two blocks an SM (MmaConfig.min_blocks: Q6_K wo 5.84 -> 5.51, w2 12.63 ->
      11.67; 3-bit matmuls a step 1 153 -> 1 138 us);
    - from N = 8192: 8 warps; factored scales (Q6_K) at least two blocks an SM (wqkv 16.39 -> 14.48, w13 23.67
      -> 22.16), which costs 8 bits a quarter (13.32 -> 16.55); 3 bits at least four (56 registers: wqkv 10.01
      -> 9.50, w13 14.75 -> 14.41 against 48 with no bound; six, 40 registers, spill: 14.45 and 26.18).
    A PERM launch of 128-input chunks must keep warps x unroll <= 16 (its gathered x must fit 48 KB of shared
    memory): these do."""
    if n >= 8192:
        return MmaConfig(8, 1, 2 if factored else 4 if width == 3 else 0)
    return MmaConfig(20, 1) if width == 8 else MmaConfig(16, 1, 2 if factored or width == 3 else 0)


def refusal(k: int, n: int, group_size: int, bits: int) -> str | None:
    """Why the kernel cannot take this weight (None: it can)."""
    if bits not in BITS:
        return f"{bits}-bit weights have no kernel here"
    return shape_refusal(k, n, group_size, CHUNK[WIDTH[bits]])


@dataclass
class PackedLowBit:
    """A 2, 3, 5, 6 or 8-bit weight [N, K] in this module's layout, ready for `matmul` and `dequantize`."""
    words: torch.Tensor              # int32 [N/16, K/chunk, CHUNK_BYTES/4]
    store: ScaleStore                # scales, and float offsets (W = s * q + m) if any: engine.int4_mma's forms
    zeros: torch.Tensor | None       # int16 bits [N/16, G, 8, 2] (see the module docstring), None: uniform_zero
    uniform_zero: int
    bits: int
    n: int
    k: int
    group_size: int

    @property
    def width(self) -> int:
        """The layout's bits a level: 6 for 5-bit levels."""
        return WIDTH[self.bits]

    @property
    def zmode(self) -> int:
        return OFFSETS if self.store.with_offsets else ZEROS if self.zeros is not None else UNIFORM

    @property
    def form(self) -> int:
        return self.store.form

    @property
    def zero_arg(self) -> torch.Tensor:
        """The kernels' zeros argument: the factors, offsets, the per-group zeros, or (unread) the scales."""
        st = self.store
        return next(t for t in (st.supers, st.offsets, self.zeros, st.scales) if t is not None)

    @property
    def segment(self) -> int:
        return segment(self.group_size, CHUNK[self.width])

    @property
    def group_shift(self) -> int:
        return 31 if self.group_size == self.k else self.group_size.bit_length() - 1

    @property
    def uniform_bias(self) -> int:
        """The kernel's bias for every row when there are no per-group zeros."""
        if self.width == 8:
            u = struct.unpack("<I", struct.pack("<f", 2.0**23 + self.uniform_zero))[0]
        else:
            b = bf16_bits(-(128.0 + self.uniform_zero))
            u = b | (b << 16)
        return u - (1 << 32) if u >= 1 << 31 else u

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.words, self.zeros, *self.store.tensors()]
                   if t is not None)


def _words(levels: torch.Tensor, shifts: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum of levels << shifts over `dims` (the bit fields never overlap, so the sum is their OR)."""
    return (levels << shifts).sum(dims)


def _mantissa_fields(v: torch.Tensor) -> torch.Tensor:
    """3-bit levels [T, C, r, t, i, p, h] (A register p of mma step i, pair half h) -> words [T, C, 192]: a lane's
    six words (16 bytes at 16 lane, 8 at 512 + 8 lane), each half holding 3-bit fields at bits 0, 3, 6, 9, 12
    and a spare bit 15, as the kernel's raw3 reads them (see the module docstring)."""
    words = torch.zeros(*v.shape[:4], 6, dtype=torch.int64, device=v.device)
    h16 = torch.tensor([0, 16], device=v.device)
    for i in range(8):
        for p in range(4):
            level = v[:, :, :, :, i, p]                                       # [T, C, r, t, h]
            n = 4 * (i - 5) + p if i >= 5 else 4 * i + p
            if i >= 5:                                                        # an eighths step: bit 3 or 9
                words[..., n // 2] += (level << (3 + 6 * (n % 2) + h16)).sum(-1)
            elif n < 18:                                                      # bit 0, 6 or 12
                words[..., n // 3] += (level << (6 * (n % 3) + h16)).sum(-1)
            else:                                                             # bit b of the level: word 3s + b's bit 15
                for b in range(3):
                    words[..., 3 * (n - 18) + b] += (((level >> b) & 1) << (15 + h16)).sum(-1)
    T, C = v.shape[:2]
    return torch.cat([words[..., :4].reshape(T, C, 128), words[..., 4:].reshape(T, C, 64)], -1)


def _six_bit_fields(v: torch.Tensor) -> torch.Tensor:
    """6-bit levels [T, C, r, t, i, p, h] (A register p of mma step i, pair half h) -> words [T, C, 192]: a lane's
    six words (16 bytes at 16 lane, 8 at 512 + 8 lane), each half holding fields at bits 0 and 6 and a spare
    nibble at 12, as the kernel's a_pair<6> reads them (see the module docstring)."""
    words = torch.zeros(*v.shape[:4], 6, dtype=torch.int64, device=v.device)
    h16 = torch.tensor([0, 16], device=v.device)
    for i in range(4):
        for p in range(4):
            level, n = v[:, :, :, :, i, p], 4 * i + p                        # [T, C, r, t, h]
            if n < 12:                                                        # word n % 6, bit 0 or 6
                words[..., n % 6] += (level << (6 * (n // 6) + h16)).sum(-1)
            else:                                                             # spare pair s = n - 12
                s = n - 12
                words[..., s] += ((level & 15) << (12 + h16)).sum(-1)
                words[..., 4 + s // 2] += ((level >> 4) << (12 + 2 * (s % 2) + h16)).sum(-1)
    T, C = v.shape[:2]
    return torch.cat([words[..., :4].reshape(T, C, 128), words[..., 4:].reshape(T, C, 64)], -1)


def _pack_words(q: torch.Tensor, bits: int, seg: int) -> torch.Tensor:
    """Levels uint8 [K, n] (n a multiple of 16) -> int32 words [n/16, K/chunk, CHUNK_BYTES/4]; seg: mma steps a
    group (the kernel's SEG)."""
    K, N = q.shape
    CH = CHUNK[bits]
    T, C, S = N // TILE, K // CH, CH // 16
    ar = lambda n, *shape: torch.arange(n, device=q.device).view(*shape)
    # [N, K] -> [T, C, r, t, i, pk, pb, h]: row = 16 T + 8 pb + r, k = CH C + 16 seg s + 4 seg t + 4 j + 2 pk + h
    # with mma step i = seg s + j (int4_mma's segment layout), and A register p = pb + 2 pk of step i holds the
    # pair h = 0, 1.
    v = (q.t().reshape(T, 2, 8, C, S // seg, 4, seg, 2, 2).permute(0, 3, 2, 5, 4, 6, 7, 1, 8)
         .reshape(T, C, 8, 4, S, 2, 2, 2).to(torch.int64))
    if bits == 6:
        words = _six_bit_fields(v.reshape(T, C, 8, 4, S, 4, 2))
    elif bits == 8:
        v = v.reshape(T, C, 8, 4, 2, 2, 2, 2, 2)                 # i -> (plane, i % 2)
        shifts = 8 * (ar(2, 2, 1) + 2 * ar(2, 1, 2))              # [pb, h]: byte pb + 2 h
        words = _words(v, shifts, (-2, -1))                       # [T, C, r, t, plane, i % 2, pk]
        words = words.permute(0, 1, 4, 2, 3, 5, 6).reshape(T, C, -1)
    elif bits == 3:
        words = _mantissa_fields(v.reshape(T, C, 8, 4, S, 4, 2))
    else:
        low = v.reshape(T, C, 8, 4, S // 2, 2, 2, 2, 2)        # i -> (word, i % 2)
        # [i % 2, pk, pb, h]: bit 2 p + 8 (i % 2) + 16 h
        shifts = 2 * (ar(2, 1, 1, 2, 1) + 2 * ar(2, 1, 2, 1, 1)) + 8 * ar(2, 2, 1, 1, 1) + 16 * ar(2, 1, 1, 1, 2)
        words = _words(low, shifts, (-4, -3, -2, -1)).reshape(T, C, -1)      # [T, C, 32 lanes x 4 words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, bits: int,
         slice_levels: int = 2**26, offsets: torch.Tensor | None = None) -> PackedLowBit:
    """q: levels uint8 [K, N] with groups contiguous along K (act-order: sorted, x gathered by the caller),
    scales [G, N], zeros [G, N] integer zero points (None: 2^(bits-1), symmetric GPTQ), or instead float
    offsets [G, N] (W = s * q + m).
    slice_levels: about how many levels are packed at once. The int64 temporaries of a whole 70B MLP matrix
    would take ~15 GB, more than all its packed weights, on the card the packing is for."""
    K, N = q.shape
    width = WIDTH[bits]
    step = max(TILE, (slice_levels // K) // TILE * TILE)
    seg = segment(group_size, CHUNK[width])
    words = torch.cat([_pack_words(q[:, n:n + step], width, seg) for n in range(0, N, step)]).contiguous()
    if offsets is not None:   # the levels go in as q: a uniform zero of 0
        zeros = torch.zeros(1, 1, dtype=torch.uint8, device=q.device)
    uniform = zeros is None or bool((zeros == zeros.flatten()[0]).all())
    stored = None
    if not uniform:
        z = zeros.float()
        stored = tiled((z.half() if width == 8 else (-(128.0 + z)).to(torch.bfloat16)).view(torch.int16))
    return PackedLowBit(words=words, store=scale_storage(scales, offsets, group_size, stored is not None), zeros=stored,
                        uniform_zero=1 << (bits - 1) if zeros is None else int(zeros.flatten()[0]), bits=bits,
                        n=N, k=K, group_size=group_size)


def kernel_name(w: PackedLowBit, config: MmaConfig, gathers: bool = False) -> str:
    """The lowbit_mma instantiation that runs w at this launch shape (x gathered through perm)."""
    return (f"lowbit_mma<{w.width},{config.warps},{config.min_blocks},{config.unroll},{w.segment},{w.zmode},{w.form},"
            f"{str(gathers).lower()}>")


def matmul(x: torch.Tensor, w: PackedLowBit, config: MmaConfig, perm: torch.Tensor | None = None) -> torch.Tensor:
    """x: bf16 [M, K] contiguous, M <= 8 -> y: bf16 [M, N]. perm: int32 [K], read x[:, perm] instead."""
    M = x.shape[0]
    x = aligned(x)
    y = torch.empty(M, w.n, dtype=torch.bfloat16, device=x.device)
    launch(compiled(SOURCE, kernel_name(w, config, gathers=perm is not None)), (w.n // TILE, 1, 1),
           (32 * config.warps, 1, 1),
           [x, perm if perm is not None else w.words, w.words, w.store.scales, w.zero_arg, y, M, w.n, w.k,
            w.k // w.group_size, w.group_shift, w.uniform_bias, w.store.span_shift])
    return y


def dequantize(w: PackedLowBit) -> torch.Tensor:
    """W bf16 [N, K] (in the packed weight's input order: act-order's sorted K)."""
    out = torch.empty(w.n, w.k, dtype=torch.bfloat16, device=w.words.device)
    units = w.n // TILE * (w.k // CHUNK[w.width])                                         # a warp each
    launch(compiled(SOURCE, f"lowbit_dequant<{w.width},{w.segment},{w.zmode},{w.form}>"), (-(-units // 8), 1, 1),
           (256, 1, 1),
           [w.words, w.store.scales, w.zero_arg, out, w.n, w.k, w.k // w.group_size, w.group_shift,
            w.uniform_bias, w.store.span_shift], pdl=False)   # it does not wait for the kernel before
    return out
