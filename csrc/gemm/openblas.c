/* The GEMM provider for host memory: OpenBLAS (scipy-openblas32: symbols prefixed scipy_, 32-bit BLAS ints),
 * and the BLAS thread count. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "gemm.h"

/* OpenBLAS' 32-bit interface takes int dimensions. */
static tp_status check_int(int64_t v, const char *what)
{
    if (v > INT_MAX) return tp_error(TP_ERR_VALUE, "%s %lld exceeds the BLAS limit %d", what, (long long)v, INT_MAX);
    return TP_OK;
}

/* Writing C (accumulate == 0) with a small inner dimension: OpenBLAS' beta = 0 zeroes all of C in a pass of
 * its own before an accumulating kernel, so a gradient of 90 MB from 8 tokens costs two trips through memory.
 * Row blocks of C small enough to stay in cache (each its own call: the zeroing pass then leaves the block
 * in cache for the kernel) write C in one trip. Measured on [5504 x 4096] and [4096 x 5504] float32 from
 * 8 tokens, one thread: 15-18 ms against 38-42 ms for the whole-matrix call; faster up to K = 32; from
 * K = 48 on, repacking op(B) for every block costs more than it saves. */
#define SMALL_K_MAX 32
#define SMALL_K_BLOCK_BYTES (128 * 1024) /* per 8 of K, per BLAS thread */

static int small_k_rows(int64_t k, int64_t n, size_t itemsize)
{
    int64_t bytes = (int64_t)SMALL_K_BLOCK_BYTES * ((k + 7) / 8) * scipy_openblas_get_num_threads();
    int64_t rows = bytes / (n * (int64_t)itemsize);
    return (int)(rows < 1 ? 1 : rows > INT_MAX ? INT_MAX : rows);
}

static tp_status blas_gemm(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate)
{
    tp_status st = TP_OK;
    /* op(A) is [m, k], op(B) is [k, n]; a stored-transposed view flips the BLAS transpose flag */
    int64_t m = c->rows, n = c->cols, k = ta ? a->rows : a->cols, block = m;
    enum CBLAS_TRANSPOSE opa = (ta != a->trans) ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE opb = (tb != b->trans) ? CblasTrans : CblasNoTrans;
    size_t item = tp_dtype_size(c->dtype);
    /* row i of op(A): row i of the stored matrix (NoTrans) or its column i (Trans) */
    int64_t a_row_step = opa == CblasNoTrans ? a->ld : 1;
    TP_REQUIRE(!c->trans, "gemm: output must be row-major");
    TP_REQUIRE(c->dtype == TP_FLOAT32 || c->dtype == TP_FLOAT64, "CPU GEMM supports float32 and float64, got %s",
               tp_dtype_name(c->dtype));
    TP_CHECK(check_int(m, "rows"));
    TP_CHECK(check_int(n, "columns"));
    TP_CHECK(check_int(k, "inner dimension"));
    TP_CHECK(check_int(a->ld, "leading dimension"));
    TP_CHECK(check_int(b->ld, "leading dimension"));
    TP_CHECK(check_int(c->ld, "leading dimension"));
    if (m == 0 || n == 0) goto out;
    if (k == 0) {
        if (!accumulate)
            for (int64_t i = 0; i < m; i++) memset((char *)c->data + (size_t)(i * c->ld) * item, 0, (size_t)n * item);
        goto out;
    }
    if (!accumulate && k <= SMALL_K_MAX) block = small_k_rows(k, n, item);
    for (int64_t i0 = 0; i0 < m; i0 += block) {
        int mb = (int)(m - i0 < block ? m - i0 : block);
        const char *pa = (const char *)a->data + (size_t)(i0 * a_row_step) * item;
        char *pc = (char *)c->data + (size_t)(i0 * c->ld) * item;
        if (c->dtype == TP_FLOAT32)
            scipy_cblas_sgemm(CblasRowMajor, opa, opb, mb, (int)n, (int)k, 1.0f, (const float *)pa, (int)a->ld,
                              b->data, (int)b->ld, accumulate ? 1.0f : 0.0f, (float *)pc, (int)c->ld);
        else
            scipy_cblas_dgemm(CblasRowMajor, opa, opb, mb, (int)n, (int)k, 1.0, (const double *)pa, (int)a->ld,
                              b->data, (int)b->ld, accumulate ? 1.0 : 0.0, (double *)pc, (int)c->ld);
    }
out:
    return st;
}

static tp_status blas_rows(tp_mat *c, const void *bias, int mode)
{
    tp_status st = TP_OK;
    TP_REQUIRE(!c->trans, "bias: output must be row-major");
    if (c->dtype == TP_FLOAT32) {
        const float *bv = bias;
        for (int64_t i = 0; i < c->rows; i++) {
            float *row = (float *)c->data + i * c->ld;
            if (mode == 0)
                for (int64_t j = 0; j < c->cols; j++) row[j] = bv[j];
            else
                for (int64_t j = 0; j < c->cols; j++) row[j] += bv[j];
        }
    } else if (c->dtype == TP_FLOAT64) {
        const double *bv = bias;
        for (int64_t i = 0; i < c->rows; i++) {
            double *row = (double *)c->data + i * c->ld;
            if (mode == 0)
                for (int64_t j = 0; j < c->cols; j++) row[j] = bv[j];
            else
                for (int64_t j = 0; j < c->cols; j++) row[j] += bv[j];
        }
    } else {
        st = tp_error(TP_ERR_TYPE, "bias: float32 or float64, got %s", tp_dtype_name(c->dtype));
    }
out:
    return st;
}

/* Column sums, accumulated in double so long batches keep float32 precision; added to out or written. */
static tp_status blas_col_sums(const tp_mat *a, void *out, int accumulate)
{
    tp_status st = TP_OK;
    double *acc = NULL;
    int64_t rs = a->trans ? 1 : a->ld, cs = a->trans ? a->ld : 1;
    TP_REQUIRE(a->dtype == TP_FLOAT32 || a->dtype == TP_FLOAT64, "column sums: float32 or float64, got %s",
               tp_dtype_name(a->dtype));
    acc = calloc((size_t)(a->cols > 0 ? a->cols : 1), sizeof *acc);
    if (acc == NULL) {
        st = tp_error(TP_ERR_NOMEM, "column sums: out of memory for %lld columns", (long long)a->cols);
        goto out;
    }
    for (int64_t i = 0; i < a->rows; i++) {
        if (a->dtype == TP_FLOAT32) {
            const float *p = (const float *)a->data + i * rs;
            for (int64_t j = 0; j < a->cols; j++) acc[j] += p[j * cs];
        } else {
            const double *p = (const double *)a->data + i * rs;
            for (int64_t j = 0; j < a->cols; j++) acc[j] += p[j * cs];
        }
    }
    for (int64_t j = 0; j < a->cols; j++) {
        if (a->dtype == TP_FLOAT32)
            ((float *)out)[j] = (float)acc[j] + (accumulate ? ((float *)out)[j] : 0.0f);
        else
            ((double *)out)[j] = acc[j] + (accumulate ? ((double *)out)[j] : 0.0);
    }
out:
    free(acc);
    return st;
}

/* C = op(A) op(B) + bias: the rows of C set to bias, then an accumulating GEMM. */
static tp_status blas_gemm_bias(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, const void *bias)
{
    tp_status st = TP_OK;
    TP_CHECK(blas_rows(c, bias, 0));
    TP_CHECK(blas_gemm(a, ta, b, tb, c, 1));
out:
    return st;
}

const tp_gemm_provider tp_gemm_openblas = {
    .name = "OpenBLAS",
    .gemm = blas_gemm,
    .rows = blas_rows,
    .col_sums = blas_col_sums,
    .gemm_bias = blas_gemm_bias,
};

tp_status tp_set_num_threads(int n)
{
    tp_status st = TP_OK;
    if (n <= 0) { /* this rank's share of the cores: the local world from the launcher's environment */
        long cores = sysconf(_SC_NPROCESSORS_ONLN), local;
        tp_world_env w;
        TP_CHECK(tp_world_from_env(&w));
        local = w.local_world_size > 0 ? w.local_world_size : 1;
        if (cores < 1) cores = 1;
        n = (int)(cores / local > 0 ? cores / local : 1);
    }
    scipy_openblas_set_num_threads(n);
    tp_log(TP_LOG_INFO, "BLAS threads: %d", n);
out:
    return st;
}

int tp_get_num_threads(void) { return scipy_openblas_get_num_threads(); }
