/* The module tplinear._C: state (CommError, the Group and DeviceArray types, the dtype objects) and init. */
#include <time.h>

#include "py.h"

/* ---------------------------------------------------------------- Group */

static void group_dealloc(PyObject *self)
{
    tpy_group *g = (tpy_group *)self;
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    tp_group_destroy(g->g);
    g->g = NULL;
    Py_CLEAR(g->parent);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int group_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((tpy_group *)self)->parent);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int group_clear(PyObject *self)
{
    Py_CLEAR(((tpy_group *)self)->parent);
    return 0;
}

static PyObject *group_repr(PyObject *self)
{
    tp_group *g = ((tpy_group *)self)->g;
    if (g == NULL) return PyUnicode_FromString("<tplinear Group (destroyed)>");
    return PyUnicode_FromFormat("<tplinear Group rank %d of %d, backend %s>", tp_group_rank(g), tp_group_size(g),
                                tp_group_backend(g));
}

/* A group is a live connection to the other ranks: a copy of anything that holds one (copy.deepcopy of a
 * model, an EMA or evaluation copy) shares it, as torch's ProcessGroup does; pickling one is refused. */
static PyObject *group_copy(PyObject *self, PyObject *unused)
{
    (void)unused;
    Py_INCREF(self);
    return self;
}

static PyObject *group_deepcopy(PyObject *self, PyObject *memo)
{
    (void)memo;
    Py_INCREF(self);
    return self;
}

static PyObject *group_reduce(PyObject *self, PyObject *protocol)
{
    (void)self;
    (void)protocol;
    PyErr_SetString(PyExc_TypeError, "a tplinear process group cannot be pickled: it is a live connection to the "
                                     "other ranks of this job (copy.deepcopy shares it; another process makes its "
                                     "own with tplinear.distributed.init_process_group / new_group)");
    return NULL;
}

static PyMethodDef group_methods[] = {
    {"__copy__", group_copy, METH_NOARGS, "The group itself (a group is shared, never copied)."},
    {"__deepcopy__", group_deepcopy, METH_O, "The group itself (a group is shared, never copied)."},
    {"__reduce_ex__", group_reduce, METH_O, "Raises TypeError: a group cannot be pickled."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot group_slots[] = {
    {Py_tp_methods, group_methods},
    {Py_tp_dealloc, group_dealloc},
    {Py_tp_traverse, group_traverse},
    {Py_tp_clear, group_clear},
    {Py_tp_repr, group_repr},
    {Py_tp_doc, "A process group handle (made by tplinear.distributed)."},
    {0, NULL},
};

static PyType_Spec group_spec = {
    "tplinear._C.Group", sizeof(tpy_group), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, group_slots,
};

int tpy_group_register(PyObject *module, tpy_state *state)
{
    state->group_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &group_spec, NULL);
    if (state->group_type == NULL) return -1;
    Py_INCREF(state->group_type);
    if (PyModule_AddObject(module, "Group", (PyObject *)state->group_type) < 0) {
        Py_DECREF(state->group_type);
        return -1;
    }
    return 0;
}

tp_group *tpy_group_get(PyObject *module, PyObject *obj)
{
    tpy_state *state = PyModule_GetState(module);
    if (!PyObject_TypeCheck(obj, state->group_type)) {
        PyErr_Format(PyExc_TypeError, "expected a process group, got %.100s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (((tpy_group *)obj)->g == NULL) {
        PyErr_SetString(PyExc_ValueError, "the process group was destroyed");
        return NULL;
    }
    return ((tpy_group *)obj)->g;
}

PyObject *tpy_group_call(PyObject *module, PyObject *args, PyObject *(*fn)(PyObject *, PyObject *))
{
    tpy_state *state = PyModule_GetState(module);
    PyObject *first = PyTuple_Check(args) && PyTuple_GET_SIZE(args) > 0 ? PyTuple_GET_ITEM(args, 0) : NULL;
    tpy_group *o = first && PyObject_TypeCheck(first, state->group_type) ? (tpy_group *)first : NULL;
    PyObject *res;
    if (o) {
        Py_INCREF(o);
        o->busy++;
    }
    res = fn(module, args);
    if (o) {
        o->busy--;
        Py_DECREF(o);
    }
    return res;
}

PyObject *tpy_group_destroy(PyObject *module, PyObject *obj)
{
    tpy_group *o;
    tp_group *g;
    if (tpy_group_get(module, obj) == NULL) return NULL;
    o = (tpy_group *)obj;
    g = o->g;
    o->g = NULL; /* later calls: "the process group was destroyed" */
    if (o->busy > 0) {
        /* another thread is inside a call on g: make it return now (bounded by the group's timeout in
         * any case), and wait for it with the GIL released so that it can finish */
        tp_status st = tp_group_abort(g);
        (void)st;
        tp_clear_error();
        while (o->busy > 0) {
            Py_BEGIN_ALLOW_THREADS
            struct timespec nap = {0, 1000000};
            nanosleep(&nap, NULL);
            Py_END_ALLOW_THREADS
        }
    }
    tp_group_destroy(g);
    Py_RETURN_NONE;
}

PyObject *tpy_group_wrap(PyObject *module, tp_group *g, PyObject *parent)
{
    tpy_state *state = PyModule_GetState(module);
    tpy_group *obj = PyObject_GC_New(tpy_group, state->group_type);
    if (obj == NULL) {
        tp_group_destroy(g);
        return NULL;
    }
    obj->g = g;
    obj->busy = 0;
    obj->parent = parent;
    Py_XINCREF(parent);
    PyObject_GC_Track((PyObject *)obj);
    return (PyObject *)obj;
}

/* ---------------------------------------------------------------- signals */

/* The core's interrupt hook (tp_set_interrupt_hook): on Python's main thread, waiting with the GIL
 * released, takes the GIL and runs pending signal handlers; one that raises (Ctrl-C's KeyboardInterrupt,
 * a SIGTERM handler's SystemExit) stops the wait, its exception kept for tpy_raise. A handler that
 * returns lets the wait go on. */
static int interrupt_hook(void *ctx)
{
    tpy_state *state = ctx;
    PyGILState_STATE gil;
    int stop = 0;
    if (PyThread_get_thread_ident() != state->main_thread) return 0;
    gil = PyGILState_Ensure();
    if (PyErr_CheckSignals() < 0) {
        for (int i = 0; i < 3; i++) Py_CLEAR(state->interrupt[i]);
        PyErr_Fetch(&state->interrupt[0], &state->interrupt[1], &state->interrupt[2]);
        stop = 1;
    }
    PyGILState_Release(gil);
    return stop;
}

/* Python's main thread, where signal handlers run (threading.main_thread()). */
static int main_thread_ident(unsigned long *out)
{
    PyObject *threading = PyImport_ImportModule("threading"), *main = NULL, *ident = NULL;
    int rc = -1;
    if (threading == NULL || (main = PyObject_CallMethod(threading, "main_thread", NULL)) == NULL ||
        (ident = PyObject_GetAttrString(main, "ident")) == NULL)
        goto out;
    *out = PyLong_AsUnsignedLong(ident);
    rc = PyErr_Occurred() ? -1 : 0;
out:
    Py_XDECREF(ident);
    Py_XDECREF(main);
    Py_XDECREF(threading);
    return rc;
}

/* ---------------------------------------------------------------- module */

static int module_exec(PyObject *m)
{
    tpy_state *state = PyModule_GetState(m);
    if (main_thread_ident(&state->main_thread) < 0) return -1;
    state->comm_error = PyErr_NewExceptionWithDoc(
        "tplinear.CommError",
        "A collective failed because of a peer: it died, timed out, or called a different collective.",
        PyExc_RuntimeError, NULL);
    if (state->comm_error == NULL) return -1;
    Py_INCREF(state->comm_error);
    if (PyModule_AddObject(m, "CommError", state->comm_error) < 0) {
        Py_DECREF(state->comm_error);
        return -1;
    }
    if (tpy_group_register(m, state) < 0) return -1;
    if (tpy_dtypes_register(m, state) < 0) return -1;
    if (tpy_array_register(m, state) < 0) return -1;
    if (PyModule_AddFunctions(m, tpy_core_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, tpy_comm_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, tpy_device_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, tpy_dtype_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, tpy_array_methods) < 0) return -1;
    if (PyModule_AddFunctions(m, tpy_sequence_methods) < 0) return -1;
    if (PyModule_AddStringConstant(m, "VERSION", TPLINEAR_VERSION) < 0) return -1;
    tp_set_interrupt_hook(interrupt_hook, state);
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    tpy_state *state = PyModule_GetState(m);
    Py_VISIT(state->comm_error);
    Py_VISIT(state->group_type);
    Py_VISIT(state->array_type);
    Py_VISIT(state->bf16_type);
    Py_VISIT(state->numpy);
    for (int i = 0; i < TP_DTYPE_COUNT; i++) Py_VISIT(state->dtypes[i]);
    for (int i = 0; i < 3; i++) Py_VISIT(state->interrupt[i]);
    return 0;
}

static int module_clear(PyObject *m)
{
    tpy_state *state = PyModule_GetState(m);
    Py_CLEAR(state->comm_error);
    Py_CLEAR(state->group_type);
    Py_CLEAR(state->array_type);
    Py_CLEAR(state->bf16_type);
    Py_CLEAR(state->numpy);
    for (int i = 0; i < TP_DTYPE_COUNT; i++) Py_CLEAR(state->dtypes[i]);
    for (int i = 0; i < 3; i++) Py_CLEAR(state->interrupt[i]);
    tp_set_interrupt_hook(NULL, NULL);
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "tplinear._C", "The C core of tplinear (internal; use the tplinear package).",
    sizeof(tpy_state), NULL, module_slots, module_traverse, module_clear, NULL,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
