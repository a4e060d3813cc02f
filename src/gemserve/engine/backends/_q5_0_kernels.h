/* The Q5_0 kernel's arithmetic, included by _q5_0.c once per instruction set: with TARGET (a function attribute),
   NAME(x) (x with the set's suffix) and VNNI (1 where AVX-512 VNNI, VL and BW are there) defined.

Both sets compute the same exact integer sums and the same float steps in the same order, so their results are
bit for bit the same: VNNI's `dpbusd` sums four byte products into 32 bits in one instruction where AVX2 needs
`maddubs` (into 16 bits, which cannot overflow here: 2 * 31 * 128 < 32768) and `madd`. */

/* 8 rows' exact sums over 4-byte chunks: acc + sum over the chunk of u * x. */
TARGET static inline __m256i NAME(dot4)(__m256i acc, __m256i u, __m256i x) {
#if VNNI
    return _mm256_dpbusd_epi32(acc, u, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}

/* A block of a packed group, unpacked: w[c] holds columns 4c..4c+3 of the 8 rows (row r in bytes 4r..4r+3) as
   the unsigned 5-bit values 0..31. */
TARGET static inline void NAME(unpack_packed)(const uint8_t *block, __m256i w[QK / 4]) {
    const uint8_t *nib = block, *high = block + NIB_BYTES;
    const __m256i m4 = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(0x10);
    for (int v = 0; v < QK / 8; v++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(nib + 32 * v));
        w[v] = _mm256_and_si256(q, m4);
        w[v + QK / 8] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    }
    for (int c = 0; c < QK / 4; c++) {
        uint32_t mask;
        memcpy(&mask, high + 4 * c, 4);
#if VNNI
        w[c] = _mm256_mask_add_epi8(w[c], (__mmask32)mask, w[c], sixteen);
#else
        /* byte e all ones where bit e of the mask is set */
        const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)mask),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
        const __m256i bits = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                               _mm256_set1_epi64x(-1));
        w[c] = _mm256_or_si256(w[c], _mm256_and_si256(bits, sixteen));
#endif
    }
}

/* The 8 rows' integer sums over one unpacked block, sum(u * x), for one token's block x. */
TARGET static inline __m256i NAME(block_dot)(const __m256i w[QK / 4], const int8_t *x) {
#if VNNI
    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}; /* two chains, half as long */
    for (int c = 0; c < QK / 4; c++) {
        int32_t xc;
        memcpy(&xc, x + 4 * c, 4);
        acc[c & 1] = _mm256_dpbusd_epi32(acc[c & 1], w[c], _mm256_set1_epi32(xc));
    }
    return _mm256_add_epi32(acc[0], acc[1]);
#else
    /* 4 products of at most 2 * 31 * 127 stay within int16 */
    __m256i half[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int c = 0; c < QK / 4; c++) {
        int32_t xc;
        memcpy(&xc, x + 4 * c, 4);
        half[c / 4] = _mm256_add_epi16(half[c / 4], _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(xc)));
    }
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(half[0], ones), _mm256_madd_epi16(half[1], ones));
#endif
}

/* Per token block: its scale, and 16 times the sum of its quants (Q5_0's offset). */
TARGET static void NAME(prepare_tokens)(int64_t n, int64_t k, const block_q8_0 *x, int64_t ldx, float *xd,
                                        float *xs) {
    const __m256i ones8 = _mm256_set1_epi8(1);
    for (int64_t j = 0; j < n; j++) {
        for (int64_t l = 0; l < k; l++) {
            const block_q8_0 *b = x + j * ldx + l;
            const __m256i s = NAME(dot4)(_mm256_setzero_si256(), ones8, _mm256_loadu_si256((const __m256i *)b->qs));
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
            xd[j * k + l] = _cvtsh_ss(b->d);
            xs[j * k + l] = 16.0f * (float)_mm_cvtsi128_si32(t);
        }
    }
}

/* Output rows of groups [g0, g1) for all n tokens: out[j * ldo + row]. Tokens go COLS at a time, their sums in
   registers, each block unpacked again for each COLS; with AVX2, whose unpacking costs more, more than COLS tokens
   reuse each unpacked block for all of them instead, their sums kept in `out` (floats, exact). */
#if VNNI
#define COLS 8
#define ONE_UNPACKING_FROM INT64_MAX
#else
#define COLS 4
#define ONE_UNPACKING_FROM (COLS + 1)
#endif
/* One token's step over one unpacked block `w` with row scales `wd`: acc + (sum(u * x) - 16 * sum(x)) * wd * xd,
   the float steps every path takes in this order. */
TARGET static inline __m256 NAME(block_step)(__m256 acc, const __m256i w[QK / 4], __m256 wd, const int8_t *x, float xd,
                                             float xs) {
    const __m256 sum = _mm256_sub_ps(_mm256_cvtepi32_ps(NAME(block_dot)(w, x)), _mm256_set1_ps(xs));
    return _mm256_fmadd_ps(sum, _mm256_mul_ps(wd, _mm256_set1_ps(xd)), acc);
}

/* Starts reading the packed block this far ahead of the one being multiplied (its 176 bytes: 3 cache lines):
   products over 8 tokens take 11% fewer cycles than with the hardware prefetcher alone, one token the same. */
#ifndef Q5_0_PREFETCH_BYTES
#define Q5_0_PREFETCH_BYTES (6 * GROUP_BYTES)
#endif
/* A packed block unpacked into `w` (the one further on asked for), and its 8 rows' scales. */
TARGET static inline __m256 NAME(next_block)(const uint8_t *block, __m256i w[QK / 4]) {
    _mm_prefetch((const char *)block + Q5_0_PREFETCH_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char *)block + Q5_0_PREFETCH_BYTES + 64, _MM_HINT_T0);
    _mm_prefetch((const char *)block + Q5_0_PREFETCH_BYTES + 128, _MM_HINT_T0);
    NAME(unpack_packed)(block, w);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + NIB_BYTES + HIGH_BYTES)));
}

TARGET static void NAME(multiply_groups)(const uint8_t *packed, int64_t g0, int64_t g1, int64_t k, int64_t n,
                                         const block_q8_0 *x, int64_t ldx, const float *xd, const float *xs,
                                         float *out, int64_t ldo) {
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *group = packed + g * k * GROUP_BYTES;
        float *dst = out + g * ROWS;
        if (n >= ONE_UNPACKING_FROM) {
            for (int64_t j = 0; j < n; j++) _mm256_storeu_ps(dst + j * ldo, _mm256_setzero_ps());
            for (int64_t l = 0; l < k; l++) {
                __m256i w[QK / 4];
                const __m256 wd = NAME(next_block)(group + l * GROUP_BYTES, w);
                for (int64_t j = 0; j < n; j++)
                    _mm256_storeu_ps(dst + j * ldo, NAME(block_step)(_mm256_loadu_ps(dst + j * ldo), w, wd,
                                                                     x[j * ldx + l].qs, xd[j * k + l], xs[j * k + l]));
            }
            continue;
        }
        for (int64_t j0 = 0; j0 < n; j0 += COLS) {
            const int cols = n - j0 < COLS ? (int)(n - j0) : COLS;
            __m256 acc[COLS];
            for (int c = 0; c < COLS; c++) acc[c] = _mm256_setzero_ps();
            for (int64_t l = 0; l < k; l++) {
                __m256i w[QK / 4];
                const __m256 wd = NAME(next_block)(group + l * GROUP_BYTES, w);
                for (int c = 0; c < cols; c++) {
                    const int64_t j = j0 + c;
                    acc[c] = NAME(block_step)(acc[c], w, wd, x[j * ldx + l].qs, xd[j * k + l], xs[j * k + l]);
                }
            }
            for (int c = 0; c < cols; c++) _mm256_storeu_ps(dst + (j0 + c) * ldo, acc[c]);
        }
    }
}
#undef COLS
#undef ONE_UNPACKING_FROM

/* One block of one row, unpacked: the 5-bit values 0..31 in element order. */
TARGET static inline __m256i NAME(unpack_block)(const block_q5_0 *b) {
    const __m128i qs = _mm_loadu_si128((const __m128i *)b->qs);
    const __m256i low = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0F));
    uint32_t qh;
    memcpy(&qh, b->qh, 4);
#if VNNI
    return _mm256_mask_add_epi8(low, (__mmask32)qh, low, _mm256_set1_epi8(0x10)); /* bit e of qh: element e */
#else
    /* byte e all ones where bit e of qh is set */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i bits = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                           _mm256_set1_epi64x(-1));
    return _mm256_or_si256(low, _mm256_and_si256(bits, _mm256_set1_epi8(0x10)));
#endif
}

/* Lane r of the result: the sum of v[r]'s 8 lanes. */
TARGET static inline __m256i NAME(sum_rows)(const __m256i v[ROWS]) {
    const __m256i ab = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i cd = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    /* ab: rows 0..3 summed over lanes 0..3 in its low half, over lanes 4..7 in its high half; cd rows 4..7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31));
}

/* One token, straight from llama.cpp's Q5_0 rows, a packed group's 8 rows at a time, each row read in order over
   a chunk of ONE_BLOCKS blocks (the token's scales and sums prepared once a chunk), with no allocation. The integer
   sums are the packed path's, in the same lanes (each block's 8 partial sums per row added across rows at once,
   `sum_rows`), and the float steps are the same in the same order: the result is bit for bit the packed path's. */
#define ONE_BLOCKS 32
TARGET static void NAME(multiply_one)(const block_q5_0 *a, int64_t lda, int64_t g0, int64_t g1, int64_t k,
                                      const block_q8_0 *x, float *out) {
    __m256i partial[ONE_BLOCKS][ROWS]; /* per block and row: 8 lanes that sum to the block's integer sum */
    float wd[ONE_BLOCKS * ROWS], xd[ONE_BLOCKS], xs[ONE_BLOCKS];
    for (int64_t l0 = 0; l0 < k; l0 += ONE_BLOCKS) {
        const int64_t blocks = k - l0 < ONE_BLOCKS ? k - l0 : ONE_BLOCKS;
        NAME(prepare_tokens)(1, blocks, x + l0, blocks, xd, xs);
        for (int64_t g = g0; g < g1; g++) {
            __m256 acc = l0 ? _mm256_loadu_ps(out + g * ROWS) : _mm256_setzero_ps();
            for (int r = 0; r < ROWS; r++) {
                const block_q5_0 *row = a + (g * ROWS + r) * lda + l0;
                for (int64_t l = 0; l < blocks; l++) {
                    partial[l][r] = NAME(dot4)(_mm256_setzero_si256(), NAME(unpack_block)(row + l),
                                               _mm256_loadu_si256((const __m256i *)x[l0 + l].qs));
                    wd[l * ROWS + r] = _cvtsh_ss(row[l].d);
                }
            }
            for (int64_t l = 0; l < blocks; l++) {
                const __m256 sum = _mm256_sub_ps(_mm256_cvtepi32_ps(NAME(sum_rows)(partial[l])),
                                                 _mm256_broadcast_ss(xs + l));
                acc = _mm256_fmadd_ps(sum, _mm256_mul_ps(_mm256_loadu_ps(wd + l * ROWS), _mm256_broadcast_ss(xd + l)),
                                      acc);
            }
            _mm256_storeu_ps(out + g * ROWS, acc); /* the partial sum, where more blocks follow: exact */
        }
    }
}
#undef ONE_BLOCKS
