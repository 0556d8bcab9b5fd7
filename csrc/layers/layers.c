/* Tensor-parallel layers: the forward/backward collective pairs (docs/architecture.md, section 6) in one place.
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

/* The group must include this rank and take buffers on w's device, whatever its size: a group of one of a
 * host backend copies its collectives' buffers on the host. */
static tp_status check_group(tp_group *g, const tp_tensor *w)
{
    if (g == NULL) return tp_error(TP_ERR_VALUE, "process group is NULL");
    if (tp_group_rank(g) < 0)
        return tp_error(TP_ERR_VALUE, "this rank is not a member of the layer's process group");
    return tp_group_check_device(g, w->device, "the layer's weight");
}

/* An output must be contiguous: collectives run on its flat buffer. */
static tp_status check_flat(const tp_tensor *t, const char *what)
{
    if (!tp_tensor_is_contiguous(t)) return tp_error(TP_ERR_VALUE, "%s must be contiguous", what);
    return TP_OK;
}

/* This rank's staging area in the backend's shared memory as an array shaped like t, when the group has
 * one and t fits (decided the same way on every rank); else s->data stays NULL. */
static tp_status staging_like(tp_group *g, const tp_tensor *t, tp_tensor *s)
{
    tp_status st = TP_OK;
    void *stage = NULL;
    s->data = NULL;
    if (t->device.type != TP_DEVICE_CPU || tp_group_size(g) == 1 || tp_tensor_numel(t) == 0) goto out;
    TP_CHECK(tp_all_reduce_staging(g, (size_t)tp_tensor_numel(t) * tp_dtype_size(t->dtype), &stage));
    if (stage) TP_CHECK(tp_tensor_init(s, stage, t->dtype, t->ndim, t->shape));
out:
    return st;
}

/* Row forward on CPU memory: the GEMM writes straight into this rank's staging area when the output fits
 * (else into y), and one reduction sums the ranks' products into y and adds the bias in the same pass
 * (tp_all_reduce_bias), so nothing is copied in and y is not walked again for the bias. *done stays 0
 * (nothing ran) for device outputs. */
static tp_status row_forward_host(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                                  tp_tensor *y, int *done)
{
    tp_status st = TP_OK;
    tp_tensor stage;
    size_t count = (size_t)tp_tensor_numel(y);
    *done = 0;
    if (y->device.type != TP_DEVICE_CPU) goto out;
    TP_CHECK(tp_linear_check(x, w, b, y));
    TP_CHECK(staging_like(g, y, &stage));
    *done = 1;
    TP_CHECK(tp_linear_forward(x, w, NULL, stage.data ? &stage : y));
    TP_CHECK(tp_all_reduce_bias(g, stage.data ? stage.data : y->data, y->data, count, y->dtype, b ? b->data : NULL,
                                b ? (size_t)w->shape[0] : 0));
out:
    return st;
}

tp_status tp_row_forward(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b, tp_tensor *y)
{
    tp_status st = TP_OK;
    int done = 0;
    TP_CHECK(check_group(g, w));
    TP_CHECK(check_flat(y, "output"));
    if (tp_group_size(g) == 1) { /* nothing to reduce: the plain layer, its bias in the GEMM */
        TP_CHECK(tp_linear_forward(x, w, b, y));
        goto out;
    }
    TP_CHECK(row_forward_host(g, x, w, b, y, &done));
    if (!done) {
        TP_CHECK(tp_linear_forward(x, w, NULL, y));
        TP_CHECK(tp_all_reduce(g, y->data, (size_t)tp_tensor_numel(y), y->dtype, TP_SUM));
        if (b) TP_CHECK(tp_add_bias(y, b));
    }
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

/* The dX all-reduce (from the staging area when the GEMM wrote there), run on a helper thread when
 * overlapped with the dW GEMM. Errors are captured as status + message because tp_last_error() is per
 * thread. */
typedef struct {
    tp_group *g;
    tp_tensor *dx;
    const void *in;
    tp_status st;
    char msg[512];
} reduce_job;

static void *reduce_thread(void *arg)
{
    reduce_job *job = arg;
    size_t n = (size_t)tp_tensor_numel(job->dx);
    if (job->in == job->dx->data)
        job->st = tp_all_reduce(job->g, job->dx->data, n, job->dx->dtype, TP_SUM);
    else
        job->st = tp_all_reduce_staged(job->g, job->dx->data, n, job->dx->dtype, TP_SUM);
    if (job->st != TP_OK) snprintf(job->msg, sizeof job->msg, "%s", tp_last_error());
    return NULL;
}

tp_status tp_col_backward_mode(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                               tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap, tp_grad_mode mode)
{
    tp_status st = TP_OK;
    reduce_job job;
    tp_tensor stage;
    pthread_t th;
    int started = 0;
    memset(&job, 0, sizeof job);
    TP_CHECK(tp_grad_mode_check(mode));
    TP_CHECK(check_group(g, w));
    TP_CHECK(check_flat(dx, "grad_input"));
    TP_CHECK(staging_like(g, dx, &stage)); /* the dX GEMM writes straight into shared memory when it fits */
    TP_CHECK(tp_linear_backward_input(dy, w, stage.data ? &stage : dx));
    job.g = g;
    job.dx = dx;
    job.in = stage.data ? stage.data : dx->data;
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
