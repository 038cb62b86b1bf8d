/* One transformer block for one decode token (T = 1) in a single call: the glue around the matvecs.
 *
 * Why: a decode step of a small model is ~200 tiny torch ops per layer (norms, rope, cache writes,
 * attention over a few hundred keys, residual adds), each costing microseconds of dispatch: on the 2-core
 * dev box that was ~15 ms of a ~60 ms token. Here the same math runs in C on float32 activations, with
 * the weights' matvecs going through apr_matmul_multi (matmul_multi.c). The block mirrors
 * apr/model/transformer.py (Block.forward): RMSNorm, q/k/v (+ bias), rope, KV cache write, causal GQA
 * attention, output projection, residual, RMSNorm, SwiGLU FFN, residual. tests/test_native.py checks it
 * against the torch block on tiny random models of both architectures.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int apr_matmul_multi(int n, const int *qtypes, const uint8_t *const *ws, const int64_t *row_bytes,
                     const int64_t *Ns, const float *const *biases, int64_t K, const void *x, int x_bf16,
                     int64_t M, void *y, int y_bf16, int threads, int split);

typedef struct { /* weights that read the same input, as apr_matmul_multi takes them */
    int n;
    const int *qtypes;
    const uint8_t *const *ws;
    const int64_t *row_bytes, *Ns;
    const float *const *biases;
    int split; /* x as two int8 rows (see quantize_rows in matmul_multi.c) */
} wgroup;

typedef struct { /* one block; built once in Python (apr.model.native_step) */
    int64_t dim, n_heads, n_kv, head_dim, ffn_dim, cache_len; /* cache_len: positions in the cache buffers */
    int neox; /* rope on halves (qwen2) or adjacent pairs (llama) */
    float eps;
    const float *attn_norm, *ffn_norm;
    wgroup qkv, out, gate_up, down;
    uint16_t *k_cache, *v_cache; /* this layer's (slots, n_kv, cache_len, head_dim) bfloat16 buffers */
    int64_t n_slots;             /* sequences the cache holds: row m of a step reads and writes slot[m] */
} dlayer;

/* y (M, N) = x (M, K) @ W.T: every weight row is read once for all M rows of the batch, and each row's dot
 * is the same arithmetic as with M = 1, so a sequence's numbers do not depend on what it is batched with */
static int matvec(const wgroup *g, int64_t K, const float *x, int64_t M, float *y, int threads) {
    return apr_matmul_multi(g->n, g->qtypes, g->ws, g->row_bytes, g->Ns, g->biases, K, x, 0, M, y, 0, threads, g->split);
}

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    double ss = 0; /* as torch: mean of squares in float32 is fine too, double costs nothing here */
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* x (heads, hd) in place. neox: cos/sin hold hd values in halves form ([cos, cos], [-sin, sin]); pairs:
 * hd/2 values, rotating (x[2i], x[2i+1]). Same products as apply_rope / rope_halves. */
static void rope(float *x, int64_t heads, int64_t hd, int neox, const float *cos, const float *sin) {
    float tmp[1024];
    for (int64_t h = 0; h < heads; h++, x += hd) {
        if (neox) {
            memcpy(tmp, x, sizeof(float) * (size_t)hd);
            for (int64_t i = 0; i < hd; i++) x[i] = tmp[i] * cos[i] + tmp[(i + hd / 2) % hd] * sin[i];
        } else {
            for (int64_t i = 0; i < hd / 2; i++) {
                const float a = x[2 * i], b = x[2 * i + 1];
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        }
    }
}

static inline uint16_t f2bf(float f) { /* round to nearest even (no NaN inputs here: finite activations) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}


static inline __m256 bf16x8(const uint16_t *p) { /* 8 bfloat16 -> 8 float32 (exact) */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* q . k over hd lanes (a multiple of 8): two chains, so consecutive FMAs do not wait on each other */
static inline float dot_bf16(const float *q, const uint16_t *k, int64_t hd) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= hd; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), bf16x8(k + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), bf16x8(k + i + 8), a1);
    }
    if (i < hd) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), bf16x8(k + i), a0);
    return hsum8(_mm256_add_ps(a0, a1));
}

/* o[i0 .. i0 + 8 nv) = inv * sum over s <= pos of p[s] v[s] for nv <= 8 vectors of 8 lanes: the positions
 * run inside, each vector is its own chain, so the FMAs of one position are independent of each other.
 * Inlined, so a call with a constant nv keeps the accumulators in registers. */
static inline void weighted_sum(const float *p, const uint16_t *vc, int64_t hd, int64_t pos, int64_t i0, int nv,
                                float inv, float *o) {
    __m256 acc[8];
    for (int u = 0; u < nv; u++) acc[u] = _mm256_setzero_ps();
    for (int64_t s = 0; s <= pos; s++)
        for (int u = 0; u < nv; u++)
            acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), bf16x8(vc + s * hd + i0 + 8 * u), acc[u]);
    for (int u = 0; u < nv; u++) _mm256_storeu_ps(o + i0 + 8 * u, _mm256_mul_ps(acc[u], _mm256_set1_ps(inv)));
}

/* out (M, heads, hd): row m's softmax(q k^T / sqrt(hd)) v over its slot's cached positions 0..pos[m], kv head =
 * head / group. hd is a multiple of 8 (checked by the caller): 8 lanes at a time over the bf16 cache.
 * One parallel loop over (row, head) pairs: a batch of short rows still fills both cores. */
static void attention(const dlayer *L, const float *q, int64_t M, const int64_t *pos, const int64_t *slot, float *out,
                      int threads) {
    const int64_t hd = L->head_dim, H = L->n_heads, group = H / L->n_kv, S = L->cache_len;
    const int64_t per_slot = L->n_kv * S * hd;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t mh = 0; mh < M * H; mh++) {
        const int64_t m = mh / H, h = mh % H, P = pos[m];
        const int64_t off = slot[m] * per_slot + (h / group) * S * hd;
        const uint16_t *kc = L->k_cache + off, *vc = L->v_cache + off;
        const float *qh = q + (m * H + h) * hd;
        float *oh = out + (m * H + h) * hd;
        float *p = malloc(sizeof(float) * (size_t)(P + 1)), mx = -INFINITY, sum = 0;
        if (!p) { /* cannot happen for sane sizes; leave zeros rather than crash inside the parallel region */
            memset(oh, 0, sizeof(float) * (size_t)hd);
            continue;
        }
        for (int64_t s = 0; s <= P; s++) {
            p[s] = dot_bf16(qh, kc + s * hd, hd) * scale;
            mx = p[s] > mx ? p[s] : mx;
        }
        for (int64_t s = 0; s <= P; s++) sum += (p[s] = expf(p[s] - mx));
        for (int64_t i0 = 0; i0 < hd; i0 += 64) {
            const int nv = (int)((hd - i0 < 64 ? hd - i0 : 64) / 8);
            if (nv == 8) /* the usual case (head_dim 64 or 128) */
                weighted_sum(p, vc, hd, P, i0, 8, 1.0f / sum, oh);
            else
                weighted_sum(p, vc, hd, P, i0, nv, 1.0f / sum, oh);
        }
        free(p);
    }
}

/* x (M, dim) float32, the residual streams of M sequences, in place: x += attn(norm(x)); x += ffn(norm(x)).
 * Row m is the token at position pos[m] of the sequence in cache slot slot[m] (distinct slots); cos/sin (M, hdc):
 * each row's rope row (hdc = hd in halves form, hd/2 for pairs). Returns 0, -1 on bad shapes or weights, -2 out
 * of memory. M = 1 is the single-sequence step. */
int apr_decode_layer(const dlayer *L, float *x, int64_t M, const int64_t *pos, const int64_t *slot, const float *cos,
                     const float *sin, int threads) {
    const int64_t dim = L->dim, hd = L->head_dim, qn = L->n_heads * hd, kvn = L->n_kv * hd, F = L->ffn_dim;
    const int64_t qkvn = qn + 2 * kvn, hdc = L->neox ? hd : hd / 2, S = L->cache_len;
    if (M < 1 || hd > 1024 || hd % 8 || L->n_heads % L->n_kv) return -1;
    for (int64_t m = 0; m < M; m++)
        if (pos[m] < 0 || pos[m] >= S || slot[m] < 0 || slot[m] >= L->n_slots) return -1;
    float *buf = malloc(sizeof(float) * (size_t)(M * (2 * dim + qkvn + qn + 2 * F)));
    if (!buf) return -2;
    float *h = buf, *qkv = h + M * dim, *att = qkv + M * qkvn, *gu = att + M * qn, *o = gu + M * 2 * F;
    int rc = 0;
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * dim, L->attn_norm, dim, L->eps, h + m * dim);
    if ((rc = matvec(&L->qkv, dim, h, M, qkv, threads))) goto done;
    for (int64_t m = 0; m < M; m++) {
        float *q = qkv + m * qkvn, *k = q + qn, *v = k + kvn;
        rope(q, L->n_heads, hd, L->neox, cos + m * hdc, sin + m * hdc);
        rope(k, L->n_kv, hd, L->neox, cos + m * hdc, sin + m * hdc);
        uint16_t *kc = L->k_cache + slot[m] * L->n_kv * S * hd, *vc = L->v_cache + slot[m] * L->n_kv * S * hd;
        for (int64_t j = 0; j < L->n_kv; j++) /* a slot's layout (n_kv, cache_len, hd) */
            for (int64_t i = 0; i < hd; i++) {
                kc[(j * S + pos[m]) * hd + i] = f2bf(k[j * hd + i]);
                vc[(j * S + pos[m]) * hd + i] = f2bf(v[j * hd + i]);
            }
        memmove(qkv + m * qn, q, sizeof(float) * (size_t)qn); /* pack the queries (M, qn) for attention */
    }
    attention(L, qkv, M, pos, slot, att, threads);
    if ((rc = matvec(&L->out, qn, att, M, o, threads))) goto done;
    for (int64_t i = 0; i < M * dim; i++) x[i] += o[i];
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * dim, L->ffn_norm, dim, L->eps, h + m * dim);
    if ((rc = matvec(&L->gate_up, dim, h, M, gu, threads))) goto done;
    for (int64_t m = 0; m < M; m++) { /* silu(gate) * up, row m's gate and up side by side: (M, 2F) -> (M, F) */
        const float *g = gu + m * 2 * F;
        float *a = gu + m * F; /* packs in place: a[i] only reads g[i] and g[F + i], both at or after a[i] */
        for (int64_t i = 0; i < F; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * g[F + i];
    }
    if ((rc = matvec(&L->down, F, gu, M, o, threads))) goto done;
    for (int64_t i = 0; i < M * dim; i++) x[i] += o[i];
done:
    free(buf);
    return rc;
}
