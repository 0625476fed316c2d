/* N:M activation-sparse linear layer for float32: Y = X_sparse · Wᵀ (+ bias) (+ η · row_sum),
 * multiplying only the kept activations. Called through ctypes on tensor buffers.
 *
 * Three steps:
 *   actsparse_pack_weight   once per layer: W (out × in, row-major) into panels of WIDE (128)
 *                           output channels, and one of NARROW (64) when out / 64 is odd; a panel
 *                           of width P starting at output o0 holds W[o0 + o, k] at [k][o]. The
 *                           last panel is padded with zeros to its width.
 *   actsparse_nm_compress   per call (nm_select.c): for every token, its kept inputs as (value,
 *                           channel) pairs in channel order; every token keeps the same count.
 *   actsparse_nm_gemm       per call: for every panel, every block of input channels and every
 *                           few tokens, y[t, panel] += value · W[panel, channel] over the token's
 *                           kept entries in the block. The panel's block of weights (32 KiB)
 *                           stays in L1 while all tokens pass over it; each kept value is one
 *                           broadcast and P/16 FMAs with a weight row loaded from L1, for 3
 *                           tokens at once (6 in a narrow panel): 24 register accumulators with
 *                           AVX-512.
 *
 * The GEMM is written with GCC vector types and compiled three times (AVX-512, AVX2 + FMA,
 * baseline x86-64 or whatever the target is), each with vectors of its own register width and a
 * tile that fits its registers; the widest the CPU supports is picked at run time.
 * Built by setuptools with the system compiler; no Python or PyTorch headers are used.
 */
#include <stdint.h>

#define NARROW 64  /* output channels of a narrow panel; the unit of the padded output width */
#define WIDE 128   /* output channels of a wide panel */
#define KBLOCK (32768 / 4 / WIDE) /* input channels per block: a wide panel's block is 32 KiB */
#define STRETCH_BLOCKS 32 /* blocks whose compressed rows are reused by every panel */
#define CHUNK_TOKENS 6 /* token chunks are multiples of both micro-kernels' token counts */

/* Vectors of each instruction set's register width (unaligned loads and stores). */
typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef float vec8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float vec4 __attribute__((vector_size(16), aligned(4), may_alias));

/* One kept input: its value and its channel, side by side so that a token's entries are one stream
 * (written by actsparse_nm_compress in nm_select.c, which declares the same pair). */
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

#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_X86_DISPATCH 1
#endif

/* ---- sparse GEMM ---------------------------------------------------------------------------- */

/* y[r][offset, offset + tile) += Σ_i entries[r][i].value · panel[entries[r][i].channel][offset, ...)
 * for `tokens` tokens over `count` kept entries each (weight rows `stride` floats apart). Always
 * inlined with constant `tokens` and `tile`, so that the accumulators live in registers. */
#define MICRO_KERNEL_BODY(vec, lanes)                                                                   \
    vec acc[tokens][tile / lanes];                                                                      \
    for (int r = 0; r < tokens; r++)                                                                    \
        for (int j = 0; j < tile / lanes; j++) acc[r][j] = *(const vec *)(y[r] + offset + lanes * j);  \
    for (int64_t i = 0; i < count; i++) {                                                               \
        for (int r = 0; r < tokens; r++) {                                                              \
            const vec *w = (const vec *)(panel + (int64_t)entries[r][i].channel * stride + offset);     \
            const float v = entries[r][i].value;                                                        \
            for (int j = 0; j < tile / lanes; j++) acc[r][j] += v * w[j];                               \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < tokens; r++)                                                                    \
        for (int j = 0; j < tile / lanes; j++) *(vec *)(y[r] + offset + lanes * j) = acc[r][j];

/* One panel of `width` outputs, one block of input channels, tokens [t0, t1): `group` tokens (at
 * most 6) × `tile` outputs at a time. y holds the partial sums so far. */
#define PANEL_BLOCK_BODY(micro, width, group, tile)                                                     \
    const kept_entry *rows_[group];                                                                     \
    float *ys[group];                                                                                   \
    for (int64_t t = t0; t < t1; t += group) {                                                          \
        const int tokens = t1 - t >= group ? group : (int)(t1 - t);                                     \
        for (int r = 0; r < tokens; r++) {                                                              \
            rows_[r] = entries + (t + r) * kept_per_row + first;                                        \
            ys[r] = y + (t + r) * ldy;                                                                  \
        }                                                                                               \
        for (int64_t offset = 0; offset < width; offset += tile) {                                      \
            switch (tokens) { /* cases above `group` never happen; capped so that they compile */    \
            case 6: micro(6 > group ? group : 6, tile, width, offset, panel, rows_, count, ys); break;  \
            case 5: micro(5 > group ? group : 5, tile, width, offset, panel, rows_, count, ys); break;  \
            case 4: micro(4 > group ? group : 4, tile, width, offset, panel, rows_, count, ys); break;  \
            case 3: micro(3, tile, width, offset, panel, rows_, count, ys); break;                      \
            case 2: micro(2, tile, width, offset, panel, rows_, count, ys); break;                      \
            default: micro(1, tile, width, offset, panel, rows_, count, ys); break;                     \
            }                                                                                           \
        }                                                                                               \
    }

/* The GEMM for one instruction set, with vectors of its register width. Its register file sets
 * the micro-kernel: AVX-512 (32 × 16 floats) takes a whole panel for 3 tokens (6 in a narrow one);
 * AVX2 (16 × 8) 32 outputs and the portable baseline (16 × 4 on x86-64) 16 outputs, for 3 tokens. */
#define DEFINE_GEMM(suffix, target_attribute, vec, lanes, wide_group, wide_tile, narrow_group, narrow_tile) \
    target_attribute static inline __attribute__((always_inline)) void micro_##suffix(                  \
        const int tokens, const int tile, const int64_t stride, const int64_t offset, const float *panel, \
        const kept_entry *const *entries, int64_t count, float *const *y) {                             \
        MICRO_KERNEL_BODY(vec, lanes)                                                                   \
    }                                                                                                   \
    target_attribute static void panel_block_##suffix(const float *panel, int64_t width,                \
                                                      const kept_entry *entries, int64_t kept_per_row,  \
                                                      int64_t first, int64_t count, float *y,           \
                                                      int64_t ldy, int64_t t0, int64_t t1) {            \
        if (width == WIDE) {                                                                            \
            PANEL_BLOCK_BODY(micro_##suffix, WIDE, wide_group, wide_tile)                               \
        } else {                                                                                        \
            PANEL_BLOCK_BODY(micro_##suffix, NARROW, narrow_group, narrow_tile)                         \
        }                                                                                               \
    }

DEFINE_GEMM(portable, , vec4, 4, 3, 16, 3, 16)
#ifdef HAVE_X86_DISPATCH
DEFINE_GEMM(avx2, __attribute__((target("avx2,fma"))), vec8, 8, 3, 32, 3, 32)
DEFINE_GEMM(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma"))), vec16, 16, 3, WIDE, 6,
            NARROW)
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
