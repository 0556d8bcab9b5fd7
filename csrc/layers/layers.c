/* Tensor-parallel layers: the forward/backward collective pairs of DESIGN.md §1 in one place.
 *
 *   layer              forward                         backward
 *   row (LinearAllreduce)  all_reduce(X_r W_r^T) + b   dX_r = dY W_r, dW_r, db: no collective
 *   column (LinearLayer)   X W_r^T + b_r (no comm)     dX = all_reduce(dY_r W_r), dW_r, db_r
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../gemm/gemm.h"

/* The group must include this rank and, when the layer communicates, take buffers on w's device. */
static tp_status check_group(tp_group *g, const tp_tensor *w)
{
    if (g == NULL) return tp_error(TP_ERR_VALUE, "process group is NULL");
    if (tp_group_rank(g) < 0)
        return tp_error(TP_ERR_VALUE, "this rank is not a member of the layer's process group");
    if (tp_group_size(g) > 1) return tp_group_check_device(g, w->device, "the layer's weight");
    return TP_OK;
}

/* An output must be contiguous: collectives run on its flat buffer. */
static tp_status check_flat(const tp_tensor *t, const char *what)
{
    if (!tp_tensor_is_contiguous(t)) return tp_error(TP_ERR_VALUE, "%s must be contiguous", what);
    return TP_OK;
}

/* Row forward through the backend's staging area: GEMM blocks of rows straight into this rank's part of
 * the shared segment, then all-reduce each block from there into y, so the all-reduce copies nothing
 * in. Blocks are as many rows as the staging area holds (the same on every rank: it depends only on
 * the shapes and the group). *done stays 0 when the backend has no staging area (then nothing ran). */
static tp_status row_forward_staged(tp_group *g, const tp_tensor *x, const tp_tensor *w, tp_tensor *y, int *done)
{
    tp_status st = TP_OK;
    tp_mat mx, mw, chunk_x, chunk_y;
    void *px = NULL, *stage = NULL;
    size_t item = tp_dtype_size(y->dtype), row_bytes;
    int64_t rows, block;
    *done = 0;
    if (y->device.type != TP_DEVICE_CPU || tp_group_size(g) == 1) goto out;
    TP_CHECK(tp_linear_check(x, w, NULL, y));
    row_bytes = (size_t)w->shape[0] * item;
    rows = tp_tensor_numel(y) / (w->shape[0] > 0 ? w->shape[0] : 1);
    if (rows == 0 || row_bytes == 0) goto out;
    for (block = rows; block > 0; block /= 2) {
        TP_CHECK(tp_all_reduce_staging(g, (size_t)block * row_bytes, &stage));
        if (stage != NULL) break;
    }
    if (block == 0) goto out;
    TP_CHECK(tp_mat_view(x, &mx, &px, "input"));
    TP_CHECK(tp_mat_view(w, &mw, NULL, "weight"));
    *done = 1;
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
        int64_t n = rows - r0 < block ? rows - r0 : block;
        TP_CHECK(tp_all_reduce_staging(g, (size_t)n * row_bytes, &stage));
        TP_REQUIRE(stage != NULL, "row forward: the staging area shrank between calls");
        chunk_x = mx;
        chunk_x.rows = n;
        chunk_x.data = (char *)mx.data + (size_t)r0 * (size_t)(mx.trans ? 1 : mx.ld) * item;
        chunk_y = (tp_mat){stage, n, w->shape[0], w->shape[0], 0, y->dtype, y->device};
        TP_CHECK(tp_gemm(&chunk_x, 0, &mw, 1, &chunk_y, 0));
        TP_CHECK(tp_all_reduce_staged(g, (char *)y->data + (size_t)r0 * row_bytes, (size_t)n * (size_t)w->shape[0],
                                      y->dtype, TP_SUM));
    }
out:
    free(px);
    return st;
}

tp_status tp_row_forward(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b, tp_tensor *y)
{
    tp_status st = TP_OK;
    int staged = 0;
    TP_CHECK(check_group(g, w));
    TP_CHECK(check_flat(y, "output"));
    TP_CHECK(row_forward_staged(g, x, w, y, &staged));
    if (!staged) {
        TP_CHECK(tp_linear_forward(x, w, NULL, y));
        TP_CHECK(tp_all_reduce(g, y->data, (size_t)tp_tensor_numel(y), y->dtype, TP_SUM));
    }
    if (b) TP_CHECK(tp_add_bias(y, b));
out:
    return st;
}

tp_status tp_row_backward(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                          tp_tensor *dx, tp_tensor *dw, tp_tensor *db)
{
    tp_status st = TP_OK;
    TP_CHECK(check_group(g, w));
    if (dx) TP_CHECK(tp_linear_backward_input(dy, w, dx));
    if (dw) TP_CHECK(tp_linear_backward_params(dy, x, dw, db));
out:
    return st;
}

tp_status tp_col_forward(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b, tp_tensor *y)
{
    tp_status st = TP_OK;
    TP_CHECK(check_group(g, w));
    TP_CHECK(tp_linear_forward(x, w, b, y));
out:
    return st;
}

/* The dX all-reduce, run on a helper thread when overlapped with the dW GEMM. Errors are
 * captured as status + message because tp_last_error() is per thread. */
typedef struct {
    tp_group *g;
    tp_tensor *dx;
    tp_status st;
    char msg[512];
} reduce_job;

static void *reduce_thread(void *arg)
{
    reduce_job *job = arg;
    job->st = tp_all_reduce(job->g, job->dx->data, (size_t)tp_tensor_numel(job->dx), job->dx->dtype, TP_SUM);
    if (job->st != TP_OK) snprintf(job->msg, sizeof job->msg, "%s", tp_last_error());
    return NULL;
}

tp_status tp_col_backward(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                          tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap)
{
    tp_status st = TP_OK;
    reduce_job job;
    pthread_t th;
    int started = 0;
    memset(&job, 0, sizeof job);
    TP_CHECK(check_group(g, w));
    TP_CHECK(check_flat(dx, "grad_input"));
    TP_CHECK(tp_linear_backward_input(dy, w, dx));
    job.g = g;
    job.dx = dx;
    if (overlap && dw && tp_group_size(g) > 1) {
        if (pthread_create(&th, NULL, reduce_thread, &job) != 0) {
            st = tp_error_errno(TP_ERR_SYSTEM, "could not start the overlapped all-reduce thread");
            goto out;
        }
        started = 1;
    } else {
        reduce_thread(&job);
        if (job.st != TP_OK) {
            st = tp_error(job.st, "%s", job.msg);
            goto out;
        }
    }
    if (dw) TP_CHECK(tp_linear_backward_params(dy, x, dw, db));
out:
    if (started) {
        pthread_join(th, NULL);
        /* a failed GEMM must not leave peers waiting: the all-reduce has finished either way */
        if (st == TP_OK && job.st != TP_OK) st = tp_error(job.st, "%s", job.msg);
    }
    return st;
}
