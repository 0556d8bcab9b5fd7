/* Bindings of the GPU runtime pieces used by tplinear._device (device arrays) and DLPack export.
 * Pointers cross into Python as ints; the memory itself is owned by capsules that free it. */
#include <stdlib.h>
#include <string.h>

#include "dlpack_h.h"
#include "py.h"

#define MEM_CAPSULE "tplinear.cuda_memory"

static PyObject *raise_st(PyObject *m, tp_status st) { return tpy_raise(m, st); }

/* ---------------------------------------------------------------- memory */

static void mem_destructor(PyObject *cap)
{
    void *ptr = PyCapsule_GetPointer(cap, MEM_CAPSULE);
    int device = (int)(intptr_t)PyCapsule_GetContext(cap);
    if (ptr) (void)tp_cuda_free(device, ptr); /* errors at teardown have nowhere to go */
    PyErr_Clear();
}

/* cuda_malloc(device, nbytes) -> (owner capsule, ptr) */
static PyObject *py_cuda_malloc(PyObject *m, PyObject *args)
{
    int device;
    Py_ssize_t nbytes;
    void *ptr = NULL;
    tp_status st;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "in", &device, &nbytes)) return NULL;
    if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, got %zd", nbytes);
    Py_BEGIN_ALLOW_THREADS st = tp_cuda_malloc(device, (size_t)nbytes, &ptr);
    Py_END_ALLOW_THREADS
    if (st != TP_OK) return raise_st(m, st);
    cap = PyCapsule_New(ptr, MEM_CAPSULE, mem_destructor);
    if (cap == NULL || PyCapsule_SetContext(cap, (void *)(intptr_t)device) < 0) {
        if (cap == NULL) tp_cuda_free(device, ptr);
        Py_XDECREF(cap);
        return NULL;
    }
    return Py_BuildValue("(NN)", cap, PyLong_FromVoidPtr(ptr));
}

/* cuda_upload(device, dst_ptr, src) : host buffer (C-contiguous) -> device */
static PyObject *py_cuda_upload(PyObject *m, PyObject *args)
{
    int device;
    PyObject *dst_obj;
    Py_buffer src;
    void *dst;
    tp_status st;
    if (!PyArg_ParseTuple(args, "iOy*", &device, &dst_obj, &src)) return NULL;
    dst = PyLong_AsVoidPtr(dst_obj);
    if (dst == NULL && PyErr_Occurred()) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS st = tp_cuda_memcpy(device, dst, src.buf, (size_t)src.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

/* cuda_download(device, dst, src_ptr) : device -> writable host buffer (C-contiguous) */
static PyObject *py_cuda_download(PyObject *m, PyObject *args)
{
    int device;
    PyObject *src_obj;
    Py_buffer dst;
    void *src;
    tp_status st;
    if (!PyArg_ParseTuple(args, "iw*O", &device, &dst, &src_obj)) return NULL;
    src = PyLong_AsVoidPtr(src_obj);
    if (src == NULL && PyErr_Occurred()) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS st = tp_cuda_memcpy(device, dst.buf, src, (size_t)dst.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dst);
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

/* cuda_copy(device, dst_ptr, src_ptr, nbytes) : device -> device, stream-ordered */
static PyObject *py_cuda_copy(PyObject *m, PyObject *args)
{
    int device;
    PyObject *d, *s;
    Py_ssize_t n;
    void *dst, *src;
    tp_status st;
    if (!PyArg_ParseTuple(args, "iOOn", &device, &d, &s, &n)) return NULL;
    dst = PyLong_AsVoidPtr(d);
    src = PyLong_AsVoidPtr(s);
    if (PyErr_Occurred()) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, got %zd", n);
    Py_BEGIN_ALLOW_THREADS st = tp_cuda_memcpy(device, dst, src, (size_t)n);
    Py_END_ALLOW_THREADS
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

/* cuda_zero(device, ptr, nbytes) */
static PyObject *py_cuda_zero(PyObject *m, PyObject *args)
{
    int device;
    PyObject *p;
    Py_ssize_t n;
    void *ptr;
    tp_status st;
    if (!PyArg_ParseTuple(args, "iOn", &device, &p, &n)) return NULL;
    ptr = PyLong_AsVoidPtr(p);
    if (ptr == NULL && PyErr_Occurred()) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "nbytes must be >= 0, got %zd", n);
    st = tp_cuda_memset_zero(device, ptr, (size_t)n);
    if (st != TP_OK) return raise_st(m, st);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- streams and options */

static PyObject *py_cuda_device_count(PyObject *m, PyObject *unused)
{
    (void)m; (void)unused;
    return PyLong_FromLong(tp_cuda_device_count());
}

static PyObject *py_cuda_get_stream(PyObject *m, PyObject *unused)
{
    (void)m; (void)unused;
    return PyLong_FromVoidPtr(tp_cuda_get_stream());
}

static PyObject *py_cuda_set_stream(PyObject *m, PyObject *arg)
{
    void *s = arg == Py_None ? NULL : PyLong_AsVoidPtr(arg);
    tp_status st;
    if (s == NULL && PyErr_Occurred()) return NULL;
    st = tp_cuda_set_stream(s);
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

static int dl_dtype(tp_dtype dt, tp_DLDataType *d)
{
    d->lanes = 1;
    d->bits = (uint8_t)(tp_dtype_size(dt) * 8);
    switch (dt) {
    case TP_FLOAT32: case TP_FLOAT64: case TP_FLOAT16: d->code = TP_kDLFloat; return 0;
    case TP_BFLOAT16: d->code = TP_kDLBfloat; return 0;
    case TP_INT32: case TP_INT64: d->code = TP_kDLInt; return 0;
    }
    return -1;
}

static int dtype_from_name(const char *name, tp_dtype *dt)
{
    for (int i = TP_FLOAT32; i <= TP_INT64; i++)
        if (strcmp(name, tp_dtype_name((tp_dtype)i)) == 0) {
            *dt = (tp_dtype)i;
            return 0;
        }
    PyErr_Format(PyExc_TypeError, "unknown dtype %s", name);
    return -1;
}

/* dlpack_export(owner, ptr, device_type, device_id, dtype_name, shape, versioned, read_only[, strides])
 * -> capsule; strides in elements (None: C-contiguous) */
static PyObject *py_dlpack_export(PyObject *m, PyObject *args)
{
    PyObject *owner, *ptr_obj, *shape_obj, *strides_obj = Py_None, *fast = NULL, *sfast = NULL, *cap = NULL;
    int dev_type, dev_id, versioned, readonly;
    const char *dtname;
    tp_dtype dt;
    void *ptr;
    export_block *blk = NULL;
    tp_DLTensor *dl;
    Py_ssize_t nd;
    (void)m;
    if (!PyArg_ParseTuple(args, "OOiisOpp|O", &owner, &ptr_obj, &dev_type, &dev_id, &dtname, &shape_obj, &versioned,
                          &readonly, &strides_obj))
        return NULL;
    if (dtype_from_name(dtname, &dt) < 0) return NULL;
    ptr = PyLong_AsVoidPtr(ptr_obj);
    if (ptr == NULL && PyErr_Occurred()) return NULL;
    if ((fast = PySequence_Fast(shape_obj, "shape must be a sequence of ints")) == NULL) return NULL;
    nd = PySequence_Fast_GET_SIZE(fast);
    if (nd > TP_MAX_DIMS) {
        Py_DECREF(fast);
        return PyErr_Format(PyExc_ValueError, "at most %d dimensions, got %zd", TP_MAX_DIMS, nd);
    }
    if (strides_obj != Py_None) {
        sfast = PySequence_Fast(strides_obj, "strides must be a sequence of ints");
        if (sfast == NULL || PySequence_Fast_GET_SIZE(sfast) != nd) {
            if (sfast) PyErr_Format(PyExc_ValueError, "strides must have %zd entries", nd);
            Py_DECREF(fast);
            Py_XDECREF(sfast);
            return NULL;
        }
    }
    blk = calloc(1, sizeof *blk);
    if (blk == NULL) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    dl = versioned ? &blk->u.versioned.dl_tensor : &blk->u.plain.dl_tensor;
    {
        int64_t stride = 1;
        for (Py_ssize_t d = nd - 1; d >= 0; d--) {
            long long s = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, d));
            if (s == -1 && PyErr_Occurred()) goto fail;
            blk->shape[d] = s;
            blk->strides[d] = stride;
            if (sfast) {
                blk->strides[d] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sfast, d));
                if (blk->strides[d] == -1 && PyErr_Occurred()) goto fail;
            }
            stride *= s > 0 ? s : 1;
        }
    }
    dl->data = ptr;
    dl->device.device_type = dev_type;
    dl->device.device_id = dev_id;
    dl->ndim = (int32_t)nd;
    dl_dtype(dt, &dl->dtype);
    dl->shape = blk->shape;
    dl->strides = blk->strides;
    dl->byte_offset = 0;
    Py_INCREF(owner);
    if (versioned) {
        blk->u.versioned.version.major = TP_DLPACK_MAJOR;
        blk->u.versioned.version.minor = TP_DLPACK_MINOR;
        blk->u.versioned.manager_ctx = owner;
        blk->u.versioned.deleter = versioned_deleter;
        blk->u.versioned.flags = readonly ? TP_DLPACK_FLAG_READ_ONLY : 0;
        cap = PyCapsule_New(&blk->u.versioned, "dltensor_versioned", export_capsule_destructor);
    } else {
        blk->u.plain.manager_ctx = owner;
        blk->u.plain.deleter = plain_deleter;
        cap = PyCapsule_New(&blk->u.plain, "dltensor", export_capsule_destructor);
    }
    if (cap == NULL) {
        Py_DECREF(owner);
        goto fail;
    }
    Py_DECREF(fast);
    Py_XDECREF(sfast);
    return cap;
fail:
    Py_XDECREF(fast);
    Py_XDECREF(sfast);
    free(blk);
    return NULL;
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
    {"cuda_malloc", py_cuda_malloc, METH_VARARGS, "cuda_malloc(device, nbytes) -> (owner, ptr), stream-ordered"},
    {"cuda_upload", py_cuda_upload, METH_VARARGS, "cuda_upload(device, dst_ptr, host_buffer)"},
    {"cuda_download", py_cuda_download, METH_VARARGS, "cuda_download(device, host_buffer, src_ptr)"},
    {"cuda_copy", py_cuda_copy, METH_VARARGS, "cuda_copy(device, dst_ptr, src_ptr, nbytes)"},
    {"cuda_zero", py_cuda_zero, METH_VARARGS, "cuda_zero(device, ptr, nbytes)"},
    {"cuda_get_stream", py_cuda_get_stream, METH_NOARGS, "cuda_get_stream() -> int (0: legacy default stream)"},
    {"cuda_set_stream", py_cuda_set_stream, METH_O, "cuda_set_stream(ptr|None)"},
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
