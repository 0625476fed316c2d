/* N:M activation selection for float32 rows, called through ctypes on tensor buffers.
 *
 * For every row of x (rows × width, contiguous) and every group of m consecutive inputs, keep the
 * n entries with the highest score |x| · factor (factor may be NULL); among equal scores the lower
 * index wins. A tail shorter than m is kept whole. Two passes share the selection:
 *   actsparse_nm_select_f32  writes x with the dropped entries zeroed (the emulated backend);
 *   actsparse_nm_compress    writes the kept entries as (value, channel) pairs in channel order
 *                            (the cpu-kernel backend's sparse GEMM reads them, nm_gemm.c).
 * Both also report whether x holds a NaN and how many kept values are non-zero. For bfloat16 and
 * float16 inputs, actsparse_nm_select_16 scores (rounding as PyTorch does in that dtype), selects
 * and zeroes in one pass with AVX-512; elsewhere actsparse_nm_compress ranks the float32 copy of
 * their scores and actsparse_keep_16 writes the inputs its entries name, zero elsewhere.
 *
 * Selection: entry i of a group is kept when its rank -- the number of entries j that beat it (a
 * higher score, or an equal score at a lower index) -- is below n. With AVX-512 (picked at run
 * time) one register holds 16 scores: 16/m groups for m = 2, 4 or 8, ranked with m permutes and
 * compares. A group of 16 is sorted instead (a bitonic network) to find its n-th score τ; the
 * entries above τ are kept, and of those equal to τ the lowest-indexed ones fill the n places. A
 * group of 32 spans two registers: each half is sorted, the halves merged, and the same rule
 * applied to the 32-bit masks. With AVX2 (8 lanes) the same: ranks by permutes within a register
 * for m ≤ 8, the sorting network across two or four registers for 16 and 32; kept entries are
 * left-packed through a table. Other CPUs and group sizes use the portable loop. A NaN score counts
 * as -1, below every real score, so every group keeps exactly n entries even then.
 *
 * Built by setuptools with the system compiler; no Python or PyTorch headers are used.
 */
#include <stdint.h>

#define MAX_M 64

/* One kept input, as nm_gemm.c reads it. */
typedef struct {
    float value;
    int32_t channel;
} kept_entry;

static inline float score_of(float v, const float *factor, int64_t k) {
    const float s = (v < 0 ? -v : v) * (factor ? factor[k] : 1.0f);
    return s == s ? s : -1.0f;
}

/* Bit i set when entry i of the group of m at x (channels c.. for the factor) is kept. */
static uint64_t keep_group_portable(const float *x, const float *factor, int64_t c, int m, int n, int *nan) {
    float score[MAX_M];
    for (int k = 0; k < m; k++) {
        *nan |= x[k] != x[k];
        score[k] = score_of(x[k], factor, c + k);
    }
    uint64_t keep = 0;
    for (int i = 0; i < m; i++) {
        int rank = 0;
        for (int j = 0; j < m; j++) rank += (score[j] > score[i]) | ((score[j] == score[i]) & (j < i));
        keep |= (uint64_t)(rank < n) << i;
    }
    return keep;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86_PATHS 1
#define AVX512 __attribute__((target("avx512f,avx512dq,bmi,bmi2,popcnt")))

AVX512 static inline __m512 scores_of(__m512 v, const float *factor) {
    __m512 s = _mm512_abs_ps(v);
    if (factor) s = _mm512_mul_ps(s, _mm512_loadu_ps(factor));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), s, _mm512_set1_ps(-1.0f));
}

/* Keep mask of 16 scores in groups of m = 2, 4 or 8, by rank: m permutes and compares. */
AVX512 static inline __mmask16 keep_by_rank(__m512 scores, int m, int n) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i position = _mm512_and_si512(_mm512_set1_epi32(m - 1), lane);
    const __m512i group_start = _mm512_sub_epi32(lane, position);
    __m512i rank = _mm512_setzero_si512();
    for (int j = 0; j < m; j++) {
        const __m512 sj = _mm512_permutexvar_ps(_mm512_add_epi32(group_start, _mm512_set1_epi32(j)), scores);
        const __mmask16 later = _mm512_cmpgt_epi32_mask(position, _mm512_set1_epi32(j));
        const __mmask16 beats =
            _mm512_cmp_ps_mask(sj, scores, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(later, sj, scores, _CMP_EQ_OQ);
        rank = _mm512_mask_add_epi32(rank, beats, rank, _mm512_set1_epi32(1));
    }
    return _mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(n));
}

/* One compare-exchange stage of a bitonic network: lane i meets lane i ^ distance; the lanes in
 * `upper` take the smaller score, the others the larger. */
AVX512 static inline __m512 exchange(__m512 s, int distance, __mmask16 upper) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 partner = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(distance)), s);
    return _mm512_mask_min_ps(_mm512_max_ps(s, partner), upper, s, partner);
}

/* The 16 scores sorted in descending order: a bitonic network of 10 stages, each given by its
 * distance and the lanes that take the smaller score (the upper lane of each pair in a block sorted
 * descending, the lower one in a block sorted ascending; the last block, all 16, descending). */
AVX512 static inline __m512 sorted_descending(__m512 s) {
    s = exchange(s, 1, 0x6666);
    s = exchange(s, 2, 0x3c3c);
    s = exchange(s, 1, 0x5a5a);
    s = exchange(s, 4, 0x0ff0);
    s = exchange(s, 2, 0x33cc);
    s = exchange(s, 1, 0x55aa);
    s = exchange(s, 8, 0xff00);
    s = exchange(s, 4, 0xf0f0);
    s = exchange(s, 2, 0xcccc);
    return exchange(s, 1, 0xaaaa);
}

/* Keep the entries above tau, and of those equal to tau the lowest-indexed, n in all. */
__attribute__((target("bmi2,popcnt"))) static inline uint32_t keep_by_threshold(uint32_t above, uint32_t equal,
                                                                                int n) {
    const int room = n - __builtin_popcount(above);
    return above | _pdep_u32((uint32_t)((1ull << room) - 1), equal);
}

AVX512 static inline __mmask16 keep_16(__m512 s, int n) {
    const __m512 tau = _mm512_permutexvar_ps(_mm512_set1_epi32(n - 1), sorted_descending(s));
    return (__mmask16)keep_by_threshold(_mm512_cmp_ps_mask(s, tau, _CMP_GT_OQ),
                                        _mm512_cmp_ps_mask(s, tau, _CMP_EQ_OQ), n);
}

/* Keep mask of a group of 32 scores in two registers (bit i of the result is entry i). */
AVX512 static inline uint32_t keep_32(__m512 s0, __m512 s1, int n) {
    const __m512i reverse = _mm512_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 a = sorted_descending(s0);
    const __m512 b = _mm512_permutexvar_ps(reverse, sorted_descending(s1));
    /* max(a, reversed b) holds the 16 largest of the 32 and min the 16 smallest, each bitonic;
     * sorting the one that holds the n-th largest gives tau. */
    const __m512 half = n <= 16 ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b);
    const int index = n <= 16 ? n - 1 : n - 17;
    const __m512 tau = _mm512_permutexvar_ps(_mm512_set1_epi32(index), sorted_descending(half));
    const uint32_t above = _mm512_cmp_ps_mask(s0, tau, _CMP_GT_OQ) |
                           ((uint32_t)_mm512_cmp_ps_mask(s1, tau, _CMP_GT_OQ) << 16);
    const uint32_t equal = _mm512_cmp_ps_mask(s0, tau, _CMP_EQ_OQ) |
                           ((uint32_t)_mm512_cmp_ps_mask(s1, tau, _CMP_EQ_OQ) << 16);
    return keep_by_threshold(above, equal, n);
}

/* The keep masks of the 16 entries at x + g (and of the next 16 when m = 32, in the high half). */
AVX512 static inline uint32_t keep_avx512(const float *x, const float *factor, int64_t g, int m, int n,
                                          __m512 *values, __mmask16 *nan_lanes) {
    values[0] = _mm512_loadu_ps(x + g);
    *nan_lanes |= _mm512_cmp_ps_mask(values[0], values[0], _CMP_UNORD_Q);
    const __m512 s0 = scores_of(values[0], factor ? factor + g : 0);
    if (m == 16) return keep_16(s0, n);
    if (m < 16) return keep_by_rank(s0, m, n);
    values[1] = _mm512_loadu_ps(x + g + 16);
    *nan_lanes |= _mm512_cmp_ps_mask(values[1], values[1], _CMP_UNORD_Q);
    return keep_32(s0, scores_of(values[1], factor ? factor + g + 16 : 0), n);
}

/* Zeroes the dropped entries of one row; m = 2, 4, 8, 16 or 32 and body a multiple of 16. */
AVX512 static int64_t select_row_avx512(const float *x, const float *factor, float *out, int64_t body,
                                        int m, int n, int *nan) {
    const __m512 zero = _mm512_setzero_ps();
    const int step = m == 32 ? 32 : 16;
    int64_t nonzero = 0;
    __mmask16 nan_lanes = 0;
    for (int64_t g = 0; g < body; g += step) {
        __m512 values[2];
        const uint32_t keep = keep_avx512(x, factor, g, m, n, values, &nan_lanes);
        for (int h = 0; h < step / 16; h++) {
            const __mmask16 kept = (__mmask16)(keep >> (16 * h));
            _mm512_storeu_ps(out + g + 16 * h, _mm512_maskz_mov_ps(kept, values[h]));
            nonzero += __builtin_popcount(kept & _mm512_cmp_ps_mask(values[h], zero, _CMP_NEQ_UQ));
        }
    }
    *nan |= nan_lanes != 0;
    return nonzero;
}

/* 16-bit inputs (kind 1 bfloat16, 2 float16): 16 of them widened to float32, exactly. */
AVX512 static inline __m512 widen_16(__m256i raw, int kind) {
    if (kind == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    return _mm512_cvtph_ps(raw);
}

/* s rounded to the 16-bit kind and widened back: to nearest, ties to even, as PyTorch rounds. */
AVX512 static inline __m512 round_16(__m512 s, int kind) {
    if (kind == 2) return _mm512_cvtph_ps(_mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m512i bits = _mm512_castps_si512(s);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32((int)0xffff0000u)));
}

/* The scores of 16 widened inputs as PyTorch computes them in the 16-bit dtype: |x| (exact), or
 * |x| · factor (exact in float32 for two 16-bit operands) rounded once to the dtype; NaN → -1. */
AVX512 static inline __m512 scores_16(__m512 v, const uint16_t *factor, int kind) {
    __m512 s = _mm512_abs_ps(v);
    if (factor) s = round_16(_mm512_mul_ps(s, widen_16(_mm256_loadu_si256((const __m256i *)factor), kind)), kind);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), s, _mm512_set1_ps(-1.0f));
}

/* Zeroes the dropped entries of one row of 16-bit inputs; m = 2, 4, 8, 16 or 32, body a multiple of 16. */
AVX512 static int64_t select_row16_avx512(const uint16_t *x, const uint16_t *factor, uint16_t *out,
                                          int64_t body, int m, int n, int kind, int *nan) {
    const int step = m == 32 ? 32 : 16;
    int64_t nonzero = 0;
    __mmask16 nan_lanes = 0;
    for (int64_t g = 0; g < body; g += step) {
        __m256i raw[2];
        __m512 values[2], scores[2];
        for (int h = 0; h < step / 16; h++) {
            raw[h] = _mm256_loadu_si256((const __m256i *)(x + g + 16 * h));
            values[h] = widen_16(raw[h], kind);
            nan_lanes |= _mm512_cmp_ps_mask(values[h], values[h], _CMP_UNORD_Q);
            scores[h] = scores_16(values[h], factor ? factor + g + 16 * h : 0, kind);
        }
        const uint32_t keep = m == 32   ? keep_32(scores[0], scores[1], n)
                              : m == 16 ? keep_16(scores[0], n)
                                        : keep_by_rank(scores[0], m, n);
        for (int h = 0; h < step / 16; h++) {
            const __mmask16 kept = (__mmask16)(keep >> (16 * h));
            const __m512i wide = _mm512_maskz_mov_epi32(kept, _mm512_cvtepu16_epi32(raw[h]));
            _mm256_storeu_si256((__m256i *)(out + g + 16 * h), _mm512_cvtepi32_epi16(wide));
            nonzero += __builtin_popcount(kept & _mm512_cmp_ps_mask(values[h], _mm512_setzero_ps(), _CMP_NEQ_UQ));
        }
    }
    *nan |= nan_lanes != 0;
    return nonzero;
}

/* Writes the kept entries of one row as pairs: values and channels are compressed to the front of
 * two registers, interleaved and stored. */
AVX512 static int64_t compress_row_avx512(const float *x, const float *factor, kept_entry *entries,
                                          int64_t body, int m, int n, int *nan) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i first_pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i last_pairs = _mm512_add_epi32(first_pairs, _mm512_set1_epi32(8));
    const __m512 zero = _mm512_setzero_ps();
    const int step = m == 32 ? 32 : 16;
    int64_t nonzero = 0, written = 0;
    __mmask16 nan_lanes = 0;
    for (int64_t g = 0; g < body; g += step) {
        __m512 values[2];
        const uint32_t keep = keep_avx512(x, factor, g, m, n, values, &nan_lanes);
        for (int h = 0; h < step / 16; h++) {
            const __mmask16 kept = (__mmask16)(keep >> (16 * h));
            const __m512 kept_values = _mm512_maskz_compress_ps(kept, values[h]);
            const __m512 kept_channels = _mm512_castsi512_ps(
                _mm512_maskz_compress_epi32(kept, _mm512_add_epi32(lane, _mm512_set1_epi32((int)(g + 16 * h)))));
            const int count = __builtin_popcount(kept); /* entries, two floats each */
            float *out = (float *)(entries + written);
            _mm512_mask_storeu_ps(out, (__mmask16)((1u << (count > 8 ? 16 : 2 * count)) - 1),
                                  _mm512_permutex2var_ps(kept_values, first_pairs, kept_channels));
            if (count > 8)
                _mm512_mask_storeu_ps(out + 16, (__mmask16)((1u << (2 * count - 16)) - 1),
                                      _mm512_permutex2var_ps(kept_values, last_pairs, kept_channels));
            written += count;
            nonzero += __builtin_popcount(kept & _mm512_cmp_ps_mask(values[h], zero, _CMP_NEQ_UQ));
        }
    }
    *nan |= nan_lanes != 0;
    return nonzero;
}
#define AVX2 __attribute__((target("avx2,fma,bmi2,popcnt")))

AVX2 static inline __m256 scores_of_avx2(__m256 v, const float *factor) {
    __m256 s = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    if (factor) s = _mm256_mul_ps(s, _mm256_loadu_ps(factor));
    return _mm256_blendv_ps(s, _mm256_set1_ps(-1.0f), _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
}

/* Adds to rank, per lane, 1 where sj beats the score s of that lane (higher, or equal at a lower
 * index: `later` lanes come after j). */
AVX2 static inline __m256i add_beaten(__m256i rank, __m256 sj, __m256 s, __m256i later) {
    const __m256 beats = _mm256_or_ps(_mm256_cmp_ps(sj, s, _CMP_GT_OQ),
                                      _mm256_and_ps(_mm256_cmp_ps(sj, s, _CMP_EQ_OQ), _mm256_castsi256_ps(later)));
    return _mm256_sub_epi32(rank, _mm256_castps_si256(beats)); /* a true compare is -1 */
}

/* One compare-exchange stage at distance 1, 2 or 4 within a register; the lanes set in `upper`
 * take the smaller score (as exchange() for AVX-512). */
AVX2 static inline __m256 exchange_avx2(__m256 s, int distance, int upper) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 partner = _mm256_permutevar8x32_ps(s, _mm256_xor_si256(lane, _mm256_set1_epi32(distance)));
    const __m256i takes_min = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(upper), bit), bit);
    return _mm256_blendv_ps(_mm256_max_ps(s, partner), _mm256_min_ps(s, partner), _mm256_castsi256_ps(takes_min));
}

/* 16 scores in two registers sorted in descending order: the network of sorted_descending(), with
 * its distance-8 stage across the two registers. */
AVX2 static inline void sort16_avx2(__m256 *low, __m256 *high) {
    static const int distance[10] = {1, 2, 1, 4, 2, 1, 8, 4, 2, 1};
    static const int upper[10] = {0x6666, 0x3c3c, 0x5a5a, 0x0ff0, 0x33cc, 0x55aa, 0xff00, 0xf0f0, 0xcccc, 0xaaaa};
    for (int stage = 0; stage < 10; stage++) {
        if (distance[stage] == 8) {
            const __m256 larger = _mm256_max_ps(*low, *high);
            *high = _mm256_min_ps(*low, *high);
            *low = larger;
        } else {
            *low = exchange_avx2(*low, distance[stage], upper[stage] & 0xff);
            *high = exchange_avx2(*high, distance[stage], upper[stage] >> 8);
        }
    }
}

/* Entry `index` of 16 sorted scores, in every lane. */
AVX2 static inline __m256 entry_avx2(__m256 low, __m256 high, int index) {
    return _mm256_permutevar8x32_ps(index < 8 ? low : high, _mm256_set1_epi32(index & 7));
}

/* Keep mask of a group of 16 or 32 scores in s[0 .. m/8) by the n-th score, as keep_16 and keep_32. */
AVX2 static inline uint32_t keep_sorted_avx2(const __m256 *s, int m, int n) {
    __m256 a0 = s[0], a1 = s[1];
    sort16_avx2(&a0, &a1);
    __m256 tau;
    if (m == 16) {
        tau = entry_avx2(a0, a1, n - 1);
    } else {
        const __m256i reverse = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
        __m256 b0 = s[2], b1 = s[3];
        sort16_avx2(&b0, &b1);
        const __m256 r0 = _mm256_permutevar8x32_ps(b1, reverse), r1 = _mm256_permutevar8x32_ps(b0, reverse);
        __m256 h0 = n <= 16 ? _mm256_max_ps(a0, r0) : _mm256_min_ps(a0, r0);
        __m256 h1 = n <= 16 ? _mm256_max_ps(a1, r1) : _mm256_min_ps(a1, r1);
        sort16_avx2(&h0, &h1);
        tau = entry_avx2(h0, h1, n <= 16 ? n - 1 : n - 17);
    }
    uint32_t above = 0, equal = 0;
    for (int h = 0; h < m / 8; h++) {
        above |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s[h], tau, _CMP_GT_OQ)) << (8 * h);
        equal |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(s[h], tau, _CMP_EQ_OQ)) << (8 * h);
    }
    return keep_by_threshold(above, equal, n);
}

/* Keep mask of the max(8, m) inputs at x + g (bit i is input g + i), m = 2, 4, 8, 16 or 32, by
 * rank for m ≤ 8 and by the n-th score for 16 and 32; values[h] receives inputs g + 8h .. g + 8h + 7. */
AVX2 static inline uint32_t keep_avx2(const float *x, const float *factor, int64_t g, int m, int n,
                                      __m256 *values, int *nan) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i limit = _mm256_set1_epi32(n);
    const int registers = m > 8 ? m / 8 : 1;
    __m256 s[4];
    for (int h = 0; h < registers; h++) {
        values[h] = _mm256_loadu_ps(x + g + 8 * h);
        *nan |= _mm256_movemask_ps(_mm256_cmp_ps(values[h], values[h], _CMP_UNORD_Q)) != 0;
        s[h] = scores_of_avx2(values[h], factor ? factor + g + 8 * h : 0);
    }
    if (m <= 8) {
        const __m256i position = _mm256_and_si256(lane, _mm256_set1_epi32(m - 1));
        const __m256i group_start = _mm256_sub_epi32(lane, position);
        __m256i rank = _mm256_setzero_si256();
        for (int j = 0; j < m; j++) {
            const __m256i source = _mm256_add_epi32(group_start, _mm256_set1_epi32(j));
            rank = add_beaten(rank, _mm256_permutevar8x32_ps(s[0], source), s[0],
                              _mm256_cmpgt_epi32(position, _mm256_set1_epi32(j)));
        }
        return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, rank)));
    }
    return keep_sorted_avx2(s, m, n);
}

/* left_pack[k] lists the set bits of k, lowest first: the lanes an 8-bit keep mask moves to the front. */
static int32_t left_pack[256][8];

__attribute__((constructor)) static void fill_left_pack(void) {
    for (int k = 0; k < 256; k++)
        for (int i = 0, j = 0; i < 8; i++)
            if ((k >> i) & 1) left_pack[k][j++] = i;
}

AVX2 static int64_t select_row_avx2(const float *x, const float *factor, float *out, int64_t body, int m,
                                    int n, int *nan) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const int step = m > 8 ? m : 8;
    int64_t nonzero = 0;
    for (int64_t g = 0; g < body; g += step) {
        __m256 values[4];
        const uint32_t keep = keep_avx2(x, factor, g, m, n, values, nan);
        for (int h = 0; h < step / 8; h++) {
            const int kept = (keep >> (8 * h)) & 0xff;
            const __m256i mask = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(kept), bit), bit);
            _mm256_storeu_ps(out + g + 8 * h, _mm256_and_ps(values[h], _mm256_castsi256_ps(mask)));
            nonzero += __builtin_popcount(
                kept & _mm256_movemask_ps(_mm256_cmp_ps(values[h], _mm256_setzero_ps(), _CMP_NEQ_UQ)));
        }
    }
    return nonzero;
}

AVX2 static int64_t compress_row_avx2(const float *x, const float *factor, kept_entry *entries, int64_t body,
                                      int m, int n, int *nan) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int step = m > 8 ? m : 8;
    int64_t nonzero = 0, written = 0;
    for (int64_t g = 0; g < body; g += step) {
        __m256 values[4];
        const uint32_t keep = keep_avx2(x, factor, g, m, n, values, nan);
        for (int h = 0; h < step / 8; h++) {
            const int kept = (keep >> (8 * h)) & 0xff, count = __builtin_popcount(kept);
            const __m256i order = _mm256_loadu_si256((const __m256i *)left_pack[kept]);
            const __m256 kept_values = _mm256_permutevar8x32_ps(values[h], order);
            const __m256 kept_channels = _mm256_castsi256_ps(
                _mm256_add_epi32(order, _mm256_set1_epi32((int)(g + 8 * h))));
            const __m256 low = _mm256_unpacklo_ps(kept_values, kept_channels);  /* pairs 0, 1 | 4, 5 */
            const __m256 high = _mm256_unpackhi_ps(kept_values, kept_channels); /* pairs 2, 3 | 6, 7 */
            float *out = (float *)(entries + written);
            _mm256_maskstore_ps(out, _mm256_cmpgt_epi32(_mm256_set1_epi32(2 * count), lane),
                                _mm256_permute2f128_ps(low, high, 0x20));
            if (count > 4)
                _mm256_maskstore_ps(out + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(2 * count - 8), lane),
                                    _mm256_permute2f128_ps(low, high, 0x31));
            written += count;
            nonzero += __builtin_popcount(
                kept & _mm256_movemask_ps(_mm256_cmp_ps(values[h], _mm256_setzero_ps(), _CMP_NEQ_UQ)));
        }
    }
    return nonzero;
}
#endif

/* The selection's instruction set on this CPU: 2 AVX-512 (with BMI2), 1 AVX2, 0 the portable loop. */
int64_t actsparse_select_isa(void) {
#ifdef HAVE_X86_PATHS
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) return 1;
#endif
    return 0;
}

/* The path for groups of m over a body of `body` inputs, at most `isa`. */
static int select_path(int64_t m, int64_t body, int64_t isa) {
    const int vector_groups = m == 2 || m == 4 || m == 8 || m == 16 || m == 32;
    const int best = actsparse_select_isa() < isa ? (int)actsparse_select_isa() : (int)isa;
    if (best == 2 && vector_groups && body % 16 == 0) return 2;
    if (best >= 1 && vector_groups && body % 8 == 0) return 1;
    return 0;
}

int64_t actsparse_nm_select_f32(const float *x, const float *factor, float *out, int64_t rows,
                                int64_t width, int64_t n, int64_t m, int64_t threads, int32_t *has_nan,
                                int64_t isa) {
    if (m < 1 || m > MAX_M || n < 1 || n > m) return -1;
    const int64_t body = width - width % m;
    const int path = select_path(m, body, isa);
    int64_t nonzero_total = 0;
    int nan_any = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : nonzero_total) reduction(| : nan_any) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *orow = out + r * width;
        int nan = 0;
        int64_t nonzero = 0;
#ifdef HAVE_X86_PATHS
        if (path == 2) nonzero = select_row_avx512(xr, factor, orow, body, (int)m, (int)n, &nan);
        else if (path == 1) nonzero = select_row_avx2(xr, factor, orow, body, (int)m, (int)n, &nan);
        else
#endif
            for (int64_t g = 0; g < body; g += m) {
                const uint64_t keep = keep_group_portable(xr + g, factor, g, (int)m, (int)n, &nan);
                for (int i = 0; i < m; i++) {
                    orow[g + i] = (keep >> i) & 1 ? xr[g + i] : 0.0f;
                    nonzero += orow[g + i] != 0.0f;
                }
            }
        for (int64_t k = body; k < width; k++) {
            orow[k] = xr[k];
            nan |= xr[k] != xr[k];
            nonzero += xr[k] != 0.0f;
        }
        nonzero_total += nonzero;
        nan_any |= nan;
    }
    *has_nan = nan_any;
    return nonzero_total;
}

/* actsparse_nm_select_f32 for bfloat16 (kind 1) or float16 (kind 2) rows, with a factor of the same
 * dtype (or NULL): the scores are computed and rounded in that dtype, as PyTorch computes them.
 * AVX-512 and m = 2, 4, 8, 16 or 32 with a body that is a multiple of 16 only; returns -2 otherwise. */
int64_t actsparse_nm_select_16(const uint16_t *x, const uint16_t *factor, uint16_t *out, int64_t rows,
                               int64_t width, int64_t n, int64_t m, int64_t threads, int32_t *has_nan,
                               int64_t kind) {
    if (m < 1 || m > MAX_M || n < 1 || n > m || (kind != 1 && kind != 2)) return -1;
    const int64_t body = width - width % m;
    if (select_path(m, body, 2) != 2) return -2;
    int64_t nonzero_total = 0;
    int nan_any = 0;
#ifdef HAVE_X86_PATHS
#pragma omp parallel for num_threads(threads) reduction(+ : nonzero_total) reduction(| : nan_any) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * width;
        uint16_t *orow = out + r * width;
        int nan = 0;
        int64_t nonzero = select_row16_avx512(xr, factor, orow, body, (int)m, (int)n, (int)kind, &nan);
        for (int64_t k = body; k < width; k++) {
            const uint16_t magnitude = xr[k] & 0x7fff;
            orow[k] = xr[k];
            nan |= kind == 1 ? magnitude > 0x7f80 : magnitude > 0x7c00;
            nonzero += magnitude != 0;
        }
        nonzero_total += nonzero;
        nan_any |= nan;
    }
#endif
    *has_nan = nan_any;
    return nonzero_total;
}

int64_t actsparse_nm_compress(const float *x, const float *factor, kept_entry *entries, int64_t rows,
                              int64_t width, int64_t n, int64_t m, int64_t threads, int32_t *has_nan,
                              int64_t isa) {
    if (m < 1 || m > MAX_M || n < 1 || n > m) return -1;
    const int64_t body = width - width % m;
    const int64_t kept_per_row = body / m * n + (width - body);
    const int path = select_path(m, body, isa);
    int64_t nonzero_total = 0;
    int nan_any = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : nonzero_total) reduction(| : nan_any) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        kept_entry *er = entries + r * kept_per_row;
        int nan = 0;
        int64_t nonzero = 0, written = 0;
#ifdef HAVE_X86_PATHS
        if (path) {
            nonzero = path == 2 ? compress_row_avx512(xr, factor, er, body, (int)m, (int)n, &nan)
                                : compress_row_avx2(xr, factor, er, body, (int)m, (int)n, &nan);
            written = body / m * n;
        } else
#endif
            for (int64_t g = 0; g < body; g += m) {
                const uint64_t keep = keep_group_portable(xr + g, factor, g, (int)m, (int)n, &nan);
                for (int i = 0; i < m; i++)
                    if ((keep >> i) & 1) {
                        er[written++] = (kept_entry){xr[g + i], (int32_t)(g + i)};
                        nonzero += xr[g + i] != 0.0f;
                    }
            }
        for (int64_t k = body; k < width; k++) {
            er[written++] = (kept_entry){xr[k], (int32_t)k};
            nan |= xr[k] != xr[k];
            nonzero += xr[k] != 0.0f;
        }
        nonzero_total += nonzero;
        nan_any |= nan;
    }
    *has_nan = nan_any;
    return nonzero_total;
}

/* out (rows × width, 16-bit values: bfloat16 or float16) = x where a row's compressed entries
 * (from actsparse_nm_compress on that row's scores) name the channel, +0 elsewhere. */
void actsparse_keep_16(const kept_entry *entries, int64_t rows, int64_t kept_per_row, const uint16_t *x,
                       uint16_t *out, int64_t width, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const kept_entry *er = entries + r * kept_per_row;
        uint16_t *orow = out + r * width;
        const uint16_t *xr = x + r * width;
        for (int64_t k = 0; k < width; k++) orow[k] = 0;
        for (int64_t i = 0; i < kept_per_row; i++) orow[er[i].channel] = xr[er[i].channel];
    }
}
