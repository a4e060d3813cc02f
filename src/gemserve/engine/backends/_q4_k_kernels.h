/* The Q4_K kernel's arithmetic, included by _q5_0.c once per instruction set, as _q5_0_kernels.h (whose `dot4` it
   uses): with TARGET, NAME(x) and VNNI defined.

A Q4_K block is 256 weights d * scale[s] * q - dmin * min[s]: q 0..15 in 4 bits, a 6-bit scale and min per 32
weights (sub-block s), fp16 d and dmin. Tokens come quantized to Q8_K by llama.cpp (256 int8 values, a float d, the
sums of each 16: bsums). A row's product with a token's block is xd * (d * S - dmin * M), S = sum over s of
scale[s] * sum(q * x) over the sub-block and M = sum over s of min[s] * (bsums of its two 16s): both integers, exact
in 32 bits (S at most 8 * 63 * 32 * 15 * 128; its conversion to float may round, the same way everywhere), then two
float steps per block, in the same order on every path and
with either instruction set, so a token's result is bit for bit the same whatever the pass. `dot4` with AVX2 sums
pairs of byte products in 16 bits: 2 * 15 * 128 < 32768. */

/* A sub-block of a packed block (columns 32s..32s + 31), unpacked: w[t] holds columns 32s + 4t .. 32s + 4t + 3 of
   the 8 rows (row r in bytes 4r..4r+3) as the values 0..15. */
TARGET static inline void NAME(unpack_q4_k)(const uint8_t *sub, __m256i w[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 4; h++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(sub + 32 * h));
        w[h] = _mm256_and_si256(v, m4);
        w[h + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
}

/* sum(q * x) over sub-block s for the 8 rows, times their scales, added to acc: exact. */
TARGET static inline __m256i NAME(q4_k_step)(__m256i acc, const __m256i w[8], __m256i scale, const block_q8_K *x,
                                             int s) {
    const int8_t *q = x->qs + 32 * s;
    __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
    for (int t = 0; t < 8; t += 2) { /* each 4 activations broadcast from memory */
        int32_t four[2];
        memcpy(four, q + 4 * t, 8);
        even = NAME(dot4)(even, w[t], _mm256_set1_epi32(four[0]));
        odd = NAME(dot4)(odd, w[t + 1], _mm256_set1_epi32(four[1]));
    }
    return _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_add_epi32(even, odd), scale));
}

/* One group's rows for `cols` tokens (a constant where inlined, so that their sums stay in registers): out[j * ldo],
   or added to what is there (`more`: the sums over earlier blocks, for the path that packs a block at a time). */
#ifndef Q4_PREFETCH_BYTES
#define Q4_PREFETCH_BYTES (4 * K4_GROUP_BYTES) /* a few blocks ahead, as for Q6_K */
#endif
TARGET static inline __attribute__((always_inline)) void NAME(q4_k_group)(const uint8_t *group, int64_t k, int cols,
                                                                          const block_q8_K *x, int64_t ldx, float *out,
                                                                          int64_t ldo, bool more) {
    __m256 acc[8];
    for (int c = 0; c < cols; c++) acc[c] = more ? _mm256_loadu_ps(out + c * ldo) : _mm256_setzero_ps();
    for (int64_t l = 0; l < k; l++) {
        const uint8_t *block = group + l * K4_GROUP_BYTES;
        __m256i sums[8];
        for (int c = 0; c < cols; c++) sums[c] = _mm256_setzero_si256();
        for (int s = 0; s < QK_K / 32; s++) {
            __m256i w[8];
            const uint8_t *sub = block + K4_SUB_BYTES * s;
            _mm_prefetch((const char *)sub + Q4_PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)sub + Q4_PREFETCH_BYTES + 64, _MM_HINT_T0);
            NAME(unpack_q4_k)(sub, w);
            const __m256i scale =
                _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(block + K4_SCALES_AT + 8 * s)));
            for (int c = 0; c < cols; c++) sums[c] = NAME(q4_k_step)(sums[c], w, scale, x + c * ldx + l, s);
        }
        /* M: the mins of sub-blocks 2p, 2p + 1 as 16-bit pairs per row, against the sums of their activations */
        __m256i mins[8];
        for (int c = 0; c < cols; c++) mins[c] = _mm256_setzero_si256();
        for (int p = 0; p < QK_K / 64; p++) {
            const __m256i pair = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(block + K4_MINS_AT + 16 * p)));
            for (int c = 0; c < cols; c++) {
                const int16_t *b = x[c * ldx + l].bsums + 4 * p;
                const int32_t both = (int32_t)(uint16_t)(int16_t)(b[0] + b[1]) |
                                     (int32_t)((uint32_t)(uint16_t)(int16_t)(b[2] + b[3]) << 16);
                mins[c] = _mm256_add_epi32(mins[c], _mm256_madd_epi16(pair, _mm256_set1_epi32(both)));
            }
        }
        const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + K4_D_AT)));
        const __m256 wmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(block + K4_DMIN_AT)));
        for (int c = 0; c < cols; c++) {
            const __m256 xd = _mm256_set1_ps(x[c * ldx + l].d);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[c]), _mm256_mul_ps(wd, xd), acc[c]);
            acc[c] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mins[c]), _mm256_mul_ps(wmin, xd), acc[c]);
        }
    }
    for (int c = 0; c < cols; c++) _mm256_storeu_ps(out + c * ldo, acc[c]);
}

/* multiply_groups_q4_k: groups of rows by any number of tokens (K_QUANT_GROUPS, _q5_0.c) */
K_QUANT_GROUPS(q4_k, K4_GROUP_BYTES)
