/* The GPU path's internal pieces: error mapping, per-device handles, the process-wide stream.
 * Only compiled into TPLINEAR_CUDA builds (csrc/cuda/stub.c replaces all of it otherwise). */
#ifndef TP_CUDA_H
#define TP_CUDA_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "../comm/backend.h"
#include "../core/internal.h"

/* Checks a CUDA runtime call; on failure records "what: cudaErrorName (string)" and jumps to out. */
#define TP_CU(expr, what)                                                                    \
    do {                                                                                     \
        cudaError_t e_ = (expr);                                                             \
        if (e_ != cudaSuccess) {                                                             \
            (void)cudaGetLastError();                                                        \
            st = tp_error(TP_ERR_CUDA, "%s: %s (%s)", (what), cudaGetErrorName(e_),          \
                          cudaGetErrorString(e_));                                           \
            goto out;                                                                        \
        }                                                                                    \
    } while (0)

/* Same for cuBLAS / cuBLASLt. */
#define TP_CUBLAS(expr, what)                                                                \
    do {                                                                                     \
        cublasStatus_t b_ = (expr);                                                          \
        if (b_ != CUBLAS_STATUS_SUCCESS) {                                                   \
            st = tp_error(TP_ERR_CUDA, "%s: %s (%s)", (what), cublasGetStatusName(b_),       \
                          cublasGetStatusString(b_));                                        \
            goto out;                                                                        \
        }                                                                                    \
    } while (0)

#define TP_CUDA_MAX_DEVICES 64

/* Lazily created per-device state. Handles are shared by every thread of the process; calls that
 * set the handle's stream and enqueue hold `lock`. */
typedef struct {
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    void *workspace; /* cuBLAS / cuBLASLt workspace */
    size_t workspace_bytes;
    void *ones[4];          /* a vector of ones per floating dtype (TP_FLOAT32..TP_BFLOAT16) */
    int64_t ones_len[4];
} tp_cuda_ctx;

/* Makes device current on this thread and returns its context (created on first use). */
tp_status tp_cuda_ctx_get(int device, tp_cuda_ctx **ctx);
void tp_cuda_lock(void);
void tp_cuda_unlock(void);
/* The current stream as a cudaStream_t. */
cudaStream_t tp_cuda_stream(void);
/* A device vector of at least n ones of dtype dt (grown on demand, cached). Caller holds the lock. */
tp_status tp_cuda_ones(tp_cuda_ctx *ctx, tp_dtype dt, int64_t n, const void **ones);

#endif
