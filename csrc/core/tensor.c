/* tp_tensor: descriptors, views and strided copies (dtypes: dtype.c). */
#include <string.h>

#include "internal.h"

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

/* Recursive strided copy; the innermost dimension is a memcpy when both are unit-stride. */
static void copy_rec(char *dst, const char *src, const tp_tensor *d, const tp_tensor *s, int dim,
                     size_t item)
{
    int64_t n = d->shape[dim];
    if (dim == d->ndim - 1) {
        if (d->strides[dim] == 1 && s->strides[dim] == 1) {
            memcpy(dst, src, (size_t)n * item);
            return;
        }
        for (int64_t i = 0; i < n; i++)
            memcpy(dst + i * d->strides[dim] * (int64_t)item, src + i * s->strides[dim] * (int64_t)item,
                   item);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        copy_rec(dst + i * d->strides[dim] * (int64_t)item, src + i * s->strides[dim] * (int64_t)item,
                 d, s, dim + 1, item);
}

tp_status tp_tensor_copy(tp_tensor *dst, const tp_tensor *src)
{
    tp_status st = TP_OK;
    TP_REQUIRE(dst->ndim == src->ndim, "copy: ndim %d vs %d", dst->ndim, src->ndim);
    TP_REQUIRE(dst->dtype == src->dtype, "copy: dtype %s vs %s", tp_dtype_name(dst->dtype),
               tp_dtype_name(src->dtype));
    if (dst->device.type == TP_DEVICE_CUDA || src->device.type == TP_DEVICE_CUDA) return tp_cuda_tensor_copy(dst, src);
    for (int d = 0; d < dst->ndim; d++)
        TP_REQUIRE(dst->shape[d] == src->shape[d], "copy: dim %d is %lld vs %lld", d,
                   (long long)dst->shape[d], (long long)src->shape[d]);
    if (tp_tensor_numel(dst) == 0) goto out;
    if (dst->ndim == 0) {
        memcpy(dst->data, src->data, tp_dtype_size(dst->dtype));
        goto out;
    }
    copy_rec(dst->data, src->data, dst, src, 0, tp_dtype_size(dst->dtype));
out:
    return st;
}
