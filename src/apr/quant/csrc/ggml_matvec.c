/* y = x @ W.T straight from ggml blocks, for the few rows of a decode step (AVX2 + FMA + F16C; built a
 * second time with AVX-512 F/BW/VL + VNNI, see dot_us and dot_k: the same results bit for bit).
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
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ggml type ids */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

typedef struct {
    const int8_t *q;  /* K int8 values */
    const float *d;   /* K/32 block scales: x ~= d * q */
    const float *s;   /* K/32 block sums of x as rounded: d * sum(q) (for the weights' offsets) */
} xrow;

/* Each row's dot product asks for the bytes PF_BYTES further on. With only the hardware prefetcher, a
 * decode step of the 1.5B streamed its weights at 11.1 GB/s (median of 20 whole-model passes) on the 2-core
 * box that reads 14.2 GB/s; with 8 KiB ahead (4 and 16 KiB measured about the same) 12.1 GB/s. */
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif

typedef float (*dot_fn)(const uint8_t *w, xrow x, int64_t K);

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* unsigned weights (0..128) x signed int8 (-127..127) -> 8 int32 partial sums, each of 4 products.
 * ISA variants (apr/quant/native.py builds one library per variant, each with its own flags): AVX2 sums
 * pairs into int16 (maddubs) and pairs of those into int32 (madd); AVX-512 VNNI (with VL: 256-bit forms)
 * sums all four straight into int32 in one instruction. maddubs cannot saturate here (|pair| <= 2 * 128 *
 * 127 < 32768), so both give the same integers and every result is bit-identical between the variants. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define APR_ISA "avx512"
static inline __m256i dot_us(__m256i w, __m256i x) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x); }
#else
#define APR_ISA "avx2"
static inline __m256i dot_us(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
#endif

/* the variant this library was built as: "avx2" or "avx512" */
const char *apr_isa(void) { return APR_ISA; }

/* signed x signed: move w's sign onto x so maddubs sees |w| */
static inline __m256i dot_ss(__m256i w, __m256i x) {
    return dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

static inline __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 16 bytes of nibbles -> 32 values: low nibbles are elements 0..15, high nibbles 16..31 (the bytes in
 * both lanes, the upper lane shifted right by 4, then masked) */
static inline __m256i nibbles(const uint8_t *p) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(15));
}

/* 32 bits -> 32 bytes: byte i = 0 where bit i is set, else 0xF0 (-16). OR-ed onto a nibble it gives the
 * signed Q5 value q - 16 = nibble + 16 bit - 16 as int8. */
static inline __m256i fifth_bits_minus16(const uint8_t *p) {
    uint32_t b;
    memcpy(&b, p, 4);
    __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_andnot_si256(set, _mm256_set1_epi8((char)0xF0));
}

#define ACC(p, scale, acc) _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc)

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

/* Q4_K/Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes */
static inline void k_scale_min(const uint8_t *q, int j, float *sc, float *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q4_K (144 B / 256) and Q5_K (176 B / 256): d, dmin, scales[12], [qh[32]], qs[128]; w = d sc q - dmin m.
 * Chunk j (64 values) takes qs[32j..32j+31]: low nibbles are sub-block 2j, high nibbles 2j+1; Q5_K adds
 * bit 2j / 2j+1 of qh[l] as the fifth bit. */
/* The 8 scales and 8 mins of a Q4_K/Q5_K super-block as floats, from the 12 packed bytes (same values
 * as k_scale_min, four bytes at a time) */
static inline void k_scales_mins(const uint8_t *packed, __m256 *sc, __m256 *mn) {
    uint32_t u[4];
    memcpy(u, packed, 12);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4); /* mins 4..7 */
    const uint32_t mins_lo = u[1] & low6;                        /* mins 0..3 */
    u[1] = (u[2] & low4) | (((u[0] >> 6) & low2) << 4);         /* scales 4..7 */
    u[2] = mins_lo;
    u[0] &= low6;                                                /* scales 0..3 */
    __m128i bytes = _mm_loadu_si128((const __m128i *)u);
    *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
}

/* chunk j (64 values) of a Q4_K/Q5_K super-block: sub-blocks 2j (low nibbles) and 2j+1 (high nibbles),
 * with Q5_K's fifth bit (bit 2j / 2j+1 of each qh byte) as 16 */
static inline void k_chunk(const uint8_t *qs, __m256i qh, int five, int j, __m256i q[2]) {
    const __m256i m4 = _mm256_set1_epi8(15), v = load32(qs + 32 * j);
    q[0] = _mm256_and_si256(v, m4);
    q[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    for (int h = 0; five && h < 2; h++)
        q[h] = _mm256_or_si256(q[h], _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j + h), 4),
                                                      _mm256_set1_epi8(16)));
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* AVX-512: a chunk's two sub-blocks in one 512-bit register (x's blocks 2j and 2j+1 are adjacent), so lanes
 * 0..7 are the AVX2 path's even-sub-block chain and lanes 8..15 its odd one: the same FMAs on the same
 * values in the same order, half the instructions, bit-identical results. */
static inline __m512 pair256(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

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

/* Q6_K (210 B / 256): ql[128], qh[64], scales int8[16], d; w = d sc (q - 32) with 16-value sub-blocks.
 * Half h (128 values) takes ql[64h..], qh[32h..]: value 32c + l (c = 0..3, l = 0..31) is
 * (ql[l + 32 (c & 1)] >> 4 (c >> 1)) & 15 | ((qh[l] >> 2c) & 3) << 4, scale sc[8h + 2c + l / 16]. */
static inline void q6k_half(const uint8_t *w, int h, __m256i q[4]) { /* the 6-bit q (0..63) of half h */
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    __m256i l0 = load32(w + 64 * h), l1 = load32(w + 64 * h + 32), qh = load32(w + 128 + 32 * h);
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}

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

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* y (M, N_0 + ... + N_{n-1}) = x (M, K) @ [W_0; ...; W_{n-1}].T (+ [bias_0, ...]), W_j being N_j rows of
 * row_bytes_j ggml bytes of type qtypes[j]: the outputs of the n weights side by side in each row of y.
 * x and y are float32, or bfloat16 where x_bf16 / y_bf16 say so. One call for several weights that read
 * the same x (q, k, v; gate, up) quantizes x once and runs one parallel region over all their rows. Returns 0; -1 for an unsupported type or a K that is not a multiple of
 * the type's block; -2 when out of memory. */
int apr_matmul_multi(int n, const int *qtypes, const uint8_t *const *ws, const int64_t *row_bytes,
                     const int64_t *Ns, const float *const *biases, int64_t K, const void *x, int x_bf16,
                     int64_t M, void *y, int y_bf16, int threads) {
    dot_fn dots[8];
    int64_t first[9] = {0};
    if (n < 1 || n > 8) return -1;
    for (int j = 0; j < n; j++) {
        const int t = qtypes[j];
        const int64_t block = (t == Q4_K || t == Q5_K || t == Q6_K) ? 256 : 32;
        dots[j] = pick(t);
        if (!dots[j] || K % block) return -1;
        first[j + 1] = first[j] + Ns[j];
    }
    const int64_t nb = K / 32;
    int8_t *q = malloc((size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(M * nb)), *s = malloc(sizeof(float) * (size_t)(M * nb));
    float *xf = malloc(sizeof(float) * (size_t)K);
    if (!q || !d || !s || !xf) {
        free(q), free(d), free(s), free(xf);
        return -2;
    }
    for (int64_t m = 0; m < M; m++) {
        const float *row = (const float *)x + m * K;
        if (x_bf16) {
            for (int64_t i = 0; i < K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[m * K + i]);
            row = xf;
        }
        quantize_row(row, K, q + m * K, d + m * nb, s + m * nb);
    }
    /* guided: the two threads' shares end together even when the VM takes a core away for a while (the
     * 1.5B's whole-model pass, median of 40: 71.3 ms against 75.9 ms static; the 0.5B's the same) */
#pragma omp parallel for num_threads(threads) schedule(guided)
    for (int64_t r = 0; r < first[n]; r++) {
        int j = 0;
        while (r >= first[j + 1]) j++;
        const int64_t row = r - first[j], N = first[n];
        const uint8_t *w = ws[j] + row * row_bytes[j];
        if ((row + 1) * row_bytes[j] + PF_BYTES <= Ns[j] * row_bytes[j]) /* see PF_BYTES */
            for (int64_t o = 0; o < row_bytes[j]; o += 64) _mm_prefetch((const char *)w + PF_BYTES + o, _MM_HINT_T0);
        for (int64_t m = 0; m < M; m++) {
            xrow xr = {q + m * K, d + m * nb, s + m * nb};
            float v = dots[j](w, xr, K) + (biases[j] ? biases[j][row] : 0.0f);
            if (y_bf16)
                ((uint16_t *)y)[m * N + r] = f32_to_bf16(v);
            else
                ((float *)y)[m * N + r] = v;
        }
    }
    free(q), free(d), free(s), free(xf);
    return 0;
}

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
    for (int64_t i = 0; i < K; i += (qtype == Q4_K || qtype == Q5_K || qtype == Q6_K) ? 256 : 32) {
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

/* out (rows, K) float32 = the dequantized ggml rows w (rows of row_bytes bytes). Returns 0, or -1 for an
 * unsupported type or a K that is not a multiple of its block. */
int apr_dequant(int qtype, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t K, float *out, int threads) {
    const int64_t block = (qtype == Q4_K || qtype == Q5_K || qtype == Q6_K) ? 256 : 32;
    if (!pick(qtype) || K % block) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) dequant_row(qtype, w + r * row_bytes, K, out + r * K);
    return 0;
}
