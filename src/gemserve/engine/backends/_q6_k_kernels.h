/* The Q6_K kernel's arithmetic, included by _q5_0.c once per instruction set, as _q5_0_kernels.h (whose `dot4` it
   uses): with TARGET, NAME(x) and VNNI defined.

A Q6_K block is 256 weights d * scale[s] * (q - 32): q 0..63 in 6 bits, an int8 scale per 16 weights (sub-block
s), a fp16 d. Tokens come quantized to Q8_K by llama.cpp: 256 int8 values, a float d, and the sums of each 16
(bsums). A row's product with a token's block is d * xd * sum over s of scale[s] * (sum over the sub-block of
q * x - 32 * bsum[s]): the integer sum exact in 32 bits (at most 16 * 16 * 32 * 128 * 128 in size), then one float
step per block, in the same order on every path and with either instruction set, so a token's result is bit for bit
the same whatever the pass. `dot4` with AVX2 sums pairs of byte products in 16 bits: 2 * 63 * 128 < 32768. */

/* A sub-block of a packed block (columns 16s..16s + 15), unpacked: w[t] holds columns 16s + 4t .. 16s + 4t + 3 of
   the 8 rows (row r in bytes 4r..4r+3) as the unsigned 6-bit values 0..63. */
TARGET static inline void NAME(unpack_q6_k)(const uint8_t *sub, __m256i w[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    const __m256i a = _mm256_loadu_si256((const __m256i *)sub);
    const __m256i b = _mm256_loadu_si256((const __m256i *)(sub + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)(sub + K6_HIGH_AT));
    /* bits 2t, 2t + 1 of h's bytes are w[t]'s fifth and sixth: moved to bits 4 and 5 (16-bit shifts; what crosses
       from the next byte is masked off) */
    const __m256i low[4] = {a, _mm256_srli_epi16(a, 4), b, _mm256_srli_epi16(b, 4)};
    const __m256i top[4] = {_mm256_slli_epi16(h, 4), _mm256_slli_epi16(h, 2), h, _mm256_srli_epi16(h, 2)};
    for (int t = 0; t < 4; t++) w[t] = _mm256_or_si256(_mm256_and_si256(low[t], m4), _mm256_and_si256(top[t], m30));
}

/* The 8 rows' scale[s] * (sum(q * x) - 32 * bsum[s]) over sub-block s, added to acc: exact. */
TARGET static inline __m256i NAME(q6_k_step)(__m256i acc, const __m256i w[4], __m256i scale, const block_q8_K *x,
                                             int s) {
    const int8_t *q = x->qs + 16 * s;
    __m256i c[4];
    for (int t = 0; t < 4; t++) { /* each a broadcast from memory */
        int32_t four;
        memcpy(&four, q + 4 * t, 4);
        c[t] = _mm256_set1_epi32(four);
    }
    const __m256i zero = _mm256_setzero_si256();
    const __m256i first = NAME(dot4)(NAME(dot4)(zero, w[0], c[0]), w[1], c[1]);
    const __m256i second = NAME(dot4)(NAME(dot4)(zero, w[2], c[2]), w[3], c[3]);
    const __m256i t = _mm256_add_epi32(first, second);
    const __m256i u = _mm256_sub_epi32(t, _mm256_set1_epi32(32 * (int32_t)x->bsums[s]));
    return _mm256_add_epi32(acc, _mm256_mullo_epi32(u, scale));
}

/* One group's rows for `cols` tokens (a constant where inlined, so that their sums stay in registers): out[j * ldo],
   or added to what is there (`more`: the sums over earlier blocks, which a float holds without loss between calls,
   for the path that packs a block at a time). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES (4 * K6_GROUP_BYTES) /* a few blocks ahead: faster than the prefetcher alone */
#endif
TARGET static inline __attribute__((always_inline)) void NAME(q6_k_group)(const uint8_t *group, int64_t k, int cols,
                                                                          const block_q8_K *x, int64_t ldx, float *out,
                                                                          int64_t ldo, bool more) {
    __m256 acc[8];
    for (int c = 0; c < cols; c++) acc[c] = more ? _mm256_loadu_ps(out + c * ldo) : _mm256_setzero_ps();
    for (int64_t l = 0; l < k; l++) {
        const uint8_t *block = group + l * K6_GROUP_BYTES;
        __m256i sums[8];
        for (int c = 0; c < cols; c++) sums[c] = _mm256_setzero_si256();
        for (int s = 0; s < QK_K / 16; s++) {
            __m256i w[4];
            const uint8_t *sub = block + K6_SUB_BYTES * s;
            _mm_prefetch((const char *)sub + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)sub + PREFETCH_BYTES + 64, _MM_HINT_T0);
            NAME(unpack_q6_k)(sub, w);
            const __m256i scale = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sub + K6_SCALES_AT)));
            for (int c = 0; c < cols; c++) sums[c] = NAME(q6_k_step)(sums[c], w, scale, x + c * ldx + l, s);
        }
        const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + K6_D_AT)));
        for (int c = 0; c < cols; c++)
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[c]), _mm256_mul_ps(wd, _mm256_set1_ps(x[c * ldx + l].d)),
                                     acc[c]);
    }
    for (int c = 0; c < cols; c++) _mm256_storeu_ps(out + c * ldo, acc[c]);
}

/* multiply_groups_q6_k: groups of rows by any number of tokens (K_QUANT_GROUPS, _q5_0.c) */
K_QUANT_GROUPS(q6_k, K6_GROUP_BYTES)
