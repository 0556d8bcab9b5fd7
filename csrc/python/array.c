/* tplinear._C.DeviceArray: an array on one GPU that owns its allocation (stream-ordered, freed when the
 * last array or view on it goes), with basic slicing views, copies to and from the host, and zero-copy
 * export through DLPack and the CUDA Array Interface v3.
 *
 * Streams: everything runs on tplinear's current stream (tp_cuda_get_stream; NULL is the legacy default
 * stream, the protocols' 1). An exported array orders the consumer's stream after ours. An allocation
 * remembers the stream tplinear last used it on: a use on another stream waits for that one's work first,
 * and the memory is freed ordered after it (cudaFreeAsync on the stream current at the free would let that
 * stream reuse it while the other still reads it). */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "dlpack_h.h"
#include "py.h"
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    tp_tensor t;        /* data, dtype, shape, strides (elements), device: always a GPU */
    void *alloc;        /* the allocation this array owns, freed in dealloc; NULL for views */
    void *stream;       /* the owner's: the stream tplinear last used the allocation on */
    PyObject *base;     /* what keeps a view's memory alive: the owning array, or a foreign owner */
    PyObject *weakrefs;
} tpy_array;

static void array_dealloc(PyObject *self);

int tpy_array_check(PyObject *obj) { return Py_TYPE(obj)->tp_dealloc == array_dealloc; }

const tp_tensor *tpy_array_tensor(PyObject *obj) { return &((tpy_array *)obj)->t; }

/* The array that owns obj's allocation (obj itself, or the array a view was taken of), NULL for memory
 * borrowed from another owner. */
static tpy_array *alloc_owner(PyObject *obj)
{
    tpy_array *a = (tpy_array *)obj;
    if (a->alloc) return a;
    return a->base && tpy_array_check(a->base) && ((tpy_array *)a->base)->alloc ? (tpy_array *)a->base : NULL;
}

int tpy_array_use(PyObject *obj)
{
    tpy_array *a = alloc_owner(obj);
    void *now = NULL;
    tp_status st;
    if (a == NULL || a->stream == (now = tp_cuda_get_stream(a->t.device.index))) return 0;
    if ((st = tp_cuda_stream_order(a->t.device.index, a->stream, 0)) != TP_OK) {
        PyErr_Format(PyExc_RuntimeError, "could not order a GPU array's last stream before this one: %s",
                     tp_last_error());
        return -1;
    }
    a->stream = now;
    return 0;
}

/* Maps a failed status to the module's exception (CommError, ...) for an array of type. */
static PyObject *raise_st(PyTypeObject *type, tp_status st) { return tpy_raise(PyType_GetModule(type), st); }

/* ---------------------------------------------------------------- devices */

/* This process's GPU: its local rank (tp_world_from_env: torchrun's LOCAL_RANK, OpenMPI's
 * OMPI_COMM_WORLD_LOCAL_RANK; 0 when unset) modulo the visible GPUs, as the nccl backend picks it. */
static int default_device(int *device)
{
    tp_world_env w;
    tp_status st;
    int n = tp_cuda_device_count();
    if (n == 0) {
        PyErr_Format(PyExc_RuntimeError, "no CUDA GPU is visible to this process%s",
                     tp_cuda_compiled() ? "" : " (tplinear was built without CUDA)");
        return -1;
    }
    if ((st = tp_world_from_env(&w)) != TP_OK) {
        PyErr_SetString(PyExc_ValueError, tp_last_error());
        return -1;
    }
    *device = (w.local_rank > 0 ? w.local_rank : 0) % n;
    return 0;
}

int tpy_device_index(PyObject *obj, int *device)
{
    PyObject *type = NULL, *index = NULL;
    long v;
    int rc = -1;
    if (obj == Py_None || (PyUnicode_Check(obj) && PyUnicode_CompareWithASCIIString(obj, "cuda") == 0))
        return default_device(device);
    if (PyLong_Check(obj) && !PyBool_Check(obj)) {
        v = PyLong_AsLong(obj);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < 0 || v > 1 << 20) goto bad;
        *device = (int)v;
        return 0;
    }
    if (PyUnicode_Check(obj)) {
        const char *s = PyUnicode_AsUTF8(obj);
        char *end;
        if (s == NULL) return -1;
        if (strncmp(s, "cuda:", 5) != 0 || s[5] < '0' || s[5] > '9') goto bad;
        v = strtol(s + 5, &end, 10);
        if (*end != '\0' || v > 1 << 20) goto bad;
        *device = (int)v;
        return 0;
    }
    /* torch.device("cuda", i) */
    if ((type = PyObject_GetAttrString(obj, "type")) == NULL) {
        PyErr_Clear();
        goto bad;
    }
    if (!PyUnicode_Check(type) || PyUnicode_CompareWithASCIIString(type, "cuda") != 0) goto bad;
    if ((index = PyObject_GetAttrString(obj, "index")) == NULL) goto out;
    if (index == Py_None) {
        rc = default_device(device);
        goto out;
    }
    v = PyLong_AsLong(index);
    if (v == -1 && PyErr_Occurred()) goto out;
    *device = (int)v;
    rc = 0;
    goto out;
bad:
    PyErr_Format(PyExc_ValueError, "device must be 'cuda', 'cuda:N' or a GPU index, got %R", obj);
out:
    Py_XDECREF(type);
    Py_XDECREF(index);
    return rc;
}

/* device_index(device) -> int */
static PyObject *py_device_index(PyObject *m, PyObject *obj)
{
    int device;
    (void)m;
    if (tpy_device_index(obj, &device) < 0) return NULL;
    return PyLong_FromLong(device);
}

/* ---------------------------------------------------------------- shapes */

static int64_t numel(int ndim, const int64_t *shape)
{
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= shape[d];
    return n;
}

static void contiguous_strides(int ndim, const int64_t *shape, int64_t *strides)
{
    int64_t step = 1;
    for (int d = ndim - 1; d >= 0; d--) {
        strides[d] = step;
        step *= shape[d] > 0 ? shape[d] : 1;
    }
}

static PyObject *int64_tuple(int n, const int64_t *v)
{
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

/* A shape from a sequence of ints (what names it in messages); -1 entries allowed when allow_unknown. */
static int parse_shape(PyObject *obj, int *ndim, int64_t *shape, int allow_unknown)
{
    PyObject *fast = PySequence_Fast(obj, "shape must be a sequence of ints");
    Py_ssize_t n;
    int rc = -1;
    if (fast == NULL) return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    if (n > TP_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "at most %d dimensions are supported, got %zd", TP_MAX_DIMS, n);
        goto out;
    }
    for (Py_ssize_t d = 0; d < n; d++) {
        PyObject *item = PyNumber_Index(PySequence_Fast_GET_ITEM(fast, d));
        long long v;
        if (item == NULL) goto out;
        v = PyLong_AsLongLong(item);
        Py_DECREF(item);
        if (v == -1 && PyErr_Occurred()) goto out;
        if (v < 0 && !(allow_unknown && v == -1)) {
            PyErr_Format(PyExc_ValueError, "negative dimension in shape %R", obj);
            goto out;
        }
        shape[d] = v;
    }
    *ndim = (int)n;
    rc = 0;
out:
    Py_DECREF(fast);
    return rc;
}

/* ---------------------------------------------------------------- making arrays */

/* An uninitialised (zero: zeroed) C-contiguous array that owns its memory. */
static PyObject *array_alloc(PyTypeObject *type, int ndim, const int64_t *shape, tp_dtype dt, int device, int zero)
{
    tpy_array *a;
    int64_t n = 1;
    size_t nbytes, item = tp_dtype_size(dt);
    tp_status st;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] > 0 && n > (INT64_MAX / (int64_t)item) / shape[d]) {
            PyErr_SetString(PyExc_ValueError, "array is too big");
            return NULL;
        }
        n *= shape[d];
    }
    nbytes = (size_t)n * item;
    if ((a = (tpy_array *)type->tp_alloc(type, 0)) == NULL) return NULL;
    a->t.dtype = dt;
    a->t.ndim = ndim;
    memcpy(a->t.shape, shape, (size_t)ndim * sizeof *shape);
    contiguous_strides(ndim, shape, a->t.strides);
    a->t.device.type = TP_DEVICE_CUDA;
    a->t.device.index = device;
    Py_BEGIN_ALLOW_THREADS
    st = tp_cuda_malloc(device, nbytes, &a->alloc);
    if (st == TP_OK && zero) st = tp_cuda_memset_zero(device, a->alloc, nbytes);
    Py_END_ALLOW_THREADS
    if (st != TP_OK) { /* the message first: the array's teardown may call into CUDA again */
        raise_st(type, st);
        Py_DECREF(a);
        return NULL;
    }
    a->t.data = a->alloc;
    a->stream = tp_cuda_get_stream(a->t.device.index);
    return (PyObject *)a;
}

/* A view of src's memory: shape and strides given, data at src's data + offset elements. */
static PyObject *array_view(tpy_array *src, int ndim, const int64_t *shape, const int64_t *strides, int64_t offset)
{
    PyTypeObject *type = Py_TYPE(src);
    tpy_array *v = (tpy_array *)type->tp_alloc(type, 0);
    if (v == NULL) return NULL;
    v->t = src->t;
    v->t.ndim = ndim;
    memcpy(v->t.shape, shape, (size_t)ndim * sizeof *shape);
    memcpy(v->t.strides, strides, (size_t)ndim * sizeof *strides);
    v->t.data = (char *)src->t.data + offset * (int64_t)tp_dtype_size(src->t.dtype);
    v->base = src->alloc ? (PyObject *)src : src->base; /* always the owner: views of views collapse */
    Py_XINCREF(v->base);
    return (PyObject *)v;
}

/* (shape, dtype="float32", device=None) -> an owning array (zero: zero-filled); fmt names the call */
static PyObject *array_make(PyTypeObject *type, PyObject *args, PyObject *kwargs, const char *fmt, int zero)
{
    static char *kw[] = {"shape", "dtype", "device", NULL};
    PyObject *shape_obj, *dtype_obj = NULL, *device_obj = Py_None;
    int64_t shape[TP_MAX_DIMS];
    int ndim, device;
    tp_dtype dt = TP_FLOAT32;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, fmt, kw, &shape_obj, &dtype_obj, &device_obj)) return NULL;
    if (parse_shape(shape_obj, &ndim, shape, 0) < 0) return NULL;
    if (dtype_obj && tpy_dtype_from_object(tpy_state_of_type(type), dtype_obj, &dt) < 0) return NULL;
    if (tpy_device_index(device_obj, &device) < 0) return NULL;
    return array_alloc(type, ndim, shape, dt, device, zero);
}

/* DeviceArray(shape, dtype="float32", device=None) */
static PyObject *array_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    return array_make(type, args, kwargs, "O|OO:DeviceArray", 0);
}

/* DeviceArray.zeros(shape, dtype="float32", device=None) */
static PyObject *array_zeros(PyObject *cls, PyObject *args, PyObject *kwargs)
{
    return array_make((PyTypeObject *)cls, args, kwargs, "O|OO:zeros", 1);
}

/* DeviceArray._borrow(owner, ptr, shape, dtype, device, strides=None): an array over memory someone else
 * owns (kept alive through owner); nothing is checked or touched. For tests and foreign allocations. */
static PyObject *array_borrow(PyObject *cls, PyObject *args)
{
    PyTypeObject *type = (PyTypeObject *)cls;
    PyObject *owner, *ptr_obj, *shape_obj, *dtype_obj, *strides_obj = Py_None;
    int64_t shape[TP_MAX_DIMS], strides[TP_MAX_DIMS];
    int ndim, sdim, device;
    tp_dtype dt;
    void *ptr;
    tpy_array *a;
    if (!PyArg_ParseTuple(args, "OOOOi|O:_borrow", &owner, &ptr_obj, &shape_obj, &dtype_obj, &device, &strides_obj))
        return NULL;
    if ((ptr = PyLong_AsVoidPtr(ptr_obj)) == NULL && PyErr_Occurred()) return NULL;
    if (parse_shape(shape_obj, &ndim, shape, 0) < 0) return NULL;
    if (tpy_dtype_from_object(tpy_state_of_type(type), dtype_obj, &dt) < 0) return NULL;
    contiguous_strides(ndim, shape, strides);
    if (strides_obj != Py_None) {
        PyObject *fast = PySequence_Fast(strides_obj, "strides must be a sequence of ints");
        if (fast == NULL) return NULL;
        sdim = (int)PySequence_Fast_GET_SIZE(fast);
        for (int d = 0; d < sdim && d < ndim; d++) strides[d] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, d));
        Py_DECREF(fast);
        if (PyErr_Occurred()) return NULL;
        if (sdim != ndim) return PyErr_Format(PyExc_ValueError, "strides must have %d entries, got %d", ndim, sdim);
    }
    if ((a = (tpy_array *)type->tp_alloc(type, 0)) == NULL) return NULL;
    a->t.data = ptr;
    a->t.dtype = dt;
    a->t.ndim = ndim;
    memcpy(a->t.shape, shape, sizeof shape);
    memcpy(a->t.strides, strides, sizeof strides);
    a->t.device.type = TP_DEVICE_CUDA;
    a->t.device.index = device;
    a->base = owner;
    Py_INCREF(owner);
    return (PyObject *)a;
}

static void array_dealloc(PyObject *self)
{
    tpy_array *a = (tpy_array *)self;
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (a->weakrefs) PyObject_ClearWeakRefs(self);
    if (a->alloc) { /* a failure at teardown has nowhere to go */
        if (a->stream != tp_cuda_get_stream(a->t.device.index))
            (void)tp_cuda_stream_order(a->t.device.index, a->stream, 0);
        (void)tp_cuda_free(a->t.device.index, a->alloc);
        a->alloc = NULL;
    }
    Py_CLEAR(a->base);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int array_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((tpy_array *)self)->base);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int array_clear(PyObject *self)
{
    Py_CLEAR(((tpy_array *)self)->base);
    return 0;
}

/* ---------------------------------------------------------------- properties */

#define SELF ((tpy_array *)self)

static PyObject *get_shape(PyObject *self, void *c) { (void)c; return int64_tuple(SELF->t.ndim, SELF->t.shape); }
static PyObject *get_strides(PyObject *self, void *c) { (void)c; return int64_tuple(SELF->t.ndim, SELF->t.strides); }
static PyObject *get_device(PyObject *self, void *c) { (void)c; return PyLong_FromLong(SELF->t.device.index); }
static PyObject *get_ndim(PyObject *self, void *c) { (void)c; return PyLong_FromLong(SELF->t.ndim); }
static PyObject *get_ptr(PyObject *self, void *c) { (void)c; return PyLong_FromVoidPtr(SELF->t.data); }
static PyObject *get_size(PyObject *self, void *c) { (void)c; return PyLong_FromLongLong(tp_tensor_numel(&SELF->t)); }

static PyObject *get_nbytes(PyObject *self, void *c)
{
    (void)c;
    return PyLong_FromLongLong(tp_tensor_numel(&SELF->t) * (int64_t)tp_dtype_size(SELF->t.dtype));
}

static PyObject *get_is_contiguous(PyObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(tp_tensor_is_contiguous(&SELF->t));
}

static PyObject *get_dtype(PyObject *self, void *c)
{
    tpy_state *state = tpy_state_of_type(Py_TYPE(self));
    (void)c;
    if (state == NULL) return NULL;
    Py_INCREF(state->dtypes[SELF->t.dtype]);
    return state->dtypes[SELF->t.dtype];
}

static PyObject *get_cai(PyObject *self, void *c)
{
    const tp_dtype_info *info = tp_dtype_info_of(SELF->t.dtype);
    PyObject *shape = NULL, *strides = NULL, *stream = NULL, *res = NULL;
    (void)c;
    if (info->typestr == NULL)
        return PyErr_Format(PyExc_AttributeError, "%s has no __cuda_array_interface__ typestr; use DLPack",
                            info->name);
    if ((shape = get_shape(self, NULL)) == NULL || (stream = tpy_protocol_stream(SELF->t.device.index)) == NULL)
        goto out;
    if (tp_tensor_is_contiguous(&SELF->t)) {
        strides = Py_None;
        Py_INCREF(strides);
    } else {
        int64_t bytes[TP_MAX_DIMS];
        for (int d = 0; d < SELF->t.ndim; d++) bytes[d] = SELF->t.strides[d] * (int64_t)info->itemsize;
        if ((strides = int64_tuple(SELF->t.ndim, bytes)) == NULL) goto out;
    }
    res = Py_BuildValue("{s:O,s:s,s:(NO),s:i,s:O,s:O}", "shape", shape, "typestr", info->typestr, "data",
                        PyLong_FromVoidPtr(SELF->t.data), Py_False, "version", 3, "strides", strides, "stream",
                        stream);
out:
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    Py_XDECREF(stream);
    return res;
}

static PyGetSetDef array_getset[] = {
    {"shape", get_shape, NULL, "tuple of ints", NULL},
    {"strides", get_strides, NULL, "tuple of ints, in elements (views may be non-contiguous)", NULL},
    {"dtype", get_dtype, NULL, "a NumPy dtype, or tplinear's bfloat16", NULL},
    {"device", get_device, NULL, "the GPU index", NULL},
    {"ndim", get_ndim, NULL, "number of dimensions", NULL},
    {"size", get_size, NULL, "number of elements", NULL},
    {"nbytes", get_nbytes, NULL, "size * itemsize", NULL},
    {"is_contiguous", get_is_contiguous, NULL, "True when C-contiguous (dims of size 1 may have any stride)", NULL},
    {"ptr", get_ptr, NULL, "the address of the first element (an int)", NULL},
    {"__cuda_array_interface__", get_cai, NULL, "CUDA Array Interface v3 (not for bfloat16: use DLPack)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef array_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(tpy_array, weakrefs), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* ---------------------------------------------------------------- len, repr, indexing */

static Py_ssize_t array_length(PyObject *self)
{
    if (SELF->t.ndim == 0) {
        PyErr_SetString(PyExc_TypeError, "len() of a 0-d array");
        return -1;
    }
    return (Py_ssize_t)SELF->t.shape[0];
}

static PyObject *array_repr(PyObject *self)
{
    PyObject *shape = get_shape(self, NULL), *dtype = get_dtype(self, NULL), *strides = NULL, *res = NULL;
    if (shape == NULL || dtype == NULL) goto out;
    if (tp_tensor_is_contiguous(&SELF->t)) {
        res = PyUnicode_FromFormat("DeviceArray(shape=%R, dtype=%S, device='cuda:%d')", shape, dtype,
                                   SELF->t.device.index);
    } else if ((strides = get_strides(self, NULL)) != NULL) {
        res = PyUnicode_FromFormat("DeviceArray(shape=%R, dtype=%S, device='cuda:%d', strides=%R)", shape, dtype,
                                   SELF->t.device.index, strides);
    }
out:
    Py_XDECREF(shape);
    Py_XDECREF(dtype);
    Py_XDECREF(strides);
    return res;
}

/* Basic indexing as a view: ints, step-1 slices and one Ellipsis (x[..., a:b], x[i], x[a:b, :]). */
static PyObject *array_subscript(PyObject *self, PyObject *key)
{
    const tp_tensor *t = &SELF->t;
    PyObject *keys = PyTuple_Check(key) ? key : PyTuple_Pack(1, key), *res = NULL;
    Py_ssize_t nk, ellipses = 0;
    int64_t shape[TP_MAX_DIMS], strides[TP_MAX_DIMS], offset = 0;
    int d = 0, nd = 0;
    if (keys == NULL) return NULL;
    if (keys == key) Py_INCREF(keys);
    nk = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < nk; i++) ellipses += PyTuple_GET_ITEM(keys, i) == Py_Ellipsis;
    if (ellipses > 1) {
        PyErr_SetString(PyExc_IndexError, "an index can only have a single ellipsis");
        goto out;
    }
    if (nk - ellipses > t->ndim) {
        PyErr_Format(PyExc_IndexError, "too many indices for a %d-d array", t->ndim);
        goto out;
    }
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *k = PyTuple_GET_ITEM(keys, i);
        if (k == Py_Ellipsis) {
            for (Py_ssize_t skip = t->ndim - (nk - 1); skip > 0; skip--, d++, nd++) {
                shape[nd] = t->shape[d];
                strides[nd] = t->strides[d];
            }
        } else if (PySlice_Check(k)) {
            Py_ssize_t start, stop, step;
            if (PySlice_Unpack(k, &start, &stop, &step) < 0) goto out;
            if (step != 1) {
                PyErr_SetString(PyExc_IndexError, "DeviceArray slices must have step 1");
                goto out;
            }
            shape[nd] = PySlice_AdjustIndices((Py_ssize_t)t->shape[d], &start, &stop, step);
            strides[nd++] = t->strides[d];
            offset += (int64_t)start * t->strides[d];
            d++;
        } else {
            Py_ssize_t idx = PyNumber_AsSsize_t(k, PyExc_IndexError);
            if (idx == -1 && PyErr_Occurred()) goto out;
            if (idx < -t->shape[d] || idx >= t->shape[d]) {
                PyErr_Format(PyExc_IndexError, "index %zd is out of bounds for size %lld", idx,
                             (long long)t->shape[d]);
                goto out;
            }
            offset += (idx < 0 ? idx + t->shape[d] : idx) * t->strides[d];
            d++;
        }
    }
    for (; d < t->ndim; d++, nd++) {
        shape[nd] = t->shape[d];
        strides[nd] = t->strides[d];
    }
    res = array_view(SELF, nd, shape, strides, offset);
out:
    Py_DECREF(keys);
    return res;
}

static PyObject *array_item(PyObject *self, Py_ssize_t i)
{
    PyObject *key = PyLong_FromSsize_t(i), *res;
    if (key == NULL) return NULL;
    res = array_subscript(self, key);
    Py_DECREF(key);
    return res;
}

/* iter(): the rows, as views (through __getitem__ until IndexError) */
static PyObject *array_iter(PyObject *self) { return PySeqIter_New(self); }

/* ---------------------------------------------------------------- copies */

static PyObject *array_copy(PyObject *self, PyObject *unused)
{
    tpy_array *out;
    tp_status st;
    (void)unused;
    if (tpy_array_use(self) < 0) return NULL;
    out = (tpy_array *)array_alloc(Py_TYPE(self), SELF->t.ndim, SELF->t.shape, SELF->t.dtype, SELF->t.device.index, 0);
    if (out == NULL) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (tp_tensor_is_contiguous(&SELF->t))
        st = tp_cuda_memcpy(SELF->t.device.index, out->t.data, SELF->t.data,
                            (size_t)tp_tensor_numel(&SELF->t) * tp_dtype_size(SELF->t.dtype));
    else
        st = tp_tensor_copy(&out->t, &SELF->t);
    Py_END_ALLOW_THREADS
    if (st != TP_OK) {
        raise_st(Py_TYPE(self), st);
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* reshape(*shape) or reshape(shape): a view when contiguous, else of a contiguous copy; -1 is inferred */
static PyObject *array_reshape(PyObject *self, PyObject *args)
{
    PyObject *shape_obj = args, *src = self, *res = NULL;
    int64_t shape[TP_MAX_DIMS], strides[TP_MAX_DIMS], known = 1, size = tp_tensor_numel(&SELF->t);
    int ndim, unknown = -1;
    if (PyTuple_GET_SIZE(args) == 1 &&
        (PyTuple_Check(PyTuple_GET_ITEM(args, 0)) || PyList_Check(PyTuple_GET_ITEM(args, 0))))
        shape_obj = PyTuple_GET_ITEM(args, 0);
    if (parse_shape(shape_obj, &ndim, shape, 1) < 0) return NULL;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] != -1) {
            known *= shape[d];
        } else if (unknown >= 0) {
            return PyErr_Format(PyExc_ValueError, "can only specify one unknown dimension, got %R", shape_obj);
        } else {
            unknown = d;
        }
    }
    if (unknown >= 0) shape[unknown] = known ? size / known : 0;
    if (numel(ndim, shape) != size) {
        PyObject *old = get_shape(self, NULL);
        if (old) PyErr_Format(PyExc_ValueError, "cannot reshape %R into %R", old, shape_obj);
        Py_XDECREF(old);
        return NULL;
    }
    if (!tp_tensor_is_contiguous(&SELF->t)) {
        if ((src = array_copy(self, NULL)) == NULL) return NULL;
    } else {
        Py_INCREF(src);
    }
    contiguous_strides(ndim, shape, strides);
    res = array_view((tpy_array *)src, ndim, shape, strides, 0);
    Py_DECREF(src);
    return res;
}

/* numpy(): a host copy (bfloat16 comes back as float32) */
static PyObject *array_numpy(PyObject *self, PyObject *unused)
{
    tpy_state *state = tpy_state_of_type(Py_TYPE(self));
    PyObject *src = self, *shape = NULL, *host = NULL;
    int bf16 = SELF->t.dtype == TP_BFLOAT16;
    size_t n = (size_t)tp_tensor_numel(&SELF->t), nbytes = n * tp_dtype_size(SELF->t.dtype);
    uint16_t *stage = NULL;
    Py_buffer buf;
    tp_status st = TP_OK;
    (void)unused;
    if (state == NULL || tpy_array_use(self) < 0) return NULL;
    if (!tp_tensor_is_contiguous(&SELF->t)) {
        if ((src = array_copy(self, NULL)) == NULL) return NULL;
    } else {
        Py_INCREF(src);
    }
    if ((shape = get_shape(src, NULL)) == NULL) goto fail;
    host = PyObject_CallMethod(state->numpy, "empty", "(OO)", shape,
                               bf16 ? state->dtypes[TP_FLOAT32] : state->dtypes[SELF->t.dtype]);
    if (host == NULL || PyObject_GetBuffer(host, &buf, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto fail;
    if (bf16 && n > 0 && (stage = PyMem_Malloc(nbytes)) == NULL) {
        PyBuffer_Release(&buf);
        PyErr_NoMemory();
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    st = tp_cuda_memcpy(SELF->t.device.index, bf16 ? (void *)stage : buf.buf, ((tpy_array *)src)->t.data, nbytes);
    if (st == TP_OK && bf16) tp_bf16_to_float32(stage, buf.buf, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    PyMem_Free(stage);
    if (st != TP_OK) {
        raise_st(Py_TYPE(self), st);
        goto fail;
    }
    Py_DECREF(src);
    Py_DECREF(shape);
    return host;
fail:
    Py_DECREF(src);
    Py_XDECREF(shape);
    Py_XDECREF(host);
    return NULL;
}

/* __array__(dtype=None, copy=None): the host copy (NumPy's protocol; copy=False cannot be honoured) */
static PyObject *array_array(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"dtype", "copy", NULL};
    PyObject *dtype = Py_None, *copy = Py_None, *host, *res;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO:__array__", kw, &dtype, &copy)) return NULL;
    if (copy == Py_False) {
        PyErr_SetString(PyExc_ValueError, "a DeviceArray is GPU memory: NumPy can only get a copy (copy=False)");
        return NULL;
    }
    if ((host = array_numpy(self, NULL)) == NULL || dtype == Py_None) return host;
    res = PyObject_CallMethod(host, "astype", "(OO)", dtype, Py_False);
    Py_DECREF(host);
    return res;
}

/* DeviceArray.to_device(arr, dtype=None, device=None): a host array (NumPy or anything numpy.asarray
 * takes) copied to the GPU in dtype (default: its own; float32 data can become float16 or bfloat16).
 * A DeviceArray already of that dtype and device is returned as it is. */
static PyObject *array_to_device(PyObject *cls, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"arr", "dtype", "device", NULL};
    PyTypeObject *type = (PyTypeObject *)cls;
    tpy_state *state = tpy_state_of_type(type);
    PyObject *arr, *dtype_obj = Py_None, *device_obj = Py_None, *host = NULL, *payload = NULL, *res = NULL;
    int is_array, device;
    tp_dtype dt = TP_FLOAT32;
    uint16_t *stage = NULL;
    Py_buffer buf;
    tp_status st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|OO:to_device", kw, &arr, &dtype_obj, &device_obj)) return NULL;
    if (state == NULL) return NULL;
    is_array = tpy_array_check(arr);
    if (dtype_obj != Py_None && tpy_dtype_from_object(state, dtype_obj, &dt) < 0) return NULL;
    if (is_array) { /* already on a GPU: by default it stays on its own */
        const tp_tensor *t = &((tpy_array *)arr)->t;
        if (device_obj == Py_None) device = t->device.index;
        else if (tpy_device_index(device_obj, &device) < 0) return NULL;
        if (dtype_obj == Py_None) dt = t->dtype;
        if (dt == t->dtype && device == t->device.index) {
            Py_INCREF(arr);
            return arr;
        }
    }
    host = is_array ? array_numpy(arr, NULL) : PyObject_CallMethod(state->numpy, "asarray", "(O)", arr);
    if (host == NULL) return NULL;
    if (!is_array && dtype_obj == Py_None) { /* the host array's own dtype, checked before the device */
        PyObject *own = PyObject_GetAttrString(host, "dtype");
        int rc = own ? tpy_dtype_from_object(state, own, &dt) : -1;
        Py_XDECREF(own);
        if (rc < 0) goto out;
    }
    if (!is_array && tpy_device_index(device_obj, &device) < 0) goto out;
    payload = PyObject_CallMethod(state->numpy, "ascontiguousarray", "(OO)", host,
                                  state->dtypes[dt == TP_BFLOAT16 ? TP_FLOAT32 : dt]);
    if (payload == NULL || PyObject_GetBuffer(payload, &buf, PyBUF_C_CONTIGUOUS) < 0) goto out;
    {
        PyObject *shape = PyObject_GetAttrString(payload, "shape");
        int64_t dims[TP_MAX_DIMS];
        int ndim;
        if (shape == NULL || parse_shape(shape, &ndim, dims, 0) < 0) {
            Py_XDECREF(shape);
            PyBuffer_Release(&buf);
            goto out;
        }
        Py_DECREF(shape);
        res = array_alloc(type, ndim, dims, dt, device, 0);
    }
    if (res != NULL && dt == TP_BFLOAT16 && buf.len > 0 && (stage = PyMem_Malloc((size_t)buf.len / 2)) == NULL) {
        PyErr_NoMemory();
        Py_CLEAR(res);
    }
    if (res != NULL) {
        void *data = ((tpy_array *)res)->t.data;
        Py_BEGIN_ALLOW_THREADS
        if (stage) tp_bf16_from_float32(buf.buf, stage, (size_t)buf.len / 4);
        st = tp_cuda_memcpy(device, data, stage ? (void *)stage : buf.buf, stage ? (size_t)buf.len / 2 : (size_t)buf.len);
        Py_END_ALLOW_THREADS
        if (st != TP_OK) {
            raise_st(type, st);
            Py_CLEAR(res);
        }
    }
    PyBuffer_Release(&buf);
out:
    PyMem_Free(stage);
    Py_XDECREF(host);
    Py_XDECREF(payload);
    return res;
}

/* ---------------------------------------------------------------- DLPack out */

static PyObject *array_dlpack_device(PyObject *self, PyObject *unused)
{
    (void)unused;
    return Py_BuildValue("(ii)", TP_kDLCUDA, SELF->t.device.index);
}

/* __dlpack__(stream=None, max_version=None, dl_device=None, copy=None): the Python array API's export.
 * stream is the consumer's (None: the legacy default stream, -1: no ordering); its later work is
 * ordered after everything queued so far on tplinear's stream. */
static PyObject *array_dlpack(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
    int versioned = 0, want_copy;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OOOO:__dlpack__", kw, &stream, &max_version, &dl_device, &copy))
        return NULL;
    if (dl_device != Py_None) {
        int type, id;
        if (!PyArg_ParseTuple(dl_device, "ii", &type, &id)) return NULL;
        if (type != TP_kDLCUDA || id != SELF->t.device.index)
            return PyErr_Format(PyExc_BufferError, "cannot export a cuda:%d array to DLPack device %R",
                                SELF->t.device.index, dl_device);
    }
    if ((want_copy = PyObject_IsTrue(copy)) < 0) return NULL;
    if (want_copy)
        return PyErr_Format(PyExc_BufferError,
                            "DeviceArray exports without copying only (copy=True is not supported)");
    if (tpy_array_use(self) < 0) return NULL; /* ours after the stream of its last use, theirs after ours */
    {
        /* None and 0: the legacy default stream */
        void *theirs = (void *)1, *mine = tp_cuda_get_stream(SELF->t.device.index);
        int overflow = 0;
        long long v = stream == Py_None ? 0 : PyLong_AsLongLongAndOverflow(stream, &overflow);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (overflow || v > 0) theirs = PyLong_AsVoidPtr(stream);
        if (theirs == NULL && PyErr_Occurred()) return NULL;
        if (v != -1 && theirs != (mine ? mine : (void *)1)) { /* -1: the consumer asks for no ordering */
            tp_status st = tp_cuda_stream_order(SELF->t.device.index, theirs, 1);
            if (st != TP_OK) return raise_st(Py_TYPE(self), st);
        }
    }
    if (max_version != Py_None) {
        PyObject *major = PySequence_GetItem(max_version, 0);
        long v = major ? PyLong_AsLong(major) : -1;
        Py_XDECREF(major);
        if (v == -1 && PyErr_Occurred()) return NULL;
        versioned = v >= 1;
    }
    return tpy_dlpack_capsule(self, &SELF->t, TP_kDLCUDA, versioned, 0);
}

/* ---------------------------------------------------------------- the type */

static PyMethodDef array_methods_[] = {
    {"zeros", (PyCFunction)(void (*)(void))array_zeros, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "zeros($type, /, shape, dtype='float32', device=None)\n--\n\nA zero-filled DeviceArray."},
    {"to_device", (PyCFunction)(void (*)(void))array_to_device, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "to_device($type, /, arr, dtype=None, device=None)\n--\n\n"
     "A GPU copy of a host array (float32 can become float16 / bfloat16); a DeviceArray of that dtype and "
     "device is returned as it is."},
    {"_borrow", array_borrow, METH_VARARGS | METH_CLASS,
     "_borrow($type, owner, ptr, shape, dtype, device, strides=None, /)\n--\n\n"
     "An array over memory that owner keeps alive; nothing is checked or touched (tests)."},
    {"reshape", array_reshape, METH_VARARGS, "reshape($self, /, *shape)\n--\n\nA view (of a copy when not contiguous); one -1 is inferred."},
    {"copy", array_copy, METH_NOARGS, "copy($self, /)\n--\n\nA C-contiguous copy on the same GPU."},
    {"numpy", array_numpy, METH_NOARGS, "numpy($self, /)\n--\n\nA host copy (bfloat16 comes back as float32)."},
    {"__array__", (PyCFunction)(void (*)(void))array_array, METH_VARARGS | METH_KEYWORDS,
     "__array__($self, /, dtype=None, copy=None)\n--\n\nnumpy(), converted to dtype."},
    {"__dlpack__", (PyCFunction)(void (*)(void))array_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__($self, /, stream=None, max_version=None, dl_device=None, copy=None)\n--\n\n"
     "A DLPack capsule (zero-copy); the consumer's stream is ordered after tplinear's."},
    {"__dlpack_device__", array_dlpack_device, METH_NOARGS, "__dlpack_device__($self, /)\n--\n\n(2, device): kDLCUDA."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot array_slots[] = {
    {Py_tp_new, array_new},
    {Py_tp_dealloc, array_dealloc},
    {Py_tp_traverse, array_traverse},
    {Py_tp_clear, array_clear},
    {Py_tp_repr, array_repr},
    {Py_tp_methods, array_methods_},
    {Py_tp_getset, array_getset},
    {Py_tp_members, array_members},
    {Py_mp_length, array_length},
    {Py_mp_subscript, array_subscript},
    {Py_sq_length, array_length},
    {Py_sq_item, array_item},
    {Py_tp_iter, array_iter},
    {Py_tp_doc,
     "DeviceArray(shape, dtype='float32', device=None)\n--\n\n"
     "An array on one GPU, owning its memory (freed with the last array or view on it). The constructor\n"
     "allocates uninitialised C-contiguous memory on device ('cuda' / None: this process's GPU, 'cuda:N', N).\n"
     "See zeros(), to_device(), reshape() and basic slicing (views), copy(), numpy(); exported zero-copy\n"
     "through DLPack (torch.from_dlpack) and __cuda_array_interface__ (cupy.asarray). strides are in\n"
     "elements; views made by slicing may be non-contiguous."},
    {0, NULL},
};

static PyType_Spec array_spec = {
    "tplinear._C.DeviceArray", sizeof(tpy_array), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, array_slots,
};

int tpy_array_register(PyObject *module, tpy_state *state)
{
    state->array_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &array_spec, NULL);
    if (state->array_type == NULL) return -1;
    Py_INCREF(state->array_type);
    if (PyModule_AddObject(module, "DeviceArray", (PyObject *)state->array_type) < 0) {
        Py_DECREF(state->array_type);
        return -1;
    }
    return 0;
}

PyMethodDef tpy_array_methods[] = {
    {"device_index", py_device_index, METH_O,
     "device_index($module, device, /)\n--\n\n"
     "The GPU index of None / 'cuda' (this process's GPU: local rank modulo the visible GPUs), 'cuda:N', N "
     "or a torch.device."},
    {NULL, NULL, 0, NULL},
};
