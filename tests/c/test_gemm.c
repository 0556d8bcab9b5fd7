/* GEMM and the linear ops against naive double loops; strided, transposed and empty operands;
 * counter-based init of shards; single-rank layers; error statuses. */
#include <stdlib.h>
#include <string.h>

#include "check.h"

#include "../../csrc/gemm/gemm.h" /* white box: the alignment cuBLASLt is told (gemm/cublas.c) */

static double rnd(unsigned *s)
{
    *s = *s * 1103515245u + 12345u;
    return ((double)((*s >> 8) & 0xffff) / 65536.0) - 0.5;
}

static double rel_err(const double *got, const double *want, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Y = X W^T + b, dX = dY W, dW = dY^T X, db = sum dY: naive references in double. */
static void reference(int64_t m, int64_t in, int64_t out, const double *x, const double *w, const double *b,
                      const double *dy, double *y, double *dx, double *dw, double *db)
{
    for (int64_t i = 0; i < m; i++)
        for (int64_t o = 0; o < out; o++) {
            double acc = b ? b[o] : 0;
            for (int64_t k = 0; k < in; k++) acc += x[i * in + k] * w[o * in + k];
            y[i * out + o] = acc;
        }
    for (int64_t i = 0; i < m; i++)
        for (int64_t k = 0; k < in; k++) {
            double acc = 0;
            for (int64_t o = 0; o < out; o++) acc += dy[i * out + o] * w[o * in + k];
            dx[i * in + k] = acc;
        }
    for (int64_t o = 0; o < out; o++) {
        for (int64_t k = 0; k < in; k++) {
            double acc = 0;
            for (int64_t i = 0; i < m; i++) acc += dy[i * out + o] * x[i * in + k];
            dw[o * in + k] = acc;
        }
        db[o] = 0;
        for (int64_t i = 0; i < m; i++) db[o] += dy[i * out + o];
    }
}

/* layout: bit 0 stores X column-major, bit 1 stores dY column-major (a transposed view of each). */
static void run_case(tp_dtype dt, int64_t m, int64_t in, int64_t out, int with_bias, int layout)
{
    int fortran_x = layout & 1, fortran_dy = (layout >> 1) & 1;
    unsigned seed = (unsigned)(m * 131 + in * 7 + out + (int)dt);
    size_t item = tp_dtype_size(dt);
    double *x = malloc(sizeof(double) * (size_t)(m * in + 1)), *w = malloc(sizeof(double) * (size_t)(out * in + 1));
    double *b = malloc(sizeof(double) * (size_t)(out + 1)), *dy = malloc(sizeof(double) * (size_t)(m * out + 1));
    double *ry = malloc(sizeof(double) * (size_t)(m * out + 1)), *rdx = malloc(sizeof(double) * (size_t)(m * in + 1));
    double *rdw = malloc(sizeof(double) * (size_t)(out * in + 1)), *rdb = malloc(sizeof(double) * (size_t)(out + 1));
    double *got = malloc(sizeof(double) * (size_t)(out * in + m * out + m * in + out + 1));
    char *tx = malloc(item * (size_t)(m * in + 1)), *tw = malloc(item * (size_t)(out * in + 1));
    char *tb = malloc(item * (size_t)(out + 1)), *tdy = malloc(item * (size_t)(m * out + 1));
    char *ty = malloc(item * (size_t)(m * out + 1)), *tdx = malloc(item * (size_t)(m * in + 1));
    char *tdw = calloc((size_t)(out * in + 1), item), *tdb = calloc((size_t)(out + 1), item);
    tp_tensor X, W, B, DY, Y, DX, DW, DB;
    double tol = dt == TP_FLOAT32 ? 1e-5 : 1e-12;
    for (int64_t i = 0; i < m * in; i++) x[i] = rnd(&seed);
    for (int64_t i = 0; i < out * in; i++) w[i] = rnd(&seed);
    for (int64_t i = 0; i < out; i++) b[i] = rnd(&seed);
    for (int64_t i = 0; i < m * out; i++) dy[i] = rnd(&seed);
    /* store in the test dtype, and compute the reference from the stored (rounded) values */
#define STORE(dst, src, n)                                                                    \
    for (int64_t i = 0; i < (n); i++) {                                                       \
        if (dt == TP_FLOAT32) {                                                               \
            ((float *)(dst))[i] = (float)(src)[i];                                            \
            (src)[i] = ((float *)(dst))[i];                                                   \
        } else                                                                                \
            ((double *)(dst))[i] = (src)[i];                                                  \
    }
    STORE(tw, w, out * in);
    STORE(tb, b, out);
    if (fortran_dy) { /* column-major dY: element (i, o) at o * m + i */
        for (int64_t i = 0; i < m; i++)
            for (int64_t o = 0; o < out; o++) {
                if (dt == TP_FLOAT32) {
                    ((float *)tdy)[o * m + i] = (float)dy[i * out + o];
                    dy[i * out + o] = ((float *)tdy)[o * m + i];
                } else
                    ((double *)tdy)[o * m + i] = dy[i * out + o];
            }
    } else {
        STORE(tdy, dy, m * out);
    }
    if (fortran_x) { /* column-major X: element (i, k) at k * m + i */
        for (int64_t i = 0; i < m; i++)
            for (int64_t k = 0; k < in; k++) {
                if (dt == TP_FLOAT32) {
                    ((float *)tx)[k * m + i] = (float)x[i * in + k];
                    x[i * in + k] = ((float *)tx)[k * m + i];
                } else
                    ((double *)tx)[k * m + i] = x[i * in + k];
            }
    } else {
        STORE(tx, x, m * in);
    }
    reference(m, in, out, x, w, with_bias ? b : NULL, dy, ry, rdx, rdw, rdb);
    EXPECT_OK(tp_tensor_init(&X, tx, dt, 2, (int64_t[]){m, in}));
    if (fortran_x) {
        X.strides[0] = 1;
        X.strides[1] = m;
    }
    EXPECT_OK(tp_tensor_init(&W, tw, dt, 2, (int64_t[]){out, in}));
    EXPECT_OK(tp_tensor_init(&B, tb, dt, 1, (int64_t[]){out}));
    EXPECT_OK(tp_tensor_init(&DY, tdy, dt, 2, (int64_t[]){m, out}));
    if (fortran_dy) {
        DY.strides[0] = 1;
        DY.strides[1] = m;
    }
    EXPECT_OK(tp_tensor_init(&Y, ty, dt, 2, (int64_t[]){m, out}));
    EXPECT_OK(tp_tensor_init(&DX, tdx, dt, 2, (int64_t[]){m, in}));
    EXPECT_OK(tp_tensor_init(&DW, tdw, dt, 2, (int64_t[]){out, in}));
    EXPECT_OK(tp_tensor_init(&DB, tdb, dt, 1, (int64_t[]){out}));
    EXPECT_OK(tp_linear_forward(&X, &W, with_bias ? &B : NULL, &Y));
    EXPECT_OK(tp_linear_backward_input(&DY, &W, &DX));
    EXPECT_OK(tp_linear_backward_params(&DY, &X, &DW, &DB));
#define LOAD(dst, src, n) \
    for (int64_t i = 0; i < (n); i++) (dst)[i] = dt == TP_FLOAT32 ? ((float *)(src))[i] : ((double *)(src))[i];
    {
        double *gy = got, *gdx = gy + m * out, *gdw = gdx + m * in, *gdb = gdw + out * in;
        LOAD(gy, ty, m * out);
        LOAD(gdx, tdx, m * in);
        LOAD(gdw, tdw, out * in);
        LOAD(gdb, tdb, out);
        if (rel_err(gy, ry, m * out) > tol || rel_err(gdx, rdx, m * in) > tol || rel_err(gdw, rdw, out * in) > tol ||
            rel_err(gdb, rdb, out) > tol) {
            fprintf(stderr, "%s m=%lld in=%lld out=%lld bias=%d layout=%d: errors y %.2e dx %.2e dw %.2e db %.2e\n",
                    tp_dtype_name(dt), (long long)m, (long long)in, (long long)out, with_bias, layout,
                    rel_err(gy, ry, m * out), rel_err(gdx, rdx, m * in), rel_err(gdw, rdw, out * in),
                    rel_err(gdb, rdb, out));
            tp_test_failures++;
        }
        /* accumulation: a second backward doubles dW and db */
        EXPECT_OK(tp_linear_backward_params(&DY, &X, &DW, &DB));
        LOAD(gdw, tdw, out * in);
        for (int64_t i = 0; i < out * in; i++) rdw[i] *= 2;
        EXPECT(rel_err(gdw, rdw, out * in) <= tol);
        /* assignment: whatever dW and db held (NaN here) is overwritten, never read */
        for (int64_t i = 0; i < out * in; i++) rdw[i] /= 2;
        for (int64_t i = 0; i < out * in; i++) {
            if (dt == TP_FLOAT32)
                ((float *)tdw)[i] = NAN;
            else
                ((double *)tdw)[i] = NAN;
        }
        for (int64_t i = 0; i < out; i++) {
            if (dt == TP_FLOAT32)
                ((float *)tdb)[i] = NAN;
            else
                ((double *)tdb)[i] = NAN;
        }
        EXPECT_OK(tp_linear_backward_params_mode(&DY, &X, &DW, &DB, TP_GRAD_ASSIGN));
        LOAD(gdw, tdw, out * in);
        LOAD(gdb, tdb, out);
        if (!(rel_err(gdw, rdw, out * in) <= tol) || !(rel_err(gdb, rdb, out) <= tol)) {
            fprintf(stderr, "%s m=%lld in=%lld out=%lld layout=%d: assign errors dw %.2e db %.2e\n",
                    tp_dtype_name(dt), (long long)m, (long long)in, (long long)out, layout,
                    rel_err(gdw, rdw, out * in), rel_err(gdb, rdb, out));
            tp_test_failures++;
        }
        /* and accumulating onto it gives twice the gradient again */
        EXPECT_OK(tp_linear_backward_params_mode(&DY, &X, &DW, &DB, TP_GRAD_ACCUMULATE));
        LOAD(gdw, tdw, out * in);
        for (int64_t i = 0; i < out * in; i++) rdw[i] *= 2;
        EXPECT(rel_err(gdw, rdw, out * in) <= tol);
        EXPECT_STATUS(tp_linear_backward_params_mode(&DY, &X, &DW, &DB, (tp_grad_mode)7), TP_ERR_VALUE);
    }
    free(x); free(w); free(b); free(dy); free(ry); free(rdx); free(rdw); free(rdb); free(got);
    free(tx); free(tw); free(tb); free(tdy); free(ty); free(tdx); free(tdw); free(tdb);
}

static void test_errors(void)
{
    float w[6] = {0}, x[6] = {0}, y[4] = {0};
    double xd[6] = {0};
    int32_t xi[6] = {0};
    tp_tensor W, X, Y, XD, XI;
    EXPECT_OK(tp_tensor_init(&W, w, TP_FLOAT32, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&X, x, TP_FLOAT32, 2, (int64_t[]){3, 2}));
    EXPECT_OK(tp_tensor_init(&Y, y, TP_FLOAT32, 2, (int64_t[]){2, 2}));
    EXPECT_OK(tp_tensor_init(&XD, xd, TP_FLOAT64, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&XI, xi, TP_INT32, 2, (int64_t[]){2, 3}));
    EXPECT_STATUS(tp_linear_forward(&X, &W, NULL, &Y), TP_ERR_VALUE); /* last dim 2, expected 3 */
    EXPECT(strstr(tp_last_error(), "must be 3") != NULL && strstr(tp_last_error(), "got 2") != NULL);
    EXPECT_STATUS(tp_linear_forward(&XD, &W, NULL, &Y), TP_ERR_TYPE);
    EXPECT(strstr(tp_last_error(), "float64") != NULL && strstr(tp_last_error(), "float32") != NULL);
    EXPECT_STATUS(tp_linear_forward(&XI, &W, NULL, &Y), TP_ERR_TYPE);
    EXPECT_STATUS(tp_tensor_init(&X, x, TP_FLOAT32, 9, (int64_t[]){1, 1, 1, 1, 1, 1, 1, 1, 1}), TP_ERR_VALUE);
    /* GPU tensors in a build without CUDA: the GEMM dispatch says so (nothing is dereferenced) */
    {
        tp_tensor WG = W, XG, YG = Y;
        EXPECT_OK(tp_tensor_init(&XG, x, TP_FLOAT32, 2, (int64_t[]){2, 3}));
        WG.device.type = XG.device.type = YG.device.type = TP_DEVICE_CUDA;
        EXPECT_STATUS(tp_linear_forward(&XG, &WG, NULL, &YG), TP_ERR_UNSUPPORTED);
        EXPECT(strstr(tp_last_error(), "built without CUDA") != NULL);
        EXPECT_STATUS(tp_tensor_copy(&YG, &Y), TP_ERR_UNSUPPORTED);
    }
}

static void test_init_shards(void)
{
    /* a column shard and a row shard initialised alone equal the same slices of the full tensor */
    enum { OUT = 10, IN = 7 };
    float full[OUT][IN], rows[4][IN], cols[OUT][3];
    tp_tensor F, R, C;
    EXPECT_OK(tp_tensor_init(&F, full, TP_FLOAT32, 2, (int64_t[]){OUT, IN}));
    EXPECT_OK(tp_tensor_init(&R, rows, TP_FLOAT32, 2, (int64_t[]){4, IN}));
    EXPECT_OK(tp_tensor_init(&C, cols, TP_FLOAT32, 2, (int64_t[]){OUT, 3}));
    EXPECT_OK(tp_init_uniform(&F, 42, 0, 0.5, 0, 0, IN));
    EXPECT_OK(tp_init_uniform(&R, 42, 0, 0.5, 3, 0, IN));
    EXPECT_OK(tp_init_uniform(&C, 42, 0, 0.5, 0, 4, IN));
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < IN; j++) EXPECT(rows[i][j] == full[3 + i][j]);
    for (int i = 0; i < OUT; i++)
        for (int j = 0; j < 3; j++) EXPECT(cols[i][j] == full[i][4 + j]);
    {
        double lo = 1, hi = -1, mean = 0;
        for (int i = 0; i < OUT; i++)
            for (int j = 0; j < IN; j++) {
                lo = full[i][j] < lo ? full[i][j] : lo;
                hi = full[i][j] > hi ? full[i][j] : hi;
                mean += full[i][j] / (OUT * IN);
            }
        EXPECT(lo >= -0.5 && hi < 0.5 && hi - lo > 0.5 && fabs(mean) < 0.15);
    }
    /* another seed gives other values */
    EXPECT_OK(tp_init_uniform(&R, 43, 0, 0.5, 3, 0, IN));
    EXPECT(rows[0][0] != full[3][0]);
    EXPECT_STATUS(tp_init_uniform(&C, 42, 0, 0.5, 0, 5, IN), TP_ERR_VALUE); /* 5 + 3 > 7 columns */
}

static void test_single_rank_layers(void)
{
    tp_init_options o;
    tp_group *g = NULL;
    float w[6] = {1, 2, 3, 4, 5, 6}, b[2] = {0.5f, -1}, x[3] = {1, 0, -1}, y[2], dy[2] = {1, 2}, dx[3];
    float dw[6] = {0}, db[2] = {0};
    tp_tensor W, B, X, Y, DY, DX, DW, DB;
    tp_init_options_default(&o);
    o.world_size = 1;
    o.rank = 0;
    EXPECT_OK(tp_group_init_world(&o, &g));
    EXPECT(g != NULL && tp_group_size(g) == 1 && tp_group_rank(g) == 0);
    EXPECT_OK(tp_tensor_init(&W, w, TP_FLOAT32, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&B, b, TP_FLOAT32, 1, (int64_t[]){2}));
    EXPECT_OK(tp_tensor_init(&X, x, TP_FLOAT32, 1, (int64_t[]){3}));
    EXPECT_OK(tp_tensor_init(&Y, y, TP_FLOAT32, 1, (int64_t[]){2}));
    EXPECT_OK(tp_tensor_init(&DY, dy, TP_FLOAT32, 1, (int64_t[]){2}));
    EXPECT_OK(tp_tensor_init(&DX, dx, TP_FLOAT32, 1, (int64_t[]){3}));
    EXPECT_OK(tp_tensor_init(&DW, dw, TP_FLOAT32, 2, (int64_t[]){2, 3}));
    EXPECT_OK(tp_tensor_init(&DB, db, TP_FLOAT32, 1, (int64_t[]){2}));
    EXPECT_OK(tp_row_forward(g, &X, &W, &B, &Y));
    EXPECT(y[0] == 1 - 3 + 0.5f && y[1] == 4 - 6 - 1);
    EXPECT_OK(tp_col_forward(g, &X, &W, &B, &Y));
    EXPECT(y[0] == -1.5f && y[1] == -3);
    EXPECT_OK(tp_col_backward(g, &DY, &X, &W, &DX, &DW, &DB, 1));
    EXPECT(dx[0] == 9 && dx[1] == 12 && dx[2] == 15);
    EXPECT(dw[0] == 1 && dw[2] == -1 && dw[3] == 2 && dw[5] == -2 && db[0] == 1 && db[1] == 2);
    EXPECT_OK(tp_row_backward(g, &DY, &X, &W, &DX, &DW, &DB));
    EXPECT(dw[0] == 2 && db[1] == 4);
    /* the _mode variants: assign overwrites, accumulate adds, a bad mode fails before anything runs */
    EXPECT_OK(tp_col_backward_mode(g, &DY, &X, &W, &DX, &DW, &DB, 1, TP_GRAD_ASSIGN));
    EXPECT(dw[0] == 1 && dw[2] == -1 && dw[3] == 2 && dw[5] == -2 && db[0] == 1 && db[1] == 2);
    EXPECT_OK(tp_row_backward_mode(g, &DY, &X, &W, &DX, &DW, &DB, TP_GRAD_ACCUMULATE));
    EXPECT(dw[0] == 2 && dw[5] == -4 && db[1] == 4);
    dw[0] = dw[5] = db[1] = NAN;
    EXPECT_OK(tp_row_backward_mode(g, &DY, &X, &W, NULL, &DW, &DB, TP_GRAD_ASSIGN));
    EXPECT(dw[0] == 1 && dw[5] == -2 && db[1] == 2);
    dx[0] = -7;
    EXPECT_STATUS(tp_col_backward_mode(g, &DY, &X, &W, &DX, &DW, &DB, 0, (tp_grad_mode)-1), TP_ERR_VALUE);
    EXPECT_STATUS(tp_row_backward_mode(g, &DY, &X, &W, &DX, &DW, &DB, (tp_grad_mode)2), TP_ERR_VALUE);
    EXPECT(dx[0] == -7 && dw[0] == 1);
    {
        /* gather of a world of one is a copy */
        float full[6] = {0};
        tp_tensor F;
        tp_range rg = {0, 3};
        EXPECT_OK(tp_tensor_init(&F, full, TP_FLOAT32, 2, (int64_t[]){2, 3}));
        EXPECT_OK(tp_gather_dim(g, &W, 1, &rg, &F));
        EXPECT(memcmp(full, w, sizeof w) == 0);
    }
    tp_group_destroy(g);
}

/* The alignment preference of cuBLASLt's operands: the largest power of two dividing the address, <= 256. */
static void test_alignment(void)
{
    static _Alignas(256) char buf[1024];
    EXPECT(tp_gemm_alignment(buf) == 256);
    EXPECT(tp_gemm_alignment(buf + 512) == 256);
    EXPECT(tp_gemm_alignment(buf + 4) == 4);   /* x[..., 1:] of float32 rows */
    EXPECT(tp_gemm_alignment(buf + 2) == 2);   /* an offset bfloat16 bias */
    EXPECT(tp_gemm_alignment(buf + 1) == 1);
    EXPECT(tp_gemm_alignment(buf + 96) == 32);
    EXPECT(tp_gemm_alignment(buf + 384) == 128);
    EXPECT(tp_gemm_alignment(NULL) == 256);
}

int main(void)
{
    /* [tokens, in, out]; {8, 4096, 21}, {32, 4096, 70}, {3, 2500, 27} write dW by row blocks when assigning
     * (openblas.c: blocks of 128 KiB per 8 tokens: 8 rows of 4096 floats, 4 of 4096 doubles, 13 rows of 2500
     * floats; float32 {32, 4096, 70} streams instead on AVX-512). The float32 weights of the last four are >= 1 MiB, where openblas.c's own kernels take over on
     * AVX-512 CPUs: Y and dX from <= 8 tokens (small_m_dot, small_m_gemm: widths not a multiple of 16 or 32,
     * 9 tokens past the limit), dW from <= 32 tokens with streaming stores (rows not 64-byte aligned), and a
     * dW of 4 rows from 64 tokens (small_m_gemm accumulating and assigning, dY transposed). */
    const int64_t shapes[][3] = {{1, 1, 1}, {5, 7, 3}, {33, 64, 17}, {64, 129, 65}, {0, 8, 4}, {4, 0, 5}, {3, 9, 0},
                                 {8, 4096, 21}, {32, 4096, 70}, {3, 2500, 27}, {8, 1037, 259}, {5, 2048, 131},
                                 {9, 1037, 259}, {64, 4096, 4}};
    tp_set_num_threads(1);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int dt = 0; dt < 2; dt++)
            for (int bias = 0; bias < 2; bias++)
                for (int f = 0; f < 4; f++)
                    run_case(dt ? TP_FLOAT64 : TP_FLOAT32, shapes[s][0], shapes[s][1], shapes[s][2], bias, f);
    test_errors();
    test_init_shards();
    test_single_rank_layers();
    test_alignment();
    TEST_MAIN_END();
}
