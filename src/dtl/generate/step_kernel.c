/* DTL's decode step on the CPU, whole: one new token per row through every block, the final
 * LayerNorm and the vocabulary head, in one call (`dtl.generate.step_kernel` builds and calls it).
 *
 * Why a kernel of our own: a one-token step of the `small` preset is ~190 calls into torch, each
 * with a fixed cost of a few microseconds (dispatch, an OpenMP fork, a join), ~0.6 ms a step that
 * no eager layout removes (docs/benchmarks.md, "Decode, session 10"). Here the step is one OpenMP
 * parallel region: the threads stay up from the first product to the last, meeting at a barrier
 * between the phases that need each other's results.
 *
 * Shapes (B rows, d = H * d_k model width, F the feed-forward width, V the vocabulary):
 *   x (B, d) the residual stream, fp32 always; q|k|v (B, 3d); attention out (B, d); ff (B, F).
 *   Weights are nn.Linear's (out, in) packed in panels of 32 outputs, (ceil(out/32), in, 32)
 *   (`dtl.generate.step_kernel.panels`), in one of three formats (`wtype`): fp32; bf16 (the top
 *   16 bits of an fp32); int8 with one fp32 scale per output (w = scale[o] * q[o][i]). Biases,
 *   LayerNorms and scales are fp32; every sum is fp32.
 *   The KV cache: fp32, per layer (B, H, max_len, d_k) with strides (sb, sh, d_k, 1).
 *
 * A product streams each panel once per step, whatever B: every input value multiplies a row
 * of 32 weights (two vectors) for up to 8 rows at once, so there are no horizontal sums and the
 * weights are read from memory once (an earlier form, a dot product per output row, spent more
 * time summing its vectors than reading them: int8 2x slower, fp32 at batch 8 1.8x).
 */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a compiler without OpenMP (Apple's clang): the same step on one thread */
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

/* Whether this build runs a step on several threads (built with OpenMP). */
int dtl_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE4_1__)
#include <immintrin.h>
#endif

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

typedef struct {
    const void *w;      /* (panels, in, PANEL): W (out, in) in panels of 32 outputs, zero-padded */
    const float *scale; /* (out,) for int8, else NULL */
    const float *bias;  /* (out,) */
    int32_t out, in;
} Linear;

typedef struct {
    Linear qkv, wo, up, down;
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float eps1, eps2;
} Block;

typedef struct {
    int32_t n_layers, d, n_heads, d_k, d_ff, vocab, n_pos, wtype, emb_bf16;
    float embed_scale, eps_f;
    const void *embedding; /* (V, d), fp32 or bf16 (emb_bf16) */
    const float *pe;       /* (n_pos, d) */
    const Block *blocks;   /* n_layers of them */
    Linear head;
    const float *lnf_w, *lnf_b;
} Model;

typedef struct {
    float **keys, **values; /* n_layers pointers to (B, H, max_len, d_k) */
    int64_t sb, sh;         /* element strides of a row and of a head */
} Cache;

/* A vector of VW floats, the CPU's widest (GCC/Clang vector extensions), and how many input
 * rows a product takes at once (ROWS_MAX: more share each weight load, until their sums no
 * longer fit in registers). A wider vector than the CPU's is lowered through memory: 3-30x
 * slower, measured with AVX2 and SSE2 builds on the AVX-512 box. */
#if defined(__AVX512F__)
#define VW 16
#define ROWS_MAX 8
#elif defined(__AVX__) /* 4 rows: 1.3-1.7x faster than 2 at batch 8 on AVX2 or SSE */
#define VW 8
#define ROWS_MAX 4
#else
#define VW 4
#define ROWS_MAX 4
#endif
#define PANEL 32          /* outputs per panel */
#define NV (PANEL / VW)   /* vectors per panel row */
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vf_u __attribute__((vector_size(VW * 4), aligned(4)));    /* any address */
typedef uint16_t vh_u __attribute__((vector_size(VW * 2), aligned(2)));
typedef uint32_t vw __attribute__((vector_size(VW * 4)));
typedef int8_t vb_u __attribute__((vector_size(VW), aligned(1)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

/* Load VW weights of each format as fp32 (bf16: the top half of an fp32; int8: its value). */
static inline vf load_f32(const float *p) { return *(const vf_u *)p; }
static inline vf load_bf16(const uint16_t *p) {
    return (vf)(__builtin_convertvector(*(const vh_u *)p, vw) << 16);
}
static inline vf load_i8(const int8_t *p) { /* GCC 12 widens int8 lanes one at a time: by hand */
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif defined(__SSE4_1__) && VW == 4
    int32_t four;
    memcpy(&four, p, 4);
    return (vf)_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four)));
#else
    return __builtin_convertvector(__builtin_convertvector(*(const vb_u *)p, vi), vf);
#endif
}

/* The panels [p0, p1) of a product against RB input rows:
 * y[r][o] = sum_i x[r][i] W[o][i] (* scale[o]) + bias[o] (+ add[r][o]) (ReLU).
 * W is packed in panels of PANEL outputs: panel p holds W[p*32 + j][i] at [p][i][j], so a panel
 * streams from memory in order and each input value multiplies a row of 32 weights at once;
 * the RB rows share every load of the weights. PREFETCH bytes ahead are asked for as they go:
 * the hardware's prefetcher alone kept too few lines in flight (2x slower, measured). */
#define PREFETCH 2048
#define DEFINE_PANELS(NAME, WT, LOAD, RB)                                                        \
    static void NAME(const Linear *L, const float *x, float *y, const float *add, int relu,     \
                     int p0, int p1) {                                                            \
        const int n = L->in, out = L->out;                                                        \
        for (int p = p0; p < p1; p++) {                                                           \
            const WT *w = (const WT *)L->w + (int64_t)p * n * PANEL;                              \
            vf acc[RB][NV];                                                                       \
            _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)                                  \
                _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) acc[r][j] = (vf){0};         \
            for (int i = 0; i < n; i++, w += PANEL) {                                             \
                __builtin_prefetch((const char *)w + PREFETCH, 0, 0);                             \
                if (sizeof(WT) == 4) __builtin_prefetch((const char *)w + PREFETCH + 64, 0, 0);   \
                vf wv[NV];                                                                        \
                _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) wv[j] = LOAD(w + j * VW);    \
                _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++) {                            \
                    const float xi = x[(int64_t)r * n + i];                                       \
                    _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) acc[r][j] += wv[j] * xi; \
                }                                                                                 \
            }                                                                                     \
            for (int r = 0; r < RB; r++)                                                          \
                finish(L, (const float *)acc[r], p, y + (int64_t)r * out,                         \
                       add ? add + (int64_t)r * out : NULL, relu);                                \
        }                                                                                         \
    }

/* A panel's sums of one row (PANEL of them), finished: scale, bias, the residual, ReLU;
 * stored for the outputs the panel has (the last one may be short). */
static inline void finish(const Linear *L, const float *s, int p, float *y, const float *add,
                          int relu) {
    const int o0 = p * PANEL, m = L->out - o0 < PANEL ? L->out - o0 : PANEL;
    for (int j = 0; j < m; j++) {
        float v = s[j];
        if (L->scale) v *= L->scale[o0 + j];
        v += L->bias[o0 + j];
        if (add) v += add[o0 + j];
        if (relu && v < 0.f) v = 0.f;
        y[o0 + j] = v;
    }
}

#define DEFINE_FORMAT(SUFFIX, WT, LOAD)                                                          \
    DEFINE_PANELS(panels_##SUFFIX##_1, WT, LOAD, 1)                                              \
    DEFINE_PANELS(panels_##SUFFIX##_2, WT, LOAD, 2)                                              \
    DEFINE_PANELS(panels_##SUFFIX##_4, WT, LOAD, 4)                                              \
    DEFINE_PANELS(panels_##SUFFIX##_8, WT, LOAD, 8)                                              \
    static void panels_##SUFFIX(const Linear *L, const float *x, int B, float *y,                \
                                const float *add, int relu, int p0, int p1) {                     \
        for (int b = 0; b < B;) { /* rows 8, 4, 2, 1 at a time (up to ROWS_MAX) */              \
            const int64_t xo = (int64_t)b * L->in, yo = (int64_t)b * L->out;                     \
            const float *ad = add ? add + yo : NULL;                                              \
            const int left = B - b < ROWS_MAX ? B - b : ROWS_MAX;                                 \
            if (left >= 8) { panels_##SUFFIX##_8(L, x + xo, y + yo, ad, relu, p0, p1); b += 8; } \
            else if (left >= 4) { panels_##SUFFIX##_4(L, x + xo, y + yo, ad, relu, p0, p1); b += 4; } \
            else if (left >= 2) { panels_##SUFFIX##_2(L, x + xo, y + yo, ad, relu, p0, p1); b += 2; } \
            else { panels_##SUFFIX##_1(L, x + xo, y + yo, ad, relu, p0, p1); b += 1; }          \
        }                                                                                         \
    }

DEFINE_FORMAT(f32, float, load_f32)
DEFINE_FORMAT(bf16, uint16_t, load_bf16)
DEFINE_FORMAT(i8, int8_t, load_i8)

/* [*lo, *hi): this thread's share of n items, split evenly. */
static inline void share(int n, int *lo, int *hi) {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *lo = (int)((int64_t)n * t / nt);
    *hi = (int)((int64_t)n * (t + 1) / nt);
}

/* Where the step's threads wait for each other between phases. OpenMP's own barrier puts a
 * waiting thread to sleep at once where idle threads sleep (OMP_WAIT_POLICY=PASSIVE, what
 * `import dtl` sets), and waking it costs ~25 us, 37 times a step: a step of the small preset
 * in int8 took 1.6 ms instead of 0.6. The threads of one step arrive within microseconds of
 * each other, so they spin here (SPIN pauses, tens of microseconds), and only then yield the
 * core, where another process holds it (the waiting thread is then not the one to run). */
#define SPIN 4000
typedef struct {
    atomic_int arrived;
    atomic_int phase;
} Barrier;

static void barrier_wait(Barrier *b, int *phase) {
    const int next = *phase + 1, n = omp_get_num_threads();
    *phase = next;
    if (n == 1) return;
    if (atomic_fetch_add(&b->arrived, 1) == n - 1) { /* the last one in lets the others go */
        atomic_store(&b->arrived, 0);
        atomic_store(&b->phase, next);
        return;
    }
    for (int i = 0; atomic_load(&b->phase) != next; i++) {
        if (i < SPIN) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

/* One thread's share of a product: whole panels, split evenly (no barrier here). */
static void product(const Model *m, const Linear *L, const float *x, int B, float *y,
                    const float *add, int relu) {
    int p0, p1;
    share((L->out + PANEL - 1) / PANEL, &p0, &p1);
    if (p0 >= p1) return;
    if (m->wtype == W_F32) panels_f32(L, x, B, y, add, relu, p0, p1);
    else if (m->wtype == W_BF16) panels_bf16(L, x, B, y, add, relu, p0, p1);
    else panels_i8(L, x, B, y, add, relu, p0, p1);
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* x[b] = LayerNorm(x[b]) for this thread's share of the rows (as torch: biased variance) */
static void layer_norm_rows(float *x, int B, int d, const float *w, const float *bias,
                            float eps) {
    int lo, hi;
    share(B, &lo, &hi);
    for (int b = lo; b < hi; b++) {
        float *r = x + (int64_t)b * d;
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < d; i++) mean += r[i];
        mean /= d;
        for (int i = 0; i < d; i++) { const double c = r[i] - mean; var += c * c; }
        var /= d;
        const float rstd = (float)(1.0 / sqrt(var + eps)), mu = (float)mean;
        for (int i = 0; i < d; i++) r[i] = (r[i] - mu) * rstd * w[i] + bias[i];
    }
}

/* Store row r's new key and value of head h (row r = b * T + t, the token at cache slot
 * `slot` of batch row b) in the cache. */
static void store(const Model *m, const Cache *c, int layer, int b, int h, int slot,
                  const float *qkv_row) {
    const int d = m->d, dk = m->d_k;
    const int64_t at = b * c->sb + h * c->sh + (int64_t)slot * dk;
    memcpy(c->keys[layer] + at, qkv_row + d + h * dk, sizeof(float) * dk);
    memcpy(c->values[layer] + at, qkv_row + 2 * d + h * dk, sizeof(float) * dk);
}

/* One head of one new token: attend over cache slots 0..slot of its batch row b, those `mask`
 * marks real, and its own slot always (the forward's rule). out_row: its (d,) attention
 * output; scores: (slot + 1,) of this thread's. */
static void attend(const Model *m, const Cache *c, int layer, int b, int h, int slot,
                   const uint8_t *mask, int64_t mask_stride, const float *qkv_row,
                   float *out_row, float *scores) {
    const int dk = m->d_k;
    const float *q = qkv_row + h * dk;
    const float *K = c->keys[layer] + b * c->sb + h * c->sh;
    const float *Vv = c->values[layer] + b * c->sb + h * c->sh;
    const uint8_t *valid = mask ? mask + b * mask_stride : NULL;
    const float scale = 1.0f / sqrtf((float)dk);
    float best = -INFINITY;
    for (int j = 0; j <= slot; j++) {
        if (valid && !valid[j] && j != slot) { scores[j] = -INFINITY; continue; }
        const float *k = K + (int64_t)j * dk;
        float s = 0.f;
        #pragma omp simd reduction(+ : s)
        for (int i = 0; i < dk; i++) s += q[i] * k[i];
        s *= scale;
        scores[j] = s;
        if (s > best) best = s;
    }
    float total = 0.f;
    for (int j = 0; j <= slot; j++) {
        const float e = scores[j] == -INFINITY ? 0.f : expf(scores[j] - best);
        scores[j] = e;
        total += e;
    }
    float *o = out_row + h * dk;
    for (int i = 0; i < dk; i++) o[i] = 0.f;
    for (int j = 0; j <= slot; j++) {
        if (scores[j] == 0.f) continue;
        const float p = scores[j] / total, *v = Vv + (int64_t)j * dk;
        #pragma omp simd
        for (int i = 0; i < dk; i++) o[i] += p * v[i];
    }
}

/* T new tokens per row through the cache, and the next-token logits after each row's last.
 * tokens (B, T); pos: the first cache slot they take (its length before); mask: the cache's key
 * mask (B rows of mask_stride bytes, the new slots already written) when it holds padding, else
 * NULL; logits (B, V) out. work: B * T * (2d + 3d + d + F) + B * d + threads * (pos + T) floats.
 * Rows r = b * T + t run together through every product. A one-token step (T = 1) stores and
 * attends in one phase; with T > 1 every new key is stored before any query attends.
 * Returns 0, or 1 + the first row (b * T + t) whose token id is outside the vocabulary (nothing
 * run then). */
int dtl_decode_step(const Model *m, const Cache *c, int B, int T, int pos,
                    const int64_t *tokens, const uint8_t *mask, int64_t mask_stride,
                    float *logits, float *work, int threads) {
    const int d = m->d, F = m->d_ff, H = m->n_heads, R = B * T;
    float *x = work, *tmp = x + (int64_t)R * d, *qkv = tmp + (int64_t)R * d;
    float *att = qkv + (int64_t)R * 3 * d, *ff = att + (int64_t)R * d;
    float *last = ff + (int64_t)R * F, *scores_all = last + (int64_t)B * d;
    for (int r = 0; r < R; r++)
        if (tokens[r] < 0 || tokens[r] >= m->vocab) return r + 1; /* row r's id is no token */
    Barrier barrier = {0, 0};
    #pragma omp parallel num_threads(threads)
    {
        int phase = 0, lo, hi;
        float *scores = scores_all + (int64_t)omp_get_thread_num() * (pos + T);
        share(R, &lo, &hi);
        for (int r = lo; r < hi; r++) { /* embedding * scale + the position's sinusoid */
            const int b = r / T, slot = pos + r % T;
            int p = slot;
            if (mask) { /* a row's position counts its real tokens before it */
                p = 0;
                for (int j = 0; j < slot; j++) p += mask[b * mask_stride + j] != 0;
            }
            const float *pe = m->pe + (int64_t)p * d;
            float *x_r = x + (int64_t)r * d;
            if (m->emb_bf16) {
                const uint16_t *e = (const uint16_t *)m->embedding + tokens[r] * d;
                for (int i = 0; i < d; i++) x_r[i] = bf16_to_f32(e[i]) * m->embed_scale + pe[i];
            } else {
                const float *e = (const float *)m->embedding + tokens[r] * d;
                for (int i = 0; i < d; i++) x_r[i] = e[i] * m->embed_scale + pe[i];
            }
        }
        barrier_wait(&barrier, &phase);
        for (int l = 0; l < m->n_layers; l++) {
            const Block *blk = &m->blocks[l];
            product(m, &blk->qkv, x, R, qkv, NULL, 0);
            barrier_wait(&barrier, &phase);
            share(R * H, &lo, &hi);
            if (T > 1) { /* every new key in place before any query reads it */
                for (int rh = lo; rh < hi; rh++) {
                    const int r = rh / H;
                    store(m, c, l, r / T, rh % H, pos + r % T, qkv + (int64_t)r * 3 * d);
                }
                barrier_wait(&barrier, &phase);
            }
            for (int rh = lo; rh < hi; rh++) {
                const int r = rh / H, b = r / T, h = rh % H, slot = pos + r % T;
                const float *qkv_r = qkv + (int64_t)r * 3 * d;
                if (T == 1) store(m, c, l, b, h, slot, qkv_r);
                attend(m, c, l, b, h, slot, mask, mask_stride, qkv_r, att + (int64_t)r * d,
                       scores);
            }
            barrier_wait(&barrier, &phase);
            product(m, &blk->wo, att, R, tmp, x, 0); /* + the residual */
            barrier_wait(&barrier, &phase);
            layer_norm_rows(tmp, R, d, blk->ln1_w, blk->ln1_b, blk->eps1);
            barrier_wait(&barrier, &phase);
            product(m, &blk->up, tmp, R, ff, NULL, 1);
            barrier_wait(&barrier, &phase);
            product(m, &blk->down, ff, R, x, tmp, 0); /* + the residual */
            barrier_wait(&barrier, &phase);
            layer_norm_rows(x, R, d, blk->ln2_w, blk->ln2_b, blk->eps2);
            barrier_wait(&barrier, &phase);
        }
        share(B, &lo, &hi); /* each row's last token only goes through the head */
        for (int b = lo; b < hi; b++)
            memcpy(last + (int64_t)b * d, x + ((int64_t)b * T + T - 1) * d, sizeof(float) * d);
        layer_norm_rows(last, B, d, m->lnf_w, m->lnf_b, m->eps_f);
        barrier_wait(&barrier, &phase);
        product(m, &m->head, last, B, logits, NULL, 0);
    }
    return 0;
}
