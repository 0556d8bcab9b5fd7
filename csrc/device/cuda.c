/* The CUDA runtime: availability, tplinear's stream of each device, device memory and copies. */
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

/* tplinear's stream of each device by ordinal (cudaStream_t; NULL: that device's legacy default stream). A
 * stream belongs to one device: enqueueing device 1's work on device 0's stream fails, so each device has
 * its own entry, set on first use (tp_cuda_set_stream) and read by every call that runs on that device. */
static void *g_streams[TP_CUDA_MAX_DEVICES];
static int g_tf32 = -1; /* -1: not read from the environment yet */

/* The thread's current device; 0 when none is known (no driver, no GPU: settings may still be given). */
static int current_device(void)
{
    int d = 0;
    if (cudaGetDevice(&d) != cudaSuccess) {
        (void)cudaGetLastError();
        d = 0;
    }
    return d;
}

tp_status tp_cuda_set_stream(int device, void *stream)
{
    int n = tp_cuda_device_count();
    if (device < 0) device = current_device();
    if (device >= TP_CUDA_MAX_DEVICES)
        return tp_error(TP_ERR_VALUE, "CUDA device %d: at most %d devices are supported", device,
                        TP_CUDA_MAX_DEVICES);
    if (n > 0 && device >= n) /* without a visible GPU only the table bounds the ordinal (nothing runs) */
        return tp_error(TP_ERR_VALUE, "CUDA device %d does not exist (%d visible)", device, n);
    __atomic_store_n(&g_streams[device], stream, __ATOMIC_RELEASE);
    return TP_OK;
}

void *tp_cuda_get_stream(int device)
{
    if (device < 0) device = current_device();
    return device < TP_CUDA_MAX_DEVICES ? __atomic_load_n(&g_streams[device], __ATOMIC_ACQUIRE) : NULL;
}

cudaStream_t tp_cuda_stream(void) { return (cudaStream_t)tp_cuda_get_stream(-1); }

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

tp_status tp_cuda_use_device(int device, int *prev)
{
    tp_status st = TP_OK;
    int n = tp_cuda_device_count(), cur = -1;
    *prev = -1;
    if (n == 0) return tp_error(TP_ERR_UNSUPPORTED, "no CUDA GPU is visible to this process (tplinear.cuda_available() is False)");
    TP_REQUIRE(device >= 0 && device < n, "CUDA device %d does not exist (%d visible)", device, n);
    TP_CU(cudaGetDevice(&cur), "cudaGetDevice");
    if (cur != device) TP_CU(cudaSetDevice(device), "cudaSetDevice");
    *prev = cur;
out:
    return st;
}

void tp_cuda_restore_device(int prev)
{
    int cur = -1;
    if (prev < 0) return;
    if (cudaGetDevice(&cur) != cudaSuccess || (cur != prev && cudaSetDevice(prev) != cudaSuccess))
        (void)cudaGetLastError(); /* nothing to report it to: the caller's own status stands */
}

/* ---------------------------------------------------------------- streams */

tp_status tp_cuda_stream_order(int device, void *other, int other_waits)
{
    tp_status st = TP_OK;
    int prev = -1;
    cudaEvent_t ev = NULL;
    cudaStream_t mine = (cudaStream_t)tp_cuda_get_stream(device), theirs = (cudaStream_t)other;
    if (mine == theirs) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CU(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    TP_CU(cudaEventRecord(ev, other_waits ? mine : theirs), "cudaEventRecord");
    TP_CU(cudaStreamWaitEvent(other_waits ? theirs : mine, ev, 0), "cudaStreamWaitEvent");
out:
    tp_cuda_restore_device(prev);
    if (ev) cudaEventDestroy(ev); /* released once the wait has been satisfied */
    return st;
}

tp_status tp_cuda_synchronize(int device)
{
    tp_status st = TP_OK;
    int prev = -1;
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CU(cudaStreamSynchronize(tp_cuda_stream()), "cudaStreamSynchronize");
out:
    tp_cuda_restore_device(prev);
    return st;
}

/* ---------------------------------------------------------------- memory */

tp_status tp_cuda_malloc(int device, size_t bytes, void **ptr)
{
    tp_status st = TP_OK;
    int prev = -1;
    *ptr = NULL;
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CU(cudaMallocAsync(ptr, bytes > 0 ? bytes : 1, tp_cuda_stream()), "cudaMallocAsync");
out:
    tp_cuda_restore_device(prev);
    return st;
}

tp_status tp_cuda_free(int device, void *ptr)
{
    tp_status st = TP_OK;
    int prev = -1;
    if (ptr == NULL) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CU(cudaFreeAsync(ptr, tp_cuda_stream()), "cudaFreeAsync");
out:
    tp_cuda_restore_device(prev);
    return st;
}

tp_status tp_cuda_memset_zero(int device, void *ptr, size_t bytes)
{
    tp_status st = TP_OK;
    int prev = -1;
    if (bytes == 0) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CU(cudaMemsetAsync(ptr, 0, bytes, tp_cuda_stream()), "cudaMemsetAsync");
out:
    tp_cuda_restore_device(prev);
    return st;
}

tp_status tp_cuda_memcpy(int device, void *dst, const void *src, size_t bytes)
{
    tp_status st = TP_OK;
    int prev = -1;
    int dd, sd;
    if (bytes == 0) return TP_OK;
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CHECK(tp_cuda_pointer_device(dst, &dd));
    TP_CHECK(tp_cuda_pointer_device(src, &sd));
    TP_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, tp_cuda_stream()), "cudaMemcpyAsync");
    /* pageable host memory: the copy must have finished before the caller touches (or frees) it */
    if (dd < 0 || sd < 0) TP_CU(cudaStreamSynchronize(tp_cuda_stream()), "cudaStreamSynchronize");
out:
    tp_cuda_restore_device(prev);
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

/* Whether t's dims from dim on are one compact row-major block (unit stride innermost). */
static int block_is_compact(const tp_tensor *t, int dim)
{
    int64_t expect = 1;
    for (int d = t->ndim - 1; d >= dim; d--) {
        if (t->shape[d] > 1 && t->strides[d] != expect) return 0;
        expect *= t->shape[d];
    }
    return 1;
}

/* dst = src for any strides with cudaMemcpy(2D)Async (either side may be host memory: unified addressing):
 * the last two dims as one 2-D copy when both are unit-stride innermost, a last dim of any other positive
 * strides as a 2-D copy of single elements, and a source dim of stride 0 (a broadcast, e.g. torch's
 * expand()) as its first index copied once and then doubled inside the compact destination. */
static tp_status copy_rec(char *d, const char *s, const tp_tensor *dt, const tp_tensor *st_, int dim, size_t item)
{
    tp_status st = TP_OK;
    int nd = dt->ndim;
    int64_t n = dt->shape[dim];
    cudaStream_t stream = tp_cuda_stream();
    if (n > 1 && st_->strides[dim] == 0) {
        size_t block = item, done = 1;
        TP_REQUIRE(block_is_compact(dt, dim), "copy: a broadcast (stride 0) source needs a contiguous destination");
        for (int j = dim + 1; j < nd; j++) block *= (size_t)dt->shape[j];
        if (dim == nd - 1)
            TP_CU(cudaMemcpyAsync(d, s, item, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
        else
            TP_CHECK(copy_rec(d, s, dt, st_, dim + 1, item));
        while (done < (size_t)n) {
            size_t k = done < (size_t)n - done ? done : (size_t)n - done;
            TP_CU(cudaMemcpyAsync(d + done * block, d, k * block, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
            done += k;
        }
        goto out;
    }
    if (dim == nd - 1) {
        if (n <= 1 || (dt->strides[dim] == 1 && st_->strides[dim] == 1))
            TP_CU(cudaMemcpyAsync(d, s, (size_t)n * item, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
        else
            TP_CU(cudaMemcpy2DAsync(d, (size_t)dt->strides[dim] * item, s, (size_t)st_->strides[dim] * item, item,
                                    (size_t)n, cudaMemcpyDefault, stream),
                  "cudaMemcpy2DAsync");
        goto out;
    }
    if (dim == nd - 2 && (dt->shape[nd - 1] <= 1 || (dt->strides[nd - 1] == 1 && st_->strides[nd - 1] == 1)) &&
        st_->strides[dim] > 0 && (dt->shape[nd - 1] > 1 || st_->strides[nd - 1] != 0)) {
        size_t width = (size_t)dt->shape[nd - 1] * item;
        size_t dp = n > 1 ? (size_t)dt->strides[dim] * item : width;
        size_t sp = n > 1 ? (size_t)st_->strides[dim] * item : width;
        if (dp >= width && sp >= width) {
            TP_CU(cudaMemcpy2DAsync(d, dp, s, sp, width, (size_t)n, cudaMemcpyDefault, stream), "cudaMemcpy2DAsync");
            goto out;
        }
    }
    for (int64_t i = 0; i < n; i++)
        TP_CHECK(copy_rec(d + i * dt->strides[dim] * (int64_t)item, s + i * st_->strides[dim] * (int64_t)item, dt,
                          st_, dim + 1, item));
out:
    return st;
}

tp_status tp_cuda_tensor_copy(tp_tensor *dst, const tp_tensor *src)
{
    tp_status st = TP_OK;
    int prev = -1;
    int nd = dst->ndim, device = dst->device.type == TP_DEVICE_CUDA ? dst->device.index : src->device.index;
    size_t item = tp_dtype_size(dst->dtype);
    TP_REQUIRE(dst->ndim == src->ndim && dst->dtype == src->dtype, "copy: shapes or dtypes differ");
    for (int d = 0; d < nd; d++) {
        TP_REQUIRE(dst->shape[d] == src->shape[d], "copy: dim %d is %lld vs %lld", d, (long long)dst->shape[d],
                   (long long)src->shape[d]);
        TP_REQUIRE(dst->shape[d] <= 1 || dst->strides[d] > 0, "copy: the destination overlaps itself (stride %lld)",
                   (long long)dst->strides[d]);
        TP_REQUIRE(src->shape[d] <= 1 || src->strides[d] >= 0, "copy: negative strides are not supported");
    }
    if (nd >= 2 && dst->shape[nd - 2] > 1 && dst->shape[nd - 1] > 1 && dst->strides[nd - 1] == 1)
        TP_REQUIRE(dst->strides[nd - 2] >= dst->shape[nd - 1], "copy: the destination's rows overlap");
    if (tp_tensor_numel(dst) == 0) goto out;
    if (nd == 0) {
        TP_CHECK(tp_cuda_memcpy(device, dst->data, src->data, item));
        goto out;
    }
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CHECK(copy_rec(dst->data, src->data, dst, src, 0, item));
    if (dst->device.type != TP_DEVICE_CUDA || src->device.type != TP_DEVICE_CUDA)
        TP_CU(cudaStreamSynchronize(tp_cuda_stream()), "cudaStreamSynchronize");
out:
    tp_cuda_restore_device(prev);
    return st;
}
