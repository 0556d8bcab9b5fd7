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

/* Row forward through the backend's staging area: the GEMM writes straight into this rank's part of
 * the shared segment and the all-reduce reads it from there into y, so nothing is copied in. Only when
 * the whole output fits (decided the same way on every rank): splitting a larger output into blocks
 * was measured slower on 2 cores (one synchronisation per block), so those take the plain path.
 * *done stays 0 when nothing ran. */
static tp_status row_forward_staged(tp_group *g, const tp_tensor *x, const tp_tensor *w, tp_tensor *y, int *done)
{
    tp_status st = TP_OK;
    tp_mat mx, mw, my;
    void *px = NULL, *stage = NULL;
    size_t count = (size_t)tp_tensor_numel(y);
    *done = 0;
    if (y->device.type != TP_DEVICE_CPU || tp_group_size(g) == 1 || count == 0) goto out;
    TP_CHECK(tp_linear_check(x, w, NULL, y));
    TP_CHECK(tp_all_reduce_staging(g, count * tp_dtype_size(y->dtype), &stage));
    if (stage == NULL) goto out;
    TP_CHECK(tp_mat_view(x, &mx, &px, "input"));
    TP_CHECK(tp_mat_view(w, &mw, NULL, "weight"));
    my = (tp_mat){stage, (int64_t)count / w->shape[0], w->shape[0], w->shape[0], 0, y->dtype, y->device};
    *done = 1;
    TP_CHECK(tp_gemm(&mx, 0, &mw, 1, &my, 0));
    TP_CHECK(tp_all_reduce_staged(g, y->data, count, y->dtype, TP_SUM));
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

tp_status tp_row_backward_mode(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                               tp_tensor *dx, tp_tensor *dw, tp_tensor *db, tp_grad_mode mode)
{
    tp_status st = TP_OK;
    TP_CHECK(tp_grad_mode_check(mode));
    TP_CHECK(check_group(g, w));
    if (dx) TP_CHECK(tp_linear_backward_input(dy, w, dx));
    if (dw) TP_CHECK(tp_linear_backward_params_mode(dy, x, dw, db, mode));
out:
    return st;
}

tp_status tp_row_backward(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                          tp_tensor *dx, tp_tensor *dw, tp_tensor *db)
{
    return tp_row_backward_mode(g, dy, x, w, dx, dw, db, TP_GRAD_ACCUMULATE);
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

tp_status tp_col_backward_mode(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                               tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap, tp_grad_mode mode)
{
    tp_status st = TP_OK;
    reduce_job job;
    pthread_t th;
    int started = 0;
    memset(&job, 0, sizeof job);
    TP_CHECK(tp_grad_mode_check(mode));
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
    if (dw) TP_CHECK(tp_linear_backward_params_mode(dy, x, dw, db, mode));
out:
    if (started) {
        pthread_join(th, NULL);
        /* a failed GEMM must not leave peers waiting: the all-reduce has finished either way */
        if (st == TP_OK && job.st != TP_OK) st = tp_error(job.st, "%s", job.msg);
    }
    return st;
}

tp_status tp_col_backward(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                          tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap)
{
    return tp_col_backward_mode(g, dy, x, w, dx, dw, db, overlap, TP_GRAD_ACCUMULATE);
}
