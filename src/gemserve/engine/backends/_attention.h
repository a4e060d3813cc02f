/* Attention of gemserve's own in place of llama.cpp's flash attention, for every pass; included by _q5_0.c, whose
library llama.cpp's CPU backend calls through its PLT.

Why: llama.cpp's CPU flash attention (`ggml_compute_forward_flash_attn_ext`) picks its arithmetic by the shape of
the pass. One query row over 512 or more cache cells has its cells split among the threads, whose partial sums are
merged; rows of a pass of 32 or more tokens go through tiles of cells; others take the cells one at a time with
half-precision sums of the values. Each path rounds differently, so a position's attention - and from there its
logits - depended on how many tokens its pass held: greedy output changed with prompt lookup's proposals, with the
other sequences decoding in the same pass and with how many cells the cache held (on Gemma 3 270M, logits moved by
up to 1.1 between a position computed alone and in a pass of 2 tokens, once the cache held 512 cells).

Here each query row (one head of one token) is computed the same way whatever else its pass holds: its scores with
the cells its mask lets it see (not -inf), in cell order, in chunks of ATTN_CHUNK of those cells; per chunk the
maximum so far, the weights exp(s - max) (a polynomial of fixed steps), their sum and the values weighted by them,
in single precision, in order. The cells a row sees and their order do not change with the pass: the row's sums
are the same bits in a pass of 1 token, of 9, or beside 7 other sequences, and on any number of threads (rows are
shared among them whole). What it does depend on is where llama.cpp put the sequence's cells: it fills the
holes that freed cells leave, so a later token of a sequence can sit before its earlier ones (seen: a request's
first output token in cell 0, freed by an earlier request, its prompt in cells 120-124), and its cells are then
summed in that order (Gemma's log-probabilities moved by up to 0.06). So the same placement gives the same bits,
and a cache with another history may not; seeded requests run in a context of their own (llamacpp.py), whose
placement nothing else changes. The matrix products around it are made so by
the kernels in this library and by llama.cpp's plain path below 32 tokens; the engine loads models without
llama.cpp's repacked Q4_K products, whose 4-token tiles round otherwise. The query stays in single precision
(llama.cpp's one-cell-at-a-time path rounds it to f16 first), so results differ from llama.cpp's by more than the
order of sums, a little more precise here.

Prompts too: a 1000-token prompt takes 0.93 (Qwen) and 0.96 (Gemma) of the time it took with llama.cpp's tiled
path, whose sums also depended on which cache cells the sequence sat in (the same prompt's logits up to 1.3 apart
between two slots), so a prompt computed whole and the same prompt continued from a kept cache could answer
differently; now they are the same bits (`benchmarks/q5_0.py prompts`). Left to llama.cpp: shapes this does not
cover (other cache types than f16, ALiBi, attention sinks, key heads not a multiple of 16 wide, value heads not
a multiple of 32 or wider than 512, caches split in streams), and everything when `q5_0_attention_check` could not
confirm that ggml's tensor layout is the one mirrored here. That check runs once, before any pass (q5_0.install(),
as the first model loads): every thread of a pass must decide alike, llama.cpp's function having barriers inside. */

#define ATTN_CHUNK 256
#define ATTN_MAX_DV 512
#define TYPE_F32 0
#define TYPE_F16 1

/* ggml.h's struct ggml_tensor, as the llama.cpp this runs against lays it out; `attention_check` confirms it. */
struct ggml_tensor_view {
    int type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int op;
    int32_t op_params[16];
    int32_t flags;
    struct ggml_tensor_view *src[10];
    struct ggml_tensor_view *view_src;
    size_t view_offs;
    void *data;
    char name[64];
    void *extra;
    char padding[8];
};

typedef void (*attention_fn)(const struct compute_params *, struct ggml_tensor_view *);
static _Atomic(attention_fn) attention_original;
static atomic_int attention_enabled = 0;    /* set once attention_check confirms the layout */
static atomic_int attention_op = -1;        /* ggml's op number for FLASH_ATTN_EXT, from attention_check */
static atomic_llong attention_rows;         /* query rows (token x head) computed here, for tests */
/* Passes of fewer tokens than this are computed here: all of them, unless a benchmark gives passes of that many
   tokens and more back to llama.cpp (`benchmarks/q5_0.py prompts`). Only between passes. */
static atomic_llong attention_max_rows = INT64_MAX;
void q5_0_attention_set_max_rows(int64_t rows) { atomic_store(&attention_max_rows, rows); }

void ggml_compute_forward_flash_attn_ext(const struct compute_params *params, struct ggml_tensor_view *dst);

/* e^x for 8 lanes: Cephes' range reduction and polynomial (relative error about 2e-7), the same steps for every
   lane and every call. Arguments below -87 give about 0 (they are differences from a maximum, never above 0). */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x); /* the constant first: a NaN argument stays NaN */
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AVX2 static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* q (f32) . k (f16), n a multiple of 16. */
AVX2 static inline float dot_f16(const float *q, const uint16_t *k, int64_t n) {
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8),
                            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i + 8))), b);
    }
    return sum8(_mm256_add_ps(a, b));
}

AVX2 static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

/* Whether all 16 mask values from `m` are -inf (f16 0xFC00, as llama.cpp writes the cells a row may not see). */
AVX2 static inline bool hidden16(const uint16_t *m) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)m);
    return _mm256_movemask_epi8(_mm256_cmpeq_epi16(v, _mm256_set1_epi16((short)0xFC00))) == -1;
}

/* One query row: `out` (dv floats) = softmax(softcap(scale * q.K) + mask) V over the cells `mask` lets it see
   (`scale` already divided by a non-zero softcap, as llama.cpp does). */
AVX2 static void attend_row(const float *q, const struct ggml_tensor_view *k, const struct ggml_tensor_view *v,
                            const uint16_t *mask, int64_t ik2, int64_t iv2, float scale, float softcap, float *out) {
    const int64_t dk = k->ne[0], dv = v->ne[0], cells = k->ne[1];
    const char *kbase = (const char *)k->data + ik2 * k->nb[2], *vbase = (const char *)v->data + iv2 * v->nb[2];
    float acc[ATTN_MAX_DV] __attribute__((aligned(32)));
    float s[ATTN_CHUNK + 8] __attribute__((aligned(32)));
    int32_t at[ATTN_CHUNK];
    memset(acc, 0, sizeof(float) * (size_t)dv);
    float m = -INFINITY, total = 0.0f;
    int64_t ic = 0;
    while (ic < cells) {
        int n = 0; /* the next chunk of the cells this row sees, and their scores */
        for (; ic < cells && n < ATTN_CHUNK; ic++) {
            /* other sequences' cells, hidden from this row, come in runs: 16 at a time */
            while (mask && ic + 16 <= cells && hidden16(mask + ic)) ic += 16;
            if (ic == cells) break;
            const float mv = mask ? f16_to_f32(mask[ic]) : 0.0f;
            if (mv == -INFINITY) continue;
            float score = dot_f16(q, (const uint16_t *)(kbase + ic * k->nb[1]), dk) * scale;
            if (softcap != 0.0f) score = softcap * tanhf(score);
            s[n] = score + mv;
            at[n++] = (int32_t)ic;
        }
        if (n == 0) break;
        float cm = m;
        for (int j = 0; j < n; j++) cm = s[j] > cm ? s[j] : cm;
        if (cm > m) { /* a new maximum: what was summed so far is scaled down to it */
            if (m != -INFINITY) {
                const float r = expf(m - cm);
                total *= r;
                for (int64_t d = 0; d < dv; d += 8)
                    _mm256_store_ps(acc + d, _mm256_mul_ps(_mm256_load_ps(acc + d), _mm256_set1_ps(r)));
            }
            m = cm;
        }
        for (int j = n; j < n + 8; j++) s[j] = m; /* the lanes past the end weigh exp(0); never read below */
        for (int j = 0; j < n; j += 8)
            _mm256_store_ps(s + j, exp8(_mm256_sub_ps(_mm256_load_ps(s + j), _mm256_set1_ps(m))));
        for (int j = 0; j < n; j++) total += s[j];
        for (int64_t d0 = 0; d0 < dv; d0 += 32) { /* 32 of the values' columns at a time, in registers */
            __m256 a0 = _mm256_load_ps(acc + d0), a1 = _mm256_load_ps(acc + d0 + 8);
            __m256 a2 = _mm256_load_ps(acc + d0 + 16), a3 = _mm256_load_ps(acc + d0 + 24);
            for (int j = 0; j < n; j++) {
                const uint16_t *row = (const uint16_t *)(vbase + at[j] * v->nb[1]) + d0;
                const __m256 w = _mm256_set1_ps(s[j]);
                a0 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)row)), a0);
                a1 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 8))), a1);
                a2 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 16))), a2);
                a3 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 24))), a3);
            }
            _mm256_store_ps(acc + d0, a0);
            _mm256_store_ps(acc + d0 + 8, a1);
            _mm256_store_ps(acc + d0 + 16, a2);
            _mm256_store_ps(acc + d0 + 24, a3);
        }
    }
    const float inv = total == 0.0f ? 0.0f : 1.0f / total;
    for (int64_t d = 0; d < dv; d++) out[d] = acc[d] * inv;
}

/* Whether this library computes `dst`: shapes and types it covers (in a pass of fewer than attention_max_rows
   tokens). */
static bool attention_takes(const struct ggml_tensor_view *dst) {
    if (!atomic_load_explicit(&attention_enabled, memory_order_relaxed) ||
        dst->op != atomic_load_explicit(&attention_op, memory_order_relaxed))
        return false;
    const struct ggml_tensor_view *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    float max_bias;
    memcpy(&max_bias, dst->op_params + 1, sizeof(float));
    for (int i = 4; i < 10; i++)
        if (dst->src[i]) return false; /* attention sinks, or an input this does not know */
    return q && k && v && dst->type == TYPE_F32 && q->type == TYPE_F32 && k->type == TYPE_F16 &&
           v->type == TYPE_F16 && (!mask || (mask->type == TYPE_F16 && mask->ne[3] == 1 && mask->nb[0] == 2)) &&
           max_bias == 0.0f && q->ne[1] < atomic_load_explicit(&attention_max_rows, memory_order_relaxed) &&
           q->ne[3] == 1 && k->ne[3] == 1 && v->ne[3] == 1 &&
           q->ne[0] == k->ne[0] && k->ne[0] % 16 == 0 && v->ne[0] % 32 == 0 && v->ne[0] <= ATTN_MAX_DV &&
           k->ne[1] == v->ne[1] && k->ne[2] > 0 && v->ne[2] > 0 && q->ne[2] % k->ne[2] == 0 &&
           q->ne[2] % v->ne[2] == 0 && q->nb[0] == 4 && k->nb[0] == 2 && v->nb[0] == 2 && dst->nb[0] == 4 &&
           dst->ne[0] == v->ne[0] && dst->ne[1] == q->ne[2] && dst->ne[2] == q->ne[1] &&
           (!mask || (mask->ne[0] >= k->ne[1] && mask->ne[1] >= q->ne[1] && mask->ne[2] > 0));
}

AVX2 static void attention(const struct compute_params *params, struct ggml_tensor_view *dst) {
    const struct ggml_tensor_view *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    float scale, softcap;
    memcpy(&scale, dst->op_params + 0, sizeof(float));
    memcpy(&softcap, dst->op_params + 2, sizeof(float));
    if (softcap != 0.0f) scale /= softcap;
    const int64_t rows = q->ne[1], heads = q->ne[2];
    int64_t u0, u1; /* this thread's (head, token) rows, head-major as llama.cpp numbers them */
    share(rows * heads, params->ith, params->nth, &u0, &u1);
    for (int64_t u = u0; u < u1; u++) {
        const int64_t head = u / rows, token = u % rows;
        const float *qrow = (const float *)((const char *)q->data + token * q->nb[1] + head * q->nb[2]);
        const uint16_t *mrow = mask ? (const uint16_t *)((const char *)mask->data + token * mask->nb[1] +
                                                          (head % mask->ne[2]) * mask->nb[2])
                                    : NULL;
        float *out = (float *)((char *)dst->data + (head + token * dst->ne[1]) * dst->nb[1]);
        attend_row(qrow, k, v, mrow, head / (heads / k->ne[2]), head / (heads / v->ne[2]), scale, softcap, out);
    }
    atomic_fetch_add_explicit(&attention_rows, (long long)(u1 - u0), memory_order_relaxed);
}

/* llama.cpp's own, looked up in its libggml-cpu as llama_cpps() does, else the next definition after this library's
   (the one llama.cpp would have called). There is always one where llama.cpp called this; were there none, the
   process could not go on: there would be no attention to compute. */
static attention_fn attention_theirs(void) {
    attention_fn fn = atomic_load_explicit(&attention_original, memory_order_acquire);
    if (fn) return fn;
    fn = (attention_fn)llama_cpp_symbol("ggml_compute_forward_flash_attn_ext",
                                        (const void *)ggml_compute_forward_flash_attn_ext);
    if (!fn) fn = (attention_fn)dlsym(RTLD_NEXT, "ggml_compute_forward_flash_attn_ext");
    if (!fn || fn == (attention_fn)ggml_compute_forward_flash_attn_ext) {
        fputs("gemserve: llama.cpp's flash attention was not found\n", stderr);
        abort();
    }
    atomic_store_explicit(&attention_original, fn, memory_order_release);
    return fn;
}

void ggml_compute_forward_flash_attn_ext(const struct compute_params *params, struct ggml_tensor_view *dst) {
    if (attention_takes(dst)) {
        attention(params, dst);
        return;
    }
    attention_theirs()(params, dst);
}

/* Confirms the mirrored tensor layout on a flash-attention node built by the ggml in this process, and
   finds llama.cpp's own function; only then does this library take attention over. 1 if so. */
typedef struct { size_t mem_size; void *mem_buffer; bool no_alloc; } ggml_init_params_view;

int q5_0_attention_check(void) {
    void *base = dlopen("libggml-base.so.0", RTLD_LAZY | RTLD_NOLOAD);
    int ok = 0;
    if (base) {
        attention_fn theirs = (attention_fn)llama_cpp_symbol("ggml_compute_forward_flash_attn_ext",
                                                             (const void *)ggml_compute_forward_flash_attn_ext);
        void *(*init)(ggml_init_params_view) = (void *(*)(ggml_init_params_view))dlsym(base, "ggml_init");
        void (*release)(void *) = (void (*)(void *))dlsym(base, "ggml_free");
        void *(*data_of)(void *) = (void *(*)(void *))dlsym(base, "ggml_get_data");
        struct ggml_tensor_view *(*tensor)(void *, int, int64_t, int64_t, int64_t, int64_t) =
            (struct ggml_tensor_view * (*)(void *, int, int64_t, int64_t, int64_t, int64_t))
                dlsym(base, "ggml_new_tensor_4d");
        struct ggml_tensor_view *(*fa)(void *, void *, void *, void *, void *, float, float, float) =
            (struct ggml_tensor_view * (*)(void *, void *, void *, void *, void *, float, float, float))
                dlsym(base, "ggml_flash_attn_ext");
        void *ctx = (theirs && init && release && data_of && tensor && fa)
                        ? init((ggml_init_params_view){1 << 20, NULL, false})
                        : NULL;
        if (ctx) {
            struct ggml_tensor_view *q = tensor(ctx, TYPE_F32, 64, 3, 4, 1);
            struct ggml_tensor_view *k = tensor(ctx, TYPE_F16, 64, 96, 2, 1);
            struct ggml_tensor_view *v = tensor(ctx, TYPE_F16, 64, 96, 2, 1);
            struct ggml_tensor_view *dst = fa(ctx, q, k, v, NULL, 0.125f, 0.0f, 30.0f);
            float p[3];
            memcpy(p, dst->op_params, sizeof p);
            ok = q->type == TYPE_F32 && k->type == TYPE_F16 && q->ne[0] == 64 && q->ne[1] == 3 && q->ne[2] == 4 &&
                 q->ne[3] == 1 && q->nb[0] == 4 && q->nb[1] == 256 && k->nb[1] == 128 && v->ne[1] == 96 &&
                 dst->type == TYPE_F32 && dst->src[0] == q && dst->src[1] == k && dst->src[2] == v &&
                 dst->src[3] == NULL && dst->src[4] == NULL && dst->ne[0] == 64 && dst->ne[1] == 4 &&
                 dst->ne[2] == 3 && dst->nb[0] == 4 && p[0] == 0.125f && p[1] == 0.0f && p[2] == 30.0f &&
                 q->data != NULL && q->data == data_of(q) && k->data == data_of(k) && dst->data == data_of(dst) &&
                 dst->view_src == NULL;
            if (ok) {
                atomic_store(&attention_op, dst->op);
                atomic_store_explicit(&attention_original, theirs, memory_order_release);
            }
            release(ctx);
        }
    }
    if (base) dlclose(base);
    atomic_store(&attention_enabled, ok);
    return ok;
}

/* Only between passes: the threads of one pass must decide alike. Never before attention_check confirmed. */
void q5_0_attention_set_enabled(int on) {
    atomic_store(&attention_enabled, on && atomic_load(&attention_op) >= 0);
}
int64_t q5_0_attention_rows(void) { return atomic_load(&attention_rows); }
int q5_0_attention_in_use(void) { return atomic_load(&attention_enabled); }
