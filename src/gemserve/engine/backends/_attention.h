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
the cells its mask lets it see (not -inf), in the order of their positions, in chunks of ATTN_CHUNK of those
cells; per chunk the maximum so far, the weights exp(s - max) (a polynomial of fixed steps), their sum and the
values weighted by them, in single precision, in order. The cells a row sees and their order do not change with
the pass: the row's sums are the same bits in a pass of 1 token, of 9, or beside 7 other sequences, and on any
number of threads (rows are shared among them whole). Nor with where llama.cpp put the cells: it fills the holes
that forgotten sequences leave, so a later token of a sequence can sit before its earlier ones (seen: a request's
first output token in cell 0, freed by an earlier request, its prompt in cells 120-124), and summed in cell
order such a row's bits depended on the cache's history (Gemma's log-probabilities 0.06 apart). So the cells'
positions are noted as llama.cpp writes keys into the cache (`ggml_compute_forward_set_rows`, with the positions
the keys were rotated with: `ggml_compute_forward_rope`, both also called through the PLT), and a row whose cells
are out of order is put in order (a bucket per position: linear in its cells); keys read back from a saved state
take their positions from the order llama.cpp writes them (`ggml_backend_tensor_set`). A row that sees a cell
whose position is not known (more caches in use than POS_TABLES) keeps cell order. The matrix products around it
are made so by the kernels in this library and by llama.cpp's plain path (its tiled path is declined at every
size, `_q5_0.c`); the engine loads models without
llama.cpp's repacked Q4_K products, whose 4-token tiles round otherwise. The query stays in single precision
(llama.cpp's one-cell-at-a-time path rounds it to f16 first), so results differ from llama.cpp's by more than the
order of sums, a little more precise here.

Prompts too: a 1000-token prompt took 0.93 (Qwen) and 0.96 (Gemma) of the time it took with llama.cpp's
attention (with llama.cpp's tiled products; without them, the default since, 1.04 and 1.01 of that), whose sums also depended on which cache cells the sequence sat in (the same prompt's logits up to 1.3 apart
between two slots), so a prompt computed whole and the same prompt continued from a kept cache could answer
differently; now they are the same bits (`benchmarks/q5_0.py prompts`). Left to llama.cpp: shapes this does not
cover (other cache types than f16, ALiBi, attention sinks, key heads not a multiple of 16 wide, value heads not
a multiple of 32 or wider than 512, caches split in streams), and everything when `q5_0_attention_check` could not
confirm that ggml's tensor layout is the one mirrored here. That check runs once, before any pass (q5_0.install(),
as the first model loads): every thread of a pass must decide alike, llama.cpp's function having barriers inside.
It also confirms where a rotation's positions and a cache write's cells are found (`positions_check`); without
that, rows are summed in cell order. */

#define ATTN_CHUNK 256
#define ATTN_MAX_DV 512
#define TYPE_F32 0
#define TYPE_F16 1
#define TYPE_I32 26
#define TYPE_I64 27

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
static _Atomic(void *) attention_original;
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

/* Where a cache's cells sit in their sequences: each cell's position, recorded as llama.cpp writes keys into the
cache (`ggml_compute_forward_set_rows`, with the positions the keys were rotated with: `ggml_compute_forward_rope`),
so that a row can sum its cells in position order whatever cells llama.cpp chose. One table per cache tensor (a
layer's keys), found by its data; -1 where a cell's position is not known (never written since the table was
made). Keys read back from a saved state are written otherwise (`ggml_backend_tensor_set`): between
q5_0_positions_loading(first) and q5_0_positions_loading(-1) the rows written into a known cache take positions
first, first + 1, ... in the order written (llama.cpp writes a sequence's cells in position order, layer by
layer). At most POS_TABLES tables: a new one replaces the one least recently used that no pass is reading (a
replaced table's cache, if still in use, is summed in cell order where its cells' positions are not known again). */
#define POS_TABLES 256
typedef struct {
    const void *data;
    int64_t cells;
    size_t row_bytes;   /* from one cell's keys to the next */
    int32_t *pos;
    int users;          /* passes reading or writing it now, under pos_lock */
    uint64_t used_at;
    int32_t next;       /* the position of the next row read back from a saved state */
} pos_table;
static pos_table pos_tables[POS_TABLES];
static pthread_mutex_t pos_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t pos_clock;
static atomic_int positions_enabled = 0; /* set once attention_check confirms the ops' layout */
static atomic_int rope_op = -1, set_rows_op = -1;
static atomic_int loading_first = -1;
static atomic_llong reordered_rows; /* rows summed in another order than their cells': for tests */

/* The table of the cache whose data starts at `data`, made if need be (`make`: `cells` cells `row_bytes` apart);
   NULL if there is none. Held until pos_release. */
static pos_table *pos_acquire(const void *data, int64_t cells, size_t row_bytes, bool make) {
    pos_table *found = NULL, *free_slot = NULL;
    pthread_mutex_lock(&pos_lock);
    for (int i = 0; i < POS_TABLES; i++) {
        pos_table *t = &pos_tables[i];
        if (t->pos && t->data == data) { found = t; break; }
        if (t->users == 0 && (!free_slot || !t->pos || (free_slot->pos && t->used_at < free_slot->used_at)))
            free_slot = t;
    }
    if (found && make && (found->cells != cells || found->row_bytes != row_bytes)) {
        /* another cache where an old one was: start again, unless a pass still reads the old table */
        free_slot = found->users ? NULL : found;
        found = NULL;
    }
    if (!found && make && free_slot) {
        int32_t *pos = malloc(sizeof(int32_t) * (size_t)cells);
        if (pos) {
            for (int64_t i = 0; i < cells; i++) pos[i] = -1;
            free(free_slot->pos);
            *free_slot = (pos_table){data, cells, row_bytes, pos, 0, 0, atomic_load(&loading_first)};
            found = free_slot;
        }
    }
    if (found) {
        found->users++;
        found->used_at = ++pos_clock;
    }
    pthread_mutex_unlock(&pos_lock);
    return found;
}

static void pos_release(pos_table *t) {
    if (!t) return;
    pthread_mutex_lock(&pos_lock);
    t->users--;
    pthread_mutex_unlock(&pos_lock);
}

/* Around llama.cpp reading a sequence's cache back from a file: `first`, the position of its first cell (its
   cells come in position order), then -1 when it is done. */
void q5_0_positions_loading(int first) {
    pthread_mutex_lock(&pos_lock);
    for (int i = 0; i < POS_TABLES; i++) pos_tables[i].next = first;
    atomic_store(&loading_first, first);
    pthread_mutex_unlock(&pos_lock);
}

/* llama.cpp's own definition of `name`, a function this library also defines (`ours`), found once into `slot`: in
   ggml's `library` that llama.cpp loaded, else the next definition after this library's (the one llama.cpp would
   have called). Where llama.cpp called ours there is always one; were there none, the process could not go on. */
static void *required_original(_Atomic(void *) *slot, const char *library, const char *name, const void *ours) {
    void *fn = atomic_load_explicit(slot, memory_order_acquire);
    if (fn) return fn;
    fn = llama_cpp_symbol_in(library, name, ours);
    if (!fn) fn = dlsym(RTLD_NEXT, name);
    if (!fn || fn == ours) {
        fprintf(stderr, "gemserve: llama.cpp's %s was not found\n", name);
        abort();
    }
    atomic_store_explicit(slot, fn, memory_order_release);
    return fn;
}

typedef void (*tensor_set_fn)(struct ggml_tensor_view *, const void *, size_t, size_t);
static _Atomic(void *) tensor_set_original;

void ggml_backend_tensor_set(struct ggml_tensor_view *tensor, const void *data, size_t offset, size_t size);

/* Rows read back into a known cache's keys: their positions, in the order written (a row not whole: unknown). */
static void note_loaded(const struct ggml_tensor_view *tensor, size_t offset, size_t size) {
    const char *at = (const char *)tensor->data + offset;
    pthread_mutex_lock(&pos_lock);
    for (int i = 0; i < POS_TABLES; i++) {
        pos_table *t = &pos_tables[i];
        const char *start = (const char *)t->data;
        if (!t->pos || at < start || at >= start + (size_t)t->cells * t->row_bytes) continue;
        const size_t from = (size_t)(at - start);
        const bool whole = from % t->row_bytes == 0 && size % t->row_bytes == 0;
        const int64_t c0 = (int64_t)(from / t->row_bytes);
        const int64_t c1 = c0 + (int64_t)((size + t->row_bytes - 1) / t->row_bytes);
        for (int64_t c = c0; c < c1 && c < t->cells; c++) t->pos[c] = whole && t->next >= 0 ? t->next++ : -1;
        break;
    }
    pthread_mutex_unlock(&pos_lock);
}

void ggml_backend_tensor_set(struct ggml_tensor_view *tensor, const void *data, size_t offset, size_t size) {
    if (atomic_load_explicit(&loading_first, memory_order_relaxed) >= 0) note_loaded(tensor, offset, size);
    ((tensor_set_fn)required_original(&tensor_set_original, GGML_BASE, "ggml_backend_tensor_set",
                                      (const void *)ggml_backend_tensor_set))(tensor, data, offset, size);
}

int64_t q5_0_attention_reordered_rows(void) { return atomic_load(&reordered_rows); }

/* The positions the latest rotation on this thread used (thread 0 of a pass computes both a layer's rotation and
   its write into the cache, in that order): copied, since llama.cpp may reuse the positions' memory once the last
   rotation has read them. */
static __thread const void *rope_positions;
static __thread int32_t *rope_values;
static __thread int64_t rope_count, rope_capacity;

typedef void (*op_fn)(const struct compute_params *, struct ggml_tensor_view *);
static _Atomic(void *) rope_original, set_rows_original;

static op_fn op_theirs(_Atomic(void *) *slot, const char *name, const void *ours) {
    return (op_fn)required_original(slot, GGML_CPU, name, ours);
}

void ggml_compute_forward_rope(const struct compute_params *params, struct ggml_tensor_view *dst) {
    const struct ggml_tensor_view *positions = dst->src[1];
    if (params->ith == 0) rope_positions = NULL;
    if (params->ith == 0 && atomic_load_explicit(&positions_enabled, memory_order_relaxed) && positions &&
        positions->type == TYPE_I32 && positions->ne[1] == 1 && positions->nb[0] == 4) {
        const int64_t n = positions->ne[0];
        if (n > rope_capacity) {
            int32_t *grown = realloc(rope_values, sizeof(int32_t) * (size_t)n);
            if (grown) { rope_values = grown; rope_capacity = n; }
        }
        if (n <= rope_capacity) {
            memcpy(rope_values, positions->data, sizeof(int32_t) * (size_t)n);
            rope_positions = positions;
            rope_count = n;
        }
    }
    op_theirs(&rope_original, "ggml_compute_forward_rope", (const void *)ggml_compute_forward_rope)(params, dst);
}

/* Keys written into a cache: their cells' positions noted, from the rotation that made the keys (found through
   the views between them). Values, not rotated, note nothing. */
static void note_positions(const struct ggml_tensor_view *dst) {
    const struct ggml_tensor_view *src = dst->src[0], *idx = dst->src[1], *cache = dst->view_src;
    if (!src || !idx || !cache || cache->ne[2] != 1 || cache->ne[3] != 1 || idx->ne[1] != 1 ||
        (idx->type != TYPE_I64 && idx->type != TYPE_I32))
        return;
    const struct ggml_tensor_view *made = src->view_src ? src->view_src : src;
    const int64_t n = idx->ne[0];
    /* row i of what is written is token i of the rotation */
    if (made->op != atomic_load_explicit(&rope_op, memory_order_relaxed) || made->src[1] != rope_positions ||
        rope_count != n || src->ne[1] != n || src->view_offs != 0 || made->ne[2] != n || src->nb[1] != made->nb[2])
        return;
    pos_table *t = pos_acquire(cache->data, cache->ne[1], cache->nb[1], true);
    if (!t) return;
    for (int64_t i = 0; i < n; i++) {
        const int64_t cell = idx->type == TYPE_I64 ? ((const int64_t *)idx->data)[i] : ((const int32_t *)idx->data)[i];
        if (cell >= 0 && cell < t->cells) t->pos[cell] = rope_values[i];
    }
    pos_release(t);
}

void ggml_compute_forward_set_rows(const struct compute_params *params, struct ggml_tensor_view *dst) {
    if (params->ith == 0 && atomic_load_explicit(&positions_enabled, memory_order_relaxed) &&
        dst->op == atomic_load_explicit(&set_rows_op, memory_order_relaxed))
        note_positions(dst);
    op_theirs(&set_rows_original, "ggml_compute_forward_set_rows",
              (const void *)ggml_compute_forward_set_rows)(params, dst);
}

/* A row's running softmax: the maximum so far, the sum of weights and the weighted values (dv floats). */
typedef struct { float m, total; float *acc; int64_t dv; } attend_state;

/* Adds `n` cells' scores `s` (mask added; room for 8 more) at cells `at` to the row's sums, in that order. */
AVX2 static void attend_chunk(attend_state *st, float *s, const int32_t *at, int n, const char *vbase,
                              const struct ggml_tensor_view *v) {
    float cm = st->m;
    for (int j = 0; j < n; j++) cm = s[j] > cm ? s[j] : cm;
    if (cm > st->m) { /* a new maximum: what was summed so far is scaled down to it */
        if (st->m != -INFINITY) {
            const float r = expf(st->m - cm);
            st->total *= r;
            for (int64_t d = 0; d < st->dv; d += 8)
                _mm256_store_ps(st->acc + d, _mm256_mul_ps(_mm256_load_ps(st->acc + d), _mm256_set1_ps(r)));
        }
        st->m = cm;
    }
    for (int j = n; j < n + 8; j++) s[j] = st->m; /* the lanes past the end weigh exp(0); never read below */
    for (int j = 0; j < n; j += 8)
        _mm256_store_ps(s + j, exp8(_mm256_sub_ps(_mm256_load_ps(s + j), _mm256_set1_ps(st->m))));
    for (int j = 0; j < n; j++) st->total += s[j];
    for (int64_t d0 = 0; d0 < st->dv; d0 += 32) { /* 32 of the values' columns at a time, in registers */
        float *acc = st->acc;
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

/* The next cells from *ic on that `mask` lets a row see, at most `room`, in cell order, into `seen`; how many. */
AVX2 static int64_t visible_cells(const uint16_t *mask, int64_t cells, int64_t *ic, int32_t *seen, int64_t room) {
    int64_t n = 0, c = *ic;
    for (; c < cells && n < room; c++) {
        /* other sequences' cells, hidden from this row, come in runs: 16 at a time */
        while (mask && c + 16 <= cells && hidden16(mask + c)) c += 16;
        if (c == cells) break;
        if (mask && f16_to_f32(mask[c]) == -INFINITY) continue;
        seen[n++] = (int32_t)c;
    }
    *ic = c;
    return n;
}

/* `seen` (n cells) put in position order, `pos` giving the position of cell c at pos[c]; `bucket` has room for
   `room` entries. False, and `seen` as it was, where a cell's position is unknown, two cells share one, or their
   span exceeds `room`; true if the order is now their positions' (also when it already was). */
static bool in_position_order(int32_t *seen, int64_t n, const int32_t *pos, int32_t *bucket, int64_t room,
                              bool *moved) {
    *moved = false;
    if (n == 0) return true;
    int32_t lo = INT32_MAX, hi = -1, last = -1;
    bool sorted = true;
    for (int64_t j = 0; j < n; j++) {
        const int32_t p = pos[seen[j]];
        if (p < 0) return false;
        sorted = sorted && p > last;
        last = p;
        lo = p < lo ? p : lo;
        hi = p > hi ? p : hi;
    }
    if (sorted) return true;
    const int64_t span = (int64_t)hi - lo + 1;
    if (span > room) return false;
    for (int64_t i = 0; i < span; i++) bucket[i] = -1;
    for (int64_t j = 0; j < n; j++) {
        const int64_t at = (int64_t)pos[seen[j]] - lo; /* read again: within the span, or the order stays */
        if (at < 0 || at >= span || bucket[at] >= 0) return false; /* (two cells at one position: two sequences) */
        bucket[at] = seen[j];
    }
    int64_t k = 0;
    for (int64_t i = 0; i < span; i++)
        if (bucket[i] >= 0) seen[k++] = bucket[i];
    *moved = true;
    return true;
}

/* One query row: `out` (dv floats) = softmax(softcap(scale * q.K) + mask) V over the cells `mask` lets it see
   (`scale` already divided by a non-zero softcap, as llama.cpp does), in chunks of ATTN_CHUNK of them: in position
   order where `pos` knows the cells' positions (`seen` and `bucket` with room for `cells` entries each), else in
   cell order (also where `seen` is NULL: then gathered a chunk at a time). */
AVX2 static void attend_row(const float *q, const struct ggml_tensor_view *k, const struct ggml_tensor_view *v,
                            const uint16_t *mask, int64_t ik2, int64_t iv2, float scale, float softcap, float *out,
                            const int32_t *pos, int32_t *seen, int32_t *bucket) {
    const int64_t dk = k->ne[0], dv = v->ne[0], cells = k->ne[1];
    const char *kbase = (const char *)k->data + ik2 * k->nb[2], *vbase = (const char *)v->data + iv2 * v->nb[2];
    float acc[ATTN_MAX_DV] __attribute__((aligned(32)));
    float s[ATTN_CHUNK + 8] __attribute__((aligned(32)));
    int32_t chunk[ATTN_CHUNK];
    memset(acc, 0, sizeof(float) * (size_t)dv);
    attend_state st = {-INFINITY, 0.0f, acc, dv};
    int64_t n = 0, ic = 0; /* with `seen`: all the cells the row sees, n of them; without: the next cell to look at */
    if (seen) {
        n = visible_cells(mask, cells, &ic, seen, cells);
        bool moved = false;
        if (pos && in_position_order(seen, n, pos, bucket, cells, &moved) && moved)
            atomic_fetch_add_explicit(&reordered_rows, 1, memory_order_relaxed);
    }
    for (int64_t j0 = 0;; j0 += ATTN_CHUNK) {
        const int32_t *at = seen ? seen + j0 : chunk;
        const int c = (int)(seen ? (n - j0 < ATTN_CHUNK ? n - j0 : ATTN_CHUNK)
                                 : visible_cells(mask, cells, &ic, chunk, ATTN_CHUNK));
        if (c <= 0) break;
        for (int j = 0; j < c; j++) {
            const float mv = mask ? f16_to_f32(mask[at[j]]) : 0.0f;
            float score = dot_f16(q, (const uint16_t *)(kbase + at[j] * k->nb[1]), dk) * scale;
            if (softcap != 0.0f) score = softcap * tanhf(score);
            s[j] = score + mv;
        }
        attend_chunk(&st, s, at, c, vbase, v);
    }
    const float inv = st.total == 0.0f ? 0.0f : 1.0f / st.total;
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
    const int64_t rows = q->ne[1], heads = q->ne[2], cells = k->ne[1];
    int64_t u0, u1; /* this thread's (head, token) rows, head-major as llama.cpp numbers them */
    share(rows * heads, params->ith, params->nth, &u0, &u1);
    /* the cells' positions, where the keys' cache has a table: k views the cache from cell `first` on */
    const struct ggml_tensor_view *cache = k->view_src;
    pos_table *table = NULL;
    const int32_t *pos = NULL;
    if (u1 > u0 && cache && cache->nb[1] == k->nb[1] && atomic_load_explicit(&positions_enabled, memory_order_relaxed)) {
        const ptrdiff_t offset = (const char *)k->data - (const char *)cache->data;
        const int64_t first = offset >= 0 && offset % (ptrdiff_t)k->nb[1] == 0 ? offset / (ptrdiff_t)k->nb[1] : -1;
        table = first >= 0 ? pos_acquire(cache->data, 0, 0, false) : NULL;
        if (table && first + cells <= table->cells) pos = table->pos + first;
    }
    /* room for a row's cells, kept by each thread from pass to pass; without it, rows go in cell order */
    static __thread int32_t *room;
    static __thread int64_t room_cells;
    if (cells > room_cells) {
        free(room);
        room = malloc(sizeof(int32_t) * 2 * (size_t)cells);
        room_cells = room ? cells : 0;
    }
    int32_t *seen = room, *bucket = room ? room + cells : NULL;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t head = u / rows, token = u % rows;
        const float *qrow = (const float *)((const char *)q->data + token * q->nb[1] + head * q->nb[2]);
        const uint16_t *mrow = mask ? (const uint16_t *)((const char *)mask->data + token * mask->nb[1] +
                                                          (head % mask->ne[2]) * mask->nb[2])
                                    : NULL;
        float *out = (float *)((char *)dst->data + (head + token * dst->ne[1]) * dst->nb[1]);
        attend_row(qrow, k, v, mrow, head / (heads / k->ne[2]), head / (heads / v->ne[2]), scale, softcap, out,
                   pos, seen, bucket);
    }
    pos_release(table);
    atomic_fetch_add_explicit(&attention_rows, (long long)(u1 - u0), memory_order_relaxed);
}

void ggml_compute_forward_flash_attn_ext(const struct compute_params *params, struct ggml_tensor_view *dst) {
    if (attention_takes(dst)) {
        attention(params, dst);
        return;
    }
    ((attention_fn)required_original(&attention_original, GGML_CPU, "ggml_compute_forward_flash_attn_ext",
                                     (const void *)ggml_compute_forward_flash_attn_ext))(params, dst);
}

/* Confirms the mirrored tensor layout on a flash-attention node built by the ggml in this process, and
   finds llama.cpp's own function; only then does this library take attention over. 1 if so. */
typedef struct { size_t mem_size; void *mem_buffer; bool no_alloc; } ggml_init_params_view;

/* Confirms, on a key rotated and written into a cache as llama.cpp's graphs do it, where the positions and the cells
   are found, and finds llama.cpp's own rope and set_rows; 1 if positions can be noted. */
static int positions_check(void *base, void *ctx, struct ggml_tensor_view *(*tensor)(void *, int, int64_t, int64_t,
                                                                                     int64_t, int64_t),
                           void *(*data_of)(void *)) {
    struct ggml_tensor_view *(*rope)(void *, void *, void *, void *, int, int, int, float, float, float, float, float,
                                     float) =
        (struct ggml_tensor_view * (*)(void *, void *, void *, void *, int, int, int, float, float, float, float,
                                       float, float))dlsym(base, "ggml_rope_ext");
    struct ggml_tensor_view *(*view_2d)(void *, void *, int64_t, int64_t, size_t, size_t) =
        (struct ggml_tensor_view * (*)(void *, void *, int64_t, int64_t, size_t, size_t))dlsym(base, "ggml_view_2d");
    struct ggml_tensor_view *(*set_rows)(void *, void *, void *, void *) =
        (struct ggml_tensor_view * (*)(void *, void *, void *, void *))dlsym(base, "ggml_set_rows");
    op_fn rope_theirs = (op_fn)llama_cpp_symbol("ggml_compute_forward_rope", (const void *)ggml_compute_forward_rope);
    op_fn set_rows_theirs = (op_fn)llama_cpp_symbol("ggml_compute_forward_set_rows",
                                                    (const void *)ggml_compute_forward_set_rows);
    if (!rope || !view_2d || !set_rows || !rope_theirs || !set_rows_theirs) return 0;
    struct ggml_tensor_view *cache = tensor(ctx, TYPE_F16, 64, 8, 1, 1);
    struct ggml_tensor_view *key = tensor(ctx, TYPE_F32, 64, 1, 3, 1); /* a head of 64, one head, 3 tokens */
    struct ggml_tensor_view *positions = tensor(ctx, TYPE_I32, 3, 1, 1, 1);
    struct ggml_tensor_view *cells = tensor(ctx, TYPE_I64, 3, 1, 1, 1);
    struct ggml_tensor_view *rotated = rope(ctx, key, positions, NULL, 64, 0, 0, 10000.0f, 1.0f, 0.0f, 1.0f, 0.0f,
                                            0.0f);
    struct ggml_tensor_view *rows = view_2d(ctx, rotated, 64, 3, rotated->nb[2], 0);
    struct ggml_tensor_view *written = set_rows(ctx, cache, rows, cells);
    const int ok = rotated->src[0] == key && rotated->src[1] == positions && rows->view_src == rotated &&
                   rows->ne[1] == 3 && written->src[0] == rows && written->src[1] == cells &&
                   written->view_src == cache && written->data == data_of(cache) && cache->ne[1] == 8 &&
                   cache->nb[1] == 128 && cache->ne[2] == 1 && positions->type == TYPE_I32 &&
                   positions->ne[0] == 3 && positions->nb[0] == 4 && cells->type == TYPE_I64 &&
                   rotated->op != written->op && rows->op != rotated->op;
    if (ok) {
        atomic_store(&rope_op, rotated->op);
        atomic_store(&set_rows_op, written->op);
        atomic_store_explicit(&rope_original, (void *)rope_theirs, memory_order_release);
        atomic_store_explicit(&set_rows_original, (void *)set_rows_theirs, memory_order_release);
    }
    return ok;
}

int q5_0_attention_check(void) {
    void *base = dlopen("libggml-base.so.0", RTLD_LAZY | RTLD_NOLOAD);
    int ok = 0, noting = 0;
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
                atomic_store_explicit(&attention_original, (void *)theirs, memory_order_release);
                noting = positions_check(base, ctx, tensor, data_of);
            }
            release(ctx);
        }
    }
    if (base) dlclose(base);
    atomic_store(&positions_enabled, noting);
    atomic_store(&attention_enabled, ok);
    return ok;
}

/* Only between passes: the threads of one pass must decide alike. Never before attention_check confirmed. */
void q5_0_attention_set_enabled(int on) {
    atomic_store(&attention_enabled, on && atomic_load(&attention_op) >= 0);
}
int64_t q5_0_attention_rows(void) { return atomic_load(&attention_rows); }
int q5_0_attention_in_use(void) { return atomic_load(&attention_enabled); }
