/* The output layer (hidden state -> logits over the vocabulary) of a GGUF model whose output matrix is Q8_0.

For Gemma 3 270M that matrix is 262144 x 640: two thirds of the model's weights, and of the time llama.cpp takes
per decoded token. llama.cpp multiplies it one row and one token at a time, with a horizontal sum per 32
weights; this kernel instead packs the matrix once, eight rows interleaved, so that one AVX-512 VNNI instruction
multiplies 4 activations with the same 4 columns of 8 rows, and every token of a batch reuses each weight load.
CPUs without VNNI run the same loop with AVX2 (four instructions where VNNI needs one).
The arithmetic is that of llama.cpp: weights in 8 bits with a scale per 32, activations quantized to 8 bits
with an fp16 scale per 32 as llama.cpp quantizes them, products summed exactly in 32-bit integers, then scaled
in float (in another order than llama.cpp's, so results differ by float rounding).

Packed layout, per group of 8 rows and per block of 32 columns (288 bytes):
  32 x 8 bytes  weights + 128 as unsigned bytes: chunk c (columns 4c..4c+3) of rows 0..7, 4 bytes each
  8 floats      the rows' Q8_0 scales
Since the weights are stored offset by 128, a block's integer sum is sum((w + 128) * x) - 128 * sum(x).

`eval_callback` is a llama.cpp eval callback: it copies the final normalized hidden state ("result_norm") out of
the graph and stops the graph there, so llama.cpp skips its own output layer.

Plain C functions, called through ctypes; the module init only makes the file importable as an extension.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define QK 32          /* columns per Q8_0 block */
#define Q8_0_BYTES 34  /* fp16 scale + 32 int8 */
#define ROWS 8         /* rows per packed group */
#define GROUP_BLOCK_BYTES (QK * ROWS + ROWS * 4)
#define MAX_TOKENS 8   /* tokens per pass over the weights */

static float fp16_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Which kernel this CPU runs: 2 with AVX-512 VNNI (one instruction per 4 x 8 products), 1 with AVX2 only
   (the same products in four instructions), 0 none. */
int output_head_supported(void) {
#if HAVE_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
        return 0;
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512f") ? 2 : 1;
#else
    return 0;
#endif
}

static int chosen_level = -1; /* -1: the best this CPU runs */

/* The kernel level in use. */
int output_head_level(void) { return chosen_level < 0 ? output_head_supported() : chosen_level; }

/* Use kernel `level` (at most what the CPU supports; -1 for the best); returns the level now in use. */
int output_head_set_level(int level) {
    const int best = output_head_supported();
    chosen_level = level < 0 || level > best ? -1 : level;
    return chosen_level < 0 ? best : chosen_level;
}

int64_t output_head_packed_bytes(int64_t rows, int64_t k) {
    return ((rows + ROWS - 1) / ROWS) * (k / QK) * GROUP_BLOCK_BYTES;
}

/* Pack `rows` x `k` Q8_0 weights (llama.cpp's row layout) into `packed`. Rows past the end are zero. */
int output_head_pack(const uint8_t *q8_0, int64_t rows, int64_t k, uint8_t *packed, int threads) {
    if (rows <= 0 || k <= 0 || k % QK) return -1;
    const int64_t nb = k / QK, groups = (rows + ROWS - 1) / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *out = packed + (g * nb + b) * GROUP_BLOCK_BYTES;
            float scales[ROWS];
            for (int i = 0; i < ROWS; i++) {
                const int64_t r = g * ROWS + i;
                if (r >= rows) {
                    scales[i] = 0.0f;
                    for (int c = 0; c < QK / 4; c++) memset(out + c * 32 + i * 4, 128, 4);
                    continue;
                }
                const uint8_t *blk = q8_0 + (r * nb + b) * Q8_0_BYTES;
                uint16_t h;
                memcpy(&h, blk, 2);
                scales[i] = fp16_to_float(h);
                const int8_t *q = (const int8_t *)(blk + 2);
                for (int c = 0; c < QK / 4; c++)
                    for (int e = 0; e < 4; e++) out[c * 32 + i * 4 + e] = (uint8_t)((int)q[c * 4 + e] + 128);
            }
            memcpy(out + QK * ROWS, scales, sizeof scales);
        }
    }
    return 0;
}

/* Quantize n x k activations exactly as llama.cpp's x86 quantize_row_q8_0 does: per 32, multiplier 127 / amax,
   round half to even, the scale amax / 127 stored as fp16. Also 128 * the sum of each block's quantized
   values, for the offset weights. */
#if HAVE_X86
__attribute__((target("f16c"))) static float fp16_round(float f) {
    return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
#else
static float fp16_round(float f) { return f; }
#endif

static void quantize_activations(const float *x, int64_t n, int64_t k, int8_t *xq, float *xd, int32_t *xcorr) {
    const int64_t nb = k / QK;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + j * k + b * QK;
            float amax = 0.0f;
            for (int e = 0; e < QK; e++) amax = fmaxf(amax, fabsf(v[e]));
            const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            int32_t sum = 0;
            for (int e = 0; e < QK; e++) {
                const int8_t q = (int8_t)nearbyintf(v[e] * id); /* default rounding mode: half to even */
                xq[j * k + b * QK + e] = q;
                sum += q;
            }
            xd[j * nb + b] = fp16_round(amax / 127.0f);
            xcorr[j * nb + b] = 128 * sum;
        }
    }
}

#if HAVE_X86
#define TARGET_VNNI __attribute__((target("avx512f,avx512vl,avx512vnni,avx2,fma"), always_inline))
#define TARGET_AVX2 __attribute__((target("avx2,fma"), always_inline))

/* One block of 8 rows for one token: the 8 integer dot products of its 32 weights with the token's 32
   quantized activations `xc` (as 8 groups of 4 bytes). */

/* AVX-512 VNNI: one dpbusd per 4 columns x 8 rows, on the weights + 128 (unsigned), corrected by `corr`. Four
   independent chains: a dpbusd waits for the previous one on the same register. */
TARGET_VNNI static inline __m256i block_vnni(const __m256i w[QK / 4], const int32_t xc[QK / 4], int32_t corr) {
    __m256i d[4];
    for (int c = 0; c < 4; c++) d[c] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[c], _mm256_set1_epi32(xc[c]));
    for (int c = 4; c < QK / 4; c++) d[c - 4] = _mm256_dpbusd_epi32(d[c - 4], w[c], _mm256_set1_epi32(xc[c]));
    const __m256i dot = _mm256_add_epi32(_mm256_add_epi32(d[0], d[1]), _mm256_add_epi32(d[2], d[3]));
    return _mm256_sub_epi32(dot, _mm256_set1_epi32(corr));
}

/* AVX2: maddubs multiplies unsigned by signed bytes and adds pairs into saturating 16 bits, so it takes
   |w| (`wa`) times x with w's sign (`ws`): at most 2 * 128 * 127 per pair, no saturation, no offset. */
TARGET_AVX2 static inline __m256i block_avx2(const __m256i ws[QK / 4], const __m256i wa[QK / 4],
                                             const int32_t xc[QK / 4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i d[4];
    for (int c = 0; c < QK / 4; c++) {
        const __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(xc[c]), ws[c]);
        const __m256i pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(wa[c], x), ones);
        d[c % 4] = c < 4 ? pairs : _mm256_add_epi32(d[c % 4], pairs);
    }
    return _mm256_add_epi32(_mm256_add_epi32(d[0], d[1]), _mm256_add_epi32(d[2], d[3]));
}

/* With two tokens or more, each block is asked for this far ahead of its product (its 288 bytes: 5 cache lines):
   a pass over 8 Gemma sequences 0.89 of the time, 4 sequences 0.93, 8 Qwen sequences 0.95; one token, whose
   product waits on memory rather than arithmetic, is left to the hardware prefetcher (benchmarks.md). */
#define PREFETCH_BYTES (4 * GROUP_BLOCK_BYTES)
#define PREFETCH_LINES ((GROUP_BLOCK_BYTES + 63) / 64)

/* Groups [g0, g1) of 8 rows for T tokens. LOAD reads a block's weights once for all T tokens; DOT is the
   block's integer dots for token j (`xc`, its activations for the block). */
#define PASS(NAME, TARGET, T, LOAD, DOT)                                                                      \
TARGET static void NAME(const uint8_t *packed, int64_t g0, int64_t g1, int64_t nb, int64_t k,                \
                        const int8_t *xq, const float *xd, const int32_t *xcorr, float *out, int64_t rows) {  \
    (void)xcorr;                                                                                              \
    for (int64_t g = g0; g < g1; g++) {                                                                       \
        __m256 acc[T];                                                                                        \
        _Pragma("GCC unroll 8") for (int j = 0; j < T; j++) acc[j] = _mm256_setzero_ps();                   \
        const uint8_t *p = packed + g * nb * GROUP_BLOCK_BYTES;                                               \
        for (int64_t b = 0; b < nb; b++, p += GROUP_BLOCK_BYTES) {                                            \
            if (T > 1)                                                                                        \
                _Pragma("GCC unroll 8") for (int q = 0; q < PREFETCH_LINES; q++)                              \
                    _mm_prefetch((const char *)p + PREFETCH_BYTES + 64 * q, _MM_HINT_T0);                     \
            __m256i w[QK / 4], wa[QK / 4];                                                                    \
            _Pragma("GCC unroll 8") for (int c = 0; c < QK / 4; c++) { LOAD; }                                \
            const __m256 scale = _mm256_loadu_ps((const float *)(p + QK * ROWS));                            \
            _Pragma("GCC unroll 8") for (int j = 0; j < T; j++) {                                             \
                int32_t xc[QK / 4];                                                                           \
                memcpy(xc, xq + j * k + b * QK, QK);                                                          \
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT),                                            \
                                         _mm256_mul_ps(scale, _mm256_set1_ps(xd[j * nb + b])), acc[j]);      \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("GCC unroll 8") for (int j = 0; j < T; j++) {                                                 \
            float v[ROWS];                                                                                    \
            _mm256_storeu_ps(v, acc[j]);                                                                      \
            const int64_t r0 = g * ROWS;                                                                      \
            const int live = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;                                      \
            memcpy(out + j * rows + r0, v, (size_t)live * 4);                                                 \
        }                                                                                                     \
    }                                                                                                         \
}

#define TARGET_VNNI_PASS __attribute__((target("avx512f,avx512vl,avx512vnni,avx2,fma")))
#define TARGET_AVX2_PASS __attribute__((target("avx2,fma")))
#define LOAD_VNNI (void)wa; w[c] = _mm256_loadu_si256((const __m256i *)(p + 32 * c))
#define LOAD_AVX2                                                                                             \
    w[c] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32 * c)), _mm256_set1_epi8((char)0x80)); \
    wa[c] = _mm256_abs_epi8(w[c])
#define VNNI(T) PASS(pass_vnni_##T, TARGET_VNNI_PASS, T, LOAD_VNNI, block_vnni(w, xc, xcorr[j * nb + b]))
#define AVX2(T) PASS(pass_avx2_##T, TARGET_AVX2_PASS, T, LOAD_AVX2, block_avx2(w, wa, xc))
VNNI(1) VNNI(2) VNNI(3) VNNI(4) VNNI(5) VNNI(6) VNNI(7) VNNI(8)
AVX2(1) AVX2(2) AVX2(3) AVX2(4) AVX2(5) AVX2(6) AVX2(7) AVX2(8)

typedef void (*pass_fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const int8_t *, const float *,
                        const int32_t *, float *, int64_t);
static const pass_fn PASSES_VNNI[MAX_TOKENS + 1] = {0, pass_vnni_1, pass_vnni_2, pass_vnni_3, pass_vnni_4,
                                                    pass_vnni_5, pass_vnni_6, pass_vnni_7, pass_vnni_8};
static const pass_fn PASSES_AVX2[MAX_TOKENS + 1] = {0, pass_avx2_1, pass_avx2_2, pass_avx2_3, pass_avx2_4,
                                                    pass_avx2_5, pass_avx2_6, pass_avx2_7, pass_avx2_8};
#endif

/* out[n][rows] = x[n][k] times the packed matrix, transposed. `scratch` holds n * (k + 8 * k / 32) bytes.
   Returns 0, or -1 when this CPU cannot run the kernel. */
int output_head_matmul(const uint8_t *packed, int64_t rows, int64_t k, const float *x, int64_t n, float *out,
                       void *scratch, int threads) {
#if HAVE_X86
    const int level = chosen_level < 0 ? output_head_supported() : chosen_level;
    if (level == 0 || k % QK || n <= 0) return -1;
    const pass_fn *passes = level == 2 ? PASSES_VNNI : PASSES_AVX2;
    const int64_t nb = k / QK, groups = (rows + ROWS - 1) / ROWS;
    int8_t *xq = (int8_t *)scratch;
    float *xd = (float *)(xq + n * k);
    int32_t *xcorr = (int32_t *)(xd + n * nb);
    quantize_activations(x, n, k, xq, xd, xcorr);
    /* Chunks of groups over the threads; every chunk makes all token passes while its weights are in cache. */
    const int64_t chunk = 32;
    const int64_t chunks = (groups + chunk - 1) / chunk;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t g0 = c * chunk, g1 = g0 + chunk < groups ? g0 + chunk : groups;
        for (int64_t j0 = 0; j0 < n; j0 += MAX_TOKENS) {
            const int t = n - j0 < MAX_TOKENS ? (int)(n - j0) : MAX_TOKENS;
            passes[t](packed, g0, g1, nb, k, xq + j0 * k, xd + j0 * nb, xcorr + j0 * nb, out + j0 * rows, rows);
        }
    }
    return 0;
#else
    (void)packed; (void)rows; (void)k; (void)x; (void)n; (void)out; (void)scratch; (void)threads;
    return -1;
#endif
}

int64_t output_head_scratch_bytes(int64_t n, int64_t k) {
    return n * (k + 8 * (k / QK)) + 64;
}

/* ---- capturing the hidden state from llama.cpp's graph ---------------------------------------------------- */

typedef const char *(*name_fn)(const void *tensor);
typedef void *(*data_fn)(const void *tensor);
typedef int64_t (*count_fn)(const void *tensor);

typedef struct {
    name_fn get_name;      /* ggml_get_name */
    data_fn get_data;      /* ggml_get_data */
    count_fn nelements;    /* ggml_nelements */
    int32_t enabled;       /* 0: observe nothing, let the graph run whole */
    int32_t captured;      /* 1 when copied once, 2 more than once, -1 when one could not be; the caller resets it */
    int64_t width;         /* floats per hidden state (n_embd) */
    int64_t capacity;      /* hidden states `hidden` holds */
    int64_t rows;          /* hidden states copied since the caller last reset it */
    float *hidden;
} capture_state;

int64_t output_head_capture_state_bytes(void) { return (int64_t)sizeof(capture_state); }

static const char TARGET_NODE[] = "result_norm";

bool output_head_eval_callback(void *tensor, bool ask, void *user_data) {
    capture_state *s = (capture_state *)user_data;
    if (!s->enabled) return ask ? false : true;
    if (ask) return strcmp(s->get_name(tensor), TARGET_NODE) == 0;
    /* gemserve's batches fit one micro-batch, so this runs once per decode; the caller checks `rows`. */
    const int64_t count = s->nelements(tensor);
    if (s->captured < 0 || s->width <= 0 || count % s->width || s->rows + count / s->width > s->capacity) {
        s->captured = -1; /* unexpected shape: let llama.cpp finish the graph and use its logits */
        return true;
    }
    if (count) memcpy(s->hidden + s->rows * s->width, s->get_data(tensor), (size_t)count * sizeof(float));
    s->rows += count / s->width;
    s->captured = s->captured == 0 ? 1 : 2; /* 2: llama.cpp split the batch, and the order is not known */
    return false; /* stop the graph here: the output layer is ours */
}

/* ---- module ------------------------------------------------------------------------------------------------- */

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_output_head",
                                    "Output-layer kernel for Q8_0 GGUF models; called through ctypes.", -1, NULL,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__output_head(void) { return PyModule_Create(&module); }
