/* The GPU entry points of a build without CUDA: every call says so. */
#include "../comm/backend.h"
#include "../gemm/gemm.h"

static tp_status no_cuda(void)
{
    return tp_error(TP_ERR_UNSUPPORTED, "tplinear was built without CUDA (set TPLINEAR_CUDA=1 and a CUDA toolkit)");
}

tp_status tp_gemm_cuda(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate)
{
    (void)a; (void)ta; (void)b; (void)tb; (void)c; (void)accumulate;
    return no_cuda();
}

tp_status tp_rows_cuda(tp_mat *c, const void *bias, int mode)
{
    (void)c; (void)bias; (void)mode;
    return no_cuda();
}

tp_status tp_col_sums_cuda(const tp_mat *a, void *out)
{
    (void)a; (void)out;
    return no_cuda();
}

int tp_cuda_available(void) { return 0; }
int tp_cuda_compiled(void) { return 0; }

tp_status tp_nccl_create(tp_group *g)
{
    (void)g;
    return no_cuda();
}

tp_status tp_gemm_bias_cuda(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, const void *bias)
{
    (void)a; (void)ta; (void)b; (void)tb; (void)c; (void)bias;
    return no_cuda();
}

tp_status tp_nccl_split(tp_group *parent, tp_group *child)
{
    (void)parent; (void)child;
    return no_cuda();
}

int tp_cuda_device_count(void) { return 0; }

tp_status tp_cuda_set_stream(void *stream)
{
    (void)stream;
    return no_cuda();
}

void *tp_cuda_get_stream(void) { return NULL; }

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
