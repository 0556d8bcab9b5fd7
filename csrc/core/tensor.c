/* tp_tensor: descriptors and views (dtypes: dtype.c; copies are on the device floor: device/device.c). */
#include <string.h>

#include "error.h"

tp_status tp_tensor_init(tp_tensor *t, void *data, tp_dtype dt, int ndim, const int64_t *shape)
{
    tp_status st = TP_OK;
    int64_t stride = 1;
    TP_REQUIRE(t != NULL, "tensor descriptor is NULL");
    TP_REQUIRE(ndim >= 0 && ndim <= TP_MAX_DIMS, "ndim must be in [0, %d], got %d", TP_MAX_DIMS, ndim);
    TP_REQUIRE(tp_dtype_size(dt) != 0, "unknown dtype %d", (int)dt);
    memset(t, 0, sizeof *t);
    t->data = data;
    t->dtype = dt;
    t->ndim = ndim;
    t->device.type = TP_DEVICE_CPU;
    for (int d = ndim - 1; d >= 0; d--) {
        TP_REQUIRE(shape[d] >= 0, "negative size %lld in dim %d", (long long)shape[d], d);
        t->shape[d] = shape[d];
        t->strides[d] = stride;
        stride *= shape[d] > 0 ? shape[d] : 1;
    }
out:
    return st;
}

int64_t tp_tensor_numel(const tp_tensor *t)
{
    int64_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

int tp_tensor_is_contiguous(const tp_tensor *t)
{
    int64_t expect = 1;
    if (tp_tensor_numel(t) == 0) return 1; /* nothing to lay out (torch gives empty tensors strides NumPy does not) */
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->shape[d] != 1 && t->strides[d] != expect) return 0;
        expect *= t->shape[d];
    }
    return 1;
}

tp_status tp_tensor_narrow(const tp_tensor *t, int dim, int64_t start, int64_t length, tp_tensor *out)
{
    tp_status st = TP_OK;
    TP_REQUIRE(dim >= 0 && dim < t->ndim, "dim %d out of range for a %d-d tensor", dim, t->ndim);
    TP_REQUIRE(start >= 0 && length >= 0 && start + length <= t->shape[dim],
               "range [%lld, %lld) out of bounds for dim %d of size %lld", (long long)start,
               (long long)(start + length), dim, (long long)t->shape[dim]);
    *out = *t;
    out->shape[dim] = length;
    if (length > 0)
        out->data = (char *)t->data + start * t->strides[dim] * (int64_t)tp_dtype_size(t->dtype);
out:
    return st;
}
