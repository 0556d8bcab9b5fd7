/* Device arrays in: DLPack (__dlpack__ / __dlpack_device__, versioned and unversioned capsules) and
 * the CUDA Array Interface (v2 / v3), zero-copy.
 *
 * Streams: GPU work runs on tplinear's current stream (tp_cuda_get_stream; NULL is the legacy default
 * stream, DLPack's stream 1). A DLPack producer is given that stream, as the protocol says, and orders
 * its pending work before it; a __cuda_array_interface__ producer names its own stream, and we make
 * ours wait for it with an event (no host synchronisation). */
#include <string.h>

#include "dlpack_h.h"
#include "py.h"

/* ---------------------------------------------------------------- helpers */

PyObject *tpy_protocol_stream(int device)
{
    void *s = tp_cuda_get_stream(device);
    return PyLong_FromVoidPtr(s ? s : (void *)1);
}

/* Runs the producer's deleter of a consumed capsule. It may run while an error is pending (a later
 * argument's check failed and the views of the earlier ones are released): that error is kept, and one the
 * release itself raises is dropped (a deleter has no way to report it). */
static void dl_release(PyObject *cap)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (PyCapsule_IsValid(cap, "used_dltensor_versioned")) {
        tp_DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "used_dltensor_versioned");
        if (m && m->deleter) m->deleter(m);
    } else if (PyCapsule_IsValid(cap, "used_dltensor")) {
        tp_DLManagedTensor *m = PyCapsule_GetPointer(cap, "used_dltensor");
        if (m && m->deleter) m->deleter(m);
    }
    PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* Fills t from a DLTensor; 0, or -1 with an exception. */
static int fill_from_dl(const tp_DLTensor *dl, tp_tensor *t, const char *what)
{
    const tp_dtype_info *info = tp_dtype_by_dlpack(dl->dtype.code, dl->dtype.bits, dl->dtype.lanes);
    if (info == NULL) {
        PyObject *names = tpy_dtype_list(0);
        if (names)
            PyErr_Format(PyExc_TypeError, "%s: unsupported DLPack dtype (code %d, %d bits, %d lanes); tplinear takes %U",
                         what, dl->dtype.code, dl->dtype.bits, dl->dtype.lanes, names);
        Py_XDECREF(names);
        return -1;
    }
    t->dtype = info->dtype;
    if (dl->ndim < 0 || dl->ndim > TP_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s has %d dimensions, at most %d are supported", what, (int)dl->ndim,
                     TP_MAX_DIMS);
        return -1;
    }
    switch (dl->device.device_type) {
    case TP_kDLCPU:
    case TP_kDLCUDAHost:
        t->device.type = TP_DEVICE_CPU;
        t->device.index = 0;
        break;
    case TP_kDLCUDA:
    case TP_kDLCUDAManaged:
        t->device.type = TP_DEVICE_CUDA;
        t->device.index = dl->device.device_id;
        break;
    default:
        PyErr_Format(PyExc_TypeError, "%s is on DLPack device type %d; tplinear takes CPU and CUDA arrays", what,
                     (int)dl->device.device_type);
        return -1;
    }
    t->ndim = dl->ndim;
    t->data = (char *)dl->data + dl->byte_offset;
    {
        int64_t stride = 1;
        for (int d = dl->ndim - 1; d >= 0; d--) {
            t->shape[d] = dl->shape[d];
            t->strides[d] = dl->strides ? dl->strides[d] : stride;
            stride *= dl->shape[d] > 0 ? dl->shape[d] : 1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- DLPack */

static int from_dlpack(PyObject *obj, tp_tensor *t, tpy_view *view, int writable, const char *what)
{
    PyObject *dev = NULL, *stream = NULL, *kwargs = NULL, *fn = NULL, *cap = NULL, *empty = NULL;
    long dev_type = 0, dev_id = 0;
    int rc = -1;
    dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (dev == NULL) goto out;
    if (!PyArg_ParseTuple(dev, "ll", &dev_type, &dev_id)) {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack_device__() must return (device_type, device_id)", what);
        goto out;
    }
    if (dev_type == TP_kDLCUDA || dev_type == TP_kDLCUDAManaged) {
        stream = tpy_protocol_stream((int)dev_id);
    } else {
        stream = Py_None;
        Py_INCREF(stream);
    }
    if (stream == NULL || (fn = PyObject_GetAttrString(obj, "__dlpack__")) == NULL || (empty = PyTuple_New(0)) == NULL)
        goto out;
    /* DLPack >= 2023.12: ask for a versioned capsule; older producers reject max_version */
    kwargs = Py_BuildValue("{s:O,s:(ii)}", "stream", stream, "max_version", TP_DLPACK_MAJOR, TP_DLPACK_MINOR);
    if (kwargs == NULL) goto out;
    cap = PyObject_Call(fn, empty, kwargs);
    if (cap == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        Py_DECREF(kwargs);
        kwargs = Py_BuildValue("{s:O}", "stream", stream);
        if (kwargs == NULL) goto out;
        cap = PyObject_Call(fn, empty, kwargs);
        if (cap == NULL && stream == Py_None && PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            cap = PyObject_CallNoArgs(fn);
        }
    }
    if (cap == NULL) goto out;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        tp_DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m == NULL) goto out;
        if (m->version.major != TP_DLPACK_MAJOR) {
            PyErr_Format(PyExc_BufferError, "%s: DLPack version %u.%u is not supported (tplinear reads %d.x)", what,
                         m->version.major, m->version.minor, TP_DLPACK_MAJOR);
            goto out; /* unconsumed: the capsule's own destructor frees it */
        }
        if (writable && (m->flags & TP_DLPACK_FLAG_READ_ONLY)) {
            PyErr_Format(PyExc_ValueError, "%s must be writable, but the DLPack producer marked it read-only", what);
            goto out;
        }
        if (fill_from_dl(&m->dl_tensor, t, what) < 0) goto out;
        if (PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) goto out;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        tp_DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        if (m == NULL) goto out;
        if (fill_from_dl(&m->dl_tensor, t, what) < 0) goto out;
        if (PyCapsule_SetName(cap, "used_dltensor") < 0) goto out;
    } else {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__() returned %.100s, not a DLPack capsule", what,
                     Py_TYPE(cap)->tp_name);
        goto out;
    }
    if ((t->device.type == TP_DEVICE_CUDA) != (dev_type == TP_kDLCUDA || dev_type == TP_kDLCUDAManaged)) {
        /* the capsule is ours now: release it through the deleter */
        view->owner = cap;
        view->release = dl_release;
        cap = NULL;
        tpy_view_release(view);
        PyErr_Format(PyExc_ValueError, "%s: __dlpack_device__() and the capsule disagree on the device", what);
        goto out;
    }
    view->owner = cap; /* consumed: released through the deleter by tpy_view_release */
    view->release = dl_release;
    cap = NULL;
    rc = 1;
out:
    Py_XDECREF(dev);
    Py_XDECREF(stream);
    Py_XDECREF(kwargs);
    Py_XDECREF(fn);
    Py_XDECREF(cap);
    Py_XDECREF(empty);
    return rc;
}

/* ---------------------------------------------------------------- __cuda_array_interface__ */

static int from_cai(PyObject *obj, PyObject *cai, tp_tensor *t, tpy_view *view, int writable, const char *what)
{
    PyObject *shape, *typestr, *data, *strides, *mask, *stream, *version;
    const tp_dtype_info *info;
    void *ptr, *producer = NULL;
    int readonly = 0, dev = 0;
    Py_ssize_t nd;
    size_t item;
    if (!PyDict_Check(cai)) {
        PyErr_Format(PyExc_TypeError, "%s: __cuda_array_interface__ must be a dict", what);
        return -1;
    }
    shape = PyDict_GetItemString(cai, "shape");
    typestr = PyDict_GetItemString(cai, "typestr");
    data = PyDict_GetItemString(cai, "data");
    strides = PyDict_GetItemString(cai, "strides");
    mask = PyDict_GetItemString(cai, "mask");
    stream = PyDict_GetItemString(cai, "stream");
    version = PyDict_GetItemString(cai, "version");
    if (shape == NULL || typestr == NULL || data == NULL || version == NULL || !PyTuple_Check(shape) ||
        !PyUnicode_Check(typestr) || !PyTuple_Check(data) || PyTuple_GET_SIZE(data) != 2) {
        PyErr_Format(PyExc_TypeError,
                     "%s: __cuda_array_interface__ needs shape (tuple), typestr (str), data ((ptr, read_only)) "
                     "and version", what);
        return -1;
    }
    if (mask != NULL && mask != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: masked CUDA arrays are not supported", what);
        return -1;
    }
    info = tp_dtype_by_typestr(PyUnicode_AsUTF8(typestr));
    if (info == NULL) {
        PyObject *names;
        PyErr_Clear();
        if ((names = tpy_dtype_list(1)) != NULL)
            PyErr_Format(PyExc_TypeError, "%s: unsupported typestr %R (tplinear takes %U)", what, typestr, names);
        Py_XDECREF(names);
        return -1;
    }
    t->dtype = info->dtype;
    item = info->itemsize;
    ptr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(data, 0));
    if (ptr == NULL && PyErr_Occurred()) return -1;
    readonly = PyObject_IsTrue(PyTuple_GET_ITEM(data, 1));
    if (readonly < 0) return -1;
    if (writable && readonly) {
        PyErr_Format(PyExc_ValueError, "%s must be writable, but its __cuda_array_interface__ is read-only", what);
        return -1;
    }
    nd = PyTuple_GET_SIZE(shape);
    if (nd > TP_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s has %zd dimensions, at most %d are supported", what, nd, TP_MAX_DIMS);
        return -1;
    }
    if (strides != NULL && strides != Py_None && (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != nd)) {
        PyErr_Format(PyExc_ValueError, "%s: __cuda_array_interface__ strides must be None or a tuple of %zd", what, nd);
        return -1;
    }
    t->ndim = (int)nd;
    t->data = ptr;
    {
        int64_t stride = 1;
        for (Py_ssize_t d = nd - 1; d >= 0; d--) {
            long long s = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
            if (s == -1 && PyErr_Occurred()) return -1;
            t->shape[d] = s;
            if (strides != NULL && strides != Py_None) {
                long long b = PyLong_AsLongLong(PyTuple_GET_ITEM(strides, d));
                if (b == -1 && PyErr_Occurred()) return -1;
                if (b % (long long)item != 0) {
                    PyErr_Format(PyExc_ValueError, "%s has a stride that is not a multiple of its item size", what);
                    return -1;
                }
                t->strides[d] = b / (long long)item;
            } else {
                t->strides[d] = stride;
            }
            stride *= s > 0 ? s : 1;
        }
    }
    /* v3 stream 0 is disallowed: refused with the other metadata, before CUDA is asked about the pointer */
    if (stream != NULL && stream != Py_None) {
        producer = PyLong_AsVoidPtr(stream);
        if (producer == NULL && PyErr_Occurred()) return -1;
        if (producer == NULL) {
            PyErr_Format(PyExc_ValueError, "%s: __cuda_array_interface__ stream 0 is ambiguous and disallowed by the "
                         "protocol (use 1 for the legacy default stream, 2 for per-thread)", what);
            return -1;
        }
    }
    /* the protocol does not name the device: ask CUDA where the pointer lives */
    if (ptr != NULL) {
        if (tp_cuda_pointer_device(ptr, &dev) != TP_OK) {
            dev = 0; /* no CUDA here: the first use of the array reports that */
            tp_clear_error();
        } else if (dev < 0) {
            PyErr_Format(PyExc_ValueError, "%s: its __cuda_array_interface__ points at host memory, not GPU memory", what);
            return -1;
        }
    }
    t->device.type = TP_DEVICE_CUDA;
    t->device.index = dev;
    /* v3 stream: None / absent = nothing to order; else make our stream wait for it */
    if (producer != NULL) {
        void *mine = tp_cuda_get_stream(dev);
        if (producer != (mine ? mine : (void *)1)) {
            tp_status st = tp_cuda_stream_order(dev, producer, 0);
            if (st != TP_OK) {
                PyErr_Format(PyExc_RuntimeError, "%s: could not order the producer's stream: %s", what, tp_last_error());
                return -1;
            }
        }
    }
    view->owner = obj;
    Py_INCREF(obj);
    view->release = NULL;
    return 1;
}

/* ---------------------------------------------------------------- entry point */

/* torch refuses to export a tensor that requires grad (BufferError: "use tensor.detach()"); its detach()
 * shares the memory, so that is what is read. Returns obj.detach() when the pending error is that refusal
 * of such an object, else NULL with the pending error kept. */
static PyObject *detached_of(PyObject *obj)
{
    PyObject *type, *value, *tb, *flag = NULL, *out = NULL;
    int requires_grad = 0;
    if (!PyErr_ExceptionMatches(PyExc_BufferError)) return NULL;
    PyErr_Fetch(&type, &value, &tb);
    if ((flag = PyObject_GetAttrString(obj, "requires_grad")) != NULL) requires_grad = PyObject_IsTrue(flag);
    if (requires_grad == 1) out = PyObject_CallMethod(obj, "detach", NULL);
    if (out == NULL) {
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
    } else {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
    Py_XDECREF(flag);
    return out;
}

int tpy_device_tensor(PyObject *obj, tp_tensor *t, tpy_view *view, int writable, const char *what)
{
    PyObject *cai;
    int rc;
    if (PyObject_HasAttrString(obj, "__dlpack__")) {
        if (!PyObject_HasAttrString(obj, "__dlpack_device__")) {
            PyErr_Format(PyExc_TypeError, "%s: %.100s has __dlpack__ but no __dlpack_device__", what,
                         Py_TYPE(obj)->tp_name);
            return -1;
        }
        PyObject *detached = NULL;
        rc = from_dlpack(obj, t, view, writable, what);
        if (rc < 0 && (detached = detached_of(obj)) != NULL) {
            rc = from_dlpack(detached, t, view, writable, what); /* the capsule keeps the tensor alive */
            Py_DECREF(detached);
        }
        if (rc < 0) memset(t, 0, sizeof *t);
        return rc;
    }
    cai = PyObject_GetAttrString(obj, "__cuda_array_interface__");
    if (cai == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return 0;
    }
    rc = from_cai(obj, cai, t, view, writable, what);
    Py_DECREF(cai);
    if (rc < 0) {
        tpy_view_release(view);
        memset(t, 0, sizeof *t);
    }
    return rc;
}
