/* The extension's shared pieces: module state, object <-> tp_tensor conversion, error mapping.
 * Binding code only parses arguments and maps errors; all logic lives in the C core. */
#ifndef TP_PY_H
#define TP_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../core/dtype.h"
#include "tplinear.h"

typedef struct {
    PyObject *comm_error; /* tplinear.CommError */
    PyTypeObject *group_type;
    PyTypeObject *array_type;  /* DeviceArray (array.c) */
    PyTypeObject *bf16_type;   /* the type of the bfloat16 dtype object (dtypes.c) */
    PyObject *numpy;           /* the numpy module */
    PyObject *dtypes[TP_DTYPE_COUNT]; /* per tp_dtype: its NumPy dtype, or the bfloat16 object */
    unsigned long main_thread;        /* where Python runs signal handlers: the only thread the hook acts on */
    PyObject *interrupt[3];           /* what a signal handler raised in a wait (type, value, traceback):
                                         tpy_raise re-raises it for TP_ERR_INTERRUPTED (main thread only) */
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
/* tplinear's current stream as the integer the DLPack / CAI protocols use (1: the legacy default). */
PyObject *tpy_protocol_stream(int device);

/* Sets the Python exception for a failed status and returns NULL. */
PyObject *tpy_raise(PyObject *module, tp_status st);

/* Array arguments of a binding (tpy_arg initialisers): read, written, optional (None allowed). */
#define TPY_ARR(o, w) {.obj = (o), .what = (w)}
#define TPY_OUT(o, w) {.obj = (o), .writable = 1, .what = (w)}
#define TPY_OPT(o, w) {.obj = (o), .optional = 1, .what = (w)}
#define TPY_OPT_OUT(o, w) {.obj = (o), .writable = 1, .optional = 1, .what = (w)}
#define TPY_NARGS(a) ((int)(sizeof(a) / sizeof((a)[0])))
/* A binding's assign=True/False as the C core's gradient mode. */
#define TPY_GRAD_MODE(assign) ((assign) ? TP_GRAD_ASSIGN : TP_GRAD_ACCUMULATE)

/* Converts the arguments a, runs `call` (an expression using a[i].p) without the GIL and maps its status. */
#define TPY_CALL_RELEASED(module, a, call)              \
    do {                                                \
        tp_status st_;                                  \
        if (tpy_args_convert((a), TPY_NARGS(a)) < 0) return NULL; \
        Py_BEGIN_ALLOW_THREADS st_ = (call);            \
        Py_END_ALLOW_THREADS tpy_args_release((a), TPY_NARGS(a)); \
        if (st_ != TP_OK) return tpy_raise((module), st_);    \
        Py_RETURN_NONE;                                 \
    } while (0)

/* A sequence of (offset, size) pairs as a new tp_range array of *n entries, a multiple of nblocks
 * (NULL + exception on failure; free with PyMem_Free). what starts the messages. */
tp_range *tpy_range_list(PyObject *seq, int nblocks, Py_ssize_t *n, const char *what);

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

/* ---------------------------------------------------------------- dtypes (dtypes.c) */

/* The state of the module that defined type (array methods, classmethods). */
tpy_state *tpy_state_of_type(PyTypeObject *type);
/* Registers the bfloat16 object and fills state->dtypes; 0 or -1 with an exception. */
int tpy_dtypes_register(PyObject *module, tpy_state *state);
/* A dtype from a name ("float32", "half", "torch.bfloat16"), a NumPy dtype or scalar type, a torch dtype
 * or the bfloat16 object; 0, or -1 with TypeError naming what is accepted. */
int tpy_dtype_from_object(tpy_state *state, PyObject *obj, tp_dtype *dt);
/* "float32, float64, ..." (which = 0: names; 1: typestrs), for error messages; NULL with an exception. */
PyObject *tpy_dtype_list(int which);

/* ---------------------------------------------------------------- DeviceArray (array.c) */

int tpy_array_register(PyObject *module, tpy_state *state);
/* 1 if obj is a DeviceArray (its memory and layout are read without any protocol), else 0. */
int tpy_array_check(PyObject *obj);
const tp_tensor *tpy_array_tensor(PyObject *obj);
/* Before tplinear uses a DeviceArray on the current stream: orders it after the stream the allocation was
 * last used on, and records this one (0, or -1 with an exception). */
int tpy_array_use(PyObject *obj);
/* A GPU index from None / "cuda" (this process's GPU: local rank modulo the visible GPUs), "cuda:N", N
 * or a torch.device; 0, or -1 with an exception. */
int tpy_device_index(PyObject *obj, int *device);

/* A DLPack capsule ("dltensor_versioned" or "dltensor") describing t, which keeps owner alive until the
 * consumer's deleter runs (device.c). */
PyObject *tpy_dlpack_capsule(PyObject *owner, const tp_tensor *t, int dl_device_type, int versioned, int read_only);

extern PyMethodDef tpy_comm_methods[];
extern PyMethodDef tpy_core_methods[];
extern PyMethodDef tpy_device_methods[]; /* device.c: streams, DLPack out, copies */
extern PyMethodDef tpy_dtype_methods[];  /* dtypes.c: the dtype table, bfloat16 conversions */
extern PyMethodDef tpy_array_methods[];  /* array.c: device_index */
extern PyMethodDef tpy_sequence_methods[]; /* sequence.c: sequence- and vocabulary-parallel layers */

#endif
