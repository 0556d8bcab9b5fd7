/* Bindings of the math and layer entry points: parse, convert, call without the GIL, map errors. */
#include <stdlib.h>

#include "py.h"

static PyObject *ranges_to_list(const tp_range *r, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = Py_BuildValue("(LL)", (long long)r[i].offset, (long long)r[i].size);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

/* A Python sequence of ints as a new int64 array (NULL + exception on failure). */
static int64_t *int64_list(PyObject *seq, Py_ssize_t *n, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    int64_t *out;
    if (fast == NULL) return NULL;
    *n = PySequence_Fast_GET_SIZE(fast);
    out = PyMem_Calloc((size_t)(*n > 0 ? *n : 1), sizeof *out);
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        out[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    return out;
}

/* partition(blocks, p, grain, kv_heads=0, name=None, num_heads=0, num_kv_heads=0, head_dim=0,
 *           block_heads=None) -> [(offset, size)] * (p * len(blocks)), rank-major */
static PyObject *py_partition(PyObject *m, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"blocks", "p", "grain", "kv_heads", "name", "num_heads", "num_kv_heads", "head_dim",
                         "block_heads", NULL};
    PyObject *blocks_obj, *heads_obj = Py_None, *res = NULL;
    int p;
    long long grain, kv = 0, nh = 0, nkv = 0, hd = 0;
    const char *name = NULL;
    Py_ssize_t nb, nbh = 0;
    int64_t *blocks = NULL, *heads = NULL;
    tp_range *r = NULL;
    tp_split_spec spec;
    tp_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiL|LzLLLO", kw, &blocks_obj, &p, &grain, &kv, &name, &nh, &nkv,
                                     &hd, &heads_obj))
        return NULL;
    if (p < 1) return PyErr_Format(PyExc_ValueError, "group size must be >= 1, got %d", p);
    if ((blocks = int64_list(blocks_obj, &nb, "block sizes must be a sequence of ints")) == NULL) goto out;
    if (nb < 1 || nb > 64) {
        PyErr_Format(PyExc_ValueError, "a split dimension has 1 to 64 blocks, got %zd", nb);
        goto out;
    }
    if (heads_obj != Py_None) {
        if ((heads = int64_list(heads_obj, &nbh, "head counts must be a sequence of ints")) == NULL) goto out;
        if (nbh != nb) {
            PyErr_Format(PyExc_ValueError, "got %zd head counts for %zd blocks", nbh, nb);
            goto out;
        }
    }
    r = PyMem_Calloc((size_t)(p * nb), sizeof *r);
    if (r == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    spec = (tp_split_spec){.grain = grain, .kv_heads = kv, .name = name, .num_heads = nh, .num_kv_heads = nkv,
                           .head_dim = hd};
    st = tp_partition_packed(blocks, (int)nb, p, &spec, heads, r);
    res = st == TP_OK ? ranges_to_list(r, p * nb) : tpy_raise(m, st);
out:
    PyMem_Free(blocks);
    PyMem_Free(heads);
    PyMem_Free(r);
    return res;
}

/* attention_heads(num_heads, num_kv_heads, p) -> [((q_offset, q_count), (kv_offset, kv_count))] * p */
static PyObject *py_attention_heads(PyObject *m, PyObject *args)
{
    long long nh, nkv;
    int p;
    tp_range *r;
    tp_status st;
    PyObject *res = NULL;
    if (!PyArg_ParseTuple(args, "LLi", &nh, &nkv, &p)) return NULL;
    if (p < 1) return PyErr_Format(PyExc_ValueError, "group size must be >= 1, got %d", p);
    if ((r = PyMem_Calloc((size_t)(2 * p), sizeof *r)) == NULL) return PyErr_NoMemory();
    st = tp_attention_heads(nh, nkv, p, r, r + p);
    if (st != TP_OK) {
        res = tpy_raise(m, st);
    } else if ((res = PyList_New(p)) != NULL) {
        for (int i = 0; i < p; i++) {
            PyObject *item = Py_BuildValue("((LL)(LL))", (long long)r[i].offset, (long long)r[i].size,
                                           (long long)r[p + i].offset, (long long)r[p + i].size);
            if (item == NULL) {
                Py_CLEAR(res);
                break;
            }
            PyList_SET_ITEM(res, i, item);
        }
    }
    PyMem_Free(r);
    return res;
}

/* init_uniform(out, seed, stream, bound, row_offset, col_offset, full_cols)
 * init_normal(out, seed, stream, std, row_offset, col_offset, full_cols) */
static PyObject *init_values(PyObject *m, PyObject *args, int normal)
{
    PyObject *o;
    unsigned long long seed, stream;
    double scale;
    long long ro, co, fc;
    if (!PyArg_ParseTuple(args, "OKKdLLL", &o, &seed, &stream, &scale, &ro, &co, &fc)) return NULL;
    {
        tpy_arg a[] = {TPY_OUT(o, "out")};
        TPY_CALL_RELEASED(m, a, normal ? tp_init_normal(a[0].p, seed, stream, scale, ro, co, fc)
                                   : tp_init_uniform(a[0].p, seed, stream, scale, ro, co, fc));
    }
}

static PyObject *py_init_uniform(PyObject *m, PyObject *args) { return init_values(m, args, 0); }
static PyObject *py_init_normal(PyObject *m, PyObject *args) { return init_values(m, args, 1); }

/* linear_forward(x, w, b|None, y) */
static PyObject *py_linear_forward(PyObject *m, PyObject *args)
{
    PyObject *x, *w, *b, *y;
    if (!PyArg_ParseTuple(args, "OOOO", &x, &w, &b, &y)) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(x, "input"), TPY_ARR(w, "weight"), TPY_OPT(b, "bias"), TPY_OUT(y, "output")};
        TPY_CALL_RELEASED(m, a, tp_linear_forward(a[0].p, a[1].p, a[2].p, a[3].p));
    }
}

/* linear_backward(dy, x, w, dx|None, dw|None, db|None, assign=False) */
static PyObject *py_linear_backward(PyObject *m, PyObject *args)
{
    PyObject *dy, *x, *w, *dx, *dw, *db;
    int assign = 0;
    if (!PyArg_ParseTuple(args, "OOOOOO|p", &dy, &x, &w, &dx, &dw, &db, &assign)) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(dy, "grad_output"), TPY_ARR(x, "input"), TPY_ARR(w, "weight"), TPY_OPT_OUT(dx, "grad_input"),
                       TPY_OPT_OUT(dw, "weight grad"), TPY_OPT_OUT(db, "bias grad")};
        tp_status st_ = TP_OK;
        if (tpy_args_convert(a, TPY_NARGS(a)) < 0) return NULL;
        Py_BEGIN_ALLOW_THREADS
        if (a[3].p) st_ = tp_linear_backward_input(a[0].p, a[2].p, a[3].p);
        if (st_ == TP_OK && a[4].p) st_ = tp_linear_backward_params_mode(a[0].p, a[1].p, a[4].p, a[5].p, TPY_GRAD_MODE(assign));
        Py_END_ALLOW_THREADS
        tpy_args_release(a, TPY_NARGS(a));
        if (st_ != TP_OK) return tpy_raise(m, st_);
        Py_RETURN_NONE;
    }
}

/* row_forward(group, x, w, b|None, y) / col_forward(...) */
static PyObject *layer_forward(PyObject *m, PyObject *args, int row)
{
    PyObject *go, *x, *w, *b, *y;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOOOO", &go, &x, &w, &b, &y)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(x, "input"), TPY_ARR(w, "weight"), TPY_OPT(b, "bias"), TPY_OUT(y, "output")};
        TPY_CALL_RELEASED(m, a, row ? tp_row_forward(g, a[0].p, a[1].p, a[2].p, a[3].p)
                                : tp_col_forward(g, a[0].p, a[1].p, a[2].p, a[3].p));
    }
}

static PyObject *py_row_forward(PyObject *m, PyObject *args) { return layer_forward(m, args, 1); }
static PyObject *py_col_forward(PyObject *m, PyObject *args) { return layer_forward(m, args, 0); }

/* row_backward(group, dy, x, w, dx|None, dw|None, db|None, assign=False)
 * col_backward(group, dy, x, w, dx, dw|None, db|None, overlap=False, assign=False) */
static PyObject *layer_backward(PyObject *m, PyObject *args, int row)
{
    PyObject *go, *dy, *x, *w, *dx, *dw, *db;
    int overlap = 0, assign = 0;
    tp_group *g;
    if (!(row ? PyArg_ParseTuple(args, "OOOOOOO|p", &go, &dy, &x, &w, &dx, &dw, &db, &assign)
              : PyArg_ParseTuple(args, "OOOOOOO|pp", &go, &dy, &x, &w, &dx, &dw, &db, &overlap, &assign)))
        return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    {
        tpy_arg a[] = {TPY_ARR(dy, "grad_output"), TPY_ARR(x, "input"), TPY_ARR(w, "weight"),
                       {.obj = dx, .writable = 1, .optional = row, .what = "grad_input"}, TPY_OPT_OUT(dw, "weight grad"),
                       TPY_OPT_OUT(db, "bias grad")};
        TPY_CALL_RELEASED(m, a, row ? tp_row_backward_mode(g, a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].p,
                                                       TPY_GRAD_MODE(assign))
                                : tp_col_backward_mode(g, a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].p, overlap,
                                                       TPY_GRAD_MODE(assign)));
    }
}

static PyObject *py_row_backward(PyObject *m, PyObject *args) { return layer_backward(m, args, 1); }
static PyObject *py_col_backward(PyObject *m, PyObject *args) { return layer_backward(m, args, 0); }

tp_range *tpy_range_list(PyObject *seq, int nblocks, Py_ssize_t *n, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, "ranges must be a sequence of (offset, size)");
    tp_range *r = NULL;
    if (fast == NULL) return NULL;
    *n = PySequence_Fast_GET_SIZE(fast);
    if (nblocks < 1 || *n < 1 || *n % nblocks != 0) {
        PyErr_Format(PyExc_ValueError, "%s: need a positive multiple of nblocks=%d ranges, got %zd", what, nblocks, *n);
        goto out;
    }
    if ((r = PyMem_Calloc((size_t)*n, sizeof *r)) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        long long off, size;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "LL", &off, &size)) {
            PyMem_Free(r);
            r = NULL;
            goto out;
        }
        r[i].offset = off;
        r[i].size = size;
    }
out:
    Py_DECREF(fast);
    return r;
}

/* gather(group, shard, dim, ranges [(offset, size)] * (p * nblocks), nblocks, full)
 * shard(full, dim, ranges [(offset, size)] * (p * nblocks), nblocks, rank, out) */
static PyObject *gather_or_shard(PyObject *m, tp_group *g, PyObject *shard, int dim, PyObject *rlist, int nblocks,
                                 int rank, PyObject *full)
{
    tp_range *r;
    Py_ssize_t n;
    tp_status st_;
    const char *what = g ? "gather" : "shard";
    tpy_arg a[] = {{.obj = shard, .writable = g == NULL, .what = "shard"}, {.obj = full, .writable = g != NULL, .what = "full"}};
    if ((r = tpy_range_list(rlist, nblocks, &n, what)) == NULL) return NULL;
    if (g != NULL && n != (Py_ssize_t)tp_group_size(g) * nblocks) {
        PyMem_Free(r);
        return PyErr_Format(PyExc_ValueError, "gather: expected %d ranges (group size x blocks), got %zd",
                            tp_group_size(g) * nblocks, n);
    }
    if (tpy_args_convert(a, TPY_NARGS(a)) < 0) {
        PyMem_Free(r);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    st_ = g ? tp_gather_packed(g, a[0].p, dim, r, nblocks, a[1].p)
            : tp_shard_packed(a[1].p, dim, r, (int)(n / nblocks), nblocks, rank, a[0].p);
    Py_END_ALLOW_THREADS
    tpy_args_release(a, TPY_NARGS(a));
    PyMem_Free(r);
    if (st_ != TP_OK) return tpy_raise(m, st_);
    Py_RETURN_NONE;
}

static PyObject *py_gather(PyObject *m, PyObject *args)
{
    PyObject *go, *shard, *rlist, *full;
    int dim, nblocks;
    tp_group *g;
    if (!PyArg_ParseTuple(args, "OOiOiO", &go, &shard, &dim, &rlist, &nblocks, &full)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    return gather_or_shard(m, g, shard, dim, rlist, nblocks, tp_group_rank(g), full);
}

static PyObject *py_shard(PyObject *m, PyObject *args)
{
    PyObject *full, *rlist, *out;
    int dim, nblocks, rank;
    if (!PyArg_ParseTuple(args, "OiOiiO", &full, &dim, &rlist, &nblocks, &rank, &out)) return NULL;
    return gather_or_shard(m, NULL, out, dim, rlist, nblocks, rank, full);
}

static PyObject *py_set_num_threads(PyObject *m, PyObject *args)
{
    int n;
    tp_status st;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    st = tp_set_num_threads(n);
    if (st != TP_OK) return tpy_raise(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *m, PyObject *unused)
{
    (void)m; (void)unused;
    return PyLong_FromLong(tp_get_num_threads());
}

static PyObject *py_cuda_available(PyObject *m, PyObject *unused)
{
    (void)m; (void)unused;
    return PyBool_FromLong(tp_cuda_available());
}

static PyObject *py_cuda_compiled(PyObject *m, PyObject *unused)
{
    (void)m; (void)unused;
    return PyBool_FromLong(tp_cuda_compiled());
}

TPY_IN_GROUP(py_row_forward)
TPY_IN_GROUP(py_row_backward)
TPY_IN_GROUP(py_col_forward)
TPY_IN_GROUP(py_col_backward)
TPY_IN_GROUP(py_gather)

PyMethodDef tpy_core_methods[] = {
    {"partition", (PyCFunction)(void (*)(void))py_partition, METH_VARARGS | METH_KEYWORDS,
     "partition(blocks, p, grain, kv_heads=0, name=None, num_heads=0, num_kv_heads=0, head_dim=0, "
     "block_heads=None) -> [(offset, size)] * (p * len(blocks)), rank-major"},
    {"attention_heads", py_attention_heads, METH_VARARGS,
     "attention_heads(num_heads, num_kv_heads, p) -> [((q_offset, q_count), (kv_offset, kv_count))] * p"},
    {"init_uniform", py_init_uniform, METH_VARARGS, "init_uniform(out, seed, stream, bound, row_off, col_off, full_cols)"},
    {"init_normal", py_init_normal, METH_VARARGS, "init_normal(out, seed, stream, std, row_off, col_off, full_cols)"},
    {"linear_forward", py_linear_forward, METH_VARARGS, "linear_forward(x, w, b|None, y)"},
    {"linear_backward", py_linear_backward, METH_VARARGS, "linear_backward(dy, x, w, dx|None, dw|None, db|None, assign=False): assign writes dw, db instead of adding to them"},
    {"row_forward", py_row_forward_in_group, METH_VARARGS, "row_forward(group, x, w, b|None, y)"},
    {"row_backward", py_row_backward_in_group, METH_VARARGS, "row_backward(group, dy, x, w, dx|None, dw|None, db|None, assign=False)"},
    {"col_forward", py_col_forward_in_group, METH_VARARGS, "col_forward(group, x, w, b|None, y)"},
    {"col_backward", py_col_backward_in_group, METH_VARARGS, "col_backward(group, dy, x, w, dx, dw|None, db|None, overlap=False, assign=False)"},
    {"gather", py_gather_in_group, METH_VARARGS, "gather(group, shard, dim, ranges, nblocks, full): all-gather along dim"},
    {"shard", py_shard, METH_VARARGS,
     "shard(full, dim, ranges, nblocks, rank, out): rank's pieces of full along dim into out (no collective)"},
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n): BLAS threads (n <= 0: automatic)"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"cuda_available", py_cuda_available, METH_NOARGS, "cuda_available() -> bool"},
    {"cuda_compiled", py_cuda_compiled, METH_NOARGS, "cuda_compiled() -> bool"},
    {NULL, NULL, 0, NULL},
};
