/* The host GEMMs of the half-precision dtypes (bfloat16, float16): blocks of the operands converted to
 * float32 (core/dtype.c: exact, vectorised where the CPU can), the float32 GEMM of the host provider
 * (OpenBLAS sgemm: float32 accumulation), and each output element rounded once to the output dtype (round to
 * nearest, ties to even). The bias (and, when accumulating, the old output) joins the float32 sum before that
 * one rounding. Measured against oneDNN's bf16 matmul: benchmarks/half_gemm.py, docs/performance.md.
 *
 * op(A) is converted whole (activations: tokens x in); op(B) (the weight, or the input of dW) by blocks of
 * about HALF_BLOCK_BYTES in float32, so that each half-precision weight byte is read once from memory and the
 * float32 block it becomes is read by sgemm from cache; C by tiles of HALF_TILE_BYTES in float32. */
#include <stdlib.h>
#include <string.h>

#include "gemm.h"

/* the float32 bytes of op(B)'s block aimed at (L2-sized), and the least columns of a block when C has many
 * rows (sgemm packs op(A) once per call: a block must be wide enough to pay for it); C's float32 tiles (rows
 * of a column block) stay under HALF_TILE_BYTES, so that they are rounded from cache, not memory */
#define HALF_BLOCK_BYTES (512 * 1024)
#define HALF_TILE_BYTES (1024 * 1024)
#define HALF_WIDE_ROWS 64
#define HALF_WIDE_COLS 512

/* Converts rows [r0, r0 + nr) x columns [c0, c0 + nc) of the stored (row-major, leading dimension ld) half
 * matrix at data into the contiguous float32 [nr, nc] dst. */
static void stored_to_f32(tp_dtype dt, const void *data, int64_t ld, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                          float *dst)
{
    for (int64_t i = 0; i < nr; i++)
        tp_half_to_float32(dt, (const uint16_t *)data + (r0 + i) * ld + c0, dst + i * nc, (size_t)nc);
}

static int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

/* ma as the rows [i0, i0 + r) (cols == 0) or the columns [i0, i0 + r) (cols != 0) of op(A), A being a (float32,
 * stored contiguously with leading dimension a->ld) */
static tp_mat sub_a(const tp_mat *a, int ta, int64_t i0, int64_t r, int cols)
{
    tp_mat s = *a;
    /* op(A)'s rows are stored rows when neither or both of ta and A's transposition hold */
    int stored_rows = (ta == a->trans) != cols;
    s.data = (float *)a->data + (stored_rows ? i0 * a->ld : i0);
    if ((ta != 0) == (cols != 0))
        s.rows = r; /* op(A)'s rows when ta == 0, its columns when ta == 1, are A's rows */
    else
        s.cols = r;
    return s;
}

/* C [m, w] = (the float32 tile already in c32 when acc) + op(A) op(B32), rows tiled, each tile rounded into c's
 * columns [j0, j0 + w) */
static tp_status tiles(const tp_mat *a32, int ta, const tp_mat *b32, int tb, tp_mat *c, int64_t j0, int64_t w,
                       float *c32, int accumulate, const float *bias32, tp_gemm_fn gemm32)
{
    tp_status st = TP_OK;
    const tp_dtype dt = c->dtype;
    int64_t m = c->rows, mb = clamp64(HALF_TILE_BYTES / (w * (int64_t)sizeof(float)), 1, m);
    for (int64_t i0 = 0; i0 < m; i0 += mb) {
        int64_t r = m - i0 < mb ? m - i0 : mb;
        tp_mat ma = sub_a(a32, ta, i0, r, 0), mc;
        memset(&mc, 0, sizeof mc);
        mc.data = c32;
        mc.rows = r;
        mc.cols = w;
        mc.ld = w;
        mc.dtype = TP_FLOAT32;
        mc.device = c->device;
        if (accumulate) stored_to_f32(dt, c->data, c->ld, i0, r, j0, w, c32);
        if (bias32)
            for (int64_t i = 0; i < r; i++) {
                if (accumulate)
                    for (int64_t j = 0; j < w; j++) c32[i * w + j] += bias32[j0 + j];
                else
                    memcpy(c32 + i * w, bias32 + j0, (size_t)w * sizeof *c32);
            }
        TP_CHECK(gemm32(&ma, ta, b32, tb, &mc, accumulate || bias32 != NULL));
        for (int64_t i = 0; i < r; i++)
            tp_half_from_float32(dt, c32 + i * w, (uint16_t *)c->data + (i0 + i) * c->ld + j0, (size_t)w);
    }
out:
    return st;
}

tp_status tp_half_gemm(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate, const void *bias,
                       tp_gemm_fn gemm32)
{
    tp_status st = TP_OK;
    const tp_dtype dt = c->dtype;
    int64_t m = c->rows, n = c->cols, k = ta ? a->rows : a->cols, nb, kb = 0, a_srows, a_scols;
    /* op(B)'s columns are stored rows of B when exactly one of tb and B's own transposition holds */
    int b_by_rows = tb != b->trans, by_k;
    float *a32 = NULL, *b32 = NULL, *c32 = NULL, *bias32 = NULL;
    size_t c32_len;
    tp_mat ma, mb;
    TP_REQUIRE(!c->trans, "gemm: output must be row-major");
    TP_REQUIRE(a->dtype == dt && b->dtype == dt, "gemm: operands of %s and %s for a %s output",
               tp_dtype_name(a->dtype), tp_dtype_name(b->dtype), tp_dtype_name(dt));
    if (m == 0 || n == 0) goto out;
    /* Few rows of C and a large op(B) stored [k, n] row-major (dX = dY W from a few tokens): op(B) goes by
     * blocks of whole stored rows (contiguous), the float32 C (small) summing the blocks' products; every
     * other case by blocks of C's columns, each converted once and multiplied into tiles of C's rows. */
    by_k = !b_by_rows && m < HALF_WIDE_ROWS && k * n * (int64_t)sizeof(float) > HALF_BLOCK_BYTES;
    if (by_k) {
        nb = n;
        kb = clamp64(HALF_BLOCK_BYTES / (n * (int64_t)sizeof(float)), 16, k);
    } else {
        nb = HALF_BLOCK_BYTES / ((k > 0 ? k : 1) * (int64_t)sizeof(float));
        if (m >= HALF_WIDE_ROWS && nb < HALF_WIDE_COLS) nb = HALF_WIDE_COLS;
        nb = clamp64(nb / 16 * 16, 16, n);
    }
    a_srows = a->trans ? a->cols : a->rows;
    a_scols = a->trans ? a->rows : a->cols;
    c32_len = (size_t)(by_k ? m * n : clamp64(HALF_TILE_BYTES / (nb * (int64_t)sizeof(float)), 1, m) * nb);
    a32 = malloc((size_t)(a_srows * a_scols > 0 ? a_srows * a_scols : 1) * sizeof *a32);
    b32 = malloc((size_t)((by_k ? kb * n : k * nb) > 0 ? (by_k ? kb * n : k * nb) : 1) * sizeof *b32);
    c32 = malloc(c32_len * sizeof *c32);
    bias32 = bias ? malloc((size_t)n * sizeof *bias32) : NULL;
    if (a32 == NULL || b32 == NULL || c32 == NULL || (bias && bias32 == NULL)) {
        st = tp_error(TP_ERR_NOMEM, "gemm: out of memory for the float32 blocks of a %lld x %lld x %lld %s GEMM",
                      (long long)m, (long long)n, (long long)k, tp_dtype_name(dt));
        goto out;
    }
    stored_to_f32(dt, a->data, a->ld, 0, a_srows, 0, a_scols, a32);
    if (bias) tp_half_to_float32(dt, bias, bias32, (size_t)n);
    ma = *a;
    ma.data = a32;
    ma.ld = a_scols > 1 ? a_scols : 1;
    ma.dtype = TP_FLOAT32;
    mb = *b;
    mb.data = b32;
    mb.dtype = TP_FLOAT32;
    if (by_k) {
        /* C (float32, whole) = the old C and the bias, then + op(A)[:, k0:k0+r] op(B)[k0:k0+r, :] per block */
        tp_mat mc;
        memset(&mc, 0, sizeof mc);
        mc.data = c32;
        mc.rows = m;
        mc.cols = n;
        mc.ld = n;
        mc.dtype = TP_FLOAT32;
        mc.device = c->device;
        if (accumulate) stored_to_f32(dt, c->data, c->ld, 0, m, 0, n, c32);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n && bias; j++) c32[i * n + j] = (accumulate ? c32[i * n + j] : 0.0f) + bias32[j];
        if (!accumulate && !bias) memset(c32, 0, (size_t)(m * n) * sizeof *c32);
        for (int64_t k0 = 0; k0 < k; k0 += kb) {
            int64_t r = k - k0 < kb ? k - k0 : kb;
            tp_mat sa = sub_a(&ma, ta, k0, r, 1);
            stored_to_f32(dt, b->data, b->ld, k0, r, 0, n, b32);
            mb.ld = n;
            mb.rows = tb ? n : r; /* logical B is [n, k] when tb, else [k, n] */
            mb.cols = tb ? r : n;
            TP_CHECK(gemm32(&sa, ta, &mb, tb, &mc, 1));
        }
        for (int64_t i = 0; i < m; i++)
            tp_half_from_float32(dt, c32 + i * n, (uint16_t *)c->data + i * c->ld, (size_t)n);
        goto out;
    }
    for (int64_t j0 = 0; j0 < n; j0 += nb) {
        int64_t w = n - j0 < nb ? n - j0 : nb;
        /* op(B)[:, j0:j0+w] as a float32 matrix with B's orientation: stored rows j0.. (w rows of k), or stored
         * columns j0.. of every stored row (k rows of w) */
        if (b_by_rows) {
            stored_to_f32(dt, b->data, b->ld, j0, w, 0, k, b32);
            mb.ld = k > 1 ? k : 1;
        } else {
            stored_to_f32(dt, b->data, b->ld, 0, k, j0, w, b32);
            mb.ld = w;
        }
        mb.rows = tb ? w : k; /* logical B is [n, k] when tb, else [k, n] */
        mb.cols = tb ? k : w;
        TP_CHECK(tiles(&ma, ta, &mb, tb, c, j0, w, c32, accumulate, bias32, gemm32));
    }
out:
    free(a32);
    free(b32);
    free(c32);
    free(bias32);
    return st;
}

tp_status tp_half_rows(tp_mat *c, const void *bias, int mode)
{
    tp_status st = TP_OK;
    const size_t n = (size_t)c->cols;
    float *row = NULL, *b32 = NULL;
    TP_REQUIRE(!c->trans, "bias: output must be row-major");
    if (c->rows == 0 || n == 0) goto out;
    if (mode == 0) { /* the bias is in the output's dtype: copied as it is */
        for (int64_t i = 0; i < c->rows; i++) memcpy((uint16_t *)c->data + i * c->ld, bias, n * sizeof(uint16_t));
        goto out;
    }
    row = malloc(n * sizeof *row);
    b32 = malloc(n * sizeof *b32);
    if (row == NULL || b32 == NULL) {
        st = tp_error(TP_ERR_NOMEM, "bias: out of memory for %zu columns", n);
        goto out;
    }
    tp_half_to_float32(c->dtype, bias, b32, n);
    for (int64_t i = 0; i < c->rows; i++) { /* each sum in float32, rounded once */
        uint16_t *dst = (uint16_t *)c->data + i * c->ld;
        tp_half_to_float32(c->dtype, dst, row, n);
        for (size_t j = 0; j < n; j++) row[j] += b32[j];
        tp_half_from_float32(c->dtype, row, dst, n);
    }
out:
    free(row);
    free(b32);
    return st;
}

tp_status tp_half_col_sums(const tp_mat *a, void *out, int accumulate)
{
    tp_status st = TP_OK;
    /* stored rows of A: its rows (row-major) or its columns (a transposed view) */
    const int64_t srows = a->trans ? a->cols : a->rows, scols = a->trans ? a->rows : a->cols;
    double *acc = calloc((size_t)(a->cols > 0 ? a->cols : 1), sizeof *acc);
    float *row = malloc((size_t)(scols > 0 ? scols : 1) * sizeof *row);
    float *res = malloc((size_t)(a->cols > 0 ? a->cols : 1) * sizeof *res);
    if (acc == NULL || row == NULL || res == NULL) {
        st = tp_error(TP_ERR_NOMEM, "column sums: out of memory for %lld columns", (long long)a->cols);
        goto out;
    }
    for (int64_t s = 0; s < srows; s++) {
        tp_half_to_float32(a->dtype, (const uint16_t *)a->data + s * a->ld, row, (size_t)scols);
        if (!a->trans)
            for (int64_t j = 0; j < scols; j++) acc[j] += row[j];
        else
            for (int64_t j = 0; j < scols; j++) acc[s] += row[j];
    }
    if (accumulate) tp_half_to_float32(a->dtype, out, res, (size_t)a->cols);
    for (int64_t j = 0; j < a->cols; j++) /* the float32 sum, as the GEMMs', then one rounding */
        res[j] = (float)acc[j] + (accumulate ? res[j] : 0.0f);
    tp_half_from_float32(a->dtype, res, out, (size_t)a->cols);
out:
    free(acc);
    free(row);
    free(res);
    return st;
}
