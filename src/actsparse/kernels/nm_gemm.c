/* N:M activation-sparse linear layers: Y = X_sparse · Wᵀ (+ bias) (+ η · row_sum), multiplying
 * only the kept activations. Called through ctypes on tensor buffers.
 *
 * The weight is stored once, transposed: row k of `weight_t` (ldw ≥ the padded output width) holds
 * input channel k's weights for every output, W[o, k] at weight_t[k · ldw + o], zero past the last
 * output. PyTorch sees the same storage as the layer's (out × in) weight with strides (1, ldw), so
 * dense calls and remove() need no second copy. Two products use it:
 *
 *   actsparse_nm_gemm   many tokens (prefill), float32 or bfloat16 weights (widened into the
 *                       float32 tile): for every panel of WIDE (128) output channels (NARROW,
 *                       64, for the last when the count of 64-output units is odd), every
 *                       block of input channels and every few tokens, y[t, panel] += value ·
 *                       W[panel, channel] over the token's kept entries in the block. The
 *                       block's weights are copied once into a contiguous 32 KiB tile that stays
 *                       in L1 while all tokens pass over it; each kept value is one broadcast and
 *                       P/16 FMAs with a tile row, for 3 tokens at once (6 in a narrow panel): 24
 *                       register accumulators with AVX-512.
 *   actsparse_nm_gemv   one token or a few (decode), float32 or bfloat16 weights: a product bound
 *                       by memory bandwidth, so it reads only the rows of the kept inputs (the
 *                       union over the call's tokens), each a long contiguous stretch, four at a
 *                       time, into outputs held in L1; bfloat16 rows are widened in registers.
 *                       Threads share out the outputs. At 8:16 it reads half the weight's bytes.
 *
 * The kept entries come from actsparse_nm_compress (nm_select.c): for every token, its kept inputs
 * as (value, channel) pairs in channel order; every token keeps the same count.
 *
 * Each product is written with GCC vector types and compiled three times (AVX-512, AVX2 + FMA,
 * baseline x86-64 or whatever the target is), each with vectors of its own register width; the
 * widest the CPU supports is picked at run time.
 * Built by setuptools with the system compiler; no Python or PyTorch headers are used.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NARROW 64  /* output channels of a narrow panel; the unit of the padded output width */
#define WIDE 128   /* output channels of a wide panel */
#define KBLOCK (32768 / 4 / WIDE) /* input channels per block: a wide panel's block is 32 KiB */
#define STRETCH_BLOCKS 32 /* blocks whose compressed rows are reused by every panel */
#define CHUNK_TOKENS 6 /* token chunks are multiples of both micro-kernels' token counts */
#define GEMV_TILE 4096 /* outputs × tokens of a GEMV tile: 16 KiB of float32 sums, held in L1 */
#define GEMV_MAX_TOKENS 4 /* beyond, the GEMM is as fast: the union of kept inputs nears all */

/* Vectors of each instruction set's register width (unaligned loads and stores). */
typedef float vec16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef float vec8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float vec4 __attribute__((vector_size(16), aligned(4), may_alias));
/* bfloat16 weights as 16-bit integers, and their widening to float32 bits. */
typedef uint16_t half16 __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint16_t half8 __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint16_t half4 __attribute__((vector_size(8), aligned(2), may_alias));
typedef uint32_t word16 __attribute__((vector_size(64)));
typedef uint32_t word8 __attribute__((vector_size(32)));
typedef uint32_t word4 __attribute__((vector_size(16)));

/* One kept input: its value and its channel, side by side so that a token's entries are one stream
 * (written by actsparse_nm_compress in nm_select.c, which declares the same pair). */
typedef struct {
    float value;
    int32_t channel;
} kept_entry;

int64_t actsparse_output_unit(void) { return NARROW; }
int64_t actsparse_gemv_max_tokens(void) { return GEMV_MAX_TOKENS; }

/* Panel p covers outputs p·WIDE onwards; all panels are WIDE but the last, which is NARROW when
 * the count of 64-output units is odd. */
static int64_t panel_count(int64_t units) { return (units + 1) / 2; }
static int64_t panel_width(int64_t p, int64_t units) { return 2 * p + 1 == units ? NARROW : WIDE; }

/* y[t, o] = bias[o] + eta[t] · row_sum[o] (each term where given) for tokens [t0, t1), outputs [o0, o1). */
static void start_outputs(float *y, int64_t ldy, int64_t t0, int64_t t1, int64_t o0, int64_t o1,
                          const float *bias, const float *eta, const float *row_sum) {
    for (int64_t t = t0; t < t1; t++)
        for (int64_t o = o0; o < o1; o++) {
            float start = bias ? bias[o] : 0.0f;
            if (eta) start += eta[t] * row_sum[o];
            y[t * ldy + o] = start;
        }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_X86_DISPATCH 1
#endif

/* ---- sparse GEMM ---------------------------------------------------------------------------- */

/* y[r][offset, offset + tile) += Σ_i entries[r][i].value · tile_[entries[r][i].channel - base][offset, ...)
 * for `tokens` tokens over `count` kept entries each (tile rows `stride` floats apart). Always
 * inlined with constant `tokens` and `tile`, so that the accumulators live in registers. */
#define MICRO_KERNEL_BODY(vec, lanes)                                                                   \
    vec acc[tokens][tile / lanes];                                                                      \
    for (int r = 0; r < tokens; r++)                                                                    \
        for (int j = 0; j < tile / lanes; j++) acc[r][j] = *(const vec *)(y[r] + offset + lanes * j);  \
    for (int64_t i = 0; i < count; i++) {                                                               \
        for (int r = 0; r < tokens; r++) {                                                              \
            const vec *w = (const vec *)(tile_ + (entries[r][i].channel - base) * stride + offset);     \
            const float v = entries[r][i].value;                                                        \
            for (int j = 0; j < tile / lanes; j++) acc[r][j] += v * w[j];                               \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < tokens; r++)                                                                    \
        for (int j = 0; j < tile / lanes; j++) *(vec *)(y[r] + offset + lanes * j) = acc[r][j];

/* The stored weights of the next block a panel will copy into its tile: `rows` rows of `row_bytes`,
 * `stride` bytes apart. Fetched into L1 a few lines per token group while the current block is
 * multiplied, the next tile copy finds them there (measured: 6-8% of the GEMM's time on an Intel
 * Xeon; a row a page apart from the next is not found by the hardware's prefetchers). */
typedef struct {
    const char *first;
    int64_t row_bytes, stride, rows;
} next_block;

static inline void prefetch_lines(const next_block *next, int64_t from, int64_t to) {
    const int64_t lines_per_row = (next->row_bytes + 63) / 64;
    for (int64_t line = from; line < to && line < next->rows * lines_per_row; line++)
        __builtin_prefetch(next->first + line / lines_per_row * next->stride + line % lines_per_row * 64, 0, 3);
}

/* One panel of `width` outputs, one block of input channels (its weights copied into `tile_`, rows
 * from channel `base`; each token's kept entries in the block `count` apart), tokens [t0, t1) whose
 * partial sums so far are rows of y, `ldy` apart from token t0's: `group` tokens (at most 6) ×
 * `tile` outputs at a time. */
#define PANEL_BLOCK_BODY(micro, width, group, tile)                                                     \
    const kept_entry *rows_[group];                                                                     \
    float *ys[group];                                                                                   \
    const int64_t groups = (t1 - t0 + group - 1) / group;                                               \
    const int64_t lines = next ? next->rows * ((next->row_bytes + 63) / 64) : 0;                        \
    const int64_t lines_per_group = (lines + groups - 1) / groups;                                      \
    for (int64_t t = t0; t < t1; t += group) {                                                          \
        if (next) {                                                                                     \
            const int64_t line = (t - t0) / group * lines_per_group;                                    \
            prefetch_lines(next, line, line + lines_per_group);                                         \
        }                                                                                               \
        const int tokens = t1 - t >= group ? group : (int)(t1 - t);                                     \
        for (int r = 0; r < tokens; r++) {                                                              \
            rows_[r] = entries + (t + r) * count;                                                       \
            ys[r] = y + (t + r - t0) * ldy;                                                             \
        }                                                                                               \
        for (int64_t offset = 0; offset < width; offset += tile) {                                      \
            switch (tokens) { /* cases above `group` never happen; capped so that they compile */    \
            case 6: micro(6 > group ? group : 6, tile, width, offset, tile_, base, rows_, count, ys); break;  \
            case 5: micro(5 > group ? group : 5, tile, width, offset, tile_, base, rows_, count, ys); break;  \
            case 4: micro(4 > group ? group : 4, tile, width, offset, tile_, base, rows_, count, ys); break;  \
            case 3: micro(3, tile, width, offset, tile_, base, rows_, count, ys); break;                      \
            case 2: micro(2, tile, width, offset, tile_, base, rows_, count, ys); break;                      \
            default: micro(1, tile, width, offset, tile_, base, rows_, count, ys); break;                     \
            }                                                                                           \
        }                                                                                               \
    }

/* The GEMM for one instruction set, with vectors of its register width. Its register file sets
 * the micro-kernel: AVX-512 (32 × 16 floats) takes a whole panel for 3 tokens (6 in a narrow one);
 * AVX2 (16 × 8) 32 outputs and the portable baseline (16 × 4 on x86-64) 16 outputs, for 3 tokens. */
#define DEFINE_GEMM(suffix, target_attribute, vec, lanes, wide_group, wide_tile, narrow_group, narrow_tile) \
    target_attribute static inline __attribute__((always_inline)) void micro_##suffix(                  \
        const int tokens, const int tile, const int64_t stride, const int64_t offset, const float *tile_, \
        const int64_t base, const kept_entry *const *entries, int64_t count, float *const *y) {         \
        MICRO_KERNEL_BODY(vec, lanes)                                                                   \
    }                                                                                                   \
    target_attribute static void panel_block_##suffix(const float *tile_, int64_t base, int64_t width,  \
                                                      const kept_entry *entries, int64_t count,         \
                                                      float *y, int64_t ldy, int64_t t0, int64_t t1,    \
                                                      const next_block *next) {                         \
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

typedef void (*panel_block_fn)(const float *, int64_t, int64_t, const kept_entry *, int64_t, float *, int64_t,
                               int64_t, int64_t, const next_block *);

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

/* dst[i] = the float32 of bfloat16 src[i] (its upper 16 bits), for i < count. */
static void widen_bf16(float *dst, const uint16_t *src, int64_t count) {
    uint32_t *bits = (uint32_t *)dst;
    for (int64_t i = 0; i < count; i++) bits[i] = (uint32_t)src[i] << 16;
}

/* How the GEMM shares out its work: token chunks (multiples of both micro-kernels' token counts)
 * give the second thread work when there are few panels. */
static int64_t chunk_rows_of(int64_t rows, int64_t units, int64_t threads) {
    const int64_t panels = panel_count(units);
    const int64_t chunks = (threads * 4 + panels - 1) / panels;
    const int64_t chunk_rows = (rows + chunks - 1) / chunks;
    return (chunk_rows + CHUNK_TOKENS - 1) / CHUNK_TOKENS * CHUNK_TOKENS;
}

/* Kept entries per token in input block b of `blocks`: every block but the last is whole groups;
 * the last holds the rest, with the dense tail. */
static int64_t block_entries(int64_t b, int64_t blocks, int64_t kept_per_block, int64_t kept_per_row) {
    return b + 1 < blocks ? kept_per_block : kept_per_row - b * kept_per_block;
}

/* Floats of working space actsparse_nm_gemm needs: the kept entries regrouped by block, and one
 * chunk of output rows per thread. */
int64_t actsparse_gemm_work_size(int64_t rows, int64_t kept_per_row, int64_t units, int64_t threads) {
    return rows * kept_per_row * 2 + threads * chunk_rows_of(rows, units, threads) * WIDE + 16;
}

/* y (rows × ldy, ldy = units · NARROW) = the compressed rows times the weight (in_width inputs,
 * `units` 64-output units; stored transposed, rows ldw apart, float32 or bfloat16), plus bias[o]
 * and eta[t] · row_sum[o] where given (each padded to ldy), summed in float32. `work` holds
 * actsparse_gemm_work_size floats.
 *
 * Every load of the inner loop stays within a few pages: the kept entries are first regrouped
 * block by block (each block's entries of all tokens in one stretch of memory), and each task sums
 * into a contiguous copy of its chunk of output rows, written back once per stretch of blocks.
 * Rows of y or of the entries a page or more apart would each cost a TLB entry (measured on an
 * Intel Xeon with AMX: 77 → 81–85 GFLOPS of kept multiply-adds per core on Llama-3-8B's shapes). */
void actsparse_nm_gemm(const kept_entry *entries, int64_t rows, int64_t kept_per_row, int64_t in_width,
                       int64_t n, int64_t m, const void *weight_t, int64_t weight_bf16, int64_t ldw, int64_t units,
                       const float *bias, const float *eta, const float *row_sum, float *y, float *work,
                       int64_t threads, int64_t isa) {
    if (rows == 0) return;
    const panel_block_fn panel_block = pick_panel_block(isa);
    const int64_t panels = panel_count(units), ldy = units * NARROW;
    const int64_t block_width = KBLOCK / m * m; /* whole groups only */
    const int64_t kept_per_block = block_width / m * n;
    const int64_t blocks = (in_width + block_width - 1) / block_width;
    const int64_t chunk_rows = chunk_rows_of(rows, units, threads);
    const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
    /* Block b's entries, all tokens' in a row from entry b · kept_per_block · rows on,
     * block_entries(b) per token. */
    kept_entry *blocked = (kept_entry *)work;
    float *chunk_outputs = work + (rows * kept_per_row * 2 + 15) / 16 * 16;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t t = 0; t < rows; t++) {
            const int64_t first = b * kept_per_block;
            const int64_t count = block_entries(b, blocks, kept_per_block, kept_per_row);
            memcpy(blocked + first * rows + t * count, entries + t * kept_per_row + first,
                   count * sizeof(kept_entry));
        }
    /* Blocks are taken a stretch at a time, so that the stretch's entries stay in cache while every
     * panel passes over them (a wide layer's whole compressed input would not). */
    for (int64_t stretch = 0; stretch < blocks; stretch += STRETCH_BLOCKS) {
        const int64_t stretch_end = stretch + STRETCH_BLOCKS < blocks ? stretch + STRETCH_BLOCKS : blocks;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
        for (int64_t p = 0; p < panels; p++)
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t t0 = c * chunk_rows;
                const int64_t t1 = t0 + chunk_rows < rows ? t0 + chunk_rows : rows;
                const int64_t width = panel_width(p, units), o0 = p * WIDE;
#ifdef _OPENMP
                float *sums = chunk_outputs + omp_get_thread_num() * chunk_rows * WIDE;
#else
                float *sums = chunk_outputs;
#endif
                float tile[KBLOCK * WIDE] __attribute__((aligned(64)));
                if (stretch == 0) start_outputs(y, ldy, t0, t1, o0, o0 + width, bias, eta, row_sum);
                for (int64_t t = t0; t < t1; t++)
                    memcpy(sums + (t - t0) * width, y + t * ldy + o0, width * sizeof(float));
                for (int64_t b = stretch; b < stretch_end; b++) {
                    const int64_t first = b * kept_per_block;
                    const int64_t count = block_entries(b, blocks, kept_per_block, kept_per_row);
                    /* The block's weights, rows ldw apart in memory, into one contiguous L1 tile
                     * (bfloat16 widened to float32). */
                    const int64_t c0 = b * block_width;
                    const int64_t c1 = c0 + block_width < in_width ? c0 + block_width : in_width;
                    for (int64_t k = c0; k < c1; k++)
                        if (weight_bf16)
                            widen_bf16(tile + (k - c0) * width, (const uint16_t *)weight_t + k * ldw + o0, width);
                        else
                            memcpy(tile + (k - c0) * width, (const float *)weight_t + k * ldw + o0,
                                   width * sizeof(float));
                    const int64_t element = weight_bf16 ? 2 : 4;
                    const int64_t c2 = c1 + block_width < in_width ? c1 + block_width : in_width;
                    const next_block next = {(const char *)weight_t + (c1 * ldw + o0) * element, width * element,
                                             ldw * element, c2 - c1};
                    panel_block(tile, c0, width, blocked + first * rows, count, sums, width, t0, t1,
                                b + 1 < stretch_end ? &next : NULL);
                }
                for (int64_t t = t0; t < t1; t++)
                    memcpy(y + t * ldy + o0, sums + (t - t0) * width, width * sizeof(float));
            }
    }
}

/* Replaces every kept entry's value by the input it stands for, inputs[r · in_width + channel]
 * (for entries selected on separate scores), and returns how many of them are non-zero. */
int64_t actsparse_take_values(kept_entry *entries, int64_t rows, int64_t kept_per_row, const float *inputs,
                              int64_t in_width) {
    int64_t nonzero = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < kept_per_row; i++) {
            kept_entry *e = entries + r * kept_per_row + i;
            e->value = inputs[r * in_width + e->channel];
            nonzero += e->value != 0.0f;
        }
    return nonzero;
}

/* ---- sparse GEMV ---------------------------------------------------------------------------- */

/* y[r][o0, o1) += Σ_i values[i · vstride + r] · W[channels[i · cstride]][o0, o1) for `tokens`
 * tokens (a constant once inlined) over `count` kept inputs, outputs a tile at a time so that the
 * sums stay in L1 while the weight rows stream past, four rows at once. `load` widens `lanes`
 * weights to floats. */
#define GEMV_BODY(vec, lanes, load)                                                                     \
    const int64_t tile = GEMV_TILE / tokens / NARROW * NARROW;                                          \
    for (int64_t t0 = o0; t0 < o1; t0 += tile) {                                                        \
        const int64_t t1 = t0 + tile < o1 ? t0 + tile : o1;                                             \
        int64_t i = 0;                                                                                  \
        for (; i + 4 <= count; i += 4) {                                                                \
            const weight_type *w0 = weight_t + channels[i * cstride] * ldw;                             \
            const weight_type *w1 = weight_t + channels[(i + 1) * cstride] * ldw;                       \
            const weight_type *w2 = weight_t + channels[(i + 2) * cstride] * ldw;                       \
            const weight_type *w3 = weight_t + channels[(i + 3) * cstride] * ldw;                       \
            const float *v = values + i * vstride;                                                      \
            for (int64_t o = t0; o < t1; o += lanes) {                                                  \
                const vec a = load(w0 + o), b = load(w1 + o), c = load(w2 + o), d = load(w3 + o);        \
                for (int r = 0; r < tokens; r++) {                                                      \
                    vec *out = (vec *)(y + r * ldy + o);                                                \
                    *out += v[r] * a + v[vstride + r] * b + v[2 * vstride + r] * c + v[3 * vstride + r] * d; \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (; i < count; i++) {                                                                        \
            const weight_type *w0 = weight_t + channels[i * cstride] * ldw;                             \
            for (int64_t o = t0; o < t1; o += lanes) {                                                  \
                const vec a = load(w0 + o);                                                             \
                for (int r = 0; r < tokens; r++) *(vec *)(y + r * ldy + o) += values[i * vstride + r] * a; \
            }                                                                                           \
        }                                                                                               \
    }

#define DEFINE_GEMV_FOR(suffix, weight_kind, weight_type_, target_attribute, vec, lanes, load)            \
    target_attribute static inline __attribute__((always_inline)) void gemv_tokens_##weight_kind##_##suffix( \
        const int tokens, const int32_t *channels, int64_t cstride, const float *values, int64_t vstride, \
        int64_t count, const weight_type_ *weight_t, int64_t ldw, float *y, int64_t ldy, int64_t o0,     \
        int64_t o1) {                                                                                   \
        typedef weight_type_ weight_type;                                                               \
        GEMV_BODY(vec, lanes, load)                                                                     \
    }                                                                                                   \
    target_attribute static void gemv_##weight_kind##_##suffix(                                         \
        int tokens, const int32_t *channels, int64_t cstride, const float *values, int64_t vstride,     \
        int64_t count, const void *weight_t, int64_t ldw, float *y, int64_t ldy, int64_t o0, int64_t o1) { \
        const weight_type_ *w = (const weight_type_ *)weight_t;                                         \
        switch (tokens) {                                                                               \
        case 1: gemv_tokens_##weight_kind##_##suffix(1, channels, cstride, values, vstride, count, w, ldw, y, ldy, o0, o1); break; \
        case 2: gemv_tokens_##weight_kind##_##suffix(2, channels, cstride, values, vstride, count, w, ldw, y, ldy, o0, o1); break; \
        case 3: gemv_tokens_##weight_kind##_##suffix(3, channels, cstride, values, vstride, count, w, ldw, y, ldy, o0, o1); break; \
        default: gemv_tokens_##weight_kind##_##suffix(4, channels, cstride, values, vstride, count, w, ldw, y, ldy, o0, o1); break; \
        }                                                                                               \
    }

/* Widening loads: float32 as is; bfloat16 is the upper half of a float32's bits. */
#define DEFINE_LOADS(suffix, target_attribute, vec, half, word)                                         \
    target_attribute static inline __attribute__((always_inline)) vec load_f32_##suffix(const float *p) { \
        return *(const vec *)p;                                                                         \
    }                                                                                                   \
    target_attribute static inline __attribute__((always_inline)) vec load_bf16_##suffix(const uint16_t *p) { \
        return (vec)(__builtin_convertvector(*(const half *)p, word) << 16);                            \
    }

#define DEFINE_GEMV(suffix, target_attribute, vec, lanes, half, word)                                   \
    DEFINE_LOADS(suffix, target_attribute, vec, half, word)                                             \
    DEFINE_GEMV_FOR(suffix, f32, float, target_attribute, vec, lanes, load_f32_##suffix)                \
    DEFINE_GEMV_FOR(suffix, bf16, uint16_t, target_attribute, vec, lanes, load_bf16_##suffix)

DEFINE_GEMV(portable, , vec4, 4, half4, word4)
#ifdef HAVE_X86_DISPATCH
DEFINE_GEMV(avx2, __attribute__((target("avx2,fma"))), vec8, 8, half8, word8)
DEFINE_GEMV(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma"))), vec16, 16, half16, word16)
#endif

typedef void (*gemv_fn)(int, const int32_t *, int64_t, const float *, int64_t, int64_t, const void *, int64_t,
                        float *, int64_t, int64_t, int64_t);

static gemv_fn pick_gemv(int64_t isa, int bf16) {
#ifdef HAVE_X86_DISPATCH
    if (isa >= 2 && __builtin_cpu_supports("avx512f")) return bf16 ? gemv_bf16_avx512 : gemv_f32_avx512;
    if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return bf16 ? gemv_bf16_avx2 : gemv_f32_avx2;
#endif
    (void)isa;
    return bf16 ? gemv_bf16_portable : gemv_f32_portable;
}

/* y (rows × ldy, ldy = units · NARROW, rows ≤ GEMV_MAX_TOKENS) = the compressed rows times the
 * weight (stored transposed, rows ldw apart, float32 or bfloat16), plus bias[o] and
 * eta[t] · row_sum[o] where given. Only the weight rows of kept inputs are read: for several
 * tokens, the union of their kept inputs, gathered into `work` (in_width · (rows + 1) floats). */
void actsparse_nm_gemv(const kept_entry *entries, int64_t rows, int64_t kept_per_row, int64_t in_width,
                       const void *weight_t, int64_t weight_bf16, int64_t ldw, int64_t units, const float *bias,
                       const float *eta, const float *row_sum, float *y, float *work, int64_t threads,
                       int64_t isa) {
    if (rows == 0 || rows > GEMV_MAX_TOKENS) return;
    const gemv_fn gemv = pick_gemv(isa, weight_bf16 != 0);
    const int64_t ldy = units * NARROW;
    const int32_t *channels = &entries[0].channel;
    const float *values = &entries[0].value;
    int64_t count = kept_per_row, cstride = 2, vstride = 2;
    if (rows > 1) {
        /* The union of the tokens' kept inputs: each channel once, with every token's value (0
         * where the token dropped it), in channel order. */
        float *dense = work;
        int32_t *kept_channels = (int32_t *)(work + in_width * rows);
        memset(dense, 0, in_width * rows * sizeof(float));
        for (int64_t r = 0; r < rows; r++)
            for (int64_t i = 0; i < kept_per_row; i++) {
                const kept_entry e = entries[r * kept_per_row + i];
                dense[e.channel * rows + r] = e.value;
            }
        count = 0;
        for (int64_t k = 0; k < in_width; k++) {
            int any = 0;
            for (int64_t r = 0; r < rows; r++) any |= dense[k * rows + r] != 0.0f;
            if (!any) continue;
            memmove(dense + count * rows, dense + k * rows, rows * sizeof(float));
            kept_channels[count++] = (int32_t)k;
        }
        channels = kept_channels, values = dense, cstride = 1, vstride = rows;
    }
    /* Threads share out the outputs in whole 64-output units. */
    const int64_t parts = threads < units ? threads : units;
#pragma omp parallel for num_threads(parts) schedule(static)
    for (int64_t part = 0; part < parts; part++) {
        const int64_t o0 = units * part / parts * NARROW, o1 = units * (part + 1) / parts * NARROW;
        start_outputs(y, ldy, 0, rows, o0, o1, bias, eta, row_sum);
        gemv((int)rows, channels, cstride, values, vstride, count, weight_t, ldw, y, ldy, o0, o1);
    }
}
