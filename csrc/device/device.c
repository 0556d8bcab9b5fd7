/* Host memory and strided copies; GPU memory and copies are handed to the CUDA part (device/cuda.c, or
 * device/none.c's "built without CUDA"). */
#include <stdlib.h>
#include <string.h>

#include "device.h"

const char *tp_device_kind(tp_device dev) { return dev.type == TP_DEVICE_CUDA ? "cuda" : "cpu"; }

int tp_device_same(tp_device a, tp_device b) { return a.type == b.type && a.index == b.index; }

tp_status tp_device_alloc(tp_device dev, size_t bytes, void **p)
{
    if (dev.type == TP_DEVICE_CUDA) return tp_cuda_malloc(dev.index, bytes, p);
    *p = malloc(bytes > 0 ? bytes : 1);
    return *p ? TP_OK : tp_error(TP_ERR_NOMEM, "out of memory for %zu bytes", bytes);
}

void tp_device_free(tp_device dev, void *p)
{
    if (p == NULL) return;
    if (dev.type == TP_DEVICE_CUDA)
        (void)tp_cuda_free(dev.index, p);
    else
        free(p);
}

/* Recursive strided copy; the innermost dimension is a memcpy when both are unit-stride. */
static void copy_rec(char *dst, const char *src, const tp_tensor *d, const tp_tensor *s, int dim, size_t item)
{
    int64_t n = d->shape[dim];
    if (dim == d->ndim - 1) {
        if (d->strides[dim] == 1 && s->strides[dim] == 1) {
            memcpy(dst, src, (size_t)n * item);
            return;
        }
        for (int64_t i = 0; i < n; i++)
            memcpy(dst + i * d->strides[dim] * (int64_t)item, src + i * s->strides[dim] * (int64_t)item, item);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        copy_rec(dst + i * d->strides[dim] * (int64_t)item, src + i * s->strides[dim] * (int64_t)item, d, s, dim + 1,
                 item);
}

tp_status tp_tensor_copy(tp_tensor *dst, const tp_tensor *src)
{
    tp_status st = TP_OK;
    TP_REQUIRE(dst->ndim == src->ndim, "copy: ndim %d vs %d", dst->ndim, src->ndim);
    TP_REQUIRE(dst->dtype == src->dtype, "copy: dtype %s vs %s", tp_dtype_name(dst->dtype), tp_dtype_name(src->dtype));
    if (dst->device.type == TP_DEVICE_CUDA || src->device.type == TP_DEVICE_CUDA) return tp_cuda_tensor_copy(dst, src);
    for (int d = 0; d < dst->ndim; d++)
        TP_REQUIRE(dst->shape[d] == src->shape[d], "copy: dim %d is %lld vs %lld", d, (long long)dst->shape[d],
                   (long long)src->shape[d]);
    if (tp_tensor_numel(dst) == 0) goto out;
    if (dst->ndim == 0) {
        memcpy(dst->data, src->data, tp_dtype_size(dst->dtype));
        goto out;
    }
    copy_rec(dst->data, src->data, dst, src, 0, tp_dtype_size(dst->dtype));
out:
    return st;
}
