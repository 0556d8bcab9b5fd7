/* Vocabulary parallelism (Megatron-core's VocabParallelEmbedding and vocab_parallel_cross_entropy): the
 * embedding table and the output logits are split by vocabulary, and neither the table nor the logits are
 * ever gathered.
 *
 *   op                 forward                                          backward
 *   embedding          lookup in this rank's rows (0 elsewhere),        dW_r[id] += dY[i] for the ids in this
 *                      all_reduce (sequence-parallel: reduce-scatter)   rank's rows (sequence-parallel: dY
 *                                                                       all-gathered first)
 *   cross-entropy      max all-reduce, then one sum all-reduce of       the gradient comes with the loss, from
 *                      sum-exp, target logit (and sum of logits)        the same reduced values
 *
 * bfloat16 / float16: the lookup copies rows and its reduction adds zeros to one value (exact); the table's
 * gradient sums each row's old value and its dY rows in float32, rounded once; the cross-entropy runs its
 * float32 path on a float32 copy of the logits and rounds the gradient and the losses once at the end.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../gemm/gemm.h"

static tp_status check_host(const tp_tensor *t, const char *what)
{
    if (t->device.type != TP_DEVICE_CPU)
        return tp_error(TP_ERR_UNSUPPORTED, "%s is GPU memory: the vocabulary-parallel embedding and cross-entropy "
                        "run on host memory in this version of tplinear", what);
    return TP_OK;
}

static tp_status check_member(tp_group *g)
{
    if (g == NULL) return tp_error(TP_ERR_VALUE, "process group is NULL");
    if (tp_group_rank(g) < 0) return tp_error(TP_ERR_VALUE, "this rank is not a member of the process group");
    return TP_OK;
}

static tp_status check_float(const tp_tensor *t, const char *what)
{
    if (t->dtype != TP_FLOAT32 && t->dtype != TP_FLOAT64 && !tp_dtype_is_half(t->dtype))
        return tp_error(TP_ERR_TYPE, "%s must be float32, float64, bfloat16 or float16, got %s", what,
                        tp_dtype_name(t->dtype));
    return TP_OK;
}

/* Index arrays (ids, targets) as a new int64 array in C order (*out: caller frees). */
static tp_status load_indices(const tp_tensor *t, const char *what, int64_t **out)
{
    tp_status st = TP_OK;
    int64_t n = tp_tensor_numel(t), idx[TP_MAX_DIMS] = {0};
    *out = NULL;
    TP_CHECK(check_host(t, what));
    if (t->dtype != TP_INT32 && t->dtype != TP_INT64) {
        st = tp_error(TP_ERR_TYPE, "%s must be int32 or int64, got %s", what, tp_dtype_name(t->dtype));
        goto out;
    }
    if ((*out = malloc((size_t)(n > 0 ? n : 1) * sizeof **out)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "%s: out of memory", what);
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t off = 0;
        for (int d = 0; d < t->ndim; d++) off += idx[d] * t->strides[d];
        (*out)[i] = t->dtype == TP_INT64 ? ((const int64_t *)t->data)[off] : ((const int32_t *)t->data)[off];
        for (int d = t->ndim - 1; d >= 0 && ++idx[d] == t->shape[d]; d--) idx[d] = 0;
    }
out:
    return st;
}

/* A 2-d [rows, cols] view of t's data: element (i, j) at data[i * rs + j * cs] (no copy; t's leading dims
 * must collapse, as tp_mat_view's). */
typedef struct {
    char *data;
    int64_t rows, cols, rs, cs;
} view2;

static tp_status as_view2(const tp_tensor *t, view2 *v, const char *what)
{
    tp_status st = TP_OK;
    tp_mat m;
    TP_CHECK(tp_mat_view(t, &m, NULL, what));
    v->data = m.data;
    v->rows = m.rows;
    v->cols = m.cols;
    v->rs = m.trans ? 1 : m.ld;
    v->cs = m.trans ? m.ld : 1;
out:
    return st;
}

/* Element j of a strided row of a half dtype, as float32, and back (rounded once). */
static float half_get(tp_dtype dt, const char *row, int64_t j, int64_t cs)
{
    float f;
    tp_half_to_float32(dt, row + (size_t)(j * cs) * 2, &f, 1);
    return f;
}

static void half_put(tp_dtype dt, char *row, int64_t j, int64_t cs, float f)
{
    tp_half_from_float32(dt, &f, row + (size_t)(j * cs) * 2, 1);
}

/* ---------------------------------------------------------------- embedding */

static tp_status check_table(const tp_tensor *w, int64_t vocab_offset, int64_t vocab_size, const char *what)
{
    tp_status st = TP_OK;
    TP_CHECK(check_host(w, what));
    TP_CHECK(check_float(w, what));
    TP_REQUIRE(w->ndim == 2, "%s must be 2-d [vocabulary rows, embedding_dim], got %d-d", what, w->ndim);
    TP_REQUIRE(vocab_offset >= 0 && vocab_offset + w->shape[0] <= vocab_size,
               "this rank's rows [%lld, %lld) of the table are outside the vocabulary of %lld", (long long)vocab_offset,
               (long long)(vocab_offset + w->shape[0]), (long long)vocab_size);
out:
    return st;
}

/* The shape an embedding output or its gradient has: [*ids.shape, hidden], its first dim this rank's rows
 * with seq. */
static tp_status check_embedded(tp_group *g, const tp_tensor *ids, const tp_range *seq, int64_t hidden,
                                const tp_tensor *t, const char *what)
{
    tp_status st = TP_OK;
    TP_REQUIRE(t->ndim == ids->ndim + 1, "%s must have %d dims (the ids' and embedding_dim), got %d", what,
               ids->ndim + 1, t->ndim);
    TP_REQUIRE(t->shape[t->ndim - 1] == hidden, "%s's last dimension must be %lld (embedding_dim), got %lld", what,
               (long long)hidden, (long long)t->shape[t->ndim - 1]);
    if (seq) {
        int64_t at = 0;
        int me = tp_group_rank(g);
        TP_REQUIRE(ids->ndim >= 1, "sequence parallelism needs ids with a sequence dim (at least 1-d)");
        for (int r = 0; r < tp_group_size(g); r++) {
            TP_REQUIRE(seq[r].offset == at && seq[r].size >= 0, "the sequence ranges must be consecutive rows in "
                       "rank order, rank %d's start at %lld", r, (long long)seq[r].offset);
            at += seq[r].size;
        }
        TP_REQUIRE(at == ids->shape[0], "the ranks' rows add up to %lld but the ids' sequence dim is %lld",
                   (long long)at, (long long)ids->shape[0]);
        TP_REQUIRE(t->shape[0] == seq[me].size, "%s's sequence dim (dim 0) must be %lld (this rank's rows of %lld), "
                   "got %lld", what, (long long)seq[me].size, (long long)ids->shape[0], (long long)t->shape[0]);
    } else if (ids->ndim >= 1) {
        TP_REQUIRE(t->shape[0] == ids->shape[0], "%s's dim 0 must be %lld, got %lld", what, (long long)ids->shape[0],
                   (long long)t->shape[0]);
    }
    for (int d = 1; d < ids->ndim; d++)
        TP_REQUIRE(t->shape[d] == ids->shape[d], "%s's dim %d must be %lld (the ids'), got %lld", what, d,
                   (long long)ids->shape[d], (long long)t->shape[d]);
out:
    return st;
}

static tp_status check_ids(const int64_t *ids, int64_t n, int64_t vocab_size)
{
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab_size)
            return tp_error(TP_ERR_VALUE, "ids: index %lld (element %lld) is out of range for a vocabulary of %lld",
                            (long long)ids[i], (long long)i, (long long)vocab_size);
    return TP_OK;
}

tp_status tp_embedding_forward(tp_group *g, const tp_tensor *ids, const tp_tensor *w, int64_t vocab_offset,
                               int64_t vocab_size, const tp_range *seq, tp_tensor *y)
{
    tp_status st = TP_OK;
    int64_t *id = NULL, n = tp_tensor_numel(ids), hidden, rows;
    size_t es = tp_dtype_size(w->dtype);
    view2 vw;
    char *out = NULL;
    tp_tensor full = {0};
    TP_CHECK(check_member(g));
    TP_CHECK(check_table(w, vocab_offset, vocab_size, "the embedding table"));
    TP_CHECK(check_host(y, "the output"));
    TP_REQUIRE(y->dtype == w->dtype, "the output is %s but the table is %s", tp_dtype_name(y->dtype),
               tp_dtype_name(w->dtype));
    TP_REQUIRE(tp_tensor_is_contiguous(y), "the output must be contiguous");
    hidden = w->shape[1];
    rows = w->shape[0];
    TP_CHECK(check_embedded(g, ids, seq, hidden, y, "the output"));
    TP_CHECK(load_indices(ids, "ids", &id));
    TP_CHECK(check_ids(id, n, vocab_size));
    TP_CHECK(as_view2(w, &vw, "the embedding table"));
    out = y->data;
    if (seq) { /* the whole sequence's lookups, then this rank's rows of their sum */
        int64_t shape[TP_MAX_DIMS];
        void *p = NULL;
        memcpy(shape, ids->shape, sizeof shape);
        shape[ids->ndim] = hidden;
        TP_CHECK(tp_device_alloc(y->device, (size_t)(n * hidden) * es + 1, &p));
        TP_CHECK(tp_tensor_init(&full, p, y->dtype, ids->ndim + 1, shape));
        out = p;
    }
    for (int64_t i = 0; i < n; i++) {
        char *row = out + (size_t)(i * hidden) * es;
        int64_t k = id[i] - vocab_offset;
        if (k < 0 || k >= rows) {
            memset(row, 0, (size_t)hidden * es);
        } else if (vw.cs == 1) {
            memcpy(row, vw.data + (size_t)(k * vw.rs) * es, (size_t)hidden * es);
        } else {
            for (int64_t j = 0; j < hidden; j++)
                memcpy(row + (size_t)j * es, vw.data + (size_t)(k * vw.rs + j * vw.cs) * es, es);
        }
    }
    if (seq)
        TP_CHECK(tp_reduce_scatter_rows(g, &full, seq, y));
    else if (tp_group_size(g) > 1)
        TP_CHECK(tp_all_reduce(g, y->data, (size_t)(n * hidden), y->dtype, TP_SUM));
out:
    if (full.data) tp_device_free(y->device, full.data);
    free(id);
    return st;
}

static int by_row_then_token(const void *a, const void *b)
{
    const int64_t *x = a, *y = b;
    return x[0] != y[0] ? (x[0] < y[0] ? -1 : 1) : (x[1] > y[1]) - (x[1] < y[1]);
}

/* dw[k] += sum of dy[i] over the tokens i whose id is row k of this shard, for a half dtype: per row, its old
 * value and its tokens' rows (in token order) summed in float32, rounded once. */
static tp_status half_scatter_add(tp_dtype dt, const view2 *vw, const view2 *vd, const int64_t *id, int64_t n,
                                  int64_t vocab_offset)
{
    int64_t *pairs = malloc((size_t)n * 2 * sizeof *pairs), m = 0;
    float *acc = malloc((size_t)vw->cols * sizeof *acc);
    if (pairs == NULL || acc == NULL) {
        free(pairs);
        free(acc);
        return tp_error(TP_ERR_NOMEM, "embedding_backward: out of memory for %lld tokens", (long long)n);
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t k = id[i] - vocab_offset;
        if (k < 0 || k >= vw->rows) continue;
        pairs[2 * m] = k;
        pairs[2 * m + 1] = i;
        m++;
    }
    qsort(pairs, (size_t)m, 2 * sizeof *pairs, by_row_then_token);
    for (int64_t a = 0; a < m;) {
        int64_t k = pairs[2 * a];
        char *o = vw->data + (size_t)(k * vw->rs) * 2;
        for (int64_t j = 0; j < vw->cols; j++) acc[j] = half_get(dt, o, j, vw->cs);
        for (; a < m && pairs[2 * a] == k; a++) {
            const char *s = vd->data + (size_t)(pairs[2 * a + 1] * vd->rs) * 2;
            for (int64_t j = 0; j < vw->cols; j++) acc[j] += half_get(dt, s, j, vd->cs);
        }
        for (int64_t j = 0; j < vw->cols; j++) half_put(dt, o, j, vw->cs, acc[j]);
    }
    free(pairs);
    free(acc);
    return TP_OK;
}

tp_status tp_embedding_backward(tp_group *g, const tp_tensor *ids, const tp_tensor *dy, int64_t vocab_offset,
                                const tp_range *seq, tp_tensor *dw)
{
    tp_status st = TP_OK;
    int64_t *id = NULL, n = tp_tensor_numel(ids), hidden, rows;
    view2 vw, vd;
    tp_tensor full = {0};
    const tp_tensor *src = dy;
    TP_CHECK(check_member(g));
    TP_CHECK(check_host(dw, "the table's gradient"));
    TP_CHECK(check_float(dw, "the table's gradient"));
    TP_REQUIRE(dw->ndim == 2, "the table's gradient must be 2-d, got %d-d", dw->ndim);
    TP_CHECK(check_host(dy, "grad_output"));
    TP_REQUIRE(dy->dtype == dw->dtype, "grad_output is %s but the table is %s", tp_dtype_name(dy->dtype),
               tp_dtype_name(dw->dtype));
    TP_REQUIRE(vocab_offset >= 0, "vocab_offset must be >= 0, got %lld", (long long)vocab_offset);
    hidden = dw->shape[1];
    rows = dw->shape[0];
    TP_CHECK(check_embedded(g, ids, seq, hidden, dy, "grad_output"));
    TP_CHECK(load_indices(ids, "ids", &id));
    TP_CHECK(as_view2(dw, &vw, "the table's gradient"));
    if (seq) {
        int64_t shape[TP_MAX_DIMS];
        void *p = NULL;
        memcpy(shape, ids->shape, sizeof shape);
        shape[ids->ndim] = hidden;
        TP_CHECK(tp_device_alloc(dy->device, (size_t)(n * hidden) * tp_dtype_size(dy->dtype) + 1, &p));
        TP_CHECK(tp_tensor_init(&full, p, dy->dtype, ids->ndim + 1, shape));
        TP_CHECK(tp_gather_dim(g, dy, 0, seq, &full));
        src = &full;
    }
    if (n == 0 || hidden == 0) goto out;
    TP_CHECK(as_view2(src, &vd, "grad_output"));
    if (tp_dtype_is_half(dw->dtype)) {
        TP_CHECK(half_scatter_add(dw->dtype, &vw, &vd, id, n, vocab_offset));
        goto out;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t k = id[i] - vocab_offset;
        if (k < 0 || k >= rows) continue;
        if (dw->dtype == TP_FLOAT32) {
            float *o = (float *)vw.data + k * vw.rs;
            const float *s = (const float *)vd.data + i * vd.rs;
            for (int64_t j = 0; j < hidden; j++) o[j * vw.cs] += s[j * vd.cs];
        } else {
            double *o = (double *)vw.data + k * vw.rs;
            const double *s = (const double *)vd.data + i * vd.rs;
            for (int64_t j = 0; j < hidden; j++) o[j * vw.cs] += s[j * vd.cs];
        }
    }
out:
    if (full.data) tp_device_free(dy->device, full.data);
    free(id);
    return st;
}

/* ---------------------------------------------------------------- cross-entropy */

/* Per token i of a [rows, cols] shard: mx[i] = its largest logit (-inf when cols == 0). */
#define DEFINE_ROW_MAX(NAME, T)                                                 \
    static void NAME(const view2 *v, double *mx)                              \
    {                                                                           \
        for (int64_t i = 0; i < v->rows; i++) {                                 \
            const T *r = (const T *)v->data + i * v->rs;                        \
            T m = -(T)INFINITY;                                                 \
            for (int64_t j = 0; j < v->cols; j++)                               \
                if (r[j * v->cs] > m || r[j * v->cs] != r[j * v->cs]) m = r[j * v->cs]; \
            mx[i] = (double)m;                                                  \
        }                                                                       \
    }
DEFINE_ROW_MAX(row_max_f32, float)
DEFINE_ROW_MAX(row_max_f64, double)

/* Per token: sums[3i] = sum_j exp(l - mx), sums[3i+1] = the target's logit (0 when it is not in this
 * shard), sums[3i+2] = sum_j l (label smoothing). With g, also writes exp(l - mx) there, reading every
 * logit before its gradient is written (g may be the logits). */
#define DEFINE_ROW_SUMS(NAME, T, EXP)                                                                   \
    static void NAME(const view2 *v, const int64_t *t, int64_t offset, const double *mx, double *sums,      \
                     const view2 *g)                                                                    \
    {                                                                                                   \
        for (int64_t i = 0; i < v->rows; i++) {                                                         \
            const T *r = (const T *)v->data + i * v->rs;                                                \
            T *o = g ? (T *)g->data + i * g->rs : NULL;                                                 \
            T m = (T)mx[i];                                                                             \
            int64_t k = t[i] - offset;                                                                  \
            double se = 0.0, sl = 0.0;                                                                  \
            sums[3 * i + 1] = (k >= 0 && k < v->cols) ? (double)r[k * v->cs] : 0.0;                     \
            for (int64_t j = 0; j < v->cols; j++) {                                                     \
                T l = r[j * v->cs];                                                                     \
                T e = EXP(l - m);                                                                       \
                sl += (double)l;                                                                        \
                se += (double)e;                                                                        \
                if (o) o[j * g->cs] = e;                                                                \
            }                                                                                           \
            sums[3 * i] = se;                                                                           \
            sums[3 * i + 2] = sl;                                                                       \
        }                                                                                               \
    }
DEFINE_ROW_SUMS(row_sums_f32, float, expf)
DEFINE_ROW_SUMS(row_sums_f64, double, exp)

/* grad = scale * (e / se - smooth / V - (1 - smooth) * onehot), e the exponentials row_sums left there;
 * ignored tokens (w[i] == 0) get 0. */
#define DEFINE_GRAD(NAME, T)                                                                             \
    static void NAME(const view2 *g, const int64_t *t, int64_t offset, const double *sums, const double *w, \
                     double smooth, double vocab)                                                       \
    {                                                                                                   \
        for (int64_t i = 0; i < g->rows; i++) {                                                         \
            T *o = (T *)g->data + i * g->rs;                                                            \
            int64_t k = t[i] - offset;                                                                  \
            double a = w[i] / sums[3 * i], c = w[i] * smooth / vocab;                                   \
            for (int64_t j = 0; j < g->cols; j++) o[j * g->cs] = (T)((double)o[j * g->cs] * a - c);     \
            if (k >= 0 && k < g->cols) o[k * g->cs] = (T)((double)o[k * g->cs] - w[i] * (1.0 - smooth)); \
        }                                                                                               \
    }
DEFINE_GRAD(grad_f32, float)
DEFINE_GRAD(grad_f64, double)

/* Where an output's bytes are, for the aliasing check. */
static int overlaps(const tp_tensor *a, const tp_tensor *b)
{
    size_t ea = tp_dtype_size(a->dtype), eb = tp_dtype_size(b->dtype);
    const char *a0 = a->data, *b0 = b->data, *a1 = a0, *b1 = b0;
    for (int d = 0; d < a->ndim; d++)
        if (a->shape[d] > 0) a1 += (size_t)((a->shape[d] - 1) * a->strides[d]) * ea;
    for (int d = 0; d < b->ndim; d++)
        if (b->shape[d] > 0) b1 += (size_t)((b->shape[d] - 1) * b->strides[d]) * eb;
    if (tp_tensor_numel(a) == 0 || tp_tensor_numel(b) == 0) return 0;
    return a0 <= b1 + eb - 1 && b0 <= a1 + ea - 1;
}

static tp_status check_loss_args(const tp_tensor *logits, const tp_tensor *targets, int64_t vocab_offset,
                                 int64_t vocab_size, double label_smoothing, tp_loss_reduction reduction,
                                 const tp_tensor *losses, const tp_tensor *grad)
{
    tp_status st = TP_OK;
    TP_CHECK(check_host(logits, "logits"));
    TP_CHECK(check_float(logits, "logits"));
    TP_REQUIRE(logits->ndim >= 1, "logits must have a vocabulary dim, got a 0-d array");
    TP_REQUIRE(targets->ndim == logits->ndim - 1, "targets must have the logits' leading shape (%d dims), got %d dims",
               logits->ndim - 1, targets->ndim);
    for (int d = 0; d < targets->ndim; d++)
        TP_REQUIRE(targets->shape[d] == logits->shape[d],
                   "targets must have the logits' leading shape: targets' dim %d is %lld but the logits' is %lld", d,
                   (long long)targets->shape[d], (long long)logits->shape[d]);
    TP_REQUIRE(vocab_offset >= 0 && vocab_offset + logits->shape[logits->ndim - 1] <= vocab_size,
               "this rank's logits [%lld, %lld) are outside the vocabulary of %lld", (long long)vocab_offset,
               (long long)(vocab_offset + logits->shape[logits->ndim - 1]), (long long)vocab_size);
    TP_REQUIRE(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must be in [0, 1], got %g",
               label_smoothing);
    TP_REQUIRE(reduction >= TP_LOSS_MEAN && reduction <= TP_LOSS_NONE, "unknown reduction %d", (int)reduction);
    if (losses) {
        TP_CHECK(check_host(losses, "losses"));
        TP_CHECK(check_float(losses, "losses"));
        TP_REQUIRE(tp_tensor_is_contiguous(losses) && tp_tensor_numel(losses) == tp_tensor_numel(targets),
                   "losses must be contiguous with one element per target (%lld)", (long long)tp_tensor_numel(targets));
        TP_REQUIRE(!overlaps(losses, logits), "losses must not overlap the logits");
    }
    if (grad) {
        TP_CHECK(check_host(grad, "the logits' gradient"));
        TP_REQUIRE(grad->dtype == logits->dtype, "the logits' gradient is %s but the logits are %s",
                   tp_dtype_name(grad->dtype), tp_dtype_name(logits->dtype));
        TP_REQUIRE(grad->ndim == logits->ndim, "the logits' gradient must have the logits' shape");
        for (int d = 0; d < grad->ndim; d++)
            TP_REQUIRE(grad->shape[d] == logits->shape[d], "the logits' gradient must have the logits' shape");
        if (overlaps(grad, logits)) {
            TP_REQUIRE(grad->data == logits->data &&
                           memcmp(grad->strides, logits->strides, sizeof grad->strides) == 0,
                       "the logits' gradient overlaps the logits: it must be the logits themselves or separate");
        }
    }
out:
    return st;
}

tp_status tp_vocab_cross_entropy(tp_group *g, const tp_tensor *logits, const tp_tensor *targets, int64_t vocab_offset,
                                 int64_t vocab_size, int64_t ignore_index, double label_smoothing,
                                 tp_loss_reduction reduction, tp_tensor *losses, tp_tensor *grad, double *loss)
{
    tp_status st = TP_OK;
    int64_t *t = NULL, n, valid = 0;
    double *mx = NULL, *sums = NULL, *w = NULL, total = 0.0;
    void *packed = NULL;
    tp_mat m;
    view2 vl, vg, vh = {0};
    float *f32buf = NULL;
    tp_dtype dt = logits->dtype;
    int half = tp_dtype_is_half(dt), f32 = dt == TP_FLOAT32 || half;
    TP_CHECK(check_member(g));
    TP_CHECK(check_loss_args(logits, targets, vocab_offset, vocab_size, label_smoothing, reduction, losses, grad));
    TP_CHECK(load_indices(targets, "targets", &t));
    n = tp_tensor_numel(targets);
    for (int64_t i = 0; i < n; i++) {
        TP_REQUIRE(t[i] == ignore_index || (t[i] >= 0 && t[i] < vocab_size),
                   "targets: class %lld (element %lld) is out of range for a vocabulary of %lld (ignore_index is %lld)",
                   (long long)t[i], (long long)i, (long long)vocab_size, (long long)ignore_index);
        valid += t[i] != ignore_index;
    }
    if (grad) TP_CHECK(as_view2(grad, &vg, "the logits' gradient"));
    if (grad && grad->data == logits->data) {
        vl = vg;
    } else {
        TP_CHECK(tp_mat_view(logits, &m, &packed, "logits"));
        vl = (view2){m.data, m.rows, m.cols, m.trans ? 1 : m.ld, m.trans ? m.ld : 1};
    }
    if (half) { /* the float32 path on a float32 copy (it becomes the gradient in place); vh: the half gradient */
        f32buf = malloc((size_t)(vl.rows * vl.cols) * sizeof *f32buf + 1);
        if (f32buf == NULL) {
            st = tp_error(TP_ERR_NOMEM, "cross_entropy: out of memory for a float32 copy of the logits");
            goto out;
        }
        for (int64_t i = 0; i < vl.rows; i++)
            for (int64_t j = 0; j < vl.cols; j++)
                f32buf[i * vl.cols + j] = half_get(dt, vl.data + (size_t)(i * vl.rs) * 2, j, vl.cs);
        if (grad) vh = vg;
        vl = vg = (view2){(char *)f32buf, vl.rows, vl.cols, vl.cols, 1};
    }
    mx = malloc((size_t)(n > 0 ? n : 1) * sizeof *mx);
    sums = malloc((size_t)(n > 0 ? 3 * n : 1) * sizeof *sums);
    w = malloc((size_t)(n > 0 ? n : 1) * sizeof *w);
    if (mx == NULL || sums == NULL || w == NULL) {
        st = tp_error(TP_ERR_NOMEM, "cross_entropy: out of memory for %lld tokens", (long long)n);
        goto out;
    }
    /* 1: the largest logit of each token over the whole vocabulary */
    if (f32) row_max_f32(&vl, mx); else row_max_f64(&vl, mx);
    if (tp_group_size(g) > 1) TP_CHECK(tp_all_reduce(g, mx, (size_t)n, TP_FLOAT64, TP_MAX));
    /* 2: sum of exponentials, target logit, sum of logits, over the whole vocabulary */
    if (f32) row_sums_f32(&vl, t, vocab_offset, mx, sums, grad ? &vg : NULL);
    else row_sums_f64(&vl, t, vocab_offset, mx, sums, grad ? &vg : NULL);
    if (tp_group_size(g) > 1) TP_CHECK(tp_all_reduce(g, sums, (size_t)(3 * n), TP_FLOAT64, TP_SUM));
    /* 3: the losses, then the gradient of the reduced loss */
    for (int64_t i = 0; i < n; i++) {
        double lse = mx[i] + log(sums[3 * i]), li = 0.0;
        if (t[i] != ignore_index)
            li = (1.0 - label_smoothing) * (lse - sums[3 * i + 1]) +
                 (label_smoothing > 0.0 ? label_smoothing * (lse - sums[3 * i + 2] / (double)vocab_size) : 0.0);
        total += li;
        w[i] = t[i] == ignore_index ? 0.0 : reduction == TP_LOSS_MEAN ? 1.0 / (double)valid : 1.0;
        if (losses) {
            if (losses->dtype == TP_FLOAT32) ((float *)losses->data)[i] = (float)li;
            else if (losses->dtype == TP_FLOAT64) ((double *)losses->data)[i] = li;
            else half_put(losses->dtype, losses->data, i, 1, (float)li);
        }
    }
    if (grad) {
        if (f32) grad_f32(&vg, t, vocab_offset, sums, w, label_smoothing, (double)vocab_size);
        else grad_f64(&vg, t, vocab_offset, sums, w, label_smoothing, (double)vocab_size);
        if (half)
            for (int64_t i = 0; i < vh.rows; i++)
                for (int64_t j = 0; j < vh.cols; j++)
                    half_put(dt, vh.data + (size_t)(i * vh.rs) * 2, j, vh.cs, f32buf[i * vh.cols + j]);
    }
    if (loss) *loss = reduction == TP_LOSS_MEAN ? total / (double)valid : total;
out:
    tp_device_free(logits->device, packed);
    free(f32buf);
    free(t);
    free(mx);
    free(sums);
    free(w);
    return st;
}
