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

int tpy_tensor(PyObject *obj, tp_tensor *t, tpy_view *view, int writable, const char *what)
{
    Py_buffer *b = &view->buf;
    int handled;
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
    if (PyObject_GetBuffer(obj, b, (writable ? PyBUF_WRITABLE : 0) | PyBUF_RECORDS_RO) < 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(PyExc_TypeError, "%s must be a %sarray with a numeric dtype: %S", what,
                     writable ? "writable " : "", value ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    view->has_buf = 1;
    if ((info = tp_dtype_by_format(b->format, (size_t)b->itemsize)) == NULL) {
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
