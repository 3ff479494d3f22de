// Packed weight-only formats of the decode kernels (docs/quantization.md, src/quant/qweight.rs):
// rows of codes plus f16 scales, dequantised in registers. A matrix is (rows, K), row-major;
// every format is symmetric (no zero point), weight = s · value(code):
//
//   FmtInt8  one i8 code per byte                          one scale per row
//   FmtFp8   one FP8 E4M3 code per byte ("e4m3fn")          one scale per row
//   FmtQ4    two codes per byte, element 2k in the low      one scale per group of 2^gshift
//            nibble of byte k, each nibble q + 8 (q in       inputs of a row (64 or 128),
//            [-8, 7])                                        scales row-major (rows, K / group)
//
// `QRows<F>` is a matrix of format F as the decode kernel bodies read it (`Rows<T, WR>` of
// decode.cuh): 16-byte streaming loads of codes, each decoded to exact f32 values (every code is a
// small integer or an E4M3 value, exact in f32), dotted with x in f32 and scaled once per row
// (int8, fp8) or per 16-byte chunk (q4: a chunk of 32 codes lies inside one group of 64 or 128).
// The result is s·Σ value·x: the dequantised product before any rounding of the weights to T.
#pragma once
#include "common.cuh"

// 16 codes a 16-byte load, value = the signed byte.
struct FmtInt8 {
    static constexpr int C = 16;
    static constexpr bool GROUPED = false;
    static __device__ __forceinline__ size_t row_bytes(int K) { return (size_t)K; }
    // 2^23 + (b + 128) as float bits (b ^ 0x80 = b + 128 for a two's complement byte), less
    // 2^23 + 128: exactly b.
    static __device__ __forceinline__ void decode(const uint4& w, float (&c)[C]) {
        const unsigned int u[4] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u, w.z ^ 0x80808080u, w.w ^ 0x80808080u};
#pragma unroll
        for (int q = 0; q < 4; q++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                c[4 * q + i] = __uint_as_float(__byte_perm(u[q], 0x4B000000u, 0x7440u | (unsigned)i)) - 8388736.0f;
    }
    static __device__ __forceinline__ float in_word(unsigned int word, int i) {
        return __uint_as_float(__byte_perm(word ^ 0x80808080u, 0x4B000000u, 0x7440u | (unsigned)i)) - 8388736.0f;
    }
    static __device__ __forceinline__ float code(const unsigned char* row, int k) {
        return (float)(signed char)row[k];
    }
};

// 16 codes a 16-byte load, value = the E4M3 number of the byte.
struct FmtFp8 {
    static constexpr int C = 16;
    static constexpr bool GROUPED = false;
    static __device__ __forceinline__ size_t row_bytes(int K) { return (size_t)K; }
    // The byte's sign to bit 31 and its exponent and mantissa (7 bits) to bits 20..26: an f32 of
    // exponent field e (bias 127) and mantissa m/8, i.e. (1 + m/8)·2^(e−127) (e = 0: the f32
    // subnormal m/8·2^−126); times 2^120 gives E4M3's (1 + m/8)·2^(e−7) (m/8·2^−6), exactly.
    // (0x7F, E4M3's NaN, would read 480; the quantiser never writes it.)
    static __device__ __forceinline__ float value(unsigned int b) {
        const unsigned int bits = ((b & 0x80u) << 24) | ((b & 0x7Fu) << 20);
        return __uint_as_float(bits) * __uint_as_float(0x7B800000u);  // 2^120
    }
    static __device__ __forceinline__ void decode(const uint4& w, float (&c)[C]) {
        const unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int q = 0; q < 4; q++)
#pragma unroll
            for (int i = 0; i < 4; i++) c[4 * q + i] = value((u[q] >> (8 * i)) & 0xFFu);
    }
    static __device__ __forceinline__ float in_word(unsigned int word, int i) { return value((word >> (8 * i)) & 0xFFu); }
    static __device__ __forceinline__ float code(const unsigned char* row, int k) { return value(row[k]); }
};

// 32 codes a 16-byte load (little-endian words: element 8q + e is nibble e of word q).
struct FmtQ4 {
    static constexpr int C = 32;
    static constexpr bool GROUPED = true;
    static __device__ __forceinline__ size_t row_bytes(int K) { return (size_t)K / 2; }
    // 2^23 + n as float bits, less 2^23 + 8: exactly n − 8.
    static __device__ __forceinline__ void decode(const uint4& w, float (&c)[C]) {
        const unsigned int u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int q = 0; q < 4; q++)
#pragma unroll
            for (int e = 0; e < 8; e++)
                c[8 * q + e] = __uint_as_float(0x4B000000u | ((u[q] >> (4 * e)) & 0xFu)) - 8388616.0f;
    }
    static __device__ __forceinline__ float in_word(unsigned int word, int e) {
        return __uint_as_float(0x4B000000u | ((word >> (4 * e)) & 0xFu)) - 8388616.0f;
    }
    static __device__ __forceinline__ float code(const unsigned char* row, int k) {
        const unsigned int b = row[k >> 1];
        return (float)((k & 1) ? (b >> 4) : (b & 0xFu)) - 8.0f;
    }
};

// N elements of T from 16-byte aligned x, as f32.
template <typename T, int N>
__device__ __forceinline__ void load_x(const T* x, float (&xf)[N]) {
    constexpr int P = 16 / sizeof(T);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
#pragma unroll
    for (int v = 0; v < N / P; v++) {
        const uint4 r = xv[v];
        const T* t = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int i = 0; i < P; i++) xf[v * P + i] = to_f(t[i]);
    }
}

// Σ value(code_i) · x_i over one 16-byte load of codes.
template <typename F>
__device__ __forceinline__ float chunk_dot(const uint4& w, const float (&xf)[F::C]) {
    float c[F::C];
    F::decode(w, c);
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
    for (int i = 0; i < F::C; i += 2) {
        s0 = fmaf(c[i], xf[i], s0);
        s1 = fmaf(c[i + 1], xf[i + 1], s1);
    }
    return s0 + s1;
}

// Word i (0..3) of a 16-byte load (a select chain: i is not known at compile time).
__device__ __forceinline__ unsigned int word_of(const uint4& w, int i) {
    return i == 0 ? w.x : (i == 1 ? w.y : (i == 2 ? w.z : w.w));
}

// Whether chunk_dot_x applies: the activations of a 16-byte piece of x (P of them) cover whole
// words of codes (EW = C / 4 codes a word). Not so for q4 with f32 activations (P 4, EW 8).
template <typename F, typename T>
struct PiecesOfWords {
    static constexpr int P = 16 / sizeof(T);
    static constexpr int EW = F::C / 4;
    static constexpr bool value = P >= EW && P % EW == 0;
};

// Σ value·x over chunk c (its 16-byte load of codes w; x the whole vector), x read as NX 16-byte
// pieces starting at piece `rot` of the chunk and wrapping: consecutive lanes' chunks lie
// S = C·sizeof(T) bytes apart in x, so lanes 128/S apart would hit the same shared-memory banks
// with the same piece; rotating by (c·S / 128) mod NX gives the lanes of one 128-byte wavefront
// different pieces (bf16 q4: S 64, lanes 2 apart start 1 piece later; bf16 int8: S 32, lanes 4
// apart). Piece v holds x[c·C + v·P, +P), i.e. the codes of words v·(P/EW) .. + P/EW. TWO: a
// second row's load w1 with the same x (its sum in s1).
template <typename F, typename T, bool TWO>
__device__ __forceinline__ void chunk_dot_x(const uint4& w0, const uint4& w1, const T* x, int c, float& s0, float& s1) {
    constexpr int P = PiecesOfWords<F, T>::P, EW = PiecesOfWords<F, T>::EW, NX = F::C / P, WP = P / EW;
    constexpr int S = F::C * (int)sizeof(T);
    const int rot = ((c * S) >> 7) & (NX - 1);
    const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)c * F::C);
#pragma unroll
    for (int p = 0; p < NX; p++) {
        const int v = (p + rot) & (NX - 1);
        const uint4 xr = xv[v];
        const T* xt = reinterpret_cast<const T*>(&xr);
#pragma unroll
        for (int wi = 0; wi < WP; wi++) {
            const unsigned int u0 = word_of(w0, v * WP + wi);
            const unsigned int u1 = TWO ? word_of(w1, v * WP + wi) : 0u;
#pragma unroll
            for (int e = 0; e < EW; e++) {
                const float xx = to_f(xt[wi * EW + e]);
                s0 = fmaf(F::in_word(u0, e), xx, s0);
                if (TWO) s1 = fmaf(F::in_word(u1, e), xx, s1);
            }
        }
    }
}

// Σ value·x over chunk c for one row (chunk_dot_x where it applies, else all of x's chunk
// loaded at once).
template <typename F, typename T>
__device__ __forceinline__ float chunk_sum(const uint4& w, const T* x, int c) {
    if constexpr (PiecesOfWords<F, T>::value) {
        float s0 = 0.0f, s1 = 0.0f;
        chunk_dot_x<F, T, false>(w, w, x, c, s0, s1);
        return s0;
    } else {
        float xf[F::C];
        load_x<T, F::C>(x + (size_t)c * F::C, xf);
        return chunk_dot<F>(w, xf);
    }
}

// The same for two rows with the same x.
template <typename F, typename T>
__device__ __forceinline__ float2 chunk_sum2(const uint4& w0, const uint4& w1, const T* x, int c) {
    if constexpr (PiecesOfWords<F, T>::value) {
        float s0 = 0.0f, s1 = 0.0f;
        chunk_dot_x<F, T, true>(w0, w1, x, c, s0, s1);
        return make_float2(s0, s1);
    } else {
        float xf[F::C];
        load_x<T, F::C>(x + (size_t)c * F::C, xf);
        return make_float2(chunk_dot<F>(w0, xf), chunk_dot<F>(w1, xf));
    }
}

// 16-byte loads in flight per lane and row.
#define QDOT_BATCH 8

template <typename F>
struct QRows {
    static constexpr int C = F::C;
    const unsigned char* q;          // codes, (rows, row_bytes(K))
    const f16* s;                    // scales
    const unsigned long long* stab;  // per expert: scales pointers, beside wtab's codes pointers
    int gshift;                      // log2 of the group (FmtQ4)

    __device__ __forceinline__ float scale(size_t j, int k, int K) const {
        const size_t i = F::GROUPED ? j * (size_t)(K >> gshift) + (size_t)(k >> gshift) : j;
        return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(s) + i)));
    }

    // One lane's part of row j · x over [k0, k1): with `vec`, 16-byte loads of codes (rows of
    // codes 16-byte aligned, k0 and k1 multiples of C, x 16-byte aligned); else one element at a
    // time.
    template <typename T>
    __device__ __forceinline__ float lane_dot(int j, int K, const T* x, int k0, int k1, bool vec) const {
        const int lane = threadIdx.x & 31;
        const unsigned char* row = q + (size_t)j * F::row_bytes(K);
        float acc = 0.0f;
        if (vec) {
            const uint4* wv = reinterpret_cast<const uint4*>(row);
            const int e = k1 / C;
            for (int base = k0 / C + lane; base < e; base += 32 * QDOT_BATCH) {
                uint4 a[QDOT_BATCH];
#pragma unroll
                for (int u = 0; u < QDOT_BATCH; u++)
                    if (base + 32 * u < e) a[u] = ld_stream(wv + base + 32 * u);
#pragma unroll
                for (int u = 0; u < QDOT_BATCH; u++)
                    if (base + 32 * u < e) {
                        const int c = base + 32 * u;
                        const float d = chunk_sum<F, T>(a[u], x, c);
                        acc = F::GROUPED ? fmaf(d, scale(j, c * C, K), acc) : acc + d;
                    }
            }
        } else {
            for (int k = k0 + lane; k < k1; k += 32) {
                const float w = F::GROUPED ? F::code(row, k) * scale(j, k, K) : F::code(row, k);
                acc = fmaf(w, to_f(x[k]), acc);
            }
        }
        return F::GROUPED ? acc : acc * scale(j, 0, K);
    }

    // Rows j0 and j1 with the same x over all K, their loads in flight together.
    template <typename T>
    __device__ __forceinline__ float2 lane_dot2(int j0, int j1, int K, const T* x, bool vec) const {
        constexpr int B = QDOT_BATCH / 2;
        const int lane = threadIdx.x & 31;
        const unsigned char* r0 = q + (size_t)j0 * F::row_bytes(K);
        const unsigned char* r1 = q + (size_t)j1 * F::row_bytes(K);
        float a0 = 0.0f, a1 = 0.0f;
        if (vec) {
            const uint4* p0 = reinterpret_cast<const uint4*>(r0);
            const uint4* p1 = reinterpret_cast<const uint4*>(r1);
            const int e = K / C;
            for (int base = lane; base < e; base += 32 * B) {
                uint4 w0[B], w1[B];
#pragma unroll
                for (int u = 0; u < B; u++)
                    if (base + 32 * u < e) {
                        w0[u] = ld_stream(p0 + base + 32 * u);
                        w1[u] = ld_stream(p1 + base + 32 * u);
                    }
#pragma unroll
                for (int u = 0; u < B; u++)
                    if (base + 32 * u < e) {
                        const int c = base + 32 * u;
                        const float2 d = chunk_sum2<F, T>(w0[u], w1[u], x, c);
                        const float d0 = d.x, d1 = d.y;
                        if (F::GROUPED) {
                            a0 = fmaf(d0, scale(j0, c * C, K), a0);
                            a1 = fmaf(d1, scale(j1, c * C, K), a1);
                        } else {
                            a0 += d0;
                            a1 += d1;
                        }
                    }
            }
        } else {
            for (int k = lane; k < K; k += 32) {
                const float xx = to_f(x[k]);
                const float w0 = F::GROUPED ? F::code(r0, k) * scale(j0, k, K) : F::code(r0, k);
                const float w1 = F::GROUPED ? F::code(r1, k) * scale(j1, k, K) : F::code(r1, k);
                a0 = fmaf(w0, xx, a0);
                a1 = fmaf(w1, xx, a1);
            }
        }
        if (!F::GROUPED) {
            a0 *= scale(j0, 0, K);
            a1 *= scale(j1, 0, K);
        }
        return make_float2(a0, a1);
    }

    // Element (j, k): s · value.
    __device__ __forceinline__ float at(size_t j, int k, int K) const {
        return F::code(q + j * F::row_bytes(K), k) * scale(j, k, K);
    }

    // Expert e's matrix: codes wtab[e], scales stab[e].
    __device__ __forceinline__ QRows from_table(const unsigned long long* wtab, int e) const {
        return QRows{reinterpret_cast<const unsigned char*>(wtab[e]), reinterpret_cast<const f16*>(stab[e]), stab, gshift};
    }
};
