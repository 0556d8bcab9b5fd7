/* The device floor of a build without CUDA: no GPU is visible, and every call that needs one says that
 * tplinear was built without CUDA. (A CPU build registers no GPU GEMM and no GPU backend at all: this file
 * is only the bottom floor's answer.) */
#include "device.h"

static tp_status no_cuda(void)
{
    return tp_error(TP_ERR_UNSUPPORTED, "tplinear was built without CUDA (set TPLINEAR_CUDA=1 and a CUDA toolkit)");
}

int tp_cuda_available(void) { return 0; }
int tp_cuda_compiled(void) { return 0; }

int tp_cuda_device_count(void) { return 0; }

tp_status tp_cuda_set_stream(int device, void *stream)
{
    (void)device; (void)stream;
    return no_cuda();
}

void *tp_cuda_get_stream(int device)
{
    (void)device;
    return NULL;
}

tp_status tp_cuda_stream_order(int device, void *other, int other_waits)
{
    (void)device; (void)other; (void)other_waits;
    return no_cuda();
}

tp_status tp_cuda_synchronize(int device)
{
    (void)device;
    return no_cuda();
}

void tp_cuda_set_allow_tf32(int allow) { (void)allow; }
int tp_cuda_get_allow_tf32(void) { return 0; }

tp_status tp_cuda_malloc(int device, size_t bytes, void **ptr)
{
    (void)device; (void)bytes;
    *ptr = NULL;
    return no_cuda();
}

tp_status tp_cuda_free(int device, void *ptr)
{
    (void)device; (void)ptr;
    return no_cuda();
}

tp_status tp_cuda_memset_zero(int device, void *ptr, size_t bytes)
{
    (void)device; (void)ptr; (void)bytes;
    return no_cuda();
}

tp_status tp_cuda_memcpy(int device, void *dst, const void *src, size_t bytes)
{
    (void)device; (void)dst; (void)src; (void)bytes;
    return no_cuda();
}

tp_status tp_cuda_pointer_device(const void *ptr, int *device)
{
    (void)ptr;
    *device = -1;
    return no_cuda();
}

tp_status tp_cuda_tensor_copy(tp_tensor *dst, const tp_tensor *src)
{
    (void)dst; (void)src;
    return no_cuda();
}
