/* The extension's shared pieces: module state, object <-> tp_tensor conversion, error mapping.
 * Binding code only parses arguments and maps errors; all logic lives in the C core. */
#ifndef TP_PY_H
#define TP_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "tplinear.h"

typedef struct {
    PyObject *comm_error; /* tplinear.CommError */
    PyTypeObject *group_type;
} tpy_state;

/* What keeps a converted object's memory alive; release with tpy_view_release. */
typedef struct {
    Py_buffer buf;
    int has_buf;
    PyObject *owner; /* a DLPack capsule or other keeper */
    void (*release)(PyObject *owner);
} tpy_view;

/* obj (buffer protocol: NumPy and friends; or a DLPack / __cuda_array_interface__ producer) as a
 * tp_tensor. writable asks for a writable buffer. what names the argument in error messages.
 * Returns 0, or -1 with a Python exception set. */
int tpy_tensor(PyObject *obj, tp_tensor *t, tpy_view *view, int writable, const char *what);
/* Same, with None allowed (t set to NULL through *tp). */
int tpy_tensor_opt(PyObject *obj, tp_tensor *t, tp_tensor **tp, tpy_view *view, int writable, const char *what);
void tpy_view_release(tpy_view *view);

/* A batch of array arguments converted together: p points at t, or is NULL for an optional None. */
typedef struct {
    PyObject *obj;
    int writable;
    int optional;
    const char *what;
    tp_tensor t;
    tp_tensor *p;
    tpy_view v;
} tpy_arg;
/* Converts a[0..n); on failure releases what was converted and returns -1 with the exception set. */
int tpy_args_convert(tpy_arg *a, int n);
void tpy_args_release(tpy_arg *a, int n);
/* The DLPack / CUDA-array-interface branch (csrc/python/dlpack.c). Returns 1 if obj was handled
 * (0 if it is not such a producer), -1 with an exception. */
int tpy_device_tensor(PyObject *obj, tp_tensor *t, tpy_view *view, int writable, const char *what);

/* Sets the Python exception for a failed status and returns NULL. */
PyObject *tpy_raise(PyObject *module, tp_status st);

/* The Group type: owns a tp_group*. */
typedef struct {
    PyObject_HEAD
    tp_group *g;
    PyObject *parent; /* keeps the parent group (and its bootstrap store) alive */
    int busy;         /* calls running on g without the GIL (guarded by the GIL) */
} tpy_group;
int tpy_group_register(PyObject *module, tpy_state *state);
/* obj must be a Group; returns its handle or NULL with TypeError. */
tp_group *tpy_group_get(PyObject *module, PyObject *obj);
PyObject *tpy_group_wrap(PyObject *module, tp_group *g, PyObject *parent);
/* Runs fn(module, args) with args[0], when it is a Group, counted busy: destroy from another thread then
 * aborts the group (the running call returns a CommError at once) and frees it only after the call has
 * returned, never under it. Every binding that releases the GIL with a group goes through it
 * (TPY_IN_GROUP). */
PyObject *tpy_group_call(PyObject *module, PyObject *args, PyObject *(*fn)(PyObject *, PyObject *));
#define TPY_IN_GROUP(fn) \
    static PyObject *fn##_in_group(PyObject *m, PyObject *a) { return tpy_group_call(m, a, fn); }
/* destroy(group): frees the group's handle at once, or after the calls running on it have returned. */
PyObject *tpy_group_destroy(PyObject *module, PyObject *obj);

extern PyMethodDef tpy_comm_methods[];
extern PyMethodDef tpy_core_methods[];
extern PyMethodDef tpy_device_methods[]; /* device.c: GPU memory, streams, DLPack out */

#endif
