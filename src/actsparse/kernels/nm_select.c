/* N:M activation selection for float32 rows, called through ctypes on tensor buffers.
 *
 * For every row of x (rows × width, contiguous) and every group of m consecutive inputs, keep the
 * n entries with the highest score |x| · factor (factor may be NULL); among equal scores the lower
 * index wins. A tail shorter than m is kept whole. Two passes share the selection:
 *   actsparse_nm_select_f32  writes x with the dropped entries zeroed (the emulated backend);
 *   actsparse_nm_compress    writes the kept entries as (value, channel) pairs in channel order
 *                            (the cpu-kernel backend's sparse GEMM reads them, nm_gemm.c).
 * Both also report whether x holds a NaN and how many kept values are non-zero.
 *
 * Selection: entry i of a group is kept when its rank -- the number of entries j that beat it (a
 * higher score, or an equal score at a lower index) -- is below n. With AVX-512 (picked at run
 * time) one register holds 16 scores: 16/m groups for m = 2, 4 or 8, ranked with m permutes and
 * compares. A group of 16 is sorted instead (a bitonic network) to find its n-th score τ; the
 * entries above τ are kept, and of those equal to τ the lowest-indexed ones fill the n places. A
 * group of 32 spans two registers: each half is sorted, the halves merged, and the same rule
 * applied to the 32-bit masks. Other CPUs and group sizes use the portable loop. A NaN score
 * counts as -1, below every real score, so every group keeps exactly n entries even then.
 *
 * Built by setuptools with the system compiler; no Python or PyTorch headers are used.
 */
#include <stdint.h>

#define MAX_M 64

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
#define HAVE_AVX512_PATH 1
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
AVX512 static inline uint32_t keep_by_threshold(uint32_t above, uint32_t equal, int n) {
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
#endif

/* 2 when this CPU runs the AVX-512 selection (for m = 2, 4, 8, 16, 32), 0 when only the portable loop. */
int64_t actsparse_select_isa(void) {
#ifdef HAVE_AVX512_PATH
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2") ? 2 : 0;
#else
    return 0;
#endif
}

static int avx512_takes(int64_t m, int64_t body) {
    return (m == 2 || m == 4 || m == 8 || m == 16 || m == 32) && body % 16 == 0 && actsparse_select_isa() == 2;
}

int64_t actsparse_nm_select_f32(const float *x, const float *factor, float *out, int64_t rows,
                                int64_t width, int64_t n, int64_t m, int64_t threads, int32_t *has_nan) {
    if (m < 1 || m > MAX_M || n < 1 || n > m) return -1;
    const int64_t body = width - width % m;
    const int use_avx512 = avx512_takes(m, body);
    int64_t nonzero_total = 0;
    int nan_any = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : nonzero_total) reduction(| : nan_any) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *orow = out + r * width;
        int nan = 0;
        int64_t nonzero = 0;
#ifdef HAVE_AVX512_PATH
        if (use_avx512) nonzero = select_row_avx512(xr, factor, orow, body, (int)m, (int)n, &nan);
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

int64_t actsparse_nm_compress(const float *x, const float *factor, kept_entry *entries, int64_t rows,
                              int64_t width, int64_t n, int64_t m, int64_t threads, int32_t *has_nan) {
    if (m < 1 || m > MAX_M || n < 1 || n > m) return -1;
    const int64_t body = width - width % m;
    const int64_t kept_per_row = body / m * n + (width - body);
    const int use_avx512 = avx512_takes(m, body);
    int64_t nonzero_total = 0;
    int nan_any = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : nonzero_total) reduction(| : nan_any) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        kept_entry *er = entries + r * kept_per_row;
        int nan = 0;
        int64_t nonzero = 0, written = 0;
#ifdef HAVE_AVX512_PATH
        if (use_avx512) {
            nonzero = compress_row_avx512(xr, factor, er, body, (int)m, (int)n, &nan);
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
