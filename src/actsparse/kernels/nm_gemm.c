/* N:M activation-sparse linear layer for float32: Y = X_sparse · Wᵀ (+ bias) (+ η · row_sum),
 * multiplying only the kept activations. Called through ctypes on tensor buffers.
 *
 * Three steps:
 *   actsparse_pack_weight   once per layer: W (out × in, row-major) into panels of WIDE (128)
 *                           output channels, and one of NARROW (64) when out / 64 is odd; a panel
 *                           of width P starting at output o0 holds W[o0 + o, k] at [k][o]. The
 *                           last panel is padded with zeros to its width.
 *   actsparse_nm_compress   per call: for every token, the top n of every m scores |x|·factor
 *                           (ties to the lower index, as in nm_select.c), written as (value,
 *                           channel) pairs in increasing channel order. A tail shorter than m is
 *                           kept whole. Every token keeps the same count.
 *   actsparse_nm_gemm       per call: for every panel, every block of input channels and every
 *                           few tokens, y[t, panel] += value · W[panel, channel] over the token's
 *                           kept entries in the block. The panel's block of weights (32 KiB)
 *                           stays in L1 while all tokens pass over it; each kept value is one
 *                           broadcast and P/16 FMAs with a weight row loaded from L1, for 3
 *                           tokens at once (6 in a narrow panel): 24 register accumulators.
 *
 * The GEMM is written with GCC vector types and compiled three times (AVX-512, AVX2 + FMA,
 * baseline x86-64 or whatever the target is); the widest the CPU supports is picked at run time.
 * Built by setuptools with the system compiler; no Python or PyTorch headers are used.
 */
#include <stdint.h>

#define NARROW 64  /* output channels of a narrow panel: four 16-float vectors; the output unit */
#define WIDE 128   /* output channels of a wide panel: eight vectors */
#define KBLOCK (32768 / 4 / WIDE) /* input channels per block: a wide panel's block is 32 KiB */
#define STRETCH_BLOCKS 32 /* blocks whose compressed rows are reused by every panel */
#define CHUNK_TOKENS 6 /* token chunks are multiples of both micro-kernels' token counts */
#define MAX_M 64

typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));

/* One kept input: its value and its channel, side by side so that a token's entries are one stream. */
typedef struct {
    float value;
    int32_t channel;
} kept_entry;

int64_t actsparse_output_unit(void) { return NARROW; }

/* Panel p covers outputs p·WIDE onwards and starts at p·in·WIDE in the packed weight; all panels
 * are WIDE but the last, which is NARROW when the count of 64-output units is odd. */
static int64_t panel_count(int64_t units) { return (units + 1) / 2; }
static int64_t panel_width(int64_t p, int64_t units) { return 2 * p + 1 == units ? NARROW : WIDE; }

void actsparse_pack_weight(const float *weight, float *packed, int64_t out, int64_t in) {
    const int64_t units = (out + NARROW - 1) / NARROW;
    for (int64_t p = 0; p < panel_count(units); p++) {
        const int64_t width = panel_width(p, units);
        float *panel = packed + p * in * WIDE;
        for (int64_t k = 0; k < in; k++)
            for (int64_t o = 0; o < width; o++) {
                const int64_t channel = p * WIDE + o;
                panel[k * width + o] = channel < out ? weight[channel * in + k] : 0.0f;
            }
    }
}

/* ---- select and compress -------------------------------------------------------------------- */

/* Scores are never negative; a NaN score (from a NaN input) ranks last, -1, so that every group
 * still keeps exactly n entries (the caller is told about the NaN). */
static inline float score_of(float v, const float *factor, int64_t k) {
    const float s = (v < 0 ? -v : v) * (factor ? factor[k] : 1.0f);
    return s == s ? s : -1.0f;
}

/* One group of m inputs starting at channel c: writes its n kept entries. */
static int64_t compress_group_portable(const float *x, const float *factor, int64_t c, int m, int n,
                                       kept_entry *entries, int *nan) {
    float score[MAX_M];
    for (int k = 0; k < m; k++) {
        *nan |= x[k] != x[k];
        score[k] = score_of(x[k], factor, c + k);
    }
    int64_t nonzero = 0;
    int written = 0;
    for (int i = 0; i < m; i++) {
        int rank = 0;
        for (int j = 0; j < m; j++) rank += (score[j] > score[i]) | ((score[j] == score[i]) & (j < i));
        if (rank < n) {
            entries[written++] = (kept_entry){x[i], (int32_t)(c + i)};
            nonzero += x[i] != 0.0f;
        }
    }
    return nonzero;
}

static int64_t compress_row_portable(const float *x, const float *factor, int64_t body, int m, int n,
                                     kept_entry *entries, int *nan) {
    int64_t nonzero = 0;
    for (int64_t g = 0; g < body; g += m)
        nonzero += compress_group_portable(x + g, factor, g, m, n, entries + g / m * n, nan);
    return nonzero;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86_DISPATCH 1

/* The scores of 16 inputs, as score_of. */
__attribute__((target("avx512f"))) static inline __m512 scores_of(__m512 v, const float *factor) {
    __m512 s = _mm512_abs_ps(v);
    if (factor) s = _mm512_mul_ps(s, _mm512_loadu_ps(factor));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), s, _mm512_set1_ps(-1.0f));
}

/* Ranks of 16 scores within groups of m (2, 4, 8 or 16) held in one register. */
__attribute__((target("avx512f"))) static inline __m512i ranks_in_register(__m512 scores, int m) {
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
    return rank;
}

/* Rank of each of the 16 scores in s[h] within the 32 scores s[0], s[1]. */
__attribute__((target("avx512f"))) static inline __m512i ranks_of_32(const float *scores, __m512 s, int h) {
    const __m512i lane = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(16 * h));
    __m512i rank = _mm512_setzero_si512();
    for (int j = 0; j < 32; j++) {
        const __m512 sj = _mm512_set1_ps(scores[j]);
        const __mmask16 later = _mm512_cmpgt_epi32_mask(lane, _mm512_set1_epi32(j));
        const __mmask16 beats =
            _mm512_cmp_ps_mask(sj, s, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(later, sj, s, _CMP_EQ_OQ);
        rank = _mm512_mask_add_epi32(rank, beats, rank, _mm512_set1_epi32(1));
    }
    return rank;
}

/* m = 2, 4, 8, 16 or 32 and a body that is a multiple of 16: ranks in registers, then the kept
 * values and channels compressed to the front of two registers, interleaved into pairs and stored. */
__attribute__((target("avx512f"))) static int64_t compress_row_avx512(const float *x, const float *factor,
                                                                     int64_t body, int m, int n,
                                                                     kept_entry *entries, int *nan) {
    const __m512i first_pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i last_pairs = _mm512_add_epi32(first_pairs, _mm512_set1_epi32(8));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 zero = _mm512_setzero_ps();
    __mmask16 nan_lanes = 0;
    int64_t nonzero = 0, written = 0;
    float scores[32] __attribute__((aligned(64)));
    for (int64_t g = 0; g < body; g += 16) {
        const __m512 v = _mm512_loadu_ps(x + g);
        const __m512 s = scores_of(v, factor ? factor + g : 0);
        nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __m512i rank;
        if (m <= 16) {
            rank = ranks_in_register(s, m);
        } else {
            const int h = (int)(g / 16) & 1;
            if (h == 0) {
                _mm512_store_ps(scores, s);
                _mm512_store_ps(scores + 16, scores_of(_mm512_loadu_ps(x + g + 16), factor ? factor + g + 16 : 0));
            }
            rank = ranks_of_32(scores, s, h);
        }
        const __mmask16 keep = _mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(n));
        const __m512 kept_values = _mm512_maskz_compress_ps(keep, v);
        const __m512 kept_channels = _mm512_castsi512_ps(
            _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(lane, _mm512_set1_epi32((int)g))));
        const int count = __builtin_popcount(keep); /* entries, two floats each */
        float *out = (float *)(entries + written);
        _mm512_mask_storeu_ps(out, (__mmask16)((1u << (count > 8 ? 16 : 2 * count)) - 1),
                              _mm512_permutex2var_ps(kept_values, first_pairs, kept_channels));
        if (count > 8)
            _mm512_mask_storeu_ps(out + 16, (__mmask16)((1u << (2 * count - 16)) - 1),
                                  _mm512_permutex2var_ps(kept_values, last_pairs, kept_channels));
        written += count;
        nonzero += __builtin_popcount(keep & _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ));
    }
    *nan |= nan_lanes != 0;
    return nonzero;
}
#endif

int64_t actsparse_nm_compress(const float *x, const float *factor, kept_entry *entries, int64_t rows,
                              int64_t width, int64_t n, int64_t m, int64_t threads, int32_t *has_nan) {
    if (m < 1 || m > MAX_M || n < 1 || n > m) return -1;
    const int64_t body = width - width % m;
    const int64_t kept_per_row = body / m * n + (width - body);
    int use_avx512 = 0;
#ifdef HAVE_X86_DISPATCH
    use_avx512 = (m == 2 || m == 4 || m == 8 || m == 16 || m == 32) && body % 16 == 0 &&
                 __builtin_cpu_supports("avx512f");
#endif
    int64_t nonzero_total = 0;
    int nan_any = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : nonzero_total) reduction(| : nan_any) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        kept_entry *er = entries + r * kept_per_row;
        int nan = 0;
        int64_t nonzero;
#ifdef HAVE_X86_DISPATCH
        if (use_avx512) nonzero = compress_row_avx512(xr, factor, body, (int)m, (int)n, er, &nan);
        else
#endif
            nonzero = compress_row_portable(xr, factor, body, (int)m, (int)n, er, &nan);
        for (int64_t k = body; k < width; k++) {
            er[body / m * n + k - body] = (kept_entry){xr[k], (int32_t)k};
            nan |= xr[k] != xr[k];
            nonzero += xr[k] != 0.0f;
        }
        nonzero_total += nonzero;
        nan_any |= nan;
    }
    *has_nan = nan_any;
    return nonzero_total;
}

/* ---- sparse GEMM ---------------------------------------------------------------------------- */

/* y[r][0, width) += Σ_i entries[r][i].value · panel[entries[r][i].channel] for `tokens` tokens, over
 * `count` kept entries each. Always inlined with constant `tokens` and `width`, so that the
 * accumulators live in registers. */
#define MICRO_KERNEL_BODY                                                                               \
    vec16 acc[tokens][width / 16];                                                                      \
    for (int r = 0; r < tokens; r++)                                                                    \
        for (int j = 0; j < width / 16; j++) acc[r][j] = *(const vec16 *)(y[r] + 16 * j);              \
    for (int64_t i = 0; i < count; i++) {                                                               \
        for (int r = 0; r < tokens; r++) {                                                              \
            const vec16 *w = (const vec16 *)(panel + (int64_t)entries[r][i].channel * width);           \
            const float v = entries[r][i].value;                                                        \
            for (int j = 0; j < width / 16; j++) acc[r][j] += v * w[j];                                 \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < tokens; r++)                                                                    \
        for (int j = 0; j < width / 16; j++) *(vec16 *)(y[r] + 16 * j) = acc[r][j];

/* One panel of `width` outputs, one block of input channels, tokens [t0, t1), `group` tokens at a
 * time (at most 6). y holds the partial sums so far. */
#define PANEL_BLOCK_BODY(micro, width, group)                                                           \
    const kept_entry *rows_[group];                                                                     \
    float *ys[group];                                                                                   \
    for (int64_t t = t0; t < t1; t += group) {                                                          \
        const int tokens = t1 - t >= group ? group : (int)(t1 - t);                                     \
        for (int r = 0; r < tokens; r++) {                                                              \
            rows_[r] = entries + (t + r) * kept_per_row + first;                                        \
            ys[r] = y + (t + r) * ldy;                                                                  \
        }                                                                                               \
        switch (tokens) { /* cases above `group` never happen; capped so that they compile */        \
        case 6: micro(6 > group ? group : 6, width, panel, rows_, count, ys); break;                     \
        case 5: micro(5 > group ? group : 5, width, panel, rows_, count, ys); break;                     \
        case 4: micro(4 > group ? group : 4, width, panel, rows_, count, ys); break;                     \
        case 3: micro(3, width, panel, rows_, count, ys); break;                                        \
        case 2: micro(2, width, panel, rows_, count, ys); break;                                        \
        default: micro(1, width, panel, rows_, count, ys); break;                                       \
        }                                                                                               \
    }

#define DEFINE_GEMM(suffix, target_attribute)                                                           \
    target_attribute static inline __attribute__((always_inline)) void micro_##suffix(                  \
        const int tokens, const int width, const float *panel, const kept_entry *const *entries,        \
        int64_t count, float *const *y) {                                                               \
        MICRO_KERNEL_BODY                                                                               \
    }                                                                                                   \
    target_attribute static void panel_block_##suffix(const float *panel, int64_t width,                \
                                                      const kept_entry *entries, int64_t kept_per_row,  \
                                                      int64_t first, int64_t count, float *y,           \
                                                      int64_t ldy, int64_t t0, int64_t t1) {            \
        if (width == WIDE) {                                                                            \
            PANEL_BLOCK_BODY(micro_##suffix, WIDE, 3)                                                   \
        } else {                                                                                        \
            PANEL_BLOCK_BODY(micro_##suffix, NARROW, 6)                                                 \
        }                                                                                               \
    }

DEFINE_GEMM(portable, )
#ifdef HAVE_X86_DISPATCH
DEFINE_GEMM(avx2, __attribute__((target("avx2,fma"))))
DEFINE_GEMM(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma"))))
#endif

typedef void (*panel_block_fn)(const float *, int64_t, const kept_entry *, int64_t, int64_t, int64_t, float *,
                               int64_t, int64_t, int64_t);

static panel_block_fn pick_panel_block(int64_t isa) {
#ifdef HAVE_X86_DISPATCH
    if (isa >= 2 && __builtin_cpu_supports("avx512f")) return panel_block_avx512;
    if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return panel_block_avx2;
#endif
    (void)isa;
    return panel_block_portable;
}

/* The instruction set the GEMM runs with when allowed up to `isa` (2 AVX-512, 1 AVX2, 0 portable). */
int64_t actsparse_gemm_isa(int64_t isa) {
    const panel_block_fn fn = pick_panel_block(isa);
#ifdef HAVE_X86_DISPATCH
    if (fn == panel_block_avx512) return 2;
    if (fn == panel_block_avx2) return 1;
#endif
    (void)fn;
    return 0;
}

/* y (rows × ldy, ldy = units · NARROW) = the compressed rows times the packed weight (in_width
 * inputs, `units` 64-output units), plus bias[o] and eta[t] · row_sum[o] where given (each padded
 * to ldy). */
void actsparse_nm_gemm(const kept_entry *entries, int64_t rows, int64_t kept_per_row, int64_t in_width,
                       int64_t n, int64_t m, const float *packed, int64_t units, const float *bias,
                       const float *eta, const float *row_sum, float *y, int64_t threads, int64_t isa) {
    if (rows == 0) return;
    const panel_block_fn panel_block = pick_panel_block(isa);
    const int64_t panels = panel_count(units), ldy = units * NARROW;
    const int64_t body = in_width - in_width % m;
    const int64_t block_width = KBLOCK / m * m; /* whole groups only */
    const int64_t kept_per_block = block_width / m * n;
    const int64_t blocks = (in_width + block_width - 1) / block_width;
    /* Token chunks give the second thread work when there are few panels. */
    int64_t chunks = (threads * 4 + panels - 1) / panels;
    int64_t chunk_rows = (rows + chunks - 1) / chunks;
    chunk_rows = (chunk_rows + CHUNK_TOKENS - 1) / CHUNK_TOKENS * CHUNK_TOKENS;
    chunks = (rows + chunk_rows - 1) / chunk_rows;
    /* Blocks are taken a stretch at a time, so that the stretch's compressed rows stay in cache
     * while every panel passes over them (a wide layer's whole compressed input would not). */
    for (int64_t stretch = 0; stretch < blocks; stretch += STRETCH_BLOCKS) {
        const int64_t stretch_end = stretch + STRETCH_BLOCKS < blocks ? stretch + STRETCH_BLOCKS : blocks;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
        for (int64_t p = 0; p < panels; p++)
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t t0 = c * chunk_rows;
                const int64_t t1 = t0 + chunk_rows < rows ? t0 + chunk_rows : rows;
                const int64_t width = panel_width(p, units), o0 = p * WIDE;
                float *yp = y + o0;
                if (stretch == 0)
                    for (int64_t t = t0; t < t1; t++)
                        for (int64_t o = 0; o < width; o++) {
                            float start = bias ? bias[o0 + o] : 0.0f;
                            if (eta) start += eta[t] * row_sum[o0 + o];
                            yp[t * ldy + o] = start;
                        }
                const float *panel = packed + p * in_width * WIDE;
                for (int64_t b = stretch; b < stretch_end; b++) {
                    /* Every block but the last is whole groups; the last also holds the dense tail. */
                    const int64_t first = b * kept_per_block;
                    const int64_t count =
                        (b + 1) * block_width <= body ? kept_per_block : kept_per_row - first;
                    if (count > 0)
                        panel_block(panel, width, entries, kept_per_row, first, count, yp, ldy, t0, t1);
                }
            }
    }
}
