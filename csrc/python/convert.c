/* Python objects <-> tp_tensor, and tp_status -> Python exceptions. */
#include <string.h>

#include "py.h"

void tpy_view_release(tpy_view *view)
{
    if (view->has_buf) PyBuffer_Release(&view->buf);
    view->has_buf = 0;
    if (view->owner) {
        if (view->release) view->release(view->owner);
        Py_CLEAR(view->owner);
    }
}

/* obj's bytes as a uint16 array (obj.view("uint16"), the same memory) when obj is an array of ml_dtypes'
 * bfloat16 (dtype.name "bfloat16", 2-byte items: NumPy exports no buffer for its dtype), else None; NULL on
 * error. */
static PyObject *bfloat16_bits(PyObject *obj)
{
    PyObject *dtype = NULL, *name = NULL, *size = NULL, *out = Py_None;
    Py_INCREF(out);
    if ((dtype = PyObject_GetAttrString(obj, "dtype")) == NULL || (name = PyObject_GetAttrString(dtype, "name")) == NULL ||
        (size = PyObject_GetAttrString(dtype, "itemsize")) == NULL) {
        PyErr_Clear(); /* not an array with a dtype: None */
        goto out;
    }
    if (PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "bfloat16") == 0 && PyLong_Check(size) &&
        PyLong_AsLong(size) == 2) {
        Py_DECREF(out);
        out = PyObject_CallMethod(obj, "view", "s", "uint16");
    }
out:
    Py_XDECREF(dtype);
    Py_XDECREF(name);
    Py_XDECREF(size);
    return out;
}

/* obj's buffer into b; an ml_dtypes bfloat16 array's through its uint16 view (*bf16 = 1; the buffer holds the
 * view). A TypeError naming what otherwise. */
static int export_buffer(PyObject *obj, Py_buffer *b, int writable, const char *what, int *bf16)
{
    int flags = (writable ? PyBUF_WRITABLE : 0) | PyBUF_RECORDS_RO, rc = -1;
    PyObject *type = NULL, *value = NULL, *tb = NULL, *bits = NULL;
    *bf16 = 0;
    if (PyObject_GetBuffer(obj, b, flags) == 0) return 0;
    PyErr_Fetch(&type, &value, &tb);
    if ((bits = bfloat16_bits(obj)) == NULL) goto out;
    if (bits == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s must be a %sarray with a numeric dtype: %S", what,
                     writable ? "writable " : "", value ? value : Py_None);
        goto out;
    }
    if (PyObject_GetBuffer(bits, b, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a %sbfloat16 array", what, writable ? "writable " : "");
        goto out;
    }
    *bf16 = 1;
    rc = 0;
out:
    Py_XDECREF(bits);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return rc;
}

int tpy_tensor(PyObject *obj, tp_tensor *t, tpy_view *view, int writable, const char *what)
{
    Py_buffer *b = &view->buf;
    int handled, bf16;
    const tp_dtype_info *info;
    memset(view, 0, sizeof *view);
    memset(t, 0, sizeof *t);
    if (tpy_array_check(obj)) { /* our own GPU arrays: no protocol; the stream of their last use */
        if (tpy_array_use(obj) < 0) return -1;
        *t = *tpy_array_tensor(obj);
        view->owner = obj;
        Py_INCREF(obj);
        return 0;
    }
    if (!PyObject_CheckBuffer(obj)) {
        handled = tpy_device_tensor(obj, t, view, writable, what);
        if (handled != 0) return handled > 0 ? 0 : -1;
        PyErr_Format(PyExc_TypeError, "%s must be an array (NumPy, or a DLPack / CUDA array), got %.100s",
                     what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (export_buffer(obj, b, writable, what, &bf16) < 0) return -1;
    view->has_buf = 1;
    if ((info = bf16 ? tp_dtype_info_of(TP_BFLOAT16) : tp_dtype_by_format(b->format, (size_t)b->itemsize)) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 or float64 (layers and collectives), or int32 or "
                     "int64 (collectives), got an array of format '%s'", what, b->format ? b->format : "B");
        goto fail;
    }
    t->dtype = info->dtype;
    if (b->ndim > TP_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s has %d dimensions, at most %d are supported", what, b->ndim, TP_MAX_DIMS);
        goto fail;
    }
    t->data = b->buf;
    t->ndim = b->ndim;
    t->device.type = TP_DEVICE_CPU;
    for (int d = 0; d < b->ndim; d++) {
        t->shape[d] = b->shape[d];
        if (b->strides[d] % b->itemsize != 0) {
            PyErr_Format(PyExc_ValueError, "%s has a stride that is not a multiple of its item size", what);
            goto fail;
        }
        t->strides[d] = b->strides[d] / b->itemsize;
    }
    return 0;
fail:
    tpy_view_release(view);
    return -1;
}

int tpy_tensor_opt(PyObject *obj, tp_tensor *t, tp_tensor **tp, tpy_view *view, int writable, const char *what)
{
    memset(view, 0, sizeof *view);
    if (obj == Py_None) {
        *tp = NULL;
        return 0;
    }
    *tp = t;
    return tpy_tensor(obj, t, view, writable, what);
}

PyObject *tpy_raise(PyObject *module, tp_status st)
{
    tpy_state *state = PyModule_GetState(module);
    PyObject *type;
    switch (st) {
    case TP_ERR_VALUE: type = PyExc_ValueError; break;
    case TP_ERR_TYPE: type = PyExc_TypeError; break;
    case TP_ERR_NOMEM: type = PyExc_MemoryError; break;
    case TP_ERR_COMM:
    case TP_ERR_TIMEOUT: type = state->comm_error; break;
    case TP_ERR_UNSUPPORTED: type = PyExc_NotImplementedError; break;
    case TP_ERR_SYSTEM: type = PyExc_OSError; break;
    case TP_ERR_INTERRUPTED:
        if (state->interrupt[0] != NULL) { /* the signal handler's own exception (KeyboardInterrupt, ...) */
            PyErr_Restore(state->interrupt[0], state->interrupt[1], state->interrupt[2]);
            state->interrupt[0] = state->interrupt[1] = state->interrupt[2] = NULL;
            return NULL;
        }
        type = PyExc_KeyboardInterrupt;
        break;
    default: type = PyExc_RuntimeError; break;
    }
    PyErr_SetString(type, tp_last_error());
    return NULL;
}

int tpy_args_convert(tpy_arg *a, int n)
{
    for (int i = 0; i < n; i++) {
        int rc = a[i].optional ? tpy_tensor_opt(a[i].obj, &a[i].t, &a[i].p, &a[i].v, a[i].writable, a[i].what)
                               : tpy_tensor(a[i].obj, &a[i].t, &a[i].v, a[i].writable, a[i].what);
        if (!a[i].optional) a[i].p = &a[i].t;
        if (rc < 0) {
            tpy_args_release(a, i);
            return -1;
        }
    }
    return 0;
}

void tpy_args_release(tpy_arg *a, int n)
{
    for (int i = 0; i < n; i++) tpy_view_release(&a[i].v);
}
