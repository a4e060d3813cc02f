/* Products of Q5_0, Q6_K and Q4_K weight matrices with tokens, in place of llama.cpp's.

Qwen2.5's 896-wide rows are not a multiple of 256, so its Q4_K_M file keeps attention and the feed-forward gate
and up matrices in Q5_0 (173 of the 250 MB a token reads); Gemma 3's 640-wide ones likewise. llama.cpp multiplies
a Q5_0 matrix by one token with `ggml_vec_dot_q5_0_q8_0` (per row, unpacking the 5-bit weights for each product)
and by two or more with llamafile's tinyBLAS, which unpacks each weight block again for every column of the batch
and applies the sign trick to every product: on a 2-core AMD EPYC a batch of 2 tokens cost 3 single ones.

This kernel repacks each matrix once, on first use, in groups of 8 rows: per group and block of 32 columns, the 8
rows' 4-bit values interleaved 4 columns at a time (128 bytes: `and` and a shift give 8 vectors, vector c holding
columns 4c..4c+3 of rows 0..7), their fifth bits as 8 masks of 32 bits and their 8 scales (fp16), 176 bytes, as
many as in Q5_0, in one sequential stream. One product of a block is then 8 `dpbusd` (AVX-512 VNNI) or
`maddubs` (AVX2) of those vectors with the token's 4 activations broadcast, whose lanes are the 8 rows: no
horizontal sums, and the tokens of a batch reuse each unpacked block. The 5-bit values are used unsigned (Q5_0
subtracts 16), so a block's integer sum is sum(u * x) - 16 * sum(x). On a 2-core AMD EPYC a whole forward pass of
Qwen2.5-Coder-0.5B over one token is 1.37 times faster than with llama.cpp's products, 8 tokens' products take
about a quarter of tinyBLAS's time (`benchmarks/q5_0.py`).

Q6_K matrices (ffn_down in half of the layers of a Q4_K_M file: Qwen's 12 are 43 MB) are packed the same way, in
groups of 8 rows (_q6_k_kernels.h): llama.cpp multiplies them token by token below 32 tokens (`ggml_vec_dot_q6_K_q8_K`,
unpacking each block again for every token; its tiled path costs more there, below), 15% of a pass over 8 Qwen
sequences. Q4_K matrices (the other half of ffn_down, and Gemma's attention output: Gemma's 27, 13 MB; Qwen's 12,
29 MB) likewise (_q4_k_kernels.h), where llama.cpp's `ggml_vec_dot_q4_K_q8_K` unpacked each block again for every
token: a pass over one token is 2-8% shorter with them, over 8 sequences 7-12%. Without memory for their copy, each
group's blocks are packed on the stack one at a time, with the same bits.

Where there is no memory for the copy, the Q5_0 products are computed token by token from llama.cpp's rows
(`multiply_one`, 8 rows at a time, each block's sums for the 8 rows added across lanes together). Both paths
compute the same exact integer sums and the same float steps in the same order, so a token's result is bit for
bit the same whatever the path and the size of the pass (prompt lookup's passes, other sequences). The
arithmetic is in _q5_0_kernels.h, _q6_k_kernels.h and _q4_k_kernels.h, compiled for AVX2 and for AVX-512 VNNI
(used where the CPU has it), which give the same bits too. It is llama.cpp's: activations quantized to Q8_0 (Q8_K
for Q6_K and Q4_K) by llama.cpp, each block's products summed exactly in integers, then scaled in float (in
another order than llama.cpp's, so results differ from llama.cpp's by float rounding).

How it takes over: llama.cpp's CPU backend calls `llamafile_sgemm` through its PLT for matrix products (those
its tiled K-quant path does not take), once with the float activations and, when that declines, again with them
quantized. This library defines a function of that name; loaded with RTLD_GLOBAL before llama.cpp's libraries
are loaded (llama-cpp-python loads them with RTLD_NOW, which binds the call then), it is found first. It computes
Q5_0, Q6_K and Q4_K products itself (tokens in Q8_0 and Q8_K, as llama.cpp quantized them) and hands everything
else to llama.cpp's own function, which it looks up in the libggml-cpu that llama.cpp loaded. On other CPUs than x86 the
library defines no such function and llama.cpp runs untouched.

Only matrices inside address ranges registered as a model's weights (`q5_0_add_file_range`: the model file's
mappings) are packed, since a packed copy is valid only while the original never changes; `q5_0_release_range`
frees the copies when the model is gone. Matrices whose rows are not a multiple of 8 stay with llama.cpp. Once a
matrix of a shared read-only file mapping (rows contiguous) is packed whole, llama.cpp's copy is no longer read
(prompts too take the kernels: llama.cpp's tiled path is declined, below): its pages are let go (`MADV_DONTNEED`;
read again from the file should anything need them), so the copies add no resident memory to what llama.cpp held.

Plain C functions, called through ctypes; the module init only makes the file importable as an extension.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define HAVE_X86 0
#define AVX2
#endif

enum { TYPE_F32 = 0, TYPE_Q5_0 = 6, TYPE_Q8_0 = 8, TYPE_Q4_K = 12, TYPE_Q6_K = 14, TYPE_Q8_K = 15 }; /* ggml_type */
#define QK 32
#define ROWS 8
/* The packed copy, per group of 8 rows and block of 32 columns: the 4-bit values (128 bytes), the fifth bits (8
   masks of 32 bits) and the 8 rows' scales (fp16), GROUP_BYTES in all: as many bytes as the rows in Q5_0, read
   in one sequential stream. */
#define NIB_BYTES (ROWS * QK / 2)
#define HIGH_BYTES (ROWS * 4)
#define SCALE_BYTES (ROWS * 2)
#define GROUP_BYTES (NIB_BYTES + HIGH_BYTES + SCALE_BYTES) /* per block of a group */

typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_0;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;

/* Q6_K (ffn_down in half of the layers of a Q4_K_M file), whose tokens llama.cpp quantizes to Q8_K. The packed copy,
   per group of 8 rows and block of 256 columns: for each sub-block s of 16 columns in turn, 104 bytes: the low 4
   bits (2 vectors of 32 bytes, vector h holding column 16s + 8h + i of row r in the low nibble of byte 4r + i,
   16s + 8h + 4 + i in the high one), the high 2 bits (a vector holding column 16s + 4t + i of row r in bits 2t,
   2t + 1 of byte 4r + i) and the 8 rows' scales; then the 8 rows' d (fp16). As many bytes as the rows in Q6_K, read
   in one sequential stream. */
#define QK_K 256
typedef struct { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; } block_q6_K;
typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } block_q8_K;
#define K6_HIGH_AT (ROWS * 16 / 2)                 /* in a sub-block: after the nibbles, the high bits */
#define K6_SCALES_AT (K6_HIGH_AT + ROWS * 16 / 4)  /* then the scales */
#define K6_SUB_BYTES (K6_SCALES_AT + ROWS)
#define K6_D_AT (K6_SUB_BYTES * QK_K / 16)         /* in a block: after the 16 sub-blocks, the rows' d */
#define K6_GROUP_BYTES (K6_D_AT + ROWS * 2)

/* Q4_K (attention output and half of the ffn_down matrices in a Q4_K_M file). The packed copy, per group of 8 rows
   and block of 256 columns: for each sub-block s of 32 columns in turn, its 4-bit values (4 vectors of 32 bytes,
   vector h holding column 32s + 4h + i of row r in the low nibble of byte 4r + i, 32s + 16 + 4h + i in the high
   one); then the 8 rows' scales (8 bytes per sub-block), their mins (16 bytes per pair of sub-blocks 2p, 2p + 1:
   row r's two in bytes 2r, 2r + 1), their d and their dmin (fp16). As many bytes as the rows in Q4_K and 32 more,
   read in one sequential stream. */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; } block_q4_K;
#define K4_SUB_BYTES (ROWS * 32 / 2)
#define K4_SCALES_AT (K4_SUB_BYTES * QK_K / 32)
#define K4_MINS_AT (K4_SCALES_AT + ROWS * QK_K / 32)
#define K4_D_AT (K4_MINS_AT + ROWS * QK_K / 32)
#define K4_DMIN_AT (K4_D_AT + ROWS * 2)
#define K4_GROUP_BYTES (K4_DMIN_AT + ROWS * 2)

/* What llama.cpp passes; only ith and nth are read. */
struct compute_params { int ith, nth; };

typedef bool (*sgemm_fn)(const struct compute_params *, int64_t, int64_t, int64_t, const void *, int64_t,
                         const void *, int64_t, void *, int64_t, int, int, int);
#if HAVE_X86
bool llamafile_sgemm(const struct compute_params *, int64_t, int64_t, int64_t, const void *, int64_t, const void *,
                     int64_t, void *, int64_t, int, int, int);
#endif

int q5_0_supported(void) {
#if HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* ---- packing ------------------------------------------------------------------------------------------------ */

int64_t q5_0_packed_bytes(int64_t rows, int64_t k) { return rows / ROWS * k * GROUP_BYTES; }

#if HAVE_X86
AVX2 static void pack_group(const block_q5_0 *a, int64_t lda, int64_t k, uint8_t *out) {
    for (int64_t l = 0; l < k; l++) {
        uint8_t *nib = out + l * GROUP_BYTES, *high = nib + NIB_BYTES, *scales = high + HIGH_BYTES;
        uint32_t masks[QK / 4] = {0};
        for (int r = 0; r < ROWS; r++) {
            const block_q5_0 *b = a + r * lda + l;
            uint32_t qh;
            memcpy(&qh, b->qh, 4);
            /* vector v, row r: bytes 4v..4v+3 of qs (columns 4v.. in the low nibbles, 16 + 4v.. in the high) */
            for (int v = 0; v < QK / 8; v++) memcpy(nib + v * 32 + r * 4, b->qs + 4 * v, 4);
            /* chunk c (columns 4c..4c+3), row r: bits 4r..4r+3 of mask c */
            for (int c = 0; c < QK / 4; c++) masks[c] |= ((qh >> (4 * c)) & 15u) << (4 * r);
            memcpy(scales + r * 2, &b->d, 2);
        }
        memcpy(high, masks, HIGH_BYTES);
    }
}
#endif

/* The K-quants packed in groups of 8 rows (Q6_K, Q4_K), whose tokens llama.cpp quantizes to Q8_K: what sets them
   apart, and how many of their products were taken here. */
typedef struct {
    int type;
    size_t block_bytes;    /* llama.cpp's block of 256 columns of a row */
    int64_t group_bytes;   /* a packed block of 8 rows */
    atomic_int enabled;    /* for benchmarks; q5_0_set_enabled turns all types off */
    atomic_llong products; /* token-rows multiplied here, for logs and tests */
} k_quant;

static k_quant k_quants[] = {
    {TYPE_Q6_K, sizeof(block_q6_K), K6_GROUP_BYTES, 1, 0},
    {TYPE_Q4_K, sizeof(block_q4_K), K4_GROUP_BYTES, 1, 0},
};

static k_quant *k_quant_of(int type) {
    for (size_t i = 0; i < sizeof(k_quants) / sizeof(k_quants[0]); i++)
        if (k_quants[i].type == type) return &k_quants[i];
    return NULL;
}

/* Bytes of a packed copy of a K-quant matrix of `rows` rows of k blocks; 0 for other types. */
int64_t k_quant_packed_bytes(int type, int64_t rows, int64_t k) {
    const k_quant *q = k_quant_of(type);
    return q ? rows / ROWS * k * q->group_bytes : 0;
}

#if HAVE_X86
static void pack_group_q6_k(const void *rows, int64_t lda, int64_t k, uint8_t *out) {
    const block_q6_K *a = rows;
    for (int64_t l = 0; l < k; l++) {
        uint8_t *block = out + l * K6_GROUP_BYTES;
        memset(block, 0, K6_GROUP_BYTES);
        for (int r = 0; r < ROWS; r++) {
            const block_q6_K *b = a + r * lda + l;
            for (int e = 0; e < QK_K; e++) { /* llama.cpp's layout: halves of 128, quarters of 32 within them */
                const int half = e / 128, quarter = e % 128 / 32, i = e % 32;
                const uint8_t low = b->ql[64 * half + 32 * (quarter & 1) + i] >> (4 * (quarter >> 1)) & 15;
                const uint8_t top = b->qh[32 * half + i] >> (2 * quarter) & 3;
                const int s = e / 16, t = e % 16 / 4, c = e % 4;
                uint8_t *sub = block + K6_SUB_BYTES * s;
                sub[32 * (t / 2) + 4 * r + c] |= (uint8_t)(low << (4 * (t & 1)));
                sub[K6_HIGH_AT + 4 * r + c] |= (uint8_t)(top << (2 * t));
            }
            for (int s = 0; s < QK_K / 16; s++) block[K6_SUB_BYTES * s + K6_SCALES_AT + r] = (uint8_t)b->scales[s];
            memcpy(block + K6_D_AT + 2 * r, &b->d, 2);
        }
    }
}
#endif

#if HAVE_X86
static void pack_group_q4_k(const void *rows, int64_t lda, int64_t k, uint8_t *out) {
    const block_q4_K *a = rows;
    for (int64_t l = 0; l < k; l++) {
        uint8_t *block = out + l * K4_GROUP_BYTES;
        memset(block, 0, K4_GROUP_BYTES);
        for (int r = 0; r < ROWS; r++) {
            const block_q4_K *b = a + r * lda + l;
            for (int e = 0; e < QK_K; e++) { /* llama.cpp's layout: 64 columns per 32 bytes, low nibbles first */
                const int j = e / 64, i = e % 32;
                const uint8_t q = b->qs[32 * j + i] >> (e % 64 < 32 ? 0 : 4) & 15;
                const int s = e / 32, c = e % 32, h = c % 16 / 4;
                block[K4_SUB_BYTES * s + 32 * h + 4 * r + c % 4] |= (uint8_t)(q << (c < 16 ? 0 : 4));
            }
            for (int s = 0; s < QK_K / 32; s++) { /* llama.cpp's get_scale_min_k4 */
                const uint8_t *q = b->scales;
                const uint8_t scale = s < 4 ? q[s] & 63 : (uint8_t)((q[s + 4] & 15) | (q[s - 4] >> 6) << 4);
                const uint8_t min = s < 4 ? q[s + 4] & 63 : (uint8_t)((q[s + 4] >> 4) | (q[s] >> 6) << 4);
                block[K4_SCALES_AT + 8 * s + r] = scale;
                block[K4_MINS_AT + 16 * (s / 2) + 2 * r + s % 2] = min;
            }
            memcpy(block + K4_D_AT + 2 * r, &b->d, 2);
            memcpy(block + K4_DMIN_AT + 2 * r, &b->dmin, 2);
        }
    }
}

/* Packs the 8 rows from `rows` (lda blocks apart), k blocks of each, of a K-quant `type`. */
static void pack_k_group(int type, const void *rows, int64_t lda, int64_t k, uint8_t *out) {
    (type == TYPE_Q6_K ? pack_group_q6_k : pack_group_q4_k)(rows, lda, k, out);
}
#endif

/* Packs all of a K-quant matrix (m a multiple of 8) into `out` (k_quant_packed_bytes). For tests. */
int k_quant_pack(int type, const void *a, int64_t m, int64_t k, int64_t lda, uint8_t *out) {
#if HAVE_X86
    const k_quant *q = k_quant_of(type);
    if (!q || !q5_0_supported() || m % ROWS) return 0;
    for (int64_t g = 0; g < m / ROWS; g++)
        pack_k_group(type, (const uint8_t *)a + (size_t)(g * ROWS * lda) * q->block_bytes, lda, k,
                     out + g * k * q->group_bytes);
    return 1;
#else
    (void)type; (void)a; (void)m; (void)k; (void)lda; (void)out;
    return 0;
#endif
}

/* Packs all of a matrix (m a multiple of 8) into `out` (q5_0_packed_bytes, 32-byte aligned). For tests. */
int q5_0_pack(const void *a, int64_t m, int64_t k, int64_t lda, uint8_t *out) {
#if HAVE_X86
    if (!q5_0_supported() || m % ROWS || ((uintptr_t)out & 31)) return 0;
    for (int64_t g = 0; g < m / ROWS; g++)
        pack_group((const block_q5_0 *)a + g * ROWS * lda, lda, k, out + g * k * GROUP_BYTES);
    return 1;
#else
    (void)a; (void)m; (void)k; (void)lda; (void)out;
    return 0;
#endif
}

/* ---- products ----------------------------------------------------------------------------------------------- */

#if HAVE_X86
#define CONCAT_(a, b) a##_##b
#define CONCAT(a, b) CONCAT_(a, b)

/* Output rows of groups [g0, g1) of a packed K-quant matrix for all n tokens (Q8_K, ldx blocks apart):
   out[j * ldo + row], or added to (`more`, as the kind's group function says). Tokens go up to K_COLS at a time,
   each sub-block unpacked once for them; the group function is inlined for each count so that their sums stay in
   registers. Each K-quant's kernel header defines its multiply_groups_<kind> with it. */
#define K_COLS (VNNI ? 8 : 4)
#define K_CASE(kind, cols)                                                                                    \
    case cols:                                                                                                \
        if ((cols) <= K_COLS) NAME(kind##_group)(group, k, cols, xj, ldx, dst, ldo, more);                    \
        break;
#define K_QUANT_GROUPS(kind, group_bytes)                                                                     \
    TARGET static void NAME(multiply_groups_##kind)(const uint8_t *packed, int64_t g0, int64_t g1, int64_t k,    \
                                                    int64_t n, const block_q8_K *x, int64_t ldx, float *out,    \
                                                    int64_t ldo, bool more) {                                   \
        for (int64_t g = g0; g < g1; g++) {                                                                     \
            const uint8_t *group = packed + g * k * (group_bytes);                                              \
            for (int64_t j0 = 0; j0 < n; j0 += K_COLS) {                                                        \
                const block_q8_K *xj = x + j0 * ldx;                                                            \
                float *dst = out + j0 * ldo + g * ROWS;                                                         \
                switch (n - j0 < K_COLS ? (int)(n - j0) : K_COLS) {                                             \
                    K_CASE(kind, 1) K_CASE(kind, 2) K_CASE(kind, 3) K_CASE(kind, 4)                             \
                    K_CASE(kind, 5) K_CASE(kind, 6) K_CASE(kind, 7) K_CASE(kind, 8)                             \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

#define TARGET AVX2
#define NAME(x) CONCAT(x, avx2)
#define VNNI 0
#include "_q5_0_kernels.h"
#include "_q6_k_kernels.h"
#include "_q4_k_kernels.h"
#undef TARGET
#undef NAME
#undef VNNI

#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define NAME(x) CONCAT(x, vnni)
#define VNNI 1
#include "_q5_0_kernels.h"
#include "_q6_k_kernels.h"
#include "_q4_k_kernels.h"
#undef TARGET
#undef NAME
#undef VNNI

/* The instruction set in use: AVX-512 VNNI where the CPU has it (and q5_0_use_vnni did not turn it off), else
   AVX2; both give the same bits. */
static atomic_int vnni = -1;

static bool use_vnni(void) {
    int on = atomic_load_explicit(&vnni, memory_order_relaxed);
    if (on < 0) {
        __builtin_cpu_init();
        on = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw");
        atomic_store_explicit(&vnni, on, memory_order_relaxed);
    }
    return on;
}

static void prepare_tokens(int64_t n, int64_t k, const block_q8_0 *x, int64_t ldx, float *xd, float *xs) {
    (use_vnni() ? prepare_tokens_vnni : prepare_tokens_avx2)(n, k, x, ldx, xd, xs);
}

static void multiply_groups(const uint8_t *packed, int64_t g0, int64_t g1, int64_t k, int64_t n,
                            const block_q8_0 *x, int64_t ldx, const float *xd, const float *xs, float *out,
                            int64_t ldo) {
    (use_vnni() ? multiply_groups_vnni : multiply_groups_avx2)(packed, g0, g1, k, n, x, ldx, xd, xs, out, ldo);
}

static void multiply_k_groups(int type, const uint8_t *packed, int64_t g0, int64_t g1, int64_t k, int64_t n,
                              const block_q8_K *x, int64_t ldx, float *out, int64_t ldo, bool more) {
    const bool v = use_vnni();
    (type == TYPE_Q6_K ? (v ? multiply_groups_q6_k_vnni : multiply_groups_q6_k_avx2)
                       : (v ? multiply_groups_q4_k_vnni : multiply_groups_q4_k_avx2))(packed, g0, g1, k, n, x, ldx,
                                                                                      out, ldo, more);
}

/* Thread ith's share of a matrix's groups of rows, [*g0, *g1), of nth threads' (llama.cpp's split of work). */
static void share(int64_t groups, int ith, int nth, int64_t *g0, int64_t *g1) {
    *g0 = groups * ith / nth;
    *g1 = groups * (ith + 1) / nth;
}

/* Without a packed copy (no memory for one): each group's blocks packed one at a time on the stack, each product
   adding to the sums so far, the same float steps as from a whole copy: the same bits. */
static void multiply_k_without_copy(const k_quant *q, const void *a, int64_t lda, int64_t g0, int64_t g1, int64_t k,
                                    int64_t n, const block_q8_K *x, int64_t ldx, float *out, int64_t ldo) {
    uint8_t block[K4_GROUP_BYTES > K6_GROUP_BYTES ? K4_GROUP_BYTES : K6_GROUP_BYTES] __attribute__((aligned(32)));
    for (int64_t g = g0; g < g1; g++) {
        for (int64_t l = 0; l < k; l++) {
            pack_k_group(q->type, (const uint8_t *)a + (size_t)(g * ROWS * lda + l) * q->block_bytes, lda, 1, block);
            multiply_k_groups(q->type, block, 0, 1, 1, n, x + l, ldx, out + g * ROWS, ldo, l > 0);
        }
    }
}

static void multiply_one(const block_q5_0 *a, int64_t lda, int64_t g0, int64_t g1, int64_t k, const block_q8_0 *x,
                         float *out) {
    (use_vnni() ? multiply_one_vnni : multiply_one_avx2)(a, lda, g0, g1, k, x, out);
}
#endif

/* Whether AVX-512 VNNI is used; `on` 0 turns it off, 1 on where the CPU has it, -1 leaves it. For tests and
   benchmarks, which compare both. */
int q5_0_use_vnni(int on) {
#if HAVE_X86
    if (on >= 0) {
        atomic_store(&vnni, -1);
        if (on && use_vnni()) return 1;
        atomic_store(&vnni, 0);
        return 0;
    }
    return use_vnni();
#else
    (void)on;
    return 0;
#endif
}

/* out[i] = row i of matrix `a` (Q5_0, m rows of k blocks, lda apart) times one token x, for this thread's share of
   rows, without a packed copy. For tests. */
int q5_0_multiply_one(const void *a, int64_t m, int64_t k, int64_t lda, const void *x, float *out, int ith,
                      int nth) {
#if HAVE_X86
    if (m % ROWS) return 0;
    int64_t g0, g1;
    share(m / ROWS, ith, nth, &g0, &g1);
    multiply_one(a, lda, g0, g1, k, x, out);
    return 1;
#else
    (void)a; (void)m; (void)k; (void)lda; (void)x; (void)out; (void)ith; (void)nth;
    return 0;
#endif
}

/* out[j * ldo + i] = row i of the packed matrix (m rows, k blocks) times token j of x (Q8_0, ldx blocks apart),
   for rows of this thread's share (ith of nth). For tests and for the takeover below. */
int q5_0_multiply(const uint8_t *packed, int64_t m, int64_t k, int64_t n, const void *x, int64_t ldx, float *out,
                  int64_t ldo, int ith, int nth) {
#if HAVE_X86
    if (m % ROWS) return 0;
    float *xd = malloc(sizeof(float) * (size_t)(2 * n * k));
    if (!xd) return 0;
    prepare_tokens(n, k, x, ldx, xd, xd + n * k);
    int64_t g0, g1;
    share(m / ROWS, ith, nth, &g0, &g1);
    multiply_groups(packed, g0, g1, k, n, x, ldx, xd, xd + n * k, out, ldo);
    free(xd);
    return 1;
#else
    (void)packed; (void)m; (void)k; (void)n; (void)x; (void)ldx; (void)out; (void)ldo; (void)ith; (void)nth;
    return 0;
#endif
}

/* The same for a packed K-quant matrix of `type` and tokens in Q8_K; with `packed` NULL, from the rows of `a` (lda
   blocks apart) without a copy. For tests. */
int k_quant_multiply(int type, const uint8_t *packed, const void *a, int64_t lda, int64_t m, int64_t k, int64_t n,
                     const void *x, int64_t ldx, float *out, int64_t ldo, int ith, int nth) {
#if HAVE_X86
    const k_quant *q = k_quant_of(type);
    if (!q || !q5_0_supported() || m % ROWS) return 0;
    int64_t g0, g1;
    share(m / ROWS, ith, nth, &g0, &g1);
    if (packed)
        multiply_k_groups(type, packed, g0, g1, k, n, x, ldx, out, ldo, false);
    else
        multiply_k_without_copy(q, a, lda, g0, g1, k, n, x, ldx, out, ldo);
    return 1;
#else
    (void)type; (void)packed; (void)a; (void)lda; (void)m; (void)k; (void)n; (void)x; (void)ldx; (void)out; (void)ldo;
    (void)ith; (void)nth;
    return 0;
#endif
}

/* ---- matrices llama.cpp multiplies ---------------------------------------------------------------------------- */

enum { UNPACKED = 0, PACKING = 1, PACKED = 2 };

typedef struct {
    const void *weights;
    int type; /* TYPE_Q5_0, TYPE_Q6_K or TYPE_Q4_K */
    int64_t m, k, lda;
    uint8_t *packed;
    _Atomic uint8_t *state; /* per group of rows */
    atomic_llong unpacked;  /* groups not packed yet */
    bool let_pages_go;      /* in a read-only file mapping: pages let go once packed, read again if need be */
} matrix;

typedef struct { uintptr_t start, end; bool mapped; } range;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static matrix **matrices; /* each entry its own allocation, so that growing the list moves none */
static int64_t n_matrices, cap_matrices;
static range *ranges;
static int64_t n_ranges, cap_ranges;
static _Atomic(sgemm_fn) original;
static atomic_int enabled = 1;
static atomic_llong products; /* token-rows of Q5_0 multiplied here, for logs and tests */

/* llama.cpp's own definition of a function this library also defines (`ours`): looked up in the library of
   ggml's that llama.cpp loaded (GGML_CPU or GGML_BASE, by the name libllama asks for), whose own definition a
   lookup through its handle finds first. NULL where there is none. */
#define GGML_CPU "libggml-cpu.so.0"
#define GGML_BASE "libggml-base.so.0"
static void *llama_cpp_symbol_in(const char *library, const char *name, const void *ours) {
    void *lib = dlopen(library, RTLD_LAZY | RTLD_NOLOAD);
    if (!lib) return NULL;
    void *fn = dlsym(lib, name);
    dlclose(lib);
    return fn == ours ? NULL : fn;
}

static void *llama_cpp_symbol(const char *name, const void *ours) { return llama_cpp_symbol_in(GGML_CPU, name, ours); }

/* llama.cpp's own llamafile_sgemm; NULL where there is none. */
static sgemm_fn llama_cpps(void) {
    sgemm_fn fn = atomic_load_explicit(&original, memory_order_acquire);
    if (fn) return fn;
#if HAVE_X86
    fn = (sgemm_fn)llama_cpp_symbol("llamafile_sgemm", (const void *)llamafile_sgemm);
#else
    fn = (sgemm_fn)llama_cpp_symbol("llamafile_sgemm", NULL);
#endif
    if (fn) atomic_store_explicit(&original, fn, memory_order_release);
    return fn;
}

int q5_0_original_found(void) { return llama_cpps() != NULL; }

/* Only between passes: the threads of one product must decide alike. */
void q5_0_set_enabled(int on) { atomic_store(&enabled, on); } /* all products: every type */
int64_t q5_0_products(void) { return atomic_load(&products); }

/* One K-quant's products alone (Q6_K or Q4_K), for benchmarks. */
void k_quant_set_enabled(int type, int on) {
    k_quant *q = k_quant_of(type);
    if (q) atomic_store(&q->enabled, on);
}

int64_t k_quant_products(int type) {
    k_quant *q = k_quant_of(type);
    return q ? atomic_load(&q->products) : 0;
}

int64_t q5_0_packed_matrices(void) {
    pthread_mutex_lock(&lock);
    const int64_t n = n_matrices;
    pthread_mutex_unlock(&lock);
    return n;
}

static int add_range(uintptr_t start, uintptr_t end, bool mapped) {
    pthread_mutex_lock(&lock);
    if (n_ranges == cap_ranges) {
        const int64_t cap = cap_ranges ? 2 * cap_ranges : 16;
        range *grown = realloc(ranges, sizeof(range) * (size_t)cap);
        if (!grown) { pthread_mutex_unlock(&lock); return 0; }
        ranges = grown;
        cap_ranges = cap;
    }
    ranges[n_ranges++] = (range){start, end, mapped};
    pthread_mutex_unlock(&lock);
    return 1;
}

/* A model's weights: memory that never changes while registered. */
int q5_0_add_range(uintptr_t start, uintptr_t end) { return add_range(start, end, false); }

/* The same, in a read-only mapping of the model's file: once packed, a matrix's pages there are let go. */
int q5_0_add_file_range(uintptr_t start, uintptr_t end) { return add_range(start, end, true); }

/* Forgets a range and frees the packed copies of matrices inside it. Only once nothing multiplies them. */
int64_t q5_0_release_range(uintptr_t start, uintptr_t end) {
    int64_t freed = 0;
    pthread_mutex_lock(&lock);
    for (int64_t i = 0; i < n_ranges; i++) {
        if (ranges[i].start == start && ranges[i].end == end) {
            ranges[i] = ranges[--n_ranges];
            break;
        }
    }
    for (int64_t i = 0; i < n_matrices;) {
        const uintptr_t w = (uintptr_t)matrices[i]->weights;
        if (w >= start && w < end) {
            free(matrices[i]->packed);
            free((void *)matrices[i]->state);
            free(matrices[i]);
            matrices[i] = matrices[--n_matrices];
            freed++;
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&lock);
    return freed;
}

/* For TYPE_Q5_0 and the K-quants' types. */
static size_t block_bytes(int type) {
    return type == TYPE_Q5_0 ? sizeof(block_q5_0) : k_quant_of(type)->block_bytes;
}

static int64_t packed_bytes(int type, int64_t m, int64_t k) {
    return type == TYPE_Q5_0 ? q5_0_packed_bytes(m, k) : k_quant_packed_bytes(type, m, k);
}

static const range *in_ranges(uintptr_t start, uintptr_t end) {
    for (int64_t i = 0; i < n_ranges; i++)
        if (start >= ranges[i].start && end <= ranges[i].end) return &ranges[i];
    return NULL;
}

/* Whether the matrix lies in a registered model's weights; if so *entry is its entry, made on first sight (NULL
   if memory ran out: then the paths without a copy serve, Q5_0's lone-token one or Q6_K's and Q4_K's that pack a
   block at a time on the stack, which give the same bits). That every thread of a product decides alike matters: a
   share computed here and another by llama.cpp would not fit. */
static bool registered(const void *weights, int type, int64_t m, int64_t k, int64_t lda, matrix **entry) {
    matrix *found = NULL;
    bool inside = false;
    pthread_mutex_lock(&lock);
    for (int64_t i = 0; i < n_matrices; i++) {
        matrix *e = matrices[i];
        if (e->weights == weights && e->type == type && e->m == m && e->k == k && e->lda == lda) { found = e; break; }
    }
    const uintptr_t start = (uintptr_t)weights, end = start + (uintptr_t)(m * lda) * block_bytes(type);
    const range *where = found ? NULL : in_ranges(start, end);
    inside = found != NULL || where != NULL;
    if (!found && inside) {
        if (n_matrices == cap_matrices) {
            const int64_t cap = cap_matrices ? 2 * cap_matrices : 64;
            matrix **grown = realloc(matrices, sizeof(matrix *) * (size_t)cap);
            if (!grown) goto done;
            matrices = grown;
            cap_matrices = cap;
        }
        matrix *e = malloc(sizeof(matrix));
        uint8_t *packed = aligned_alloc(32, ((size_t)packed_bytes(type, m, k) + 31) / 32 * 32);
        _Atomic uint8_t *state = calloc((size_t)(m / ROWS), 1);
        if (!e || !packed || !state) { free(e); free(packed); free((void *)state); goto done; }
        const bool let_pages_go = where->mapped && lda == k;
        *e = (matrix){weights, type, m, k, lda, packed, state, m / ROWS, let_pages_go};
        matrices[n_matrices++] = found = e;
    }
done:
    /* an entry is freed only on release, once its model is gone, so it outlives this product */
    pthread_mutex_unlock(&lock);
    *entry = found;
    return inside;
}

#if HAVE_X86
/* The whole pages within [start, end) of a read-only file mapping: no longer resident in this process. */
static void let_go(uintptr_t start, uintptr_t end) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    start = (start + page - 1) / page * page;
    end = end / page * page;
    if (end > start) madvise((void *)start, end - start, MADV_DONTNEED);
}

/* Packs this thread's groups where no thread has yet; waits for groups another thread is packing. */
static void ensure_packed(matrix *e, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; g++) {
        uint8_t s = atomic_load_explicit(&e->state[g], memory_order_acquire);
        if (s == PACKED) continue;
        uint8_t expected = UNPACKED;
        if (atomic_compare_exchange_strong(&e->state[g], &expected, PACKING)) {
            if (e->type == TYPE_Q5_0)
                pack_group((const block_q5_0 *)e->weights + g * ROWS * e->lda, e->lda, e->k,
                           e->packed + g * e->k * GROUP_BYTES);
            else
                pack_k_group(e->type, (const uint8_t *)e->weights + (size_t)(g * ROWS * e->lda) * block_bytes(e->type),
                             e->lda, e->k, e->packed + g * e->k * k_quant_of(e->type)->group_bytes);
            atomic_store_explicit(&e->state[g], PACKED, memory_order_release);
            if (atomic_fetch_sub_explicit(&e->unpacked, 1, memory_order_acq_rel) == 1 && e->let_pages_go)
                let_go((uintptr_t)e->weights,
                       (uintptr_t)e->weights + (uintptr_t)(e->m * e->lda) * block_bytes(e->type));
        } else {
            while (atomic_load_explicit(&e->state[g], memory_order_acquire) != PACKED) sched_yield();
        }
    }
}
#endif

#if HAVE_X86
bool llamafile_sgemm(const struct compute_params *params, int64_t m, int64_t n, int64_t k, const void *a,
                     int64_t lda, const void *b, int64_t ldb, void *c, int64_t ldc, int atype, int btype,
                     int ctype) {
    matrix *e = NULL;
    if (atype == TYPE_Q5_0 && btype == TYPE_Q8_0 && ctype == TYPE_F32 && m % ROWS == 0 && n > 0 &&
        atomic_load_explicit(&enabled, memory_order_relaxed) && registered(a, TYPE_Q5_0, m, k, lda, &e)) {
        int64_t g0, g1;
        share(m / ROWS, params->ith, params->nth, &g0, &g1);
        float *xd = e ? malloc(sizeof(float) * (size_t)(2 * n * k)) : NULL;
        if (xd) {
            prepare_tokens(n, k, b, ldb, xd, xd + n * k);
            ensure_packed(e, g0, g1);
            multiply_groups(e->packed, g0, g1, k, n, b, ldb, xd, xd + n * k, c, ldc);
            free(xd);
        } else { /* no memory for the packed path: token by token from llama.cpp's rows, the same bits */
            for (int64_t j = 0; j < n; j++)
                multiply_one(a, lda, g0, g1, k, (const block_q8_0 *)b + j * ldb, (float *)c + j * ldc);
        }
        atomic_fetch_add_explicit(&products, (long long)((g1 - g0) * ROWS * n), memory_order_relaxed);
        return true;
    }
    k_quant *q = btype == TYPE_Q8_K ? k_quant_of(atype) : NULL;
    if (q && ctype == TYPE_F32 && m % ROWS == 0 && n > 0 && atomic_load_explicit(&enabled, memory_order_relaxed) &&
        atomic_load_explicit(&q->enabled, memory_order_relaxed) && registered(a, atype, m, k, lda, &e)) {
        int64_t g0, g1;
        share(m / ROWS, params->ith, params->nth, &g0, &g1);
        if (e) {
            ensure_packed(e, g0, g1);
            multiply_k_groups(atype, e->packed, g0, g1, k, n, b, ldb, c, ldc, false);
        } else {
            multiply_k_without_copy(q, a, lda, g0, g1, k, n, b, ldb, c, ldc);
        }
        atomic_fetch_add_explicit(&q->products, (long long)((g1 - g0) * ROWS * n), memory_order_relaxed);
        return true;
    }
    const sgemm_fn theirs = llama_cpps();
    return theirs ? theirs(params, m, n, k, a, lda, b, ldb, c, ldc, atype, btype, ctype) : false;
}
#endif

/* ---- llama.cpp's tiled products of quantized matrices ------------------------------------------------------ */

/* llama.cpp takes products of quantized matrices it has no repacked form for (Q6_K among them; also the other
   K-quants and IQ types) with 8 or more tokens through its tiled path, also called through the PLT. On the AMD
   EPYC machine it costs more than its plain path for small batches (a pass over 8 Qwen sequences: 62.9 against
   47.5 ms, 16: 90.7 against 84.2) and a little less for prompts (a 1000-token prompt: Gemma 1%, Qwen 4%), but
   its rounding depends on where a token falls in its tiles: the same prompt's last logits differed computed whole
   and continued from a kept cache (Gemma at 100 tokens by 0.65, Qwen at 36 and 64 by up to 0.40;
   `benchmarks/q5_0.py prompts`). So it is
   declined below `tiled_from` tokens, by default always, and llama.cpp runs its plain path, which sends Q6_K and
   Q4_K to the kernels here: a token's products are the same bits in any pass. Benchmarks set `tiled_from` to
   compare (from there on it hands over to llama.cpp's own; were that not found, every size would take the plain
   path). Reads only the destination's ne[1] (tokens): ggml_tensor begins with its type, its buffer and ne[4]. */
#if HAVE_X86
struct tensor_head { int type; void *buffer; int64_t ne[4]; };
typedef bool (*tiled_fn)(const struct compute_params *, struct tensor_head *);
static _Atomic(tiled_fn) tiled_original;
static atomic_llong tiled_from = INT64_MAX;
static atomic_llong tiled_calls[2]; /* declined, handed over: for tests */

void q5_0_set_tiled_from(int64_t tokens) { atomic_store(&tiled_from, tokens); }
int64_t q5_0_tiled_calls(int handed_over) { return atomic_load(&tiled_calls[handed_over != 0]); }

bool ggml_compute_forward_mul_mat_tiled(const struct compute_params *params, struct tensor_head *dst) {
    const bool decline = dst->ne[1] < atomic_load_explicit(&tiled_from, memory_order_relaxed);
    atomic_fetch_add_explicit(&tiled_calls[!decline], 1, memory_order_relaxed);
    if (decline) return false;
    tiled_fn fn = atomic_load_explicit(&tiled_original, memory_order_acquire);
    if (!fn) {
        fn = (tiled_fn)llama_cpp_symbol("ggml_compute_forward_mul_mat_tiled",
                                        (const void *)ggml_compute_forward_mul_mat_tiled);
        if (!fn) return false;
        atomic_store_explicit(&tiled_original, fn, memory_order_release);
    }
    return fn(params, dst);
}

#include "_attention.h"
#endif

/* ---- module ------------------------------------------------------------------------------------------------- */

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_q5_0",
                                    "Q5_0, Q6_K and Q4_K matrix products for llama.cpp; called through ctypes.", -1,
                                    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__q5_0(void) { return PyModule_Create(&module); }
