/* Bindings of the sequence- and vocabulary-parallel entry points (csrc/layers/sequence.c, vocab.c): parse,
 * convert, call without the GIL, map errors. */
#include <math.h>
#include <string.h>

#include "py.h"

/* The sequence ranges of a group: one (offset, size) per rank (NULL + exception; free with PyMem_Free). */
static tp_range *seq_ranges(tp_group *g, PyObject *obj)
{
    Py_ssize_t n;
    tp_range *r = tpy_range_list(obj, 1, &n, "sequence ranges");
    if (r != NULL && n != (Py_ssize_t)tp_group_size(g)) {
        PyErr_Format(PyExc_ValueError, "sequence ranges: need %d (one per rank), got %zd", tp_group_size(g), n);
        PyMem_Free(r);
        r = NULL;
    }
    return r;
}

/* Converts a, runs call with seq (freed after) without the GIL, maps the status. */
#define CALL_SEQ(module, g, seqobj, a, call)                                 \
    do {                                                                     \
        tp_status st_;                                                       \
        tp_range *seq = NULL;                                                \
        if ((seqobj) != Py_None && (seq = seq_ranges((g), (seqobj))) == NULL) return NULL; \
        if (tpy_args_convert((a), TPY_NARGS(a)) < 0) {                           \
            PyMem_Free(seq);                                                 \
            return NULL;                                                     \
        }                                                                    \
        Py_BEGIN_ALLOW_THREADS st_ = (call);                                 \
        Py_END_ALLOW_THREADS tpy_args_release((a), TPY_NARGS(a));                \
        PyMem_Free(seq);                                                     \
        if (st_ != TP_OK) return tpy_raise((module), st_);                   \
        Py_RETURN_NONE;                                                      \
    } while (0)

/* col_forward_sp(group, x, w, b|None, seq, y, chunks=0) */
static PyObject *py_col_forward_sp(PyObject *m, PyObject *args)
{
    PyObject *go, *x, *w, *b, *so, *y;
    int chunks = -1;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOOOO|i", &go, &x, &w, &b, &so, &y, &chunks)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(x, "input"), TPY_ARR(w, "weight"), TPY_OPT(b, "bias"), TPY_OUT(y, "output")};
        CALL_SEQ(m, g, so, a, tp_col_forward_sp(g, a[0].p, a[1].p, a[2].p, seq, a[3].p, chunks));
    }
}

/* col_backward_sp(group, dy, x, w, seq, dx, dw|None, db|None, overlap=False) */
static PyObject *py_col_backward_sp(PyObject *m, PyObject *args)
{
    PyObject *go, *dy, *x, *w, *so, *dx, *dw, *db;
    int overlap = 0;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOOOOOO|p", &go, &dy, &x, &w, &so, &dx, &dw, &db, &overlap)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(dy, "grad_output"), TPY_ARR(x, "input"), TPY_ARR(w, "weight"), TPY_OUT(dx, "grad_input"),
                       TPY_OPT_OUT(dw, "weight grad"), TPY_OPT_OUT(db, "bias grad")};
        CALL_SEQ(m, g, so, a, tp_col_backward_sp(g, a[0].p, a[1].p, a[2].p, seq, a[3].p, a[4].p, a[5].p, overlap));
    }
}

/* row_forward_sp(group, x, w, b|None, seq, y) */
static PyObject *py_row_forward_sp(PyObject *m, PyObject *args)
{
    PyObject *go, *x, *w, *b, *so, *y;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOOOO", &go, &x, &w, &b, &so, &y)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(x, "input"), TPY_ARR(w, "weight"), TPY_OPT(b, "bias"), TPY_OUT(y, "output")};
        CALL_SEQ(m, g, so, a, tp_row_forward_sp(g, a[0].p, a[1].p, a[2].p, seq, a[3].p));
    }
}

/* row_backward_sp(group, dy, x, w, seq, dx|None, dw|None, db|None) */
static PyObject *py_row_backward_sp(PyObject *m, PyObject *args)
{
    PyObject *go, *dy, *x, *w, *so, *dx, *dw, *db;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOOOOOO", &go, &dy, &x, &w, &so, &dx, &dw, &db)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(dy, "grad_output"), TPY_ARR(x, "input"), TPY_ARR(w, "weight"), TPY_OPT_OUT(dx, "grad_input"),
                       TPY_OPT_OUT(dw, "weight grad"), TPY_OPT_OUT(db, "bias grad")};
        CALL_SEQ(m, g, so, a, tp_row_backward_sp(g, a[0].p, a[1].p, a[2].p, seq, a[3].p, a[4].p, a[5].p));
    }
}

/* reduce_scatter_rows(group, full, seq, part) */
static PyObject *py_reduce_scatter_rows(PyObject *m, PyObject *args)
{
    PyObject *go, *full, *so, *part;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOO", &go, &full, &so, &part)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(full, "input"), TPY_OUT(part, "output")};
        CALL_SEQ(m, g, so, a, tp_reduce_scatter_rows(g, a[0].p, seq, a[1].p));
    }
}

/* embedding_forward(group, ids, w, vocab_offset, vocab_size, seq|None, y) */
static PyObject *py_embedding_forward(PyObject *m, PyObject *args)
{
    PyObject *go, *ids, *w, *so, *y;
    long long off, vocab;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOLLOO", &go, &ids, &w, &off, &vocab, &so, &y)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(ids, "ids"), TPY_ARR(w, "weight"), TPY_OUT(y, "output")};
        CALL_SEQ(m, g, so, a, tp_embedding_forward(g, a[0].p, a[1].p, off, vocab, seq, a[2].p));
    }
}

/* embedding_backward(group, ids, dy, vocab_offset, seq|None, dw) */
static PyObject *py_embedding_backward(PyObject *m, PyObject *args)
{
    PyObject *go, *ids, *dy, *so, *dw;
    long long off;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOLOO", &go, &ids, &dy, &off, &so, &dw)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(ids, "ids"), TPY_ARR(dy, "grad_output"), TPY_OUT(dw, "weight grad")};
        CALL_SEQ(m, g, so, a, tp_embedding_backward(g, a[0].p, a[1].p, off, seq, a[2].p));
    }
}

/* vocab_cross_entropy(group, logits, targets, vocab_offset, vocab_size, ignore_index, label_smoothing,
 *                     reduction, losses|None, grad|None) -> float */
static PyObject *py_vocab_cross_entropy(PyObject *m, PyObject *args)
{
    PyObject *go, *logits, *targets, *losses, *grad;
    long long off, vocab, ignore;
    double smoothing, loss = NAN;
    const char *rname;
    tp_loss_reduction red;
    tp_group *g;
    tp_status st;
    if (!PyArg_ParseTuple(args, "OOOLLLdsOO", &go, &logits, &targets, &off, &vocab, &ignore, &smoothing, &rname,
                          &losses, &grad))
        return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    if (strcmp(rname, "mean") == 0) red = TP_LOSS_MEAN;
    else if (strcmp(rname, "sum") == 0) red = TP_LOSS_SUM;
    else if (strcmp(rname, "none") == 0) red = TP_LOSS_NONE;
    else return PyErr_Format(PyExc_ValueError, "reduction must be 'mean', 'sum' or 'none', got '%s'", rname);
    {
        tpy_arg a[] = {TPY_ARR(logits, "logits"), TPY_ARR(targets, "targets"), TPY_OPT_OUT(losses, "losses"),
                       TPY_OPT_OUT(grad, "grad_logits")};
        if (tpy_args_convert(a, TPY_NARGS(a)) < 0) return NULL;
        Py_BEGIN_ALLOW_THREADS
        st = tp_vocab_cross_entropy(g, a[0].p, a[1].p, off, vocab, ignore, smoothing, red, a[2].p, a[3].p, &loss);
        Py_END_ALLOW_THREADS
        tpy_args_release(a, TPY_NARGS(a));
    }
    if (st != TP_OK) return tpy_raise(m, st);
    return PyFloat_FromDouble(loss);
}

PyMethodDef tpy_sequence_methods[] = {
    {"col_forward_sp", py_col_forward_sp, METH_VARARGS,
     "col_forward_sp(group, x, w, b|None, seq, y, chunks=-1): chunks < 0 takes TPLINEAR_SP_CHUNKS"},
    {"col_backward_sp", py_col_backward_sp, METH_VARARGS,
     "col_backward_sp(group, dy, x, w, seq, dx, dw|None, db|None, overlap=False)"},
    {"row_forward_sp", py_row_forward_sp, METH_VARARGS, "row_forward_sp(group, x, w, b|None, seq, y)"},
    {"row_backward_sp", py_row_backward_sp, METH_VARARGS,
     "row_backward_sp(group, dy, x, w, seq, dx|None, dw|None, db|None)"},
    {"reduce_scatter_rows", py_reduce_scatter_rows, METH_VARARGS,
     "reduce_scatter_rows(group, full, seq, part): the group's sum of full, this rank's rows seq[rank] of it"},
    {"embedding_forward", py_embedding_forward, METH_VARARGS,
     "embedding_forward(group, ids, w, vocab_offset, vocab_size, seq|None, y)"},
    {"embedding_backward", py_embedding_backward, METH_VARARGS,
     "embedding_backward(group, ids, dy, vocab_offset, seq|None, dw)"},
    {"vocab_cross_entropy", py_vocab_cross_entropy, METH_VARARGS,
     "vocab_cross_entropy(group, logits, targets, vocab_offset, vocab_size, ignore_index, label_smoothing, "
     "reduction, losses|None, grad|None) -> float"},
    {NULL, NULL, 0, NULL},
};
