/* What the CUDA parts of the floors above (gemm/cublas.c, comm/nccl.c) share with device/cuda.c: the
 * error check of CUDA runtime calls, the current stream, making a device current. Only compiled into
 * TPLINEAR_CUDA builds. Internal. */
#ifndef TP_DEVICE_CUDA_H
#define TP_DEVICE_CUDA_H

#include <cuda_runtime_api.h>

#include "device.h"

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

/* Devices with a stream entry and cuBLAS state of their own (ordinals 0 .. TP_CUDA_MAX_DEVICES - 1). */
#define TP_CUDA_MAX_DEVICES 64

/* tplinear's stream of the thread's current device (tp_cuda_set_stream) as a cudaStream_t: call it after
 * tp_cuda_use_device, so that work is enqueued on a stream of the device it runs on. */
cudaStream_t tp_cuda_stream(void);
/* Makes device current on this thread, *prev the device that was current (-1 until it is known); the
 * caller gives it back with tp_cuda_restore_device(prev) on every path, so that tplinear never leaves the
 * caller's thread (torch's current device) on another GPU. TP_ERR_UNSUPPORTED without a visible GPU,
 * TP_ERR_VALUE for an ordinal that does not exist. */
tp_status tp_cuda_use_device(int device, int *prev);
void tp_cuda_restore_device(int prev);

#endif
