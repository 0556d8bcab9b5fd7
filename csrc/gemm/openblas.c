/* The GEMM provider for host memory: OpenBLAS (scipy-openblas32: symbols prefixed scipy_, 32-bit BLAS ints),
 * and the BLAS thread count. */
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cblas.h>

#include "gemm.h"

/* OpenBLAS' 32-bit interface takes int dimensions. */
static tp_status check_int(int64_t v, const char *what)
{
    if (v > INT_MAX) return tp_error(TP_ERR_VALUE, "%s %lld exceeds the BLAS limit %d", what, (long long)v, INT_MAX);
    return TP_OK;
}

static tp_status blas_gemm(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate)
{
    tp_status st = TP_OK;
    /* op(A) is [m, k], op(B) is [k, n]; a stored-transposed view flips the BLAS transpose flag */
    int64_t m = c->rows, n = c->cols, k = ta ? a->rows : a->cols;
    enum CBLAS_TRANSPOSE opa = (ta != a->trans) ? CblasTrans : CblasNoTrans;
    enum CBLAS_TRANSPOSE opb = (tb != b->trans) ? CblasTrans : CblasNoTrans;
    TP_REQUIRE(!c->trans, "gemm: output must be row-major");
    TP_CHECK(check_int(m, "rows"));
    TP_CHECK(check_int(n, "columns"));
    TP_CHECK(check_int(k, "inner dimension"));
    TP_CHECK(check_int(a->ld, "leading dimension"));
    TP_CHECK(check_int(b->ld, "leading dimension"));
    TP_CHECK(check_int(c->ld, "leading dimension"));
    if (m == 0 || n == 0) goto out;
    if (c->dtype == TP_FLOAT32) {
        if (k == 0) {
            if (!accumulate)
                for (int64_t i = 0; i < m; i++)
                    for (int64_t j = 0; j < n; j++) ((float *)c->data)[i * c->ld + j] = 0.0f;
            goto out;
        }
        scipy_cblas_sgemm(CblasRowMajor, opa, opb, (int)m, (int)n, (int)k, 1.0f, a->data, (int)a->ld,
                          b->data, (int)b->ld, accumulate ? 1.0f : 0.0f, c->data, (int)c->ld);
    } else if (c->dtype == TP_FLOAT64) {
        if (k == 0) {
            if (!accumulate)
                for (int64_t i = 0; i < m; i++)
                    for (int64_t j = 0; j < n; j++) ((double *)c->data)[i * c->ld + j] = 0.0;
            goto out;
        }
        scipy_cblas_dgemm(CblasRowMajor, opa, opb, (int)m, (int)n, (int)k, 1.0, a->data, (int)a->ld,
                          b->data, (int)b->ld, accumulate ? 1.0 : 0.0, c->data, (int)c->ld);
    } else {
        st = tp_error(TP_ERR_TYPE, "CPU GEMM supports float32 and float64, got %s", tp_dtype_name(c->dtype));
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

/* Column sums, accumulated in double so long batches keep float32 precision. */
static tp_status blas_col_sums(const tp_mat *a, void *out)
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
            ((float *)out)[j] += (float)acc[j];
        else
            ((double *)out)[j] += acc[j];
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
