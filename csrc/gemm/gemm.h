/* Matrix views of tensors and the GEMM dispatch (host memory: OpenBLAS, GPU memory: cuBLAS). Internal. */
#ifndef TP_GEMM_H
#define TP_GEMM_H

#include "../core/dtype.h"
#include "../device/device.h"

/* A logical [rows, cols] matrix. Stored row-major with leading dimension ld when trans == 0,
 * or as the row-major [cols, rows] matrix (a column-major view) with leading dimension ld. */
typedef struct {
    void *data;
    int64_t rows, cols, ld;
    int trans;
    tp_dtype dtype;
    tp_device device;
} tp_mat;

/* Views t as [prod(leading dims), last dim] without copying when its strides allow; otherwise,
 * if packed != NULL, copies it into a new contiguous buffer on t's device returned in *packed (the caller
 * frees it with tp_device_free(t->device, ...)),
 * else fails with TP_ERR_VALUE (outputs must be viewable in place). */
tp_status tp_mat_view(const tp_tensor *t, tp_mat *m, void **packed, const char *what);

/* The alignment a GEMM library may assume of a pointer: the largest power of two that divides its address,
 * at most 256 (torch's _getAlignment). cuBLASLt's MIN_ALIGNMENT preferences take it: without them its
 * heuristic assumes 256, which a row layer's x[..., off:off + size] at p > 1 or an offset bias lacks. */
uint32_t tp_gemm_alignment(const void *p);

/* The argument checks of tp_linear_forward (shapes, dtypes, devices of x [..., in], w [out, in],
 * b [out] or NULL, y [..., out]). */
tp_status tp_linear_check(const tp_tensor *x, const tp_tensor *w, const tp_tensor *b, const tp_tensor *y);

/* TP_OK for TP_GRAD_ACCUMULATE / TP_GRAD_ASSIGN, else TP_ERR_VALUE. */
tp_status tp_grad_mode_check(tp_grad_mode mode);

/* C = op(A) @ op(B) (+ C when accumulate), where op(X) is X^T when tX. All on one device,
 * one dtype. Any of the dims may be zero. */
tp_status tp_gemm(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate);

/* A GEMM provider: the same operations for the memory of one device type. linear.c picks the provider of
 * the output's device: OpenBLAS for host memory, cuBLAS for GPU memory when the build has CUDA. */
typedef struct {
    const char *name;
    /* C = op(A) @ op(B) (+ C when accumulate), as tp_gemm */
    tp_status (*gemm)(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate);
    /* each row of C = bias (mode 0) or += bias (mode 1); bias: cols elements, contiguous */
    tp_status (*rows)(tp_mat *c, const void *bias, int mode);
    /* out (cols elements) = the column sums of A (+ out when accumulate) */
    tp_status (*col_sums)(const tp_mat *a, void *out, int accumulate);
    /* C = op(A) @ op(B) + bias broadcast over rows (OpenBLAS: rows, then an accumulating GEMM; cuBLAS:
     * cuBLASLt's bias epilogue, one kernel) */
    tp_status (*gemm_bias)(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, const void *bias);
} tp_gemm_provider;

/* The half-precision (bfloat16, float16) host GEMMs (gemm/half.c), for the OpenBLAS provider: the operands by
 * blocks converted to float32, gemm32 (the provider's float32 GEMM), every output element rounded once.
 * tp_half_gemm: C = op(A) op(B) (+ C when accumulate) (+ bias, cols elements of C's dtype, when not NULL);
 * tp_half_rows and tp_half_col_sums: as the provider's rows and col_sums (sums in float32 or wider). */
typedef tp_status (*tp_gemm_fn)(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate);
tp_status tp_half_gemm(const tp_mat *a, int ta, const tp_mat *b, int tb, tp_mat *c, int accumulate, const void *bias,
                       tp_gemm_fn gemm32);
tp_status tp_half_rows(tp_mat *c, const void *bias, int mode);
tp_status tp_half_col_sums(const tp_mat *a, void *out, int accumulate);

extern const tp_gemm_provider tp_gemm_openblas; /* gemm/openblas.c */
#if TPLINEAR_CUDA
extern const tp_gemm_provider tp_gemm_cublas; /* gemm/cublas.c */
#endif

#endif
