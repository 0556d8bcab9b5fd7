/* Sequence parallelism: Megatron-core's sequence-parallel pairs (tensor_parallel/mappings.py) in one place.
 * Between layers every activation is split along the sequence dim, dim 0, rank r holding rows seq[r]
 * (consecutive, in rank order); inside a layer pair the sequence is whole and the features are split.
 *
 *   layer                      forward                                  backward
 *   column, sequence-parallel  X = all_gather_rows(X_r); Y_r = X W_r^T   dX_r = reduce_scatter_rows(dY_r W_r);
 *                              + b_r                                     dW_r += dY_r^T all_gather_rows(X_r)
 *   row, sequence-parallel     Y_r = reduce_scatter_rows(X W_r^T) + b    dY = all_gather_rows(dY_r); dX = dY W_r;
 *                                                                        dW_r += dY^T X; db += sum(dY)
 *
 * The column layer keeps only its rows of X for the backward and gathers them again there (Megatron does
 * the same), so no full activation outlives a layer. Overlap: the column backward runs the gather of X
 * under the dX GEMM and the reduce-scatter of dX under the dW GEMM (Megatron's async communication); the
 * column forward can pipeline its gather in chunks with the GEMM (TransformerEngine's split all-gather). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../gemm/gemm.h"

/* ---------------------------------------------------------------- checks */

static tp_status check_layer_group(tp_group *g, const tp_tensor *w)
{
    tp_status st = TP_OK;
    TP_REQUIRE(g != NULL, "process group is NULL");
    TP_REQUIRE(tp_group_rank(g) >= 0, "this rank is not a member of the layer's process group");
    TP_CHECK(tp_group_check_device(g, w->device, "the layer's weight")); /* also a group of one: see layers.c */
out:
    return st;
}

/* seq has one range per rank of g, consecutive from 0 in rank order, covering `rows`. */
static tp_status check_seq(tp_group *g, const tp_range *seq, int64_t rows, const char *what)
{
    tp_status st = TP_OK;
    int64_t at = 0;
    TP_REQUIRE(seq != NULL, "%s: the sequence ranges are NULL", what);
    for (int r = 0; r < tp_group_size(g); r++) {
        TP_REQUIRE(seq[r].offset == at && seq[r].size >= 0,
                   "%s: rank %d's rows start at %lld with %lld rows, expected consecutive rows in rank order "
                   "(starting at %lld)", what, r, (long long)seq[r].offset, (long long)seq[r].size, (long long)at);
        at += seq[r].size;
    }
    TP_REQUIRE(at == rows, "%s: the ranks' rows add up to %lld but the full sequence has %lld", what, (long long)at,
               (long long)rows);
out:
    return st;
}

/* full is [S, ...] and part [seq[rank].size, ...] with the same dims between the first and the last. */
static tp_status check_rows(tp_group *g, const tp_tensor *full, const tp_tensor *part, const tp_range *seq,
                            const char *wfull, const char *wpart)
{
    tp_status st = TP_OK;
    int me = tp_group_rank(g);
    TP_REQUIRE(full->ndim >= 2, "%s must have a sequence dim and a feature dim (at least 2-d), got %d-d", wfull,
               full->ndim);
    TP_REQUIRE(part->ndim == full->ndim, "%s has %d dims but %s has %d", wpart, part->ndim, wfull, full->ndim);
    TP_CHECK(check_seq(g, seq, full->shape[0], wfull));
    TP_REQUIRE(part->shape[0] == seq[me].size,
               "%s's sequence dim (dim 0) must be %lld (this rank's rows %lld..%lld of %lld at rank %d of %d), got %lld",
               wpart, (long long)seq[me].size, (long long)seq[me].offset, (long long)(seq[me].offset + seq[me].size),
               (long long)full->shape[0], me, tp_group_size(g), (long long)part->shape[0]);
    for (int d = 1; d < full->ndim - 1; d++)
        TP_REQUIRE(part->shape[d] == full->shape[d], "%s's dim %d is %lld but %s's is %lld", wpart, d,
                   (long long)part->shape[d], wfull, (long long)full->shape[d]);
out:
    return st;
}

/* t's descriptor with `rows` sequence rows, for tp_linear_check's checks before any collective. */
static tp_tensor with_rows(const tp_tensor *t, int64_t rows)
{
    tp_tensor c = *t;
    c.shape[0] = rows;
    return c;
}

static tp_status check_flat(const tp_tensor *t, const char *what)
{
    if (!tp_tensor_is_contiguous(t)) return tp_error(TP_ERR_VALUE, "%s must be contiguous", what);
    return TP_OK;
}

/* A contiguous scratch tensor shaped like `like` with last dim `last`, on like's device; free with
 * tp_device_free(t->device, t->data). */
static tp_status scratch(const tp_tensor *like, int64_t rows, int64_t last, tp_tensor *t)
{
    tp_status st = TP_OK;
    int64_t shape[TP_MAX_DIMS];
    void *p = NULL;
    size_t n;
    memcpy(shape, like->shape, sizeof shape);
    shape[0] = rows;
    shape[like->ndim - 1] = last;
    t->data = NULL;
    TP_CHECK(tp_tensor_init(t, NULL, like->dtype, like->ndim, shape));
    n = (size_t)tp_tensor_numel(t) * tp_dtype_size(like->dtype);
    TP_CHECK(tp_device_alloc(like->device, n > 0 ? n : 1, &p));
    t->data = p;
    t->device = like->device;
out:
    return st;
}

static void scratch_free(tp_tensor *t)
{
    if (t->data) tp_device_free(t->device, t->data);
    t->data = NULL;
}

/* ---------------------------------------------------------------- the sequence collectives */

tp_status tp_reduce_scatter_rows(tp_group *g, const tp_tensor *full, const tp_range *seq, tp_tensor *part)
{
    tp_status st = TP_OK;
    size_t row = 1, *counts = NULL;
    const void *send = full->data;
    tp_tensor packed = {0};
    TP_REQUIRE(g != NULL && tp_group_rank(g) >= 0, "reduce_scatter: this rank is not a member of the group");
    TP_CHECK(check_rows(g, full, part, seq, "the full tensor", "this rank's rows"));
    TP_REQUIRE(full->shape[full->ndim - 1] == part->shape[part->ndim - 1],
               "reduce_scatter: the full tensor's last dim is %lld but this rank's rows' is %lld",
               (long long)full->shape[full->ndim - 1], (long long)part->shape[part->ndim - 1]);
    TP_REQUIRE(full->dtype == part->dtype, "reduce_scatter: the full tensor is %s but this rank's rows are %s",
               tp_dtype_name(full->dtype), tp_dtype_name(part->dtype));
    TP_REQUIRE(tp_device_same(full->device, part->device), "reduce_scatter: the tensors are on different devices");
    TP_CHECK(check_flat(part, "reduce_scatter: this rank's rows"));
    TP_CHECK(tp_group_check_device(g, full->device, "reduce_scatter: the full tensor"));
    for (int d = 1; d < full->ndim; d++) row *= (size_t)full->shape[d];
    if ((counts = calloc((size_t)tp_group_size(g), sizeof *counts)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "reduce_scatter: out of memory");
        goto out;
    }
    for (int r = 0; r < tp_group_size(g); r++) counts[r] = (size_t)seq[r].size * row;
    if (!tp_tensor_is_contiguous(full)) {
        TP_CHECK(scratch(full, full->shape[0], full->shape[full->ndim - 1], &packed));
        TP_CHECK(tp_tensor_copy(&packed, full));
        send = packed.data;
    }
    TP_CHECK(tp_reduce_scatter_v(g, send, part->data, counts, full->dtype, TP_SUM));
out:
    scratch_free(&packed);
    free(counts);
    return st;
}

/* ---------------------------------------------------------------- a collective on a helper thread */

/* Runs fn(arg) on a helper thread (threaded) or at once; the status and message are kept because
 * tp_last_error() is per thread. */
typedef struct {
    tp_status (*fn)(void *arg);
    void *arg;
    pthread_t th;
    int started;
    tp_status st;
    char msg[512];
} bg_job;

static void *bg_main(void *p)
{
    bg_job *j = p;
    j->st = j->fn(j->arg);
    if (j->st != TP_OK) snprintf(j->msg, sizeof j->msg, "%s", tp_last_error());
    return NULL;
}

static tp_status bg_start(bg_job *j, tp_status (*fn)(void *), void *arg, int threaded)
{
    j->fn = fn;
    j->arg = arg;
    j->started = 0;
    j->st = TP_OK;
    j->msg[0] = '\0';
    if (!threaded) return j->st = fn(arg); /* its message is this thread's already */
    if (pthread_create(&j->th, NULL, bg_main, j) != 0)
        return tp_error_errno(TP_ERR_SYSTEM, "could not start the overlapped collective's thread");
    j->started = 1;
    return TP_OK;
}

/* Waits for a started job; returns st, or the job's failure when st is TP_OK. */
static tp_status bg_join(bg_job *j, tp_status st)
{
    if (!j->started) return st;
    pthread_join(j->th, NULL);
    j->started = 0;
    if (st == TP_OK && j->st != TP_OK) st = tp_error(j->st, "%s", j->msg);
    return st;
}

typedef struct {
    tp_group *g;
    const tp_tensor *part;
    const tp_range *seq;
    tp_tensor *full;
} rows_args;

static tp_status gather_job(void *p)
{
    rows_args *a = p;
    return tp_gather_dim(a->g, a->part, 0, a->seq, a->full);
}

static tp_status scatter_job(void *p)
{
    rows_args *a = p;
    return tp_reduce_scatter_rows(a->g, a->full, a->seq, (tp_tensor *)a->part);
}

/* ---------------------------------------------------------------- column layer */

/* The forward's gather pipelined with its GEMM: each rank's rows are cut into `chunks` pieces; a helper
 * thread all-gathers piece k of every rank into one of two buffers while this thread multiplies piece k-1,
 * writing straight into y's rows of each rank. The full input is never assembled. */
typedef struct {
    tp_group *g;
    const tp_range *seq;
    int chunks;
    const char *send;     /* this rank's rows, contiguous */
    char *buf[2];
    size_t row_elems;     /* elements of one sequence row of the input */
    tp_dtype dtype;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int gathered;         /* pieces in a buffer so far */
    int used;             /* pieces multiplied so far */
    int gemm_failed;      /* stop waiting for buffers: nothing reads them any more */
    tp_status st;         /* the gathering thread's failure */
    char msg[512];
} ag_pipe;

static int64_t piece_lo(int64_t rows, int k, int chunks) { return rows * k / chunks; }

static void *pipe_gather(void *p)
{
    ag_pipe *a = p;
    int n = tp_group_size(a->g), me = tp_group_rank(a->g);
    size_t counts[64], es = tp_dtype_size(a->dtype);
    for (int k = 0; k < a->chunks; k++) {
        tp_status st;
        int64_t lo_me = piece_lo(a->seq[me].size, k, a->chunks);
        pthread_mutex_lock(&a->mu);
        while (!a->gemm_failed && a->used < k - 1) pthread_cond_wait(&a->cv, &a->mu); /* buffer k%2 free */
        pthread_mutex_unlock(&a->mu);
        for (int r = 0; r < n; r++)
            counts[r] = (size_t)(piece_lo(a->seq[r].size, k + 1, a->chunks) - piece_lo(a->seq[r].size, k, a->chunks)) *
                        a->row_elems;
        st = tp_all_gatherv(a->g, a->send + (size_t)lo_me * a->row_elems * es, a->buf[k & 1], counts, a->dtype);
        pthread_mutex_lock(&a->mu);
        if (st != TP_OK) {
            a->st = st;
            snprintf(a->msg, sizeof a->msg, "%s", tp_last_error());
        } else {
            a->gathered = k + 1;
        }
        pthread_cond_broadcast(&a->cv);
        pthread_mutex_unlock(&a->mu);
        if (st != TP_OK) break;
    }
    return NULL;
}

/* y rows of every rank's piece k from the gathered buffer: one GEMM per rank. */
static tp_status pipe_gemm(ag_pipe *a, int k, const tp_tensor *w, const tp_tensor *b, tp_tensor *y, int64_t inner)
{
    tp_status st = TP_OK;
    size_t es = tp_dtype_size(y->dtype), at = 0;
    int64_t in = w->shape[1], out_f = w->shape[0];
    for (int r = 0; r < tp_group_size(a->g); r++) {
        int64_t lo = piece_lo(a->seq[r].size, k, a->chunks), hi = piece_lo(a->seq[r].size, k + 1, a->chunks);
        int64_t xs[2] = {(hi - lo) * inner, in}, ys[2] = {(hi - lo) * inner, out_f};
        tp_tensor xc, yc;
        if (hi == lo) continue;
        TP_CHECK(tp_tensor_init(&xc, a->buf[k & 1] + at * es, w->dtype, 2, xs));
        TP_CHECK(tp_tensor_init(&yc, (char *)y->data + (size_t)((a->seq[r].offset + lo) * inner * out_f) * es, y->dtype,
                                2, ys));
        xc.device = yc.device = y->device;
        TP_CHECK(tp_linear_forward(&xc, w, b, &yc));
        at += (size_t)xs[0] * (size_t)in;
    }
out:
    return st;
}

static tp_status col_forward_pipelined(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                                       const tp_range *seq, tp_tensor *y, int chunks)
{
    tp_status st = TP_OK;
    ag_pipe a;
    pthread_t th;
    int started = 0, locks = 0;
    int64_t inner = 1, most = 0;
    size_t es = tp_dtype_size(x->dtype), bytes;
    tp_tensor packed = {0};
    memset(&a, 0, sizeof a);
    for (int d = 1; d < x->ndim - 1; d++) inner *= x->shape[d];
    a.g = g;
    a.seq = seq;
    a.chunks = chunks;
    a.row_elems = (size_t)(inner * w->shape[1]);
    a.dtype = x->dtype;
    a.send = x->data;
    if (!tp_tensor_is_contiguous(x)) {
        TP_CHECK(scratch(x, x->shape[0], x->shape[x->ndim - 1], &packed));
        TP_CHECK(tp_tensor_copy(&packed, x));
        a.send = packed.data;
    }
    for (int r = 0; r < tp_group_size(g); r++) most += (seq[r].size + chunks - 1) / chunks;
    bytes = (size_t)most * a.row_elems * es;
    for (int i = 0; i < 2; i++) TP_CHECK(tp_device_alloc(x->device, bytes > 0 ? bytes : 1, (void **)&a.buf[i]));
    if (pthread_mutex_init(&a.mu, NULL) != 0 || (locks = 1, pthread_cond_init(&a.cv, NULL) != 0)) {
        st = tp_error(TP_ERR_SYSTEM, "could not create the pipelined gather's lock");
        goto out;
    }
    locks = 2;
    if (pthread_create(&th, NULL, pipe_gather, &a) != 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "could not start the pipelined gather's thread");
        goto out;
    }
    started = 1;
    for (int k = 0; k < chunks; k++) {
        tp_status gathered;
        pthread_mutex_lock(&a.mu);
        while (a.st == TP_OK && a.gathered < k + 1) pthread_cond_wait(&a.cv, &a.mu);
        gathered = a.st;
        pthread_mutex_unlock(&a.mu);
        if (gathered != TP_OK) break;
        st = pipe_gemm(&a, k, w, b, y, inner);
        pthread_mutex_lock(&a.mu);
        if (st != TP_OK) a.gemm_failed = 1; /* the gathers go on, so peers are not left waiting */
        else a.used = k + 1;
        pthread_cond_broadcast(&a.cv);
        pthread_mutex_unlock(&a.mu);
        if (st != TP_OK) goto out;
    }
out:
    if (started) {
        pthread_join(th, NULL);
        if (st == TP_OK && a.st != TP_OK) st = tp_error(a.st, "%s", a.msg);
    }
    if (locks >= 1) pthread_mutex_destroy(&a.mu);
    if (locks >= 2) pthread_cond_destroy(&a.cv);
    for (int i = 0; i < 2; i++)
        if (a.buf[i]) tp_device_free(x->device, a.buf[i]);
    scratch_free(&packed);
    return st;
}

tp_status tp_col_forward_sp(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                            const tp_range *seq, tp_tensor *y, int chunks)
{
    tp_status st = TP_OK;
    tp_tensor full = {0}, xs;
    TP_CHECK(check_layer_group(g, w));
    TP_CHECK(check_flat(y, "output"));
    TP_CHECK(check_rows(g, y, x, seq, "output", "input"));
    xs = with_rows(x, y->shape[0]);
    TP_CHECK(tp_linear_check(&xs, w, b, y));
    if (chunks < 0) chunks = (int)tp_knob_value(TP_KNOB_SP_CHUNKS);
    if (chunks > 1 && chunks <= 64 && tp_group_size(g) > 1 && tp_group_size(g) <= 64 && x->device.type == TP_DEVICE_CPU) {
        TP_CHECK(col_forward_pipelined(g, x, w, b, seq, y, chunks));
        goto out;
    }
    TP_CHECK(scratch(y, y->shape[0], w->shape[1], &full));
    TP_CHECK(tp_gather_dim(g, x, 0, seq, &full));
    TP_CHECK(tp_linear_forward(&full, w, b, y));
out:
    scratch_free(&full);
    return st;
}

tp_status tp_col_backward_sp(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                             const tp_range *seq, tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap)
{
    tp_status st = TP_OK;
    tp_tensor full = {0}, dfull = {0}, xs, dxs;
    rows_args ga, sa;
    bg_job job = {0};
    int threaded;
    TP_CHECK(check_layer_group(g, w));
    TP_REQUIRE(dx != NULL, "grad_input is NULL");
    TP_CHECK(check_flat(dx, "grad_input"));
    TP_CHECK(check_rows(g, dy, x, seq, "grad_output", "input"));
    TP_CHECK(check_rows(g, dy, dx, seq, "grad_output", "grad_input"));
    xs = with_rows(x, dy->shape[0]);
    dxs = with_rows(dx, dy->shape[0]);
    TP_CHECK(tp_linear_check(&xs, w, NULL, dy));
    TP_CHECK(tp_linear_check(&dxs, w, NULL, dy));
    threaded = overlap && tp_group_size(g) > 1 && dx->device.type == TP_DEVICE_CPU;
    TP_CHECK(scratch(dy, dy->shape[0], w->shape[1], &dfull));
    if (dw) { /* 1: gather this layer's input again, under the dX GEMM */
        TP_CHECK(scratch(dy, dy->shape[0], w->shape[1], &full));
        ga = (rows_args){g, x, seq, &full};
        TP_CHECK(bg_start(&job, gather_job, &ga, threaded));
    }
    st = tp_linear_backward_input(dy, w, &dfull);
    TP_CHECK(bg_join(&job, st));
    /* 2: reduce-scatter dX, under the dW GEMM */
    sa = (rows_args){g, dx, seq, &dfull};
    TP_CHECK(bg_start(&job, scatter_job, &sa, threaded && dw != NULL));
    if (dw) st = tp_linear_backward_params(dy, &full, dw, db);
    TP_CHECK(bg_join(&job, st));
out:
    st = bg_join(&job, st);
    scratch_free(&full);
    scratch_free(&dfull);
    return st;
}

/* ---------------------------------------------------------------- row layer */

tp_status tp_row_forward_sp(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                            const tp_range *seq, tp_tensor *y)
{
    tp_status st = TP_OK;
    tp_tensor partial = {0}, ys;
    TP_CHECK(check_layer_group(g, w));
    TP_CHECK(check_flat(y, "output"));
    TP_CHECK(check_rows(g, x, y, seq, "input", "output"));
    ys = with_rows(y, x->shape[0]);
    TP_CHECK(tp_linear_check(x, w, b, &ys));
    TP_CHECK(scratch(y, x->shape[0], w->shape[0], &partial));
    TP_CHECK(tp_linear_forward(x, w, NULL, &partial));
    TP_CHECK(tp_reduce_scatter_rows(g, &partial, seq, y));
    if (b) TP_CHECK(tp_add_bias(y, b));
out:
    scratch_free(&partial);
    return st;
}

tp_status tp_row_backward_sp(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                             const tp_range *seq, tp_tensor *dx, tp_tensor *dw, tp_tensor *db)
{
    tp_status st = TP_OK;
    tp_tensor full = {0}, dys;
    TP_CHECK(check_layer_group(g, w));
    TP_CHECK(check_rows(g, x, dy, seq, "input", "grad_output"));
    dys = with_rows(dy, x->shape[0]);
    TP_CHECK(tp_linear_check(x, w, NULL, &dys));
    if (dx) TP_CHECK(tp_linear_check(dx, w, NULL, &dys));
    TP_CHECK(scratch(x, x->shape[0], w->shape[0], &full));
    TP_CHECK(tp_gather_dim(g, dy, 0, seq, &full));
    if (dx) TP_CHECK(tp_linear_backward_input(&full, w, dx));
    if (dw) TP_CHECK(tp_linear_backward_params(&full, x, dw, db));
out:
    scratch_free(&full);
    return st;
}
