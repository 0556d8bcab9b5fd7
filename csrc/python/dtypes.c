/* dtypes as Python sees them, all from the one C table (core/dtype.h): the dtype objects that
 * DeviceArray.dtype returns (NumPy's, and a bfloat16 object since NumPy has none), the resolution of
 * whatever a user passes as a dtype, _C.dtypes() for the Python package, and the bfloat16 conversions. */
#include <string.h>

#include "py.h"

tpy_state *tpy_state_of_type(PyTypeObject *type)
{
    PyObject *m = PyType_GetModule(type);
    return m ? PyModule_GetState(m) : NULL;
}

/* ---------------------------------------------------------------- the bfloat16 dtype object */

static PyObject *bf16_repr(PyObject *self)
{
    (void)self;
    return PyUnicode_FromString("bfloat16");
}

static Py_hash_t bf16_hash(PyObject *self)
{
    PyObject *name = bf16_repr(self);
    Py_hash_t h = name ? PyObject_Hash(name) : -1;
    Py_XDECREF(name);
    return h;
}

/* Equal to itself, to "bfloat16" and to anything whose .name is "bfloat16" (ml_dtypes, torch-like). */
static PyObject *bf16_richcompare(PyObject *self, PyObject *other, int op)
{
    PyObject *name;
    int eq;
    if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
    if (other == self) {
        eq = 1;
    } else if (PyUnicode_Check(other)) {
        eq = PyUnicode_CompareWithASCIIString(other, "bfloat16") == 0;
    } else {
        name = PyObject_GetAttrString(other, "name");
        if (name == NULL) {
            PyErr_Clear();
            eq = 0;
        } else {
            eq = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, "bfloat16") == 0;
            Py_DECREF(name);
        }
    }
    return PyBool_FromLong(op == Py_EQ ? eq : !eq);
}

static PyObject *bf16_name(PyObject *self, void *c) { (void)c; return bf16_repr(self); }
static PyObject *bf16_itemsize(PyObject *self, void *c) { (void)self; (void)c; return PyLong_FromLong(2); }
static PyObject *bf16_kind(PyObject *self, void *c) { (void)self; (void)c; return PyUnicode_FromString("f"); }

static PyGetSetDef bf16_getset[] = {
    {"name", bf16_name, NULL, "'bfloat16'", NULL},
    {"itemsize", bf16_itemsize, NULL, "2 (bytes)", NULL},
    {"kind", bf16_kind, NULL, "'f' (floating point)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static int bf16_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void bf16_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyType_Slot bf16_slots[] = {
    {Py_tp_dealloc, bf16_dealloc},
    {Py_tp_traverse, bf16_traverse},
    {Py_tp_repr, bf16_repr},
    {Py_tp_str, bf16_repr},
    {Py_tp_hash, bf16_hash},
    {Py_tp_richcompare, bf16_richcompare},
    {Py_tp_getset, bf16_getset},
    {Py_tp_doc, "The dtype of bfloat16 device arrays (NumPy has none); compares equal to 'bfloat16'."},
    {0, NULL},
};

static PyType_Spec bf16_spec = {
    "tplinear._C.BFloat16DType", sizeof(PyObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, bf16_slots,
};

int tpy_dtypes_register(PyObject *module, tpy_state *state)
{
    PyObject *bf16;
    state->bf16_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &bf16_spec, NULL);
    if (state->bf16_type == NULL) return -1;
    if ((state->numpy = PyImport_ImportModule("numpy")) == NULL) return -1;
    bf16 = (PyObject *)PyObject_GC_New(PyObject, state->bf16_type);
    if (bf16 == NULL) return -1;
    PyObject_GC_Track(bf16);
    for (int i = 0; i < TP_DTYPE_COUNT; i++) {
        const tp_dtype_info *info = tp_dtype_info_of((tp_dtype)i);
        if (info->typestr == NULL) { /* NumPy has no such dtype */
            state->dtypes[i] = bf16;
            Py_INCREF(bf16);
        } else if ((state->dtypes[i] = PyObject_CallMethod(state->numpy, "dtype", "s", info->typestr)) == NULL) {
            Py_DECREF(bf16);
            return -1;
        }
    }
    return PyModule_AddObject(module, "bfloat16", bf16); /* steals the reference on success */
}

/* ---------------------------------------------------------------- resolving a dtype */

PyObject *tpy_dtype_list(int which)
{
    PyObject *parts = PyList_New(0), *sep = NULL, *res = NULL;
    if (parts == NULL) return NULL;
    for (int i = 0; i < TP_DTYPE_COUNT; i++) {
        const tp_dtype_info *info = tp_dtype_info_of((tp_dtype)i);
        const char *s = which ? info->typestr : info->name;
        PyObject *item;
        if (s == NULL) continue;
        if ((item = PyUnicode_FromString(s)) == NULL || PyList_Append(parts, item) < 0) {
            Py_XDECREF(item);
            goto out;
        }
        Py_DECREF(item);
    }
    if ((sep = PyUnicode_FromString(", ")) != NULL) res = PyUnicode_Join(sep, parts);
out:
    Py_DECREF(parts);
    Py_XDECREF(sep);
    return res;
}

/* The name a dtype-like object stands for (a new str), or NULL with an exception. */
static PyObject *dtype_name_of(tpy_state *state, PyObject *obj)
{
    PyObject *s, *np_dtype, *name;
    const char *text;
    if (PyUnicode_Check(obj)) {
        Py_INCREF(obj);
        return obj;
    }
    if ((s = PyObject_Str(obj)) == NULL) return NULL;
    if ((text = PyUnicode_AsUTF8(s)) == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    if (strncmp(text, "torch.", 6) == 0) return s; /* torch.float16 */
    np_dtype = PyObject_CallMethod(state->numpy, "dtype", "O", obj);
    if (np_dtype == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
            Py_DECREF(s);
            return NULL;
        }
        PyErr_Clear();
        return s; /* not a NumPy dtype: its str may still be a name we know */
    }
    Py_DECREF(s);
    name = PyObject_GetAttrString(np_dtype, "name");
    Py_DECREF(np_dtype);
    return name;
}

int tpy_dtype_from_object(tpy_state *state, PyObject *obj, tp_dtype *dt)
{
    PyObject *name;
    const char *s;
    const tp_dtype_info *info = NULL;
    for (int i = 0; i < TP_DTYPE_COUNT; i++)
        if (obj == state->dtypes[i]) {
            *dt = (tp_dtype)i;
            return 0;
        }
    if ((name = dtype_name_of(state, obj)) == NULL) return -1;
    if ((s = PyUnicode_AsUTF8(name)) == NULL) {
        Py_DECREF(name);
        return -1;
    }
    if (strncmp(s, "torch.", 6) == 0) s += 6;
    info = tp_dtype_by_name(s);
    Py_DECREF(name);
    if (info == NULL) {
        PyObject *names = tpy_dtype_list(0);
        if (names) PyErr_Format(PyExc_TypeError, "dtype must be one of %U; got %R", names, obj);
        Py_XDECREF(names);
        return -1;
    }
    *dt = info->dtype;
    return 0;
}

/* ---------------------------------------------------------------- functions */

/* as_dtype(obj) -> the dtype object (a NumPy dtype, or tplinear's bfloat16) */
static PyObject *py_as_dtype(PyObject *m, PyObject *obj)
{
    tpy_state *state = PyModule_GetState(m);
    tp_dtype dt;
    if (tpy_dtype_from_object(state, obj, &dt) < 0) return NULL;
    Py_INCREF(state->dtypes[dt]);
    return state->dtypes[dt];
}

/* dtypes() -> {name: {...}}: the C table, in tp_dtype order */
static PyObject *py_dtypes(PyObject *m, PyObject *unused)
{
    tpy_state *state = PyModule_GetState(m);
    PyObject *res = PyDict_New();
    (void)unused;
    if (res == NULL) return NULL;
    for (int i = 0; i < TP_DTYPE_COUNT; i++) {
        const tp_dtype_info *d = tp_dtype_info_of((tp_dtype)i);
        PyObject *entry = Py_BuildValue(
            "{s:i,s:s,s:z,s:n,s:s,s:(ii),s:z,s:O,s:O,s:O,s:O}", "code", (int)d->dtype, "name", d->name, "alias",
            d->alias, "itemsize", (Py_ssize_t)d->itemsize, "formats", d->formats, "dlpack", (int)d->dl_code,
            (int)d->dl_bits, "typestr", d->typestr, "floating", (d->flags & TP_DTYPE_FLOATING) ? Py_True : Py_False,
            "host_math", (d->flags & TP_DTYPE_HOST_MATH) ? Py_True : Py_False, "device_math",
            (d->flags & TP_DTYPE_DEVICE_MATH) ? Py_True : Py_False, "dtype", state->dtypes[i]);
        if (entry == NULL || PyDict_SetItemString(res, d->name, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(res);
            return NULL;
        }
        Py_DECREF(entry);
    }
    return res;
}

/* Gets two C-contiguous buffers of one element count: src with items of src_size bytes, dst writable
 * with items of dst_size bytes. */
static int two_buffers(PyObject *args, Py_buffer *src, size_t src_size, Py_buffer *dst, size_t dst_size)
{
    PyObject *s, *d;
    if (!PyArg_ParseTuple(args, "OO", &s, &d)) return -1;
    if (PyObject_GetBuffer(s, src, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (PyObject_GetBuffer(d, dst, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(src);
        return -1;
    }
    if ((size_t)src->itemsize != src_size || (size_t)dst->itemsize != dst_size ||
        src->len / src->itemsize != dst->len / dst->itemsize) {
        PyErr_Format(PyExc_ValueError,
                     "expected a source of %zu-byte items and a destination of %zu-byte items with as many "
                     "elements; got %zd x %zd bytes and %zd x %zd bytes", src_size, dst_size,
                     src->len / (src->itemsize ? src->itemsize : 1), src->itemsize,
                     dst->len / (dst->itemsize ? dst->itemsize : 1), dst->itemsize);
        PyBuffer_Release(src);
        PyBuffer_Release(dst);
        return -1;
    }
    return 0;
}

/* float32_to_bfloat16(src float32, dst uint16) / bfloat16_to_float32(src uint16, dst float32) */
static PyObject *bf16_convert(PyObject *args, int to_bf16)
{
    Py_buffer src, dst;
    if (two_buffers(args, &src, to_bf16 ? 4 : 2, &dst, to_bf16 ? 2 : 4) < 0) return NULL;
    if (to_bf16)
        tp_bf16_from_float32(src.buf, dst.buf, (size_t)(src.len / 4));
    else
        tp_bf16_to_float32(src.buf, dst.buf, (size_t)(src.len / 2));
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *py_float32_to_bfloat16(PyObject *m, PyObject *args) { (void)m; return bf16_convert(args, 1); }
static PyObject *py_bfloat16_to_float32(PyObject *m, PyObject *args) { (void)m; return bf16_convert(args, 0); }

PyMethodDef tpy_dtype_methods[] = {
    {"as_dtype", py_as_dtype, METH_O,
     "as_dtype($module, d, /)\n--\n\n"
     "The dtype d names (a name, a NumPy or torch dtype): a NumPy dtype, or tplinear._C.bfloat16."},
    {"dtypes", py_dtypes, METH_NOARGS,
     "dtypes($module, /)\n--\n\n{name: {code, name, alias, itemsize, formats, dlpack, typestr, floating, host_math, "
     "device_math, dtype}}: the C table."},
    {"float32_to_bfloat16", py_float32_to_bfloat16, METH_VARARGS,
     "float32_to_bfloat16($module, src, dst, /)\n--\n\n"
     "dst (uint16) = the bfloat16 bit patterns of float32 src: round to nearest even, NaN kept."},
    {"bfloat16_to_float32", py_bfloat16_to_float32, METH_VARARGS,
     "bfloat16_to_float32($module, src, dst, /)\n--\n\ndst (float32) = the values of bfloat16 bit patterns src."},
    {NULL, NULL, 0, NULL},
};
