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
