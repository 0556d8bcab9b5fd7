/* Bindings of process groups and collectives (NumPy arrays in place). */
#include <stdlib.h>
#include <string.h>

#include "py.h"

#define TPY_NARGS(a) ((int)(sizeof(a) / sizeof((a)[0])))

static int parse_op(PyObject *opobj, tp_reduce_op *op)
{
    static const char *const names[] = {"sum", "avg", "max", "min"};
    Py_ssize_t n = 0;
    const char *s = PyUnicode_Check(opobj) ? PyUnicode_AsUTF8AndSize(opobj, &n) : NULL;
    if (s == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "op must be one of 'sum', 'avg', 'max', 'min', got %R", opobj);
        return -1;
    }
    for (int i = 0; i < 4; i++)
        if ((size_t)n == strlen(names[i]) && strcmp(s, names[i]) == 0) { /* "max\0x" is not "max" */
            *op = (tp_reduce_op)i;
            return 0;
        }
    PyErr_Format(PyExc_ValueError, "op must be one of 'sum', 'avg', 'max', 'min', got %R", opobj);
    return -1;
}

static int check_contig(const tp_tensor *t, const char *what)
{
    if (!tp_tensor_is_contiguous(t)) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous array (use numpy.ascontiguousarray)", what);
        return -1;
    }
    return 0;
}

static int check_device(PyObject *m, tp_group *g, const tp_tensor *t, const char *what)
{
    tp_status st = tp_group_check_device(g, t->device, what);
    if (st != TP_OK) {
        tpy_raise(m, st);
        return -1;
    }
    return 0;
}

/* None or an int >= 0 into *out (-1 for None: "from the environment"). */
static int opt_rank(PyObject *o, int *out, const char *what)
{
    int overflow = 0;
    long long v;
    if (o == Py_None) return 0;
    v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < 0 || v > (1L << 30)) {
        PyErr_Format(PyExc_ValueError, "%s must be None or an integer in 0..%ld, got %R", what, 1L << 30, o);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* init_world(backend=None, timeout=300.0, rank=None, world_size=None, device="cpu", token=None) -> Group:
 * whatever is None comes from the launcher's environment (tp_world_from_env, TPLINEAR_TOKEN); device is
 * the memory an automatic backend choice must take. */
static PyObject *py_init_world(PyObject *m, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"backend", "timeout", "rank", "world_size", "device", "token", NULL};
    tp_init_options o = TP_INIT_OPTIONS_INITIALIZER;
    const char *device = "cpu";
    PyObject *rank = Py_None, *size = Py_None;
    tp_group *g = NULL;
    tp_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|zdOOsz", kwlist, &o.backend, &o.timeout_s, &rank, &size, &device,
                                     &o.token))
        return NULL;
    if (opt_rank(rank, &o.rank, "rank") < 0 || opt_rank(size, &o.world_size, "world_size") < 0) return NULL;
    if (strcmp(device, "cpu") == 0)
        o.device = TP_DEVICE_CPU;
    else if (strcmp(device, "cuda") == 0)
        o.device = TP_DEVICE_CUDA;
    else
        return PyErr_Format(PyExc_ValueError, "device must be 'cpu' or 'cuda', got '%s'", device);
    Py_BEGIN_ALLOW_THREADS st = tp_group_init_world(&o, &g);
    Py_END_ALLOW_THREADS
    if (st != TP_OK) return tpy_raise(m, st);
    return tpy_group_wrap(m, g, NULL);
}

static PyObject *int_or_none(int v)
{
    if (v >= 0) return PyLong_FromLong(v);
    Py_RETURN_NONE;
}

/* world_env() -> dict: the launcher's description of the world (None where it says nothing) */
static PyObject *py_world_env(PyObject *m, PyObject *unused)
{
    tp_world_env w;
    tp_status st = tp_world_from_env(&w);
    (void)unused;
    if (st != TP_OK) return tpy_raise(m, st);
    return Py_BuildValue("{s:N,s:N,s:N,s:N,s:N,s:z}", "rank", int_or_none(w.rank), "world_size",
                         int_or_none(w.world_size), "local_rank", int_or_none(w.local_rank), "local_world_size",
                         int_or_none(w.local_world_size), "master_port", int_or_none(w.master_port), "master_addr",
                         w.master_addr[0] ? w.master_addr : NULL);
}

/* backends() -> [name]: the backends this build registers, in the order an automatic choice considers */
static PyObject *py_backends(PyObject *m, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    (void)m; (void)unused;
    for (int i = 0; list != NULL && i < tp_backend_count(); i++) {
        PyObject *name = PyUnicode_FromString(tp_backend_name(i));
        if (name == NULL || PyList_Append(list, name) < 0) Py_CLEAR(list);
        Py_XDECREF(name);
    }
    return list;
}

/* env_knobs() -> [{name, type, default, choices, doc}]: the environment knobs the C library reads */
static PyObject *py_env_knobs(PyObject *m, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    (void)unused;
    for (int i = 0; list != NULL && i < tp_env_knob_count(); i++) {
        tp_env_knob k;
        tp_status st = tp_env_knob_at(i, &k);
        PyObject *d = st != TP_OK ? tpy_raise(m, st)
                                  : Py_BuildValue("{s:s,s:s,s:s,s:z,s:s}", "name", k.name, "type", k.type, "default",
                                                  k.default_value, "choices", k.choices, "doc", k.doc);
        if (d == NULL || PyList_Append(list, d) < 0) Py_CLEAR(list);
        Py_XDECREF(d);
    }
    return list;
}

static PyObject *py_new_group(PyObject *m, PyObject *args)
{
    PyObject *po, *ranks_obj, *fast;
    tp_group *parent, *g = NULL;
    int *ranks;
    Py_ssize_t n;
    tp_status st;
    const char *backend = NULL;
    if (!PyArg_ParseTuple(args, "OO|z", &po, &ranks_obj, &backend)) return NULL;
    if ((parent = tpy_group_get(m, po)) == NULL) return NULL;
    if ((fast = PySequence_Fast(ranks_obj, "ranks must be a sequence of ints")) == NULL) return NULL;
    n = PySequence_Fast_GET_SIZE(fast);
    ranks = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *ranks);
    if (ranks == NULL) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(PySequence_Fast_GET_ITEM(fast, i), &overflow);
        if ((v == -1 && PyErr_Occurred()) || overflow || v < 0 || v >= tp_group_size(parent)) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "new_group: rank %R is not in the parent group of %d",
                             PySequence_Fast_GET_ITEM(fast, i), tp_group_size(parent));
            PyMem_Free(ranks);
            Py_DECREF(fast);
            return NULL;
        }
        ranks[i] = (int)v; /* in range: no truncation */
    }
    Py_DECREF(fast);
    Py_BEGIN_ALLOW_THREADS st = tp_group_new_backend(parent, ranks, (int)n, backend, &g);
    Py_END_ALLOW_THREADS
    PyMem_Free(ranks);
    if (st != TP_OK) return tpy_raise(m, st);
    return tpy_group_wrap(m, g, po);
}

static PyObject *py_group_info(PyObject *m, PyObject *args)
{
    PyObject *go, *ranks;
    tp_group *g;
    int size;
    if (!PyArg_ParseTuple(args, "O", &go)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    size = tp_group_size(g);
    if ((ranks = PyList_New(size)) == NULL) return NULL;
    for (int i = 0; i < size; i++) PyList_SET_ITEM(ranks, i, PyLong_FromLong(tp_group_global_rank(g, i)));
    return Py_BuildValue("{s:i,s:i,s:s,s:N,s:d}", "rank", tp_group_rank(g), "size", size, "backend",
                         tp_group_backend(g), "ranks", ranks, "timeout", tp_group_timeout(g));
}

static PyObject *py_all_reduce(PyObject *m, PyObject *args)
{
    PyObject *go, *arr, *opobj;
    tp_group *g;
    tp_reduce_op op;
    tpy_view v;
    tp_tensor t;
    tp_status st;
    if (!PyArg_ParseTuple(args, "OOO", &go, &arr, &opobj)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL || parse_op(opobj, &op) < 0) return NULL;
    if (tpy_tensor(arr, &t, &v, 1, "tensor") < 0) return NULL;
    if (check_contig(&t, "tensor") < 0 || check_device(m, g, &t, "tensor") < 0) {
        tpy_view_release(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS st = tp_all_reduce(g, t.data, (size_t)tp_tensor_numel(&t), t.dtype, op);
    Py_END_ALLOW_THREADS
    tpy_view_release(&v);
    if (st != TP_OK) return tpy_raise(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_broadcast(PyObject *m, PyObject *args)
{
    PyObject *go, *arr, *rootobj;
    int root, overflow = 0;
    long long r;
    tp_group *g;
    tpy_view v;
    tp_tensor t;
    tp_status st;
    if (!PyArg_ParseTuple(args, "OOO", &go, &arr, &rootobj)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    r = PyLong_AsLongLongAndOverflow(rootobj, &overflow);
    if (r == -1 && PyErr_Occurred()) return NULL;
    if (overflow || r < 0 || r >= tp_group_size(g))
        return PyErr_Format(PyExc_ValueError, "broadcast: root %R is not a rank of the group of %d", rootobj,
                            tp_group_size(g));
    root = (int)r;
    if (tpy_tensor(arr, &t, &v, 1, "tensor") < 0) return NULL;
    if (check_contig(&t, "tensor") < 0 || check_device(m, g, &t, "tensor") < 0) {
        tpy_view_release(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS st = tp_broadcast(g, t.data, (size_t)tp_tensor_numel(&t), t.dtype, root);
    Py_END_ALLOW_THREADS
    tpy_view_release(&v);
    if (st != TP_OK) return tpy_raise(m, st);
    Py_RETURN_NONE;
}

/* Converts (send, recv) and checks dtype, contiguity, and recv = size * send (scale_recv) or
 * send = size * recv (!scale_recv). counts == NULL: even. */
static int pair(PyObject *m, tp_group *g, PyObject *so, PyObject *ro, tpy_arg a[2], int scale_recv,
                const size_t *counts, const char *what)
{
    int64_t ns, nr, p = tp_group_size(g);
    a[0] = (tpy_arg){.obj = so, .what = "input"};
    a[1] = (tpy_arg){.obj = ro, .writable = 1, .what = "output"};
    if (tpy_args_convert(a, 2) < 0) return -1;
    if (check_contig(&a[0].t, "input") < 0 || check_contig(&a[1].t, "output") < 0) goto fail;
    if (check_device(m, g, &a[0].t, "input") < 0 || check_device(m, g, &a[1].t, "output") < 0) goto fail;
    if (a[0].t.dtype != a[1].t.dtype) {
        PyErr_Format(PyExc_TypeError, "%s: output dtype %s differs from input dtype %s", what,
                     tp_dtype_name(a[1].t.dtype), tp_dtype_name(a[0].t.dtype));
        goto fail;
    }
    ns = tp_tensor_numel(&a[0].t);
    nr = tp_tensor_numel(&a[1].t);
    if (counts) { /* this rank's count: the input's size (all-gather) or the output's (reduce-scatter) */
        int64_t total = 0, mine = scale_recv ? ns : nr, all = scale_recv ? nr : ns;
        int me = tp_group_rank(g);
        for (int64_t r = 0; r < p; r++)
            if (__builtin_add_overflow(total, (int64_t)counts[r], &total)) {
                PyErr_Format(PyExc_ValueError, "%s: the counts add up to more than %lld elements", what,
                             (long long)INT64_MAX);
                goto fail;
            }
        if (me >= 0 && (int64_t)counts[me] != mine) {
            PyErr_Format(PyExc_ValueError, "%s: this rank's count is %lld but its %s has %lld elements", what,
                         (long long)counts[me], scale_recv ? "input" : "output", (long long)mine);
            goto fail;
        }
        if (all != total) {
            PyErr_Format(PyExc_ValueError, "%s: %s must have %lld elements (the sum of counts), got %lld", what,
                         scale_recv ? "output" : "input", (long long)total, (long long)all);
            goto fail;
        }
    } else if (scale_recv ? nr != ns * p : ns != nr * p) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have %lld elements (group size %lld x %lld), got %lld", what,
                     scale_recv ? "output" : "input", (long long)((scale_recv ? ns : nr) * p), (long long)p,
                     (long long)(scale_recv ? ns : nr), (long long)(scale_recv ? nr : ns));
        goto fail;
    }
    return 0;
fail:
    tpy_args_release(a, 2);
    return -1;
}

/* counts (None: even) as a new array of one count per rank of g, in *out (NULL for None); 0 or -1. */
static int parse_counts(tp_group *g, PyObject *obj, size_t **out, const char *what)
{
    PyObject *fast;
    Py_ssize_t n;
    *out = NULL;
    if (obj == Py_None) return 0;
    if ((fast = PySequence_Fast(obj, "counts must be a sequence of ints")) == NULL) return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    if (n != tp_group_size(g)) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: need %d counts (one per rank), got %zd", what, tp_group_size(g), n);
        return -1;
    }
    if ((*out = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof **out)) == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int overflow = 0;
        long long c = PyLong_AsLongLongAndOverflow(PySequence_Fast_GET_ITEM(fast, i), &overflow);
        if (c < 0 || overflow) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s: counts must be in 0..%lld, got %R", what, (long long)INT64_MAX,
                             PySequence_Fast_GET_ITEM(fast, i));
            Py_DECREF(fast);
            PyMem_Free(*out);
            *out = NULL;
            return -1;
        }
        (*out)[i] = (size_t)c;
    }
    Py_DECREF(fast);
    return 0;
}

static PyObject *py_all_gather(PyObject *m, PyObject *args)
{
    PyObject *go, *so, *ro, *counts_obj = Py_None;
    tp_group *g;
    tpy_arg a[2];
    size_t *counts = NULL;
    tp_status st;
    if (!PyArg_ParseTuple(args, "OOO|O", &go, &ro, &so, &counts_obj)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL || parse_counts(g, counts_obj, &counts, "all_gather") < 0) return NULL;
    if (pair(m, g, so, ro, a, 1, counts, "all_gather") < 0) {
        PyMem_Free(counts);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (counts)
        st = tp_all_gatherv(g, a[0].t.data, a[1].t.data, counts, a[0].t.dtype);
    else
        st = tp_all_gather(g, a[0].t.data, a[1].t.data, (size_t)tp_tensor_numel(&a[0].t), a[0].t.dtype);
    Py_END_ALLOW_THREADS
    tpy_args_release(a, 2);
    PyMem_Free(counts);
    if (st != TP_OK) return tpy_raise(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_reduce_scatter(PyObject *m, PyObject *args)
{
    PyObject *go, *so, *ro, *opobj, *counts_obj = Py_None;
    tp_group *g;
    tp_reduce_op op;
    tpy_arg a[2];
    size_t *counts = NULL;
    tp_status st;
    if (!PyArg_ParseTuple(args, "OOOO|O", &go, &ro, &so, &opobj, &counts_obj)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL || parse_op(opobj, &op) < 0 ||
        parse_counts(g, counts_obj, &counts, "reduce_scatter") < 0)
        return NULL;
    if (pair(m, g, so, ro, a, 0, counts, "reduce_scatter") < 0) {
        PyMem_Free(counts);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (counts)
        st = tp_reduce_scatter_v(g, a[0].t.data, a[1].t.data, counts, a[0].t.dtype, op);
    else
        st = tp_reduce_scatter(g, a[0].t.data, a[1].t.data, (size_t)tp_tensor_numel(&a[1].t), a[0].t.dtype, op);
    Py_END_ALLOW_THREADS
    tpy_args_release(a, 2);
    PyMem_Free(counts);
    if (st != TP_OK) return tpy_raise(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_barrier(PyObject *m, PyObject *args)
{
    PyObject *go;
    tp_group *g;
    tp_status st;
    if (!PyArg_ParseTuple(args, "O", &go)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    Py_BEGIN_ALLOW_THREADS st = tp_barrier(g);
    Py_END_ALLOW_THREADS
    if (st != TP_OK) return tpy_raise(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_abort(PyObject *m, PyObject *args)
{
    PyObject *go;
    tp_group *g;
    tp_status st;
    if (!PyArg_ParseTuple(args, "O", &go)) return NULL;
    if ((g = tpy_group_get(m, go)) == NULL) return NULL;
    st = tp_group_abort(g);
    if (st != TP_OK) return tpy_raise(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_destroy(PyObject *m, PyObject *args)
{
    PyObject *go;
    if (!PyArg_ParseTuple(args, "O", &go)) return NULL;
    return tpy_group_destroy(m, go);
}

TPY_IN_GROUP(py_new_group)
TPY_IN_GROUP(py_all_reduce)
TPY_IN_GROUP(py_all_gather)
TPY_IN_GROUP(py_reduce_scatter)
TPY_IN_GROUP(py_broadcast)
TPY_IN_GROUP(py_barrier)

PyMethodDef tpy_comm_methods[] = {
    {"init_world", (PyCFunction)(void (*)(void))py_init_world, METH_VARARGS | METH_KEYWORDS,
     "init_world(backend=None, timeout=300.0, rank=None, world_size=None, device='cpu', token=None) -> Group; "
     "None: from the environment"},
    {"world_env", py_world_env, METH_NOARGS, "world_env() -> dict: the launcher's world (torchrun / OpenMPI variables)"},
    {"backends", py_backends, METH_NOARGS, "backends() -> list: the backends this build registers"},
    {"env_knobs", py_env_knobs, METH_NOARGS, "env_knobs() -> list of dicts: the environment knobs the library reads"},
    {"new_group", py_new_group_in_group, METH_VARARGS, "new_group(parent, ranks, backend=None) -> Group (collective over parent; backend None: the parent's)"},
    {"group_info", py_group_info, METH_VARARGS, "group_info(group) -> dict"},
    {"all_reduce", py_all_reduce_in_group, METH_VARARGS, "all_reduce(group, arr, op)"},
    {"all_gather", py_all_gather_in_group, METH_VARARGS, "all_gather(group, out, arr, counts=None)"},
    {"reduce_scatter", py_reduce_scatter_in_group, METH_VARARGS, "reduce_scatter(group, out, arr, op, counts=None)"},
    {"broadcast", py_broadcast_in_group, METH_VARARGS, "broadcast(group, arr, root)"},
    {"barrier", py_barrier_in_group, METH_VARARGS, "barrier(group)"},
    {"abort", py_abort, METH_VARARGS, "abort(group)"},
    {"destroy", py_destroy, METH_VARARGS, "destroy(group)"},
    {NULL, NULL, 0, NULL},
};
