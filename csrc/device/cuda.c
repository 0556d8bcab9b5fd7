/* The CUDA runtime: availability, the process-wide stream, device memory and copies. */
#include <string.h>

#include "cuda.h"

/* ---------------------------------------------------------------- availability */

int tp_cuda_compiled(void) { return 1; }

int tp_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver / no device: not an error for the caller */
        return 0;
    }
    return n;
}

int tp_cuda_available(void) { return tp_cuda_device_count() > 0; }

/* ---------------------------------------------------------------- stream and options */

static void *g_stream; /* cudaStream_t; NULL: the legacy default stream */
static int g_tf32 = -1; /* -1: not read from the environment yet */

tp_status tp_cuda_set_stream(void *stream)
{
    __atomic_store_n(&g_stream, stream, __ATOMIC_RELEASE);
    return TP_OK;
}

void *tp_cuda_get_stream(void) { return __atomic_load_n(&g_stream, __ATOMIC_ACQUIRE); }

cudaStream_t tp_cuda_stream(void) { return (cudaStream_t)tp_cuda_get_stream(); }

void tp_cuda_set_allow_tf32(int allow) { __atomic_store_n(&g_tf32, allow ? 1 : 0, __ATOMIC_RELEASE); }

int tp_cuda_get_allow_tf32(void)
{
    int v = __atomic_load_n(&g_tf32, __ATOMIC_ACQUIRE);
    if (v < 0) {
        v = tp_knob_value(TP_KNOB_ALLOW_TF32) == 1;
        __atomic_store_n(&g_tf32, v, __ATOMIC_RELEASE);
    }
    return v;
}

/* ---------------------------------------------------------------- devices */

tp_status tp_cuda_use_device(int device)
{
    tp_status st = TP_OK;
    int n = tp_cuda_device_count();
    if (n == 0) return tp_error(TP_ERR_UNSUPPORTED, "no CUDA GPU is visible to this process (tplinear.cuda_available() is False)");
    TP_REQUIRE(device >= 0 && device < n, "CUDA device %d does not exist (%d visible)", device, n);
    TP_CU(cudaSetDevice(device), "cudaSetDevice");
out:
    return st;
}

/* ---------------------------------------------------------------- streams */

tp_status tp_cuda_stream_order(int device, void *other, int other_waits)
{
    tp_status st = TP_OK;
    cudaEvent_t ev = NULL;
    cudaStream_t mine = tp_cuda_stream(), theirs = (cudaStream_t)other;
    if (mine == theirs) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device));
    TP_CU(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    TP_CU(cudaEventRecord(ev, other_waits ? mine : theirs), "cudaEventRecord");
    TP_CU(cudaStreamWaitEvent(other_waits ? theirs : mine, ev, 0), "cudaStreamWaitEvent");
out:
    if (ev) cudaEventDestroy(ev); /* released once the wait has been satisfied */
    return st;
}

tp_status tp_cuda_synchronize(int device)
{
    tp_status st = TP_OK;
    TP_CHECK(tp_cuda_use_device(device));
    TP_CU(cudaStreamSynchronize(tp_cuda_stream()), "cudaStreamSynchronize");
out:
    return st;
}

/* ---------------------------------------------------------------- memory */

tp_status tp_cuda_malloc(int device, size_t bytes, void **ptr)
{
    tp_status st = TP_OK;
    *ptr = NULL;
    TP_CHECK(tp_cuda_use_device(device));
    TP_CU(cudaMallocAsync(ptr, bytes > 0 ? bytes : 1, tp_cuda_stream()), "cudaMallocAsync");
out:
    return st;
}

tp_status tp_cuda_free(int device, void *ptr)
{
    tp_status st = TP_OK;
    if (ptr == NULL) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device));
    TP_CU(cudaFreeAsync(ptr, tp_cuda_stream()), "cudaFreeAsync");
out:
    return st;
}

tp_status tp_cuda_memset_zero(int device, void *ptr, size_t bytes)
{
    tp_status st = TP_OK;
    if (bytes == 0) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device));
    TP_CU(cudaMemsetAsync(ptr, 0, bytes, tp_cuda_stream()), "cudaMemsetAsync");
out:
    return st;
}

tp_status tp_cuda_memcpy(int device, void *dst, const void *src, size_t bytes)
{
    tp_status st = TP_OK;
    int dd, sd;
    if (bytes == 0) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device));
    TP_CHECK(tp_cuda_pointer_device(dst, &dd));
    TP_CHECK(tp_cuda_pointer_device(src, &sd));
    TP_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, tp_cuda_stream()), "cudaMemcpyAsync");
    /* pageable host memory: the copy must have finished before the caller touches (or frees) it */
    if (dd < 0 || sd < 0) TP_CU(cudaStreamSynchronize(tp_cuda_stream()), "cudaStreamSynchronize");
out:
    return st;
}

tp_status tp_cuda_pointer_device(const void *ptr, int *device)
{
    tp_status st = TP_OK;
    struct cudaPointerAttributes a;
    memset(&a, 0, sizeof a);
    *device = -1;
    TP_CU(cudaPointerGetAttributes(&a, ptr), "cudaPointerGetAttributes");
    if (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged) *device = a.device;
out:
    return st;
}

/* ---------------------------------------------------------------- strided copies */

/* dst = src for views whose innermost dimension is unit-stride: one cudaMemcpy2DAsync per index of the
 * dimensions before the last two. Either side may be host memory (unified addressing). */
static tp_status copy_rec(char *d, const char *s, const tp_tensor *dt, const tp_tensor *st_, int dim, size_t item)
{
    tp_status st = TP_OK;
    int nd = dt->ndim;
    if (dim < nd - 2) {
        for (int64_t i = 0; i < dt->shape[dim]; i++)
            TP_CHECK(copy_rec(d + i * dt->strides[dim] * (int64_t)item, s + i * st_->strides[dim] * (int64_t)item, dt,
                              st_, dim + 1, item));
        goto out;
    }
    {
        size_t width = (size_t)dt->shape[nd - 1] * item;
        size_t height = nd >= 2 ? (size_t)dt->shape[nd - 2] : 1;
        size_t dp = nd >= 2 && height > 1 ? (size_t)dt->strides[nd - 2] * item : width;
        size_t sp = nd >= 2 && height > 1 ? (size_t)st_->strides[nd - 2] * item : width;
        TP_CU(cudaMemcpy2DAsync(d, dp, s, sp, width, height, cudaMemcpyDefault, tp_cuda_stream()), "cudaMemcpy2DAsync");
    }
out:
    return st;
}

tp_status tp_cuda_tensor_copy(tp_tensor *dst, const tp_tensor *src)
{
    tp_status st = TP_OK;
    int nd = dst->ndim, device = dst->device.type == TP_DEVICE_CUDA ? dst->device.index : src->device.index;
    size_t item = tp_dtype_size(dst->dtype);
    TP_REQUIRE(dst->ndim == src->ndim && dst->dtype == src->dtype, "copy: shapes or dtypes differ");
    for (int d = 0; d < nd; d++)
        TP_REQUIRE(dst->shape[d] == src->shape[d], "copy: dim %d is %lld vs %lld", d, (long long)dst->shape[d],
                   (long long)src->shape[d]);
    if (tp_tensor_numel(dst) == 0) goto out;
    if (nd == 0) {
        TP_CHECK(tp_cuda_memcpy(device, dst->data, src->data, item));
        goto out;
    }
    TP_REQUIRE((dst->shape[nd - 1] <= 1 || (dst->strides[nd - 1] == 1 && src->strides[nd - 1] == 1)),
               "copy: GPU arrays must be contiguous in their last dimension");
    if (nd >= 2 && dst->shape[nd - 2] > 1)
        TP_REQUIRE(dst->strides[nd - 2] >= dst->shape[nd - 1] && src->strides[nd - 2] >= src->shape[nd - 1],
                   "copy: overlapping rows");
    TP_CHECK(tp_cuda_use_device(device));
    TP_CHECK(copy_rec(dst->data, src->data, dst, src, 0, item));
    if (dst->device.type != TP_DEVICE_CUDA || src->device.type != TP_DEVICE_CUDA)
        TP_CU(cudaStreamSynchronize(tp_cuda_stream()), "cudaStreamSynchronize");
out:
    return st;
}
