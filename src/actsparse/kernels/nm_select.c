/* Fused N:M activation selection for float32 rows, called through ctypes on tensor buffers.
 *
 * For every row of x (rows x width, contiguous) and every group of m consecutive inputs, keep the
 * n entries with the highest score |x| * factor (factor may be NULL) and zero the rest; among equal
 * scores the lower index wins. A tail shorter than m is copied unchanged. One pass reads x and
 * writes out; it also reports whether x holds a NaN and how many kept values are non-zero.
 *
 * Entry i of a group is kept when its rank -- the number of entries j that beat it (a higher score,
 * or an equal score at a lower index) -- is below n. With AVX-512 (picked at run time) one register
 * holds 16 scores: a group of 16, or 16/m groups when m is 2, 4 or 8; each j costs one broadcast
 * and two masked compares. Other CPUs and group sizes use the portable loop.
 *
 * Built by setuptools with the system compiler; no Python or PyTorch headers are used.
 */
#include <stdint.h>

#define MAX_M 64

static inline float abs_score(float v, const float *factor, int64_t k) {
    return (v < 0 ? -v : v) * (factor ? factor[k] : 1.0f);
}

/* One group of m at x (channel offset c for the factor), any m <= MAX_M. */
static int64_t select_group_portable(const float *x, const float *factor, int64_t c, float *out,
                                     int m, int n, int *nan) {
    float score[MAX_M];
    for (int k = 0; k < m; k++) {
        *nan |= x[k] != x[k];
        score[k] = abs_score(x[k], factor, c + k);
    }
    int64_t kept = 0;
    for (int i = 0; i < m; i++) {
        int rank = 0;
        for (int j = 0; j < m; j++) rank += (score[j] > score[i]) | ((score[j] == score[i]) & (j < i));
        out[i] = rank < n ? x[i] : 0.0f;
        kept += (rank < n) & (x[i] != 0.0f);
    }
    return kept;
}

static int64_t select_row_portable(const float *x, const float *factor, float *out, int64_t body,
                                   int m, int n, int *nan) {
    int64_t kept = 0;
    for (int64_t g = 0; g < body; g += m) kept += select_group_portable(x + g, factor, g, out + g, m, n, nan);
    return kept;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1

__attribute__((target("avx512f"))) static inline __m512 load_scores(const float *x, const float *factor,
                                                                     __m512 *values) {
    *values = _mm512_loadu_ps(x);
    __m512 s = _mm512_abs_ps(*values);
    return factor ? _mm512_mul_ps(s, _mm512_loadu_ps(factor)) : s;
}

__attribute__((target("avx512f"))) static inline int64_t store_kept(float *out, __m512 values, __m512i rank,
                                                                     int n) {
    const __mmask16 keep = _mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(n));
    _mm512_storeu_ps(out, _mm512_maskz_mov_ps(keep, values));
    return __builtin_popcount(keep & _mm512_cmp_ps_mask(values, _mm512_setzero_ps(), _CMP_NEQ_UQ));
}

/* m = 2, 4, 8 or 16: one register holds 16/m whole groups. */
__attribute__((target("avx512f"))) static int64_t select_row_avx512(const float *x, const float *factor,
                                                                   float *out, int64_t body, int m,
                                                                   int n, int *nan) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i position = _mm512_and_si512(_mm512_set1_epi32(m - 1), lane);
    const __m512i group_start = _mm512_sub_epi32(lane, position);
    __m512i source[16];
    __mmask16 later[16];
    for (int j = 0; j < m; j++) {
        source[j] = _mm512_add_epi32(group_start, _mm512_set1_epi32(j));
        later[j] = _mm512_cmpgt_epi32_mask(position, _mm512_set1_epi32(j));
    }
    const __m512i one = _mm512_set1_epi32(1);
    int64_t kept = 0;
    __mmask16 nan_lanes = 0;
    for (int64_t g = 0; g < body; g += 16) {
        __m512 values;
        const __m512 scores = load_scores(x + g, factor ? factor + g : 0, &values);
        nan_lanes |= _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
        __m512i rank = _mm512_setzero_si512();
        for (int j = 0; j < m; j++) {
            const __m512 sj = _mm512_permutexvar_ps(source[j], scores);
            const __mmask16 beats = _mm512_cmp_ps_mask(sj, scores, _CMP_GT_OQ) |
                                    _mm512_mask_cmp_ps_mask(later[j], sj, scores, _CMP_EQ_OQ);
            rank = _mm512_mask_add_epi32(rank, beats, rank, one);
        }
        kept += store_kept(out + g, values, rank, n);
    }
    *nan |= nan_lanes != 0;
    return kept;
}

/* m = 32: a group spans two registers; entry j is broadcast from memory. */
__attribute__((target("avx512f"))) static int64_t select_row_avx512_32(const float *x, const float *factor,
                                                                      float *out, int64_t body, int n,
                                                                      int *nan) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i one = _mm512_set1_epi32(1);
    int64_t kept = 0;
    __mmask16 nan_lanes = 0;
    float scores[32] __attribute__((aligned(64)));
    for (int64_t g = 0; g < body; g += 32) {
        __m512 values[2], s[2];
        for (int h = 0; h < 2; h++) {
            s[h] = load_scores(x + g + 16 * h, factor ? factor + g + 16 * h : 0, &values[h]);
            nan_lanes |= _mm512_cmp_ps_mask(values[h], values[h], _CMP_UNORD_Q);
            _mm512_store_ps(scores + 16 * h, s[h]);
        }
        __m512i rank[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int j = 0; j < 32; j++) {
            const __m512 sj = _mm512_set1_ps(scores[j]);
            for (int h = 0; h < 2; h++) {
                const __mmask16 later = _mm512_cmpgt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * h)),
                                                                _mm512_set1_epi32(j));
                const __mmask16 beats = _mm512_cmp_ps_mask(sj, s[h], _CMP_GT_OQ) |
                                        _mm512_mask_cmp_ps_mask(later, sj, s[h], _CMP_EQ_OQ);
                rank[h] = _mm512_mask_add_epi32(rank[h], beats, rank[h], one);
            }
        }
        for (int h = 0; h < 2; h++) kept += store_kept(out + g + 16 * h, values[h], rank[h], n);
    }
    *nan |= nan_lanes != 0;
    return kept;
}
#endif

int64_t actsparse_nm_select_f32(const float *x, const float *factor, float *out, int64_t rows,
                                int64_t width, int64_t n, int64_t m, int64_t threads, int32_t *has_nan) {
    if (m < 1 || m > MAX_M || n < 1 || n > m) return -1;
    const int64_t body = width - width % m;
    int use_avx512 = 0;
#ifdef HAVE_AVX512_PATH
    use_avx512 = (m == 2 || m == 4 || m == 8 || m == 16 || m == 32) && body % 16 == 0 &&
                 __builtin_cpu_supports("avx512f");
#endif
    int64_t kept_total = 0;
    int nan_any = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : kept_total) reduction(| : nan_any) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *orow = out + r * width;
        int nan = 0;
        int64_t kept;
#ifdef HAVE_AVX512_PATH
        if (use_avx512 && m == 32) kept = select_row_avx512_32(xr, factor, orow, body, (int)n, &nan);
        else if (use_avx512) kept = select_row_avx512(xr, factor, orow, body, (int)m, (int)n, &nan);
        else
#endif
            kept = select_row_portable(xr, factor, orow, body, (int)m, (int)n, &nan);
        for (int64_t k = body; k < width; k++) {
            orow[k] = xr[k];
            nan |= xr[k] != xr[k];
            kept += xr[k] != 0.0f;
        }
        kept_total += kept;
        nan_any |= nan;
    }
    *has_nan = nan_any;
    return kept_total;
}
