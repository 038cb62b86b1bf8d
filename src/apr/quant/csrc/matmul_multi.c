/* apr_matmul_multi: y = x @ W.T for M rows of activations (a batched decode step, a short prompt), every
 * weight row read once per call.
 *
 * Why: dotting each row of x separately with the one-row kernels (ggml_matvec.c) unpacks every quantized
 * block (nibbles, fifth bits, 6-bit scales, signs) once per row. At M = 8 the 0.5B's decode step was
 * bound by that unpacking, not by DRAM: 8 sequences decoded only 1.66x as fast as one. Here a block is
 * unpacked once into registers and dotted with up to APR_MT rows of x (tiles of APR_MT beyond that); the
 * AVX-512 variant also pairs two 32-value blocks in one 512-bit register, as dot_k does for Q4_K.
 *
 * Exactness: row m gets the same int32 block sums and the same float operations, in the same order, as the
 * one-row dot of that row alone (the AVX2 two-accumulator chains are the two 256-bit halves of the 512-bit
 * accumulator), so a sequence's numbers do not depend on what it is batched with. tests/test_native.py checks
 * M rows against M one-row calls bit for bit, for every type and every ISA variant the CPU runs.
 */
#include "ggml_blocks.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define APR_MT 8 /* 32 vector registers: 8 rows' accumulators stay in registers */
#define WIDE 1   /* its multi-row dots read xrow's dd, n16, n128 */
#else
#define APR_MT 4 /* 16 registers */
#define WIDE 0
#endif
#define MAXT 8
#define INLINE static inline __attribute__((always_inline))

typedef void (*dotm_fn)(const uint8_t *w, const xrow *x, int M, int64_t K, float *out);

/* A 32-value block unpacked once for all rows: u the bytes maddubs/dpbusd take unsigned (|w| for the
 * signed types), sgn the signed weights whose sign moves onto x (Q8_0, Q5_0), dw the f16 scale, dm the
 * offset's coefficient (Q4_0: d * 8, subtracted; Q4_1, Q5_1: m, added). Same values as blk_* in ggml_matvec.c. */
typedef struct { __m256i u, sgn; float dw, dm; } blk32;
#define SIGNED(t) ((t) == Q8_0 || (t) == Q5_0)
#define OFFSET(t) ((t) == Q4_0 ? -1 : (t) == Q4_1 || (t) == Q5_1 ? 1 : 0)

INLINE blk32 unpack32(int t, const uint8_t *w) {
    blk32 k = {_mm256_setzero_si256(), _mm256_setzero_si256(), f16(w), 0};
    switch (t) {
    case Q8_0: k.sgn = load32(w + 2), k.u = _mm256_sign_epi8(k.sgn, k.sgn); break;
    case Q4_0: k.u = nibbles(w + 2), k.dm = k.dw * 8; break;
    case Q4_1: k.u = nibbles(w + 4), k.dm = f16(w + 2); break;
    case Q5_0:
        k.sgn = _mm256_or_si256(nibbles(w + 6), fifth_bits_minus16(w + 2)), k.u = _mm256_sign_epi8(k.sgn, k.sgn);
        break;
    case Q5_1:
        k.u = _mm256_add_epi8(_mm256_or_si256(nibbles(w + 8), fifth_bits_minus16(w + 4)), _mm256_set1_epi8(16));
        k.dm = f16(w + 2);
        break;
    }
    return k;
}

INLINE void offset32(int t, blk32 k, xrow x, int64_t b, float *off) {
    if (OFFSET(t) > 0) *off += k.dm * x.s[b];
    if (OFFSET(t) < 0) *off -= k.dm * x.s[b];
}

/* one block of one row, 256 bits: blk_* of ggml_matvec.c on an unpacked block */
INLINE __m256 step32(int t, blk32 k, xrow x, int64_t b, __m256 acc, float *off) {
    offset32(t, k, x, b, off);
    __m256i xq = load32(x.q + 32 * b);
    if (SIGNED(t)) xq = _mm256_sign_epi8(xq, k.sgn);
    return ACC(dot_us(k.u, xq), k.dw * x.d[b], acc);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
static inline __m512i cat256(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
static inline __m256 hi256(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
/* sign(x, w) for 64 bytes: x negated where w < 0 (where w = 0, |w| = 0 makes the product 0 either way) */
static inline __m512i sign64(__m512i x, __mmask64 neg) { return _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x); }

/* Blocks b, b + 1 in one register: lanes 0..7 are the one-row dot's acc0 chain, lanes 8..15 its acc1. The
 * signed types (Q8_0, Q5_0) take w + 128 / q + 16 as the unsigned bytes and start each 4-product sum from
 * -128 / -16 times the sum of x's 4 bytes (precomputed per row: n128 / n16): the same int32 as |w| . sign(x, w),
 * one instruction per row instead of two. */
INLINE void dotm_32(int t, int64_t size, const uint8_t *w, const xrow *x, const int M, int64_t K, float *out) {
    __m512 acc[MAXT];
    float off0[MAXT], off1[MAXT];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps(), off0[m] = off1[m] = 0;
    const int bias = t == Q8_0 ? 128 : 16;
    int64_t b = 0;
    for (; b + 1 < K / 32; b += 2, w += 2 * size) {
        const blk32 e = unpack32(t, w), o = unpack32(t, w + size);
        const __m512i u = SIGNED(t) ? _mm512_add_epi8(cat256(e.sgn, o.sgn), _mm512_set1_epi8((char)bias)) : cat256(e.u, o.u);
        const __m512 dw = pair256(_mm256_set1_ps(e.dw), _mm256_set1_ps(o.dw));
        for (int m = 0; m < M; m++) {
            offset32(t, e, x[m], b, &off0[m]), offset32(t, o, x[m], b + 1, &off1[m]);
            const __m512i xq = _mm512_loadu_si512((const void *)(x[m].q + 32 * b));
            const __m512i start = SIGNED(t) ? _mm512_loadu_si512((const void *)((t == Q8_0 ? x[m].n128 : x[m].n16) + 8 * b))
                                            : _mm512_setzero_si512();
            const __m512i p = _mm512_dpbusd_epi32(start, u, xq);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_loadu_ps(x[m].dd + 8 * b)), acc[m]);
        }
    }
    if (b < K / 32) {
        const blk32 e = unpack32(t, w);
        for (int m = 0; m < M; m++)
            acc[m] = pair256(step32(t, e, x[m], b, _mm512_castps512_ps256(acc[m]), &off0[m]), hi256(acc[m]));
    }
    for (int m = 0; m < M; m++)
        out[m] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[m]), hi256(acc[m]))) + (off0[m] + off1[m]);
}

/* dot_k's AVX-512 form, a super-block's 4 chunks unpacked once */
INLINE void dotm_k(int five, const uint8_t *w, const xrow *x, const int M, int64_t K, float *out) {
    __m512 acc[MAXT];
    __m256 off[MAXT];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps(), off[m] = _mm256_setzero_ps();
    const int64_t size = five ? 176 : 144;
    __m512i idx[4]; /* chunk j takes scales 2j (lanes 0..7) and 2j + 1 (lanes 8..15) */
    for (int j = 0; j < 4; j++) idx[j] = cat256(_mm256_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1));
    for (int64_t sb = 0; sb < K / 256; sb++, w += size) {
        __m256 sc, mn;
        k_scales_mins(w + 4, &sc, &mn);
        const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(f16(w)), sc), dmn = _mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), mn);
        const uint8_t *qs = w + (five ? 48 : 16);
        const __m256i qh = five ? load32(w + 16) : _mm256_setzero_si256();
        __m512i qq[4];
        for (int j = 0; j < 4; j++) {
            __m256i q[2];
            k_chunk(qs, qh, five, j, q);
            qq[j] = cat256(q[0], q[1]);
        }
        for (int m = 0; m < M; m++) {
            const __m512 scale = _mm512_castps256_ps512(_mm256_mul_ps(dsc, _mm256_loadu_ps(x[m].d + sb * 8)));
            off[m] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(x[m].s + sb * 8), off[m]);
            const int8_t *xq = x[m].q + sb * 256;
            for (int j = 0; j < 4; j++) {
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qq[j], _mm512_loadu_si512((const void *)(xq + 64 * j)));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx[j], scale), acc[m]);
            }
        }
    }
    for (int m = 0; m < M; m++)
        out[m] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[m]), hi256(acc[m]))) - hsum(off[m]);
}

/* dot_q6_k with chunks c and c + 1 (acc0's and acc1's) in one register */
INLINE void dotm_q6_k(const uint8_t *w, const xrow *x, const int M, int64_t K, float *out) {
    __m512 acc[MAXT];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    const __m256i b32 = _mm256_set1_epi8(32);
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const __m512 d = _mm512_set1_ps(f16(w + 208));
        const int8_t *sc = (const int8_t *)(w + 192);
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6k_half(w, h, q);
            for (int c = 0; c < 4; c += 2) {
                const __m512i wq = cat256(_mm256_sub_epi8(q[c], b32), _mm256_sub_epi8(q[c + 1], b32));
                const __m512i wa = _mm512_abs_epi8(wq); /* |q - 32| <= 32: sign(wq, wq) */
                const __mmask64 neg = _mm512_movepi8_mask(wq);
                const int s = 8 * h + 2 * c;
                const __m512i scales = cat256(_mm256_set_m128i(_mm_set1_epi16(sc[s + 1]), _mm_set1_epi16(sc[s])),
                                              _mm256_set_m128i(_mm_set1_epi16(sc[s + 3]), _mm_set1_epi16(sc[s + 2])));
                const int64_t b = sb * 8 + 4 * h + c;
                for (int m = 0; m < M; m++) {
                    const __m512i xq = sign64(_mm512_loadu_si512((const void *)(x[m].q + 32 * b)), neg);
                    const __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(wa, xq), scales);
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(d, _mm512_loadu_ps(x[m].dd + 8 * b)), acc[m]);
                }
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[m]), hi256(acc[m])));
}
#else
/* the one-row DOT_32 with the block unpacked once for M rows */
INLINE void dotm_32(int t, int64_t size, const uint8_t *w, const xrow *x, const int M, int64_t K, float *out) {
    __m256 acc0[MAXT], acc1[MAXT];
    float off0[MAXT], off1[MAXT];
    for (int m = 0; m < M; m++) acc0[m] = acc1[m] = _mm256_setzero_ps(), off0[m] = off1[m] = 0;
    int64_t b = 0;
    for (; b + 1 < K / 32; b += 2, w += 2 * size) {
        const blk32 e = unpack32(t, w), o = unpack32(t, w + size);
        for (int m = 0; m < M; m++) {
            acc0[m] = step32(t, e, x[m], b, acc0[m], &off0[m]);
            acc1[m] = step32(t, o, x[m], b + 1, acc1[m], &off1[m]);
        }
    }
    if (b < K / 32) {
        const blk32 e = unpack32(t, w);
        for (int m = 0; m < M; m++) acc0[m] = step32(t, e, x[m], b, acc0[m], &off0[m]);
    }
    for (int m = 0; m < M; m++) out[m] = hsum(_mm256_add_ps(acc0[m], acc1[m])) + (off0[m] + off1[m]);
}

INLINE void dotm_k(int five, const uint8_t *w, const xrow *x, const int M, int64_t K, float *out) {
    __m256 acc[MAXT][2], off[MAXT];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = off[m] = _mm256_setzero_ps();
    const int64_t size = five ? 176 : 144;
    float scale[8] __attribute__((aligned(32)));
    for (int64_t sb = 0; sb < K / 256; sb++, w += size) {
        __m256 sc, mn;
        k_scales_mins(w + 4, &sc, &mn);
        const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(f16(w)), sc), dmn = _mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), mn);
        const uint8_t *qs = w + (five ? 48 : 16);
        const __m256i qh = five ? load32(w + 16) : _mm256_setzero_si256();
        __m256i q[8];
        for (int j = 0; j < 4; j++) k_chunk(qs, qh, five, j, q + 2 * j);
        for (int m = 0; m < M; m++) {
            _mm256_store_ps(scale, _mm256_mul_ps(dsc, _mm256_loadu_ps(x[m].d + sb * 8)));
            off[m] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(x[m].s + sb * 8), off[m]);
            const int8_t *xq = x[m].q + sb * 256;
            for (int sub = 0; sub < 8; sub++)
                acc[m][sub & 1] = ACC(dot_us(q[sub], load32(xq + 32 * sub)), scale[sub], acc[m][sub & 1]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) - hsum(off[m]);
}

INLINE void dotm_q6_k(const uint8_t *w, const xrow *x, const int M, int64_t K, float *out) {
    __m256 acc[MAXT][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const __m256i b32 = _mm256_set1_epi8(32);
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const float d = f16(w + 208);
        const int8_t *sc = (const int8_t *)(w + 192);
        for (int h = 0; h < 2; h++) {
            __m256i q[4], wa[4], scales[4];
            q6k_half(w, h, q);
            for (int c = 0; c < 4; c++) {
                q[c] = _mm256_sub_epi8(q[c], b32), wa[c] = _mm256_sign_epi8(q[c], q[c]);
                scales[c] = _mm256_set_m128i(_mm_set1_epi16(sc[8 * h + 2 * c + 1]), _mm_set1_epi16(sc[8 * h + 2 * c]));
            }
            for (int m = 0; m < M; m++)
                for (int c = 0; c < 4; c++) {
                    const int64_t b = sb * 8 + 4 * h + c;
                    __m256i pairs = _mm256_maddubs_epi16(wa[c], _mm256_sign_epi8(load32(x[m].q + 32 * b), q[c]));
                    acc[m][c & 1] = ACC(_mm256_madd_epi16(pairs, scales[c]), d * x[m].d[b], acc[m][c & 1]);
                }
        }
    }
    for (int m = 0; m < M; m++) out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
}
#endif

/* one function per type with M a compile-time constant in each case, so the row loops unroll and the
 * accumulators live in registers */
#define MULTI(name, call)                                                                               \
    static void name(const uint8_t *w, const xrow *x, int M, int64_t K, float *out) {                  \
        switch (M) {                                                                                   \
        case 2: call(2); break;                                                                        \
        case 3: call(3); break;                                                                        \
        case 4: call(4); break;                                                                        \
        case 5: call(5); break;                                                                        \
        case 6: call(6); break;                                                                        \
        case 7: call(7); break;                                                                        \
        case 8: call(8); break;                                                                        \
        default: call(1); break;                                                                       \
        }                                                                                              \
    }
#define C_Q8_0(m) dotm_32(Q8_0, 34, w, x, m, K, out)
#define C_Q4_0(m) dotm_32(Q4_0, 18, w, x, m, K, out)
#define C_Q4_1(m) dotm_32(Q4_1, 20, w, x, m, K, out)
#define C_Q5_0(m) dotm_32(Q5_0, 22, w, x, m, K, out)
#define C_Q5_1(m) dotm_32(Q5_1, 24, w, x, m, K, out)
#define C_Q4_K(m) dotm_k(0, w, x, m, K, out)
#define C_Q5_K(m) dotm_k(1, w, x, m, K, out)
#define C_Q6_K(m) dotm_q6_k(w, x, m, K, out)
MULTI(multi_q8_0, C_Q8_0)
MULTI(multi_q4_0, C_Q4_0)
MULTI(multi_q4_1, C_Q4_1)
MULTI(multi_q5_0, C_Q5_0)
MULTI(multi_q5_1, C_Q5_1)
MULTI(multi_q4_k, C_Q4_K)
MULTI(multi_q5_k, C_Q5_K)
MULTI(multi_q6_k, C_Q6_K)

static dotm_fn pick_multi(int qtype) {
    switch (qtype) {
    case Q4_0: return multi_q4_0;
    case Q4_1: return multi_q4_1;
    case Q5_0: return multi_q5_0;
    case Q5_1: return multi_q5_1;
    case Q8_0: return multi_q8_0;
    case Q4_K: return multi_q4_k;
    case Q5_K: return multi_q5_k;
    case Q6_K: return multi_q6_k;
    default: return 0;
    }
}

/* Rows of x one weight row is dotted with at a time. 1 sends every row through the one-row dot, as before
 * this file: benchmarks/batch.py sets it through apr_set_row_tile to compare the two in one process. The
 * results are the same bits either way. */
static int row_tile = APR_MT;

int apr_set_row_tile(int t) {
    const int old = row_tile;
    row_tile = t < 1 ? APR_MT : t > MAXT ? MAXT : t; /* t < 1: the default */
    return old;
}

/* x (K floats) -> int8 blocks of 32 with scale amax/127 and the sum of each block's ints */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float inv = amax > 0 ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < 32; i++) {
            int v = (int)nearbyintf(xb[i] * inv);
            q[32 * b + i] = (int8_t)v;
            sum += v;
        }
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)sum;
    }
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* xrow's dd, n16, n128 for one quantized row (see ggml_blocks.h) */
static void widen_row(xrow x, int64_t K, float *dd, int32_t *n16, int32_t *n128) {
    for (int64_t b = 0; b < K / 32; b++)
        for (int i = 0; i < 8; i++) dd[16 * (b / 2) + 8 * (b & 1) + i] = x.d[b];
    for (int64_t g = 0; g < K / 4; g++) {
        const int32_t sum = x.q[4 * g] + x.q[4 * g + 1] + x.q[4 * g + 2] + x.q[4 * g + 3];
        n16[g] = -16 * sum, n128[g] = -128 * sum;
    }
}

/* The rows the kernels dot: each row of x as int8 blocks (xr[m]), or with `split` as two (xr[2m], xr[2m + 1]):
 * the first rounds x, the second rounds what the first rounded off (|x - d q| <= d / 2), so x ~= d q + d2 q2
 * and x's rounding error falls from 1/254 of its block's max to about 1/64516. Why: int8 activations are
 * llama.cpp's arithmetic too, and on a small model's flat next-token distributions (SmolLM2, Q4_1) they tip
 * near-ties: top-1 against float32 95.3%. The second row doubles the integer work, not the weight reads. */
static void quantize_rows(const void *x, int x_bf16, int64_t M, int64_t K, int split, int8_t *q, float *d,
                          float *s, float *xf, xrow *xr) {
    const int64_t nb = K / 32;
    for (int64_t m = 0; m < M; m++) {
        const float *row = (const float *)x + m * K;
        if (x_bf16) {
            for (int64_t i = 0; i < K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[m * K + i]);
            row = xf;
        }
        const int64_t r = split ? 2 * m : m;
        quantize_row(row, K, q + r * K, d + r * nb, s + r * nb);
        xr[r] = (xrow){q + r * K, d + r * nb, s + r * nb, 0, 0, 0};
        if (!split) continue;
        float *rest = xf + K; /* x minus what the first row holds, then its own int8 blocks */
        for (int64_t i = 0; i < K; i++) rest[i] = row[i] - d[r * nb + i / 32] * (float)q[r * K + i];
        quantize_row(rest, K, q + (r + 1) * K, d + (r + 1) * nb, s + (r + 1) * nb);
        xr[r + 1] = (xrow){q + (r + 1) * K, d + (r + 1) * nb, s + (r + 1) * nb, 0, 0, 0};
    }
}

/* y (M, N_0 + ... + N_{n-1}) = x (M, K) @ [W_0; ...; W_{n-1}].T (+ [bias_0, ...]), W_j being N_j rows of
 * row_bytes_j ggml bytes of type qtypes[j]: the outputs of the n weights side by side in each row of y.
 * x and y are float32, or bfloat16 where x_bf16 / y_bf16 say so. One call for several weights that read
 * the same x (q, k, v; gate, up) quantizes x once and runs one parallel region over all their rows.
 * split: x as two int8 rows (quantize_rows), y = the sum of their dots (+ bias).
 * Returns 0; -1 for an unsupported type or a K that is not a multiple of the type's block; -2 when out of memory. */
int apr_matmul_multi(int n, const int *qtypes, const uint8_t *const *ws, const int64_t *row_bytes,
                     const int64_t *Ns, const float *const *biases, int64_t K, const void *x, int x_bf16,
                     int64_t M, void *y, int y_bf16, int threads, int split) {
    dot_fn dots[8];
    dotm_fn multis[8];
    int64_t first[9] = {0};
    if (n < 1 || n > 8) return -1;
    for (int j = 0; j < n; j++) {
        const int t = qtypes[j];
        dots[j] = apr_dot_fn(t), multis[j] = pick_multi(t);
        if (!dots[j] || !multis[j] || K % block_values(t)) return -1;
        first[j + 1] = first[j] + Ns[j];
    }
    const int64_t nb = K / 32, R = split ? 2 * M : M; /* R: the int8 rows the kernels dot */
    int8_t *q = malloc((size_t)(R * K));
    float *d = malloc(sizeof(float) * (size_t)(R * nb)), *s = malloc(sizeof(float) * (size_t)(R * nb));
    float *xf = malloc(sizeof(float) * (size_t)(2 * K));
    xrow *xr = malloc(sizeof(xrow) * (size_t)R);
    const int wide = WIDE && R > 1; /* one row goes through the one-row dot, which needs none of these */
    float *dd = wide ? malloc(sizeof(float) * (size_t)(R * nb * 8)) : 0;
    int32_t *n16 = wide ? malloc(sizeof(int32_t) * (size_t)(R * K / 4)) : 0;
    int32_t *n128 = wide ? malloc(sizeof(int32_t) * (size_t)(R * K / 4)) : 0;
    if (!q || !d || !s || !xf || !xr || (wide && (!dd || !n16 || !n128))) {
        free(q), free(d), free(s), free(xf), free(xr), free(dd), free(n16), free(n128);
        return -2;
    }
    quantize_rows(x, x_bf16, M, K, split, q, d, s, xf, xr);
    for (int64_t r = 0; wide && r < R; r++) {
        xr[r].dd = dd + r * nb * 8, xr[r].n16 = n16 + r * K / 4, xr[r].n128 = n128 + r * K / 4;
        widen_row(xr[r], K, dd + r * nb * 8, n16 + r * K / 4, n128 + r * K / 4);
    }
    /* split: an even tile, so a row's two halves are always dotted in the same tile */
    const int tile = split && row_tile % 2 ? (row_tile < MAXT ? row_tile + 1 : row_tile - 1) : row_tile;
    /* guided: the two threads' shares end together even when the VM takes a core away for a while (the
     * 1.5B's whole-model pass, median of 40: 71.3 ms against 75.9 ms static; the 0.5B's the same) */
#pragma omp parallel for num_threads(threads) schedule(guided)
    for (int64_t r = 0; r < first[n]; r++) {
        int j = 0;
        while (r >= first[j + 1]) j++;
        const int64_t row = r - first[j], N = first[n];
        const uint8_t *w = ws[j] + row * row_bytes[j];
#if PF_BYTES > 0
        if ((row + 1) * row_bytes[j] + PF_BYTES <= Ns[j] * row_bytes[j]) /* see PF_BYTES */
            for (int64_t o = 0; o < row_bytes[j]; o += 64) _mm_prefetch((const char *)w + PF_BYTES + o, PF_HINT);
#endif
        for (int64_t m0 = 0; m0 < R; m0 += tile) { /* this weight row against int8 rows m0 .. m0 + mt - 1 */
            const int mt = R - m0 < tile ? (int)(R - m0) : tile;
            float dot[MAXT];
            if (mt == 1)
                dot[0] = dots[j](w, xr[m0], K);
            else
                multis[j](w, xr + m0, mt, K, dot);
            for (int i = 0; i < mt; i += 1 + split) {
                const int64_t m = (m0 + i) >> split;
                const float v = (split ? dot[i] + dot[i + 1] : dot[i]) + (biases[j] ? biases[j][row] : 0.0f);
                if (y_bf16)
                    ((uint16_t *)y)[m * N + r] = bf16_rne(v);
                else
                    ((float *)y)[m * N + r] = v;
            }
        }
    }
    free(q), free(d), free(s), free(xf), free(xr), free(dd), free(n16), free(n128);
    return 0;
}
