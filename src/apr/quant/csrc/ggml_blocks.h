/* ggml block layouts and the AVX2 pieces that unpack them, shared by the one-row dots (ggml_matvec.c) and
 * the multi-row ones (matmul_multi.c): both must form the same integers and the same float operations. */
#ifndef APR_GGML_BLOCKS_H
#define APR_GGML_BLOCKS_H
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
    /* multi-row AVX-512 only (matmul_multi.c), per row once per call: dd block pair p's scales as 16 lanes
     * (d[2p] x 8, d[2p+1] x 8); n16 / n128 -16 / -128 times the sum of each 4 bytes of q */
    const float *dd;
    const int32_t *n16, *n128;
} xrow;

/* Each row's dot product asks for the bytes PF_BYTES further on. With only the hardware prefetcher, a
 * decode step of the 1.5B streamed its weights at 11.1 GB/s (median of 20 whole-model passes) on the 2-core
 * AVX2 box that reads 14.2 GB/s; with 8 KiB ahead (4 and 16 KiB measured about the same) 12.1 GB/s. On the
 * 2-core AMX-class Xeon (27.5 GB/s read loop), `apr bench` decode, 3 iterations, paired runs: no prefetch
 * 7.9 tok/s (1.5B) / 19.0 (0.5B); 8 KiB 11.9 / 28.2; 16 KiB 13.6-14.0 / 32.4-33.4; 24 KiB 13.7 / 33.6.
 * Into L2 (PF_HINT T1), not L1: the L1 prefetch stalled on its few line-fill buffers (87% of the row loop's
 * own samples sat on that instruction), while L2's queue holds more misses in flight. Same box, 0.5B, 256
 * tokens, three alternating rounds: T0 at 16 KiB 33.8 / 33.2 / 33.9 tok/s, T1 at 64 KiB 35.0 / 35.7 / 35.5
 * (T1 at 16 and 32 KiB in between; the 1.5B level, 14.0-14.8 either way). Not yet measured on the AVX2 class. */
#ifndef PF_BYTES
#define PF_BYTES 65536
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif

typedef float (*dot_fn)(const uint8_t *w, xrow x, int64_t K);

/* values per block: 256 for the k-quants, 32 for the rest */
static inline int64_t block_values(int qtype) { return (qtype == Q4_K || qtype == Q5_K || qtype == Q6_K) ? 256 : 32; }

/* float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0: what torch's .to(torch.bfloat16) gives
 * (c10::BFloat16), so bf16 made here (a prefill tile, a kernel's bf16 output) equals torch's, bit for bit. */
static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

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
#if defined(__AVX512BW__) && defined(__AVX512VL__)
static inline __m256i fifth_bits_minus16(const uint8_t *p) { /* the same bytes from the bits as a mask */
    uint32_t b;
    memcpy(&b, p, 4);
    return _mm256_maskz_mov_epi8((__mmask32)~b, _mm256_set1_epi8((char)0xF0));
}
#else
static inline __m256i fifth_bits_minus16(const uint8_t *p) {
    uint32_t b;
    memcpy(&b, p, 4);
    __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_andnot_si256(set, _mm256_set1_epi8((char)0xF0));
}
#endif

#define ACC(p, scale, acc) _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc)

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
#endif

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

/* the one-row dot of a type (ggml_matvec.c), 0 where there is none */
__attribute__((visibility("hidden"))) dot_fn apr_dot_fn(int qtype);

#endif
