/* Bindings of the GPU runtime's process-wide settings (streams, TF32), DLPack export, and array copies
 * and inspection. GPU memory itself is owned by DeviceArray (array.c). */
#include <stdlib.h>
#include <string.h>

#include "dlpack_h.h"
#include "py.h"

static PyObject *raise_st(PyObject *m, tp_status st) { return tpy_raise(m, st); }

/* ---------------------------------------------------------------- streams and options */

static PyObject *py_cuda_device_count(PyObject *m, PyObject *unused)
{
    (void)m; (void)unused;
    return PyLong_FromLong(tp_cuda_device_count());
}

/* cuda_get_stream(device=-1): tplinear's stream of device (-1: the current device) */
static PyObject *py_cuda_get_stream(PyObject *m, PyObject *args)
{
    int device = -1;
    (void)m;
    if (!PyArg_ParseTuple(args, "|i", &device)) return NULL;
    return PyLong_FromVoidPtr(tp_cuda_get_stream(device));
}

/* cuda_set_stream(ptr|None, device=-1) */
static PyObject *py_cuda_set_stream(PyObject *m, PyObject *args)
{
    PyObject *arg;
    int device = -1;
    void *s;
    tp_status st;
    if (!PyArg_ParseTuple(args, "O|i", &arg, &device)) return NULL;
    s = arg == Py_None ? NULL : PyLong_AsVoidPtr(arg);
    if (s == NULL && PyErr_Occurred()) return NULL;
    st = tp_cuda_set_stream(device, s);
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

/* cuda_stream_order(device, other, other_waits) */
static PyObject *py_cuda_stream_order(PyObject *m, PyObject *args)
{
    int device, other_waits;
    PyObject *o;
    void *other;
    tp_status st;
    if (!PyArg_ParseTuple(args, "iOp", &device, &o, &other_waits)) return NULL;
    other = PyLong_AsVoidPtr(o);
    if (other == NULL && PyErr_Occurred()) return NULL;
    st = tp_cuda_stream_order(device, other, other_waits);
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_cuda_synchronize(PyObject *m, PyObject *args)
{
    int device = 0;
    tp_status st;
    if (!PyArg_ParseTuple(args, "|i", &device)) return NULL;
    Py_BEGIN_ALLOW_THREADS st = tp_cuda_synchronize(device);
    Py_END_ALLOW_THREADS
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

static PyObject *py_cuda_set_allow_tf32(PyObject *m, PyObject *arg)
{
    int v = PyObject_IsTrue(arg);
    (void)m;
    if (v < 0) return NULL;
    tp_cuda_set_allow_tf32(v);
    Py_RETURN_NONE;
}

static PyObject *py_cuda_get_allow_tf32(PyObject *m, PyObject *unused)
{
    (void)m; (void)unused;
    return PyBool_FromLong(tp_cuda_get_allow_tf32());
}

/* ---------------------------------------------------------------- DLPack out */

typedef struct {
    union {
        tp_DLManagedTensor plain;
        tp_DLManagedTensorVersioned versioned;
    } u;
    int64_t shape[TP_MAX_DIMS];
    int64_t strides[TP_MAX_DIMS];
} export_block;

static void release_owner(void *ctx)
{
    PyGILState_STATE gs;
    if (ctx == NULL) return;
    gs = PyGILState_Ensure(); /* deleters may run on any thread */
    Py_DECREF((PyObject *)ctx);
    PyGILState_Release(gs);
}

static void plain_deleter(tp_DLManagedTensor *self)
{
    release_owner(self->manager_ctx);
    free(self); /* the export_block starts with the union */
}

static void versioned_deleter(tp_DLManagedTensorVersioned *self)
{
    release_owner(self->manager_ctx);
    free(self);
}

/* An unconsumed capsule frees its tensor; a consumed one (renamed used_*) belongs to the consumer. */
static void export_capsule_destructor(PyObject *cap)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        tp_DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m && m->deleter) m->deleter(m);
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        tp_DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        if (m && m->deleter) m->deleter(m);
    }
    PyErr_Restore(type, value, tb);
}

PyObject *tpy_dlpack_capsule(PyObject *owner, const tp_tensor *t, int dl_device_type, int versioned, int read_only)
{
    const tp_dtype_info *info = tp_dtype_info_of(t->dtype);
    export_block *blk = calloc(1, sizeof *blk);
    tp_DLTensor *dl;
    PyObject *cap;
    if (blk == NULL) return PyErr_NoMemory();
    dl = versioned ? &blk->u.versioned.dl_tensor : &blk->u.plain.dl_tensor;
    memcpy(blk->shape, t->shape, sizeof blk->shape);
    memcpy(blk->strides, t->strides, sizeof blk->strides);
    dl->data = t->data;
    dl->device.device_type = dl_device_type;
    dl->device.device_id = t->device.index;
    dl->ndim = t->ndim;
    dl->dtype.code = info->dl_code;
    dl->dtype.bits = info->dl_bits;
    dl->dtype.lanes = 1;
    dl->shape = blk->shape;
    dl->strides = blk->strides;
    dl->byte_offset = 0;
    Py_INCREF(owner);
    if (versioned) {
        blk->u.versioned.version.major = TP_DLPACK_MAJOR;
        blk->u.versioned.version.minor = TP_DLPACK_MINOR;
        blk->u.versioned.manager_ctx = owner;
        blk->u.versioned.deleter = versioned_deleter;
        blk->u.versioned.flags = read_only ? TP_DLPACK_FLAG_READ_ONLY : 0;
        cap = PyCapsule_New(&blk->u.versioned, "dltensor_versioned", export_capsule_destructor);
    } else {
        blk->u.plain.manager_ctx = owner;
        blk->u.plain.deleter = plain_deleter;
        cap = PyCapsule_New(&blk->u.plain, "dltensor", export_capsule_destructor);
    }
    if (cap == NULL) {
        Py_DECREF(owner);
        free(blk);
    }
    return cap;
}

/* dlpack_export(owner, ptr, device_type, device_id, dtype_name, shape, versioned, read_only[, strides])
 * -> capsule over memory that owner keeps alive; strides in elements (None: C-contiguous) */
static PyObject *py_dlpack_export(PyObject *m, PyObject *args)
{
    PyObject *owner, *ptr_obj, *shape_obj, *strides_obj = Py_None, *fast = NULL, *sfast = NULL, *cap = NULL;
    int dev_type, versioned, readonly;
    const char *dtname;
    const tp_dtype_info *info;
    tp_tensor t;
    Py_ssize_t nd;
    (void)m;
    memset(&t, 0, sizeof t);
    if (!PyArg_ParseTuple(args, "OOiisOpp|O", &owner, &ptr_obj, &dev_type, &t.device.index, &dtname, &shape_obj,
                          &versioned, &readonly, &strides_obj))
        return NULL;
    if ((info = tp_dtype_by_name(dtname)) == NULL) return PyErr_Format(PyExc_TypeError, "unknown dtype %s", dtname);
    t.dtype = info->dtype;
    t.data = PyLong_AsVoidPtr(ptr_obj);
    if (t.data == NULL && PyErr_Occurred()) return NULL;
    if ((fast = PySequence_Fast(shape_obj, "shape must be a sequence of ints")) == NULL) return NULL;
    nd = PySequence_Fast_GET_SIZE(fast);
    if (nd > TP_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "at most %d dimensions, got %zd", TP_MAX_DIMS, nd);
        goto out;
    }
    if (strides_obj != Py_None) {
        sfast = PySequence_Fast(strides_obj, "strides must be a sequence of ints");
        if (sfast == NULL) goto out;
        if (PySequence_Fast_GET_SIZE(sfast) != nd) {
            PyErr_Format(PyExc_ValueError, "strides must have %zd entries", nd);
            goto out;
        }
    }
    t.ndim = (int)nd;
    {
        int64_t stride = 1;
        for (Py_ssize_t d = nd - 1; d >= 0; d--) {
            t.shape[d] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, d));
            if (t.shape[d] == -1 && PyErr_Occurred()) goto out;
            t.strides[d] = sfast ? PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sfast, d)) : stride;
            if (t.strides[d] == -1 && PyErr_Occurred()) goto out;
            stride *= t.shape[d] > 0 ? t.shape[d] : 1;
        }
    }
    cap = tpy_dlpack_capsule(owner, &t, dev_type, versioned, readonly);
out:
    Py_XDECREF(fast);
    Py_XDECREF(sfast);
    return cap;
}

/* tensor_copy(dst, src): dst[...] = src, any two arrays of one shape and dtype (host or GPU) */
static PyObject *py_tensor_copy(PyObject *m, PyObject *args)
{
    PyObject *d, *s;
    tp_status st;
    tpy_arg a[2];
    if (!PyArg_ParseTuple(args, "OO", &d, &s)) return NULL;
    memset(a, 0, sizeof a);
    a[0].obj = d;
    a[0].writable = 1;
    a[0].what = "destination";
    a[1].obj = s;
    a[1].what = "source";
    if (tpy_args_convert(a, 2) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS st = tp_tensor_copy(a[0].p, a[1].p);
    Py_END_ALLOW_THREADS
    tpy_args_release(a, 2);
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

/* tensor_info(obj, writable=False) -> dict: how tplinear sees an array argument (for tests/debugging) */
static PyObject *py_tensor_info(PyObject *m, PyObject *args)
{
    PyObject *obj, *shape = NULL, *strides = NULL, *res = NULL;
    int writable = 0;
    tp_tensor t;
    tpy_view v;
    (void)m;
    if (!PyArg_ParseTuple(args, "O|p", &obj, &writable)) return NULL;
    if (tpy_tensor(obj, &t, &v, writable, "array") < 0) return NULL;
    shape = PyTuple_New(t.ndim);
    strides = PyTuple_New(t.ndim);
    if (shape && strides) {
        for (int d = 0; d < t.ndim; d++) {
            PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(t.shape[d]));
            PyTuple_SET_ITEM(strides, d, PyLong_FromLongLong(t.strides[d]));
        }
        res = Py_BuildValue("{s:N,s:s,s:O,s:O,s:(si)}", "data", PyLong_FromVoidPtr(t.data), "dtype",
                            tp_dtype_name(t.dtype), "shape", shape, "strides", strides, "device",
                            t.device.type == TP_DEVICE_CUDA ? "cuda" : "cpu", t.device.index);
    }
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    tpy_view_release(&v);
    return res;
}

PyMethodDef tpy_device_methods[] = {
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS, "cuda_device_count() -> int"},
    {"cuda_get_stream", py_cuda_get_stream, METH_VARARGS,
     "cuda_get_stream(device=-1) -> int: the stream of a device (-1: the current one; 0: legacy default stream)"},
    {"cuda_set_stream", py_cuda_set_stream, METH_VARARGS, "cuda_set_stream(ptr|None, device=-1)"},
    {"cuda_stream_order", py_cuda_stream_order, METH_VARARGS,
     "cuda_stream_order(device, other, other_waits): event-order the current stream and another"},
    {"cuda_synchronize", py_cuda_synchronize, METH_VARARGS, "cuda_synchronize(device=0)"},
    {"cuda_set_allow_tf32", py_cuda_set_allow_tf32, METH_O, "cuda_set_allow_tf32(bool)"},
    {"cuda_get_allow_tf32", py_cuda_get_allow_tf32, METH_NOARGS, "cuda_get_allow_tf32() -> bool"},
    {"dlpack_export", py_dlpack_export, METH_VARARGS,
     "dlpack_export(owner, ptr, device_type, device_id, dtype, shape, versioned, read_only) -> capsule"},
    {"tensor_copy", py_tensor_copy, METH_VARARGS, "tensor_copy(dst, src): copy between any two arrays (host or GPU)"},
    {"tensor_info", py_tensor_info, METH_VARARGS, "tensor_info(obj, writable=False) -> dict"},
    {NULL, NULL, 0, NULL},
};
