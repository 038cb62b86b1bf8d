/* The one-row dots: y = x @ W.T straight from ggml blocks for one row of x (AVX2 + FMA + F16C; built a
 * second time with AVX-512 F/BW/VL + VNNI, see dot_us and dot_k: the same results bit for bit), and the
 * dequantization for prefill tiles. apr_matmul_multi (matmul_multi.c) runs these for M = 1 and its own
 * multi-row dots, the same arithmetic per row, for more; ggml_blocks.h holds the pieces both use.
 *
 * Why: torch has no kernel that reads ggml blocks, and its int4 kernel runs at ~5 G weights/s per core
 * on AVX2, so a decode step was compute-bound far below the memory roofline. Here each row of x is
 * quantized to int8 blocks of 32 (one float scale and the int sum per block), and every weight block is
 * dotted with integer multiply-adds (maddubs: u8 x s8 -> s16 pairs, madd -> s32), then scaled in float.
 * The weights are read in place: no repacking, no second copy in memory.
 *
 * Exactness: the weights are the exact ggml values; the only rounding besides float accumulation is
 * the int8 rounding of x (relative error <= 1/254 of its block's max), tested against the float32
 * dequantization in tests/test_native.py.
 *
 * Layouts (ggml, little-endian, f16 scales): see apr/quant/dequant.py for the reference decoders.
 */
#include "ggml_blocks.h"

/* the variant this library was built as: "avx2" or "avx512" */
const char *apr_isa(void) { return APR_ISA; }

/* One 32-value block b of each type: returns acc + the block's dot with x (scaled); adds the weights'
 * offset times x's block sum to *off where the type has one. */
static inline __m256 blk_q8_0(const uint8_t *w, xrow x, int64_t b, __m256 acc, float *off) { /* d, q int8[32]: d q */
    (void)off;
    return ACC(dot_ss(load32(w + 2), load32(x.q + 32 * b)), f16(w) * x.d[b], acc);
}

static inline __m256 blk_q4_0(const uint8_t *w, xrow x, int64_t b, __m256 acc, float *off) { /* d, qs[16]: d (q - 8) */
    *off -= f16(w) * 8 * x.s[b];
    return ACC(dot_us(nibbles(w + 2), load32(x.q + 32 * b)), f16(w) * x.d[b], acc);
}

static inline __m256 blk_q4_1(const uint8_t *w, xrow x, int64_t b, __m256 acc, float *off) { /* d, m, qs[16]: d q + m */
    *off += f16(w + 2) * x.s[b];
    return ACC(dot_us(nibbles(w + 4), load32(x.q + 32 * b)), f16(w) * x.d[b], acc);
}

static inline __m256 blk_q5_0(const uint8_t *w, xrow x, int64_t b, __m256 acc, float *off) { /* d, qh[4], qs[16]: d (q - 16) */
    (void)off;
    __m256i q = _mm256_or_si256(nibbles(w + 6), fifth_bits_minus16(w + 2));
    return ACC(dot_ss(q, load32(x.q + 32 * b)), f16(w) * x.d[b], acc);
}

static inline __m256 blk_q5_1(const uint8_t *w, xrow x, int64_t b, __m256 acc, float *off) { /* d, m, qh[4], qs[16]: d q + m */
    *off += f16(w + 2) * x.s[b]; /* (q - 16) + 16: back to the unsigned 5-bit q */
    __m256i q = _mm256_add_epi8(_mm256_or_si256(nibbles(w + 8), fifth_bits_minus16(w + 4)), _mm256_set1_epi8(16));
    return ACC(dot_us(q, load32(x.q + 32 * b)), f16(w) * x.d[b], acc);
}

/* Blocks alternate between two accumulators, so a block's FMA waits on the block before last: one
 * chain of 4-cycle FMAs, one per 32 weights, otherwise bounds these loops below the load rate. */
#define DOT_32(name, size, blk)                                                \
    static float name(const uint8_t *w, xrow x, int64_t K) {                    \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();          \
        float off0 = 0, off1 = 0;                                               \
        int64_t b = 0;                                                          \
        for (; b + 1 < K / 32; b += 2, w += 2 * (size)) {                       \
            acc0 = blk(w, x, b, acc0, &off0);                                   \
            acc1 = blk(w + (size), x, b + 1, acc1, &off1);                      \
        }                                                                       \
        if (b < K / 32) acc0 = blk(w, x, b, acc0, &off0);                       \
        return hsum(_mm256_add_ps(acc0, acc1)) + (off0 + off1);                 \
    }

DOT_32(dot_q8_0, 34, blk_q8_0)
DOT_32(dot_q4_0, 18, blk_q4_0)
DOT_32(dot_q4_1, 20, blk_q4_1)
DOT_32(dot_q5_0, 22, blk_q5_0)
DOT_32(dot_q5_1, 24, blk_q5_1)

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* AVX-512: sub-blocks 2j and 2j+1 in one register (see pair256 in ggml_blocks.h) */
static inline float dot_k(const uint8_t *w, xrow x, int64_t K, int five) {
    __m512 acc = _mm512_setzero_ps();
    __m256 off = _mm256_setzero_ps();
    const int64_t size = five ? 176 : 144;
    float scale[8] __attribute__((aligned(32)));
    for (int64_t sb = 0; sb < K / 256; sb++, w += size) {
        __m256 sc, mn;
        k_scales_mins(w + 4, &sc, &mn);
        _mm256_store_ps(scale, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(f16(w)), sc), _mm256_loadu_ps(x.d + sb * 8)));
        off = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), mn), _mm256_loadu_ps(x.s + sb * 8), off);
        const uint8_t *qs = w + (five ? 48 : 16);
        const int8_t *xq = x.q + sb * 256;
        __m256i qh = five ? load32(w + 16) : _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i q[2];
            k_chunk(qs, qh, five, j, q);
            __m512i qq = _mm512_inserti64x4(_mm512_castsi256_si512(q[0]), q[1], 1);
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qq, _mm512_loadu_si512((const void *)(xq + 64 * j)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                  pair256(_mm256_set1_ps(scale[2 * j]), _mm256_set1_ps(scale[2 * j + 1])), acc);
        }
    }
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(acc), hi)) - hsum(off);
}
#else
static inline float dot_k(const uint8_t *w, xrow x, int64_t K, int five) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, off = _mm256_setzero_ps(); /* two chains */
    const int64_t size = five ? 176 : 144;
    float scale[8] __attribute__((aligned(32)));
    for (int64_t sb = 0; sb < K / 256; sb++, w += size) {
        __m256 sc, mn;
        k_scales_mins(w + 4, &sc, &mn);
        /* per sub-block: d sc times x's block scale; the offsets dmin m times x's block sums, 8 at once */
        _mm256_store_ps(scale, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(f16(w)), sc), _mm256_loadu_ps(x.d + sb * 8)));
        off = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), mn), _mm256_loadu_ps(x.s + sb * 8), off);
        const uint8_t *qs = w + (five ? 48 : 16);
        const int8_t *xq = x.q + sb * 256;
        __m256i qh = five ? load32(w + 16) : _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i q[2];
            k_chunk(qs, qh, five, j, q);
            for (int h = 0; h < 2; h++) {
                const int sub = 2 * j + h;
                acc[h] = ACC(dot_us(q[h], load32(xq + 32 * sub)), scale[sub], acc[h]);
            }
        }
    }
    return hsum(_mm256_add_ps(acc[0], acc[1])) - hsum(off);
}
#endif

static float dot_q4_k(const uint8_t *w, xrow x, int64_t K) { return dot_k(w, x, K, 0); }
static float dot_q5_k(const uint8_t *w, xrow x, int64_t K) { return dot_k(w, x, K, 1); }

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* AVX-512: chunks c and c + 1 (acc0's and acc1's below) in one register. dpbusd takes the unsigned q (0..63)
 * and a second dpbusd of 32s with x takes the offset off, so each int32 lane is the AVX2 path's sum of 4
 * products (q - 32) x exactly; times its int8 scale it stays below 2^24, so the float product equals the
 * AVX2 path's converted madd: the same FMAs on the same values, bit for bit. */
static float dot_q6_k(const uint8_t *w, xrow x, int64_t K) {
    const __m512i b32 = _mm512_set1_epi8(32), zero = _mm512_setzero_si512();
    __m512i idx[4]; /* the pair (h, c) takes scales 8h + 2c .. 8h + 2c + 3, each for 4 lanes */
    for (int i = 0; i < 4; i++)
        idx[i] = _mm512_add_epi32(_mm512_set1_epi32(4 * i),
                                  _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const float d = f16(w + 208);
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 192))));
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6k_half(w, h, q);
            for (int c = 0; c < 4; c += 2) {
                const int64_t b = sb * 8 + 4 * h + c;
                const __m512i qq = _mm512_inserti64x4(_mm512_castsi256_si512(q[c]), q[c + 1], 1);
                const __m512i xq = _mm512_loadu_si512((const void *)(x.q + 32 * b));
                const __m512i p = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, qq, xq), _mm512_dpbusd_epi32(zero, b32, xq));
                const __m512 ps = _mm512_mul_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(idx[2 * h + c / 2], sc));
                acc = _mm512_fmadd_ps(ps, pair256(_mm256_set1_ps(d * x.d[b]), _mm256_set1_ps(d * x.d[b + 1])), acc);
            }
        }
    }
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(acc), hi));
}
#else
static float dot_q6_k(const uint8_t *w, xrow x, int64_t K) {
    const __m256i b32 = _mm256_set1_epi8(32);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}; /* two chains, as in DOT_32 */
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const float d = f16(w + 208);
        const int8_t *sc = (const int8_t *)(w + 192);
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q6k_half(w, h, q);
            for (int c = 0; c < 4; c++) {
                const int64_t b = sb * 8 + 4 * h + c;
                __m256i wq = _mm256_sub_epi8(q[c], b32), xq = load32(x.q + 32 * b);
                __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
                __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[8 * h + 2 * c + 1]), _mm_set1_epi16(sc[8 * h + 2 * c]));
                acc[c & 1] = ACC(_mm256_madd_epi16(pairs, scales), d * x.d[b], acc[c & 1]);
            }
        }
    }
    return hsum(_mm256_add_ps(acc[0], acc[1]));
}
#endif

static dot_fn pick(int qtype) {
    switch (qtype) {
    case Q4_0: return dot_q4_0;
    case Q4_1: return dot_q4_1;
    case Q5_0: return dot_q5_0;
    case Q5_1: return dot_q5_1;
    case Q8_0: return dot_q8_0;
    case Q4_K: return dot_q4_k;
    case Q5_K: return dot_q5_k;
    case Q6_K: return dot_q6_k;
    default: return 0;
    }
}

int apr_supports(int qtype) { return pick(qtype) != 0; }

dot_fn apr_dot_fn(int qtype) { return pick(qtype); }

/* ---- dequantization to float32, for prefill tiles (a GEMM then does the work) ----
 * Same arithmetic, in the same order, as apr/quant/dequant.py (separate multiply and add: -std=c11 keeps
 * GCC from fusing them), so the values are bit-identical to the reference dequantization. */

/* out[0..31] = q * scale (+ offset): q 32 int8 values, scale/offset per 8-value group g */
static inline void store32(float *out, __m256i q, const float *scale, const float *offset) {
    __m128i half[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int g = 0; g < 4; g++) {
        __m128i eight = g & 1 ? _mm_srli_si128(half[g >> 1], 8) : half[g >> 1];
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), _mm256_set1_ps(scale[g]));
        if (offset) v = _mm256_add_ps(v, _mm256_set1_ps(offset[g]));
        _mm256_storeu_ps(out + 8 * g, v);
    }
}

static void dequant_row(int qtype, const uint8_t *w, int64_t K, float *out) {
    for (int64_t i = 0; i < K; i += block_values(qtype)) {
        float s[4], o[4];
        switch (qtype) {
        case Q8_0: /* q * d */
            s[0] = s[1] = s[2] = s[3] = f16(w);
            store32(out + i, load32(w + 2), s, 0), w += 34;
            break;
        case Q4_0: /* (q - 8) * d */
            s[0] = s[1] = s[2] = s[3] = f16(w);
            store32(out + i, _mm256_sub_epi8(nibbles(w + 2), _mm256_set1_epi8(8)), s, 0), w += 18;
            break;
        case Q4_1: /* q * d + m */
            s[0] = s[1] = s[2] = s[3] = f16(w), o[0] = o[1] = o[2] = o[3] = f16(w + 2);
            store32(out + i, nibbles(w + 4), s, o), w += 20;
            break;
        case Q5_0: /* (q - 16) * d */
            s[0] = s[1] = s[2] = s[3] = f16(w);
            store32(out + i, _mm256_or_si256(nibbles(w + 6), fifth_bits_minus16(w + 2)), s, 0), w += 22;
            break;
        case Q5_1: /* q * d + m */
            s[0] = s[1] = s[2] = s[3] = f16(w), o[0] = o[1] = o[2] = o[3] = f16(w + 2);
            store32(out + i, _mm256_add_epi8(_mm256_or_si256(nibbles(w + 8), fifth_bits_minus16(w + 4)),
                                             _mm256_set1_epi8(16)), s, o), w += 24;
            break;
        case Q4_K:
        case Q5_K: { /* q * (d sc) - dmin m, per 32-value sub-block */
            const int five = qtype == Q5_K;
            const float d = f16(w), dmin = f16(w + 2);
            const uint8_t *qs = w + (five ? 48 : 16);
            __m256i qh = five ? load32(w + 16) : _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i q[2];
                k_chunk(qs, qh, five, j, q);
                for (int h = 0; h < 2; h++) {
                    const int sub = 2 * j + h;
                    float sc, mn;
                    k_scale_min(w + 4, sub, &sc, &mn);
                    s[0] = s[1] = s[2] = s[3] = d * sc, o[0] = o[1] = o[2] = o[3] = -(dmin * mn);
                    store32(out + i + 32 * sub, q[h], s, o);
                }
            }
            w += five ? 176 : 144;
            break;
        }
        case Q6_K: { /* (d sc) * (q - 32), per 16-value sub-block */
            const float d = f16(w + 208);
            const int8_t *sc = (const int8_t *)(w + 192);
            const __m256i b32 = _mm256_set1_epi8(32);
            for (int h = 0; h < 2; h++) {
                __m256i q[4];
                q6k_half(w, h, q);
                for (int c = 0; c < 4; c++) {
                    s[0] = s[1] = d * sc[8 * h + 2 * c], s[2] = s[3] = d * sc[8 * h + 2 * c + 1];
                    store32(out + i + 128 * h + 32 * c, _mm256_sub_epi8(q[c], b32), s, 0);
                }
            }
            w += 210;
            break;
        }
        }
    }
}

/* a type the dots know and a K of whole blocks: what both dequantizers need */
static int dequant_ok(int qtype, int64_t K) { return pick(qtype) && K % block_values(qtype) == 0; }

/* out (rows, K) float32 = the dequantized ggml rows w (rows of row_bytes bytes). Returns 0, or -1 for an
 * unsupported type or a K that is not a multiple of its block. */
int apr_dequant(int qtype, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t K, float *out, int threads) {
    if (!dequant_ok(qtype, K)) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) dequant_row(qtype, w + r * row_bytes, K, out + r * K);
    return 0;
}

/* out (rows, K) bfloat16 = the dequantized ggml rows, each row made in float32 (dequant_row) and rounded
 * once: a prefill tile without the float32 tile in memory or a second pass to convert it. */
int apr_dequant_bf16(int qtype, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t K, uint16_t *out,
                     int threads) {
    if (!dequant_ok(qtype, K)) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc((size_t)K * sizeof(float)); /* one row, in cache, per thread */
        if (!row) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!row) continue;
            dequant_row(qtype, w + r * row_bytes, K, row);
            uint16_t *o = out + r * K;
            for (int64_t j = 0; j < K; j++) o[j] = bf16_rne(row[j]);
        }
        free(row);
    }
    return failed ? -2 : 0;
}
