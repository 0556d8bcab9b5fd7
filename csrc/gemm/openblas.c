/* The GEMM provider for host memory: OpenBLAS (scipy-openblas32: symbols prefixed scipy_, 32-bit BLAS ints),
 * and the BLAS thread count. */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* Writing a large float32 C (accumulate == 0) from a small inner dimension with op(B) stored row-major, as a
 * weight gradient dW = dY^T X from a few tokens is: C is a write-only stream of hundreds of MB that no one
 * reads before the optimizer does, and the kernel's work is a few FMAs per element. Ordinary stores read
 * every cache line of C from memory before writing it (write-allocate), so the GEMM moves C through memory
 * twice. Streaming (non-temporal) stores write whole lines without reading them: measured on this project's
 * 2-core Xeon, 13-20 GB/s against 5-8 GB/s. The kernel below does that with AVX-512 on one thread (used when
 * OpenBLAS runs one thread: a rank per core, as tplinear's worlds set it); tiles of op(B) of STREAM_TILE
 * columns stay in L1 while every row of C is written through them. */
#define STREAM_MIN_BYTES (1u << 20)
#define STREAM_TILE 512

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define TP_HAVE_STREAM 1

/* c[j0:j1) = sum_k coef[k] * b[k][j0:j1) for one row of C, streamed where 64-byte aligned */
__attribute__((target("avx512f"))) static void stream_row(float *c, const float *const *b, const float *coef,
                                                           int64_t k, int64_t j0, int64_t j1)
{
    int64_t j = j0;
    for (; j < j1 && ((uintptr_t)(c + j) & 63u) != 0; j++) { /* head, up to a 64-byte boundary */
        float s = 0.0f;
        for (int64_t q = 0; q < k; q++) s += coef[q] * b[q][j];
        c[j] = s;
    }
    for (; j + 64 <= j1; j += 64) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t q = 0; q < k; q++) {
            __m512 f = _mm512_set1_ps(coef[q]);
            const float *bq = b[q] + j;
            s0 = _mm512_fmadd_ps(f, _mm512_loadu_ps(bq), s0);
            s1 = _mm512_fmadd_ps(f, _mm512_loadu_ps(bq + 16), s1);
            s2 = _mm512_fmadd_ps(f, _mm512_loadu_ps(bq + 32), s2);
            s3 = _mm512_fmadd_ps(f, _mm512_loadu_ps(bq + 48), s3);
        }
        _mm512_stream_ps(c + j, s0);
        _mm512_stream_ps(c + j + 16, s1);
        _mm512_stream_ps(c + j + 32, s2);
        _mm512_stream_ps(c + j + 48, s3);
    }
    for (; j + 16 <= j1; j += 16) {
        __m512 s0 = _mm512_setzero_ps();
        for (int64_t q = 0; q < k; q++) s0 = _mm512_fmadd_ps(_mm512_set1_ps(coef[q]), _mm512_loadu_ps(b[q] + j), s0);
        _mm512_stream_ps(c + j, s0);
    }
    for (; j < j1; j++) { /* tail */
        float s = 0.0f;
        for (int64_t q = 0; q < k; q++) s += coef[q] * b[q][j];
        c[j] = s;
    }
}

/* C = op(A) B, float32, k <= SMALL_K_MAX, B row-major [k, n]; op(A)[i][q] at a[i * a_rs + q * a_cs] */
static void stream_gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                        const float *bdata, int64_t ldb, float *c, int64_t ldc)
{
    const float *b[SMALL_K_MAX];
    float coef[SMALL_K_MAX];
    for (int64_t q = 0; q < k; q++) b[q] = bdata + q * ldb;
    for (int64_t j0 = 0; j0 < n; j0 += STREAM_TILE) {
        int64_t j1 = n - j0 < STREAM_TILE ? n : j0 + STREAM_TILE;
        for (int64_t i = 0; i < m; i++) {
            for (int64_t q = 0; q < k; q++) coef[q] = a[i * a_rs + q * a_cs];
            stream_row(c + i * ldc, b, coef, k, j0, j1);
        }
    }
    _mm_sfence(); /* the streamed lines are visible to whoever reads C next (another thread, the NIC) */
}

/* C = op(A) B (+ C) with at most SMALL_M_MAX rows of C and a large row-major B [k, n], as an input gradient
 * dX = dY W from a few tokens is (or the forward of a layer stored [in, out]): one pass over B, which is
 * all the memory traffic there is. OpenBLAS' sgemm takes 45-60% longer than that pass on [8 x 5504] x
 * [5504 x 4096] (one thread; it packs panels of B for a kernel built for large M). Here blocks of
 * SMALL_M_IBLOCK rows of B are streamed once each, sequentially, through 32 columns of C at a time held in
 * registers (8 rows x 2 vectors), C's rows staying in L2 between blocks. */
#define SMALL_M_MAX 8
#define SMALL_M_IBLOCK 16

__attribute__((target("avx512f"))) static void small_m_block(float *c, int64_t ldc, int64_t n, const float *w,
                                                              int64_t ldw, int64_t rows, const float *coef)
{
    for (int64_t j = 0; j < n; j += 32) {
        int64_t r = n - j;
        __mmask16 m0 = r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u);
        __mmask16 m1 = r >= 32 ? (__mmask16)0xFFFF : r <= 16 ? (__mmask16)0 : (__mmask16)((1u << (r - 16)) - 1u);
        __m512 a0[SMALL_M_MAX], a1[SMALL_M_MAX];
#pragma GCC unroll 8
        for (int q = 0; q < SMALL_M_MAX; q++) {
            a0[q] = _mm512_maskz_loadu_ps(m0, c + q * ldc + j);
            a1[q] = _mm512_maskz_loadu_ps(m1, c + q * ldc + j + 16);
        }
        for (int64_t i = 0; i < rows; i++) {
            const float *wr = w + i * ldw + j;
            __m512 w0 = _mm512_maskz_loadu_ps(m0, wr), w1 = _mm512_maskz_loadu_ps(m1, wr + 16);
#pragma GCC unroll 8
            for (int q = 0; q < SMALL_M_MAX; q++) {
                __m512 f = _mm512_set1_ps(coef[i * SMALL_M_MAX + q]);
                a0[q] = _mm512_fmadd_ps(f, w0, a0[q]);
                a1[q] = _mm512_fmadd_ps(f, w1, a1[q]);
            }
        }
#pragma GCC unroll 8
        for (int q = 0; q < SMALL_M_MAX; q++) {
            _mm512_mask_storeu_ps(c + q * ldc + j, m0, a0[q]);
            _mm512_mask_storeu_ps(c + q * ldc + j + 16, m1, a1[q]);
        }
    }
}

/* C [m, n] = op(A) [m, k] B [k, n] (+ C), m <= SMALL_M_MAX, float32; op(A)[r][i] at a[r * a_rs + i * a_cs].
 * The rows are summed in acc ([SMALL_M_MAX, n], rows past m zero and discarded). */
static void small_m_gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                         const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate, float *acc)
{
    float coef[SMALL_M_IBLOCK * SMALL_M_MAX];
    memset(acc, 0, (size_t)(SMALL_M_MAX * n) * sizeof *acc);
    if (accumulate)
        for (int64_t r = 0; r < m; r++) memcpy(acc + r * n, c + r * ldc, (size_t)n * sizeof *acc);
    for (int64_t i0 = 0; i0 < k; i0 += SMALL_M_IBLOCK) {
        int64_t rows = k - i0 < SMALL_M_IBLOCK ? k - i0 : SMALL_M_IBLOCK;
        memset(coef, 0, sizeof coef);
        for (int64_t i = 0; i < rows; i++)
            for (int64_t r = 0; r < m; r++) coef[i * SMALL_M_MAX + r] = a[r * a_rs + (i0 + i) * a_cs];
        small_m_block(acc, n, n, b + i0 * ldb, ldb, rows, coef);
    }
    for (int64_t r = 0; r < m; r++) memcpy(c + r * ldc, acc + r * n, (size_t)n * sizeof *acc);
}

/* C [m, n] = A [m, k] B^T (+ C), m <= SMALL_M_MAX, float32, B stored row-major [n, k]: a layer's forward
 * Y = X W^T from a few tokens. Each row of B (a weight row) is read once and dotted with every row of A
 * (packed into a [SMALL_M_MAX, k] buffer). Blocks of SMALL_M_DOT_ROWS rows of B go through A by tiles of
 * SMALL_M_DOT_TILE columns, so that A's tile (8 x 4 KiB) is read from L1, not L2, for every two rows of B;
 * the partial sums wait in part (L1) between tiles. */
#define SMALL_M_DOT_ROWS 16
#define SMALL_M_DOT_TILE 1024

__attribute__((target("avx512f"))) static void small_m_dot(int64_t m, int64_t n, int64_t k, const float *x,
                                                            const float *b, int64_t ldb, float *c, int64_t ldc,
                                                            int accumulate)
{
    __m512 part[SMALL_M_DOT_ROWS + 1][SMALL_M_MAX]; /* + 1: the unused partner of an odd last row */
    for (int64_t i0 = 0; i0 < n; i0 += SMALL_M_DOT_ROWS) {
        int64_t rows = n - i0 < SMALL_M_DOT_ROWS ? n - i0 : SMALL_M_DOT_ROWS;
        for (int64_t r = 0; r <= rows; r++)
            for (int q = 0; q < SMALL_M_MAX; q++) part[r][q] = _mm512_setzero_ps();
        for (int64_t j0 = 0; j0 < k; j0 += SMALL_M_DOT_TILE) {
            int64_t j1 = k - j0 < SMALL_M_DOT_TILE ? k : j0 + SMALL_M_DOT_TILE;
            for (int64_t r = 0; r < rows; r += 2) {
                const float *b0 = b + (i0 + r) * ldb, *b1 = r + 1 < rows ? b0 + ldb : b0;
                __m512 s0[SMALL_M_MAX], s1[SMALL_M_MAX];
#pragma GCC unroll 8
                for (int q = 0; q < SMALL_M_MAX; q++) {
                    s0[q] = part[r][q];
                    s1[q] = part[r + 1][q];
                }
                for (int64_t j = j0; j < j1; j += 16) {
                    __mmask16 mk = j1 - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (j1 - j)) - 1u);
                    __m512 w0 = _mm512_maskz_loadu_ps(mk, b0 + j), w1 = _mm512_maskz_loadu_ps(mk, b1 + j);
#pragma GCC unroll 8
                    for (int q = 0; q < SMALL_M_MAX; q++) {
                        __m512 xq = _mm512_maskz_loadu_ps(mk, x + q * k + j);
                        s0[q] = _mm512_fmadd_ps(w0, xq, s0[q]);
                        s1[q] = _mm512_fmadd_ps(w1, xq, s1[q]);
                    }
                }
#pragma GCC unroll 8
                for (int q = 0; q < SMALL_M_MAX; q++) {
                    part[r][q] = s0[q];
                    part[r + 1][q] = s1[q];
                }
            }
        }
        for (int64_t q = 0; q < m; q++)
            for (int64_t r = 0; r < rows; r++) {
                float *cq = c + q * ldc + i0 + r;
                *cq = _mm512_reduce_add_ps(part[r][q]) + (accumulate ? *cq : 0.0f);
            }
    }
}

static int stream_usable(void) { return __builtin_cpu_supports("avx512f"); }
#endif

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
    if (tp_dtype_is_half(c->dtype)) {
        st = tp_half_gemm(a, ta, b, tb, c, accumulate, NULL, blas_gemm);
        goto out;
    }
    TP_REQUIRE(c->dtype == TP_FLOAT32 || c->dtype == TP_FLOAT64,
               "CPU GEMM supports float32, float64, bfloat16 and float16, got %s", tp_dtype_name(c->dtype));
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
#ifdef TP_HAVE_STREAM
    if (!accumulate && k <= SMALL_K_MAX && c->dtype == TP_FLOAT32 && opb == CblasNoTrans &&
        (uint64_t)(m * n) * item >= STREAM_MIN_BYTES && scipy_openblas_get_num_threads() == 1 && stream_usable()) {
        stream_gemm(m, n, k, a->data, a_row_step, opa == CblasNoTrans ? 1 : a->ld, b->data, b->ld, c->data, c->ld);
        goto out;
    }
    if (m <= SMALL_M_MAX && c->dtype == TP_FLOAT32 && opb == CblasNoTrans &&
        (uint64_t)(k * n) * item >= STREAM_MIN_BYTES && scipy_openblas_get_num_threads() == 1 && stream_usable()) {
        float *acc = malloc((size_t)(SMALL_M_MAX * n) * sizeof *acc);
        if (acc == NULL) {
            st = tp_error(TP_ERR_NOMEM, "gemm: out of memory for %lld x %lld float32", (long long)SMALL_M_MAX,
                          (long long)n);
            goto out;
        }
        small_m_gemm(m, n, k, a->data, opa == CblasNoTrans ? a->ld : 1, opa == CblasNoTrans ? 1 : a->ld, b->data,
                     b->ld, c->data, c->ld, accumulate, acc);
        free(acc);
        goto out;
    }
    if (m <= SMALL_M_MAX && c->dtype == TP_FLOAT32 && opb == CblasTrans && (uint64_t)(k * n) * item >= STREAM_MIN_BYTES &&
        scipy_openblas_get_num_threads() == 1 && stream_usable()) {
        float *xs = calloc((size_t)(SMALL_M_MAX * k), sizeof *xs);
        const float *pa = a->data;
        if (xs == NULL) {
            st = tp_error(TP_ERR_NOMEM, "gemm: out of memory for %lld x %lld float32", (long long)SMALL_M_MAX,
                          (long long)k);
            goto out;
        }
        for (int64_t r = 0; r < m; r++) /* op(A) packed row-major; rows past m stay zero */
            for (int64_t i = 0; i < k; i++) xs[r * k + i] = pa[opa == CblasNoTrans ? r * a->ld + i : i * a->ld + r];
        small_m_dot(m, n, k, xs, b->data, b->ld, c->data, c->ld, accumulate);
        free(xs);
        goto out;
    }
#endif
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
    } else if (tp_dtype_is_half(c->dtype)) {
        st = tp_half_rows(c, bias, mode);
    } else {
        st = tp_error(TP_ERR_TYPE, "bias: float32, float64, bfloat16 or float16, got %s", tp_dtype_name(c->dtype));
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
    if (tp_dtype_is_half(a->dtype)) {
        st = tp_half_col_sums(a, out, accumulate);
        goto out;
    }
    TP_REQUIRE(a->dtype == TP_FLOAT32 || a->dtype == TP_FLOAT64,
               "column sums: float32, float64, bfloat16 or float16, got %s", tp_dtype_name(a->dtype));
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
    if (tp_dtype_is_half(c->dtype)) { /* the bias joins the float32 sum: one rounding */
        TP_CHECK(tp_half_gemm(a, ta, b, tb, c, 0, bias, blas_gemm));
        goto out;
    }
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
        tp_world_env w;
        TP_CHECK(tp_world_from_env(&w));
        n = tp_cores_per_rank(w.local_world_size);
    }
    scipy_openblas_set_num_threads(n);
    tp_log(TP_LOG_INFO, "BLAS threads: %d", n);
out:
    return st;
}

int tp_get_num_threads(void) { return scipy_openblas_get_num_threads(); }
