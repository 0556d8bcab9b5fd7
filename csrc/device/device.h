/* The device floor: memory and copies where a tensor lives (host memory, or a GPU through device/cuda.c;
 * device/none.c answers for a build without CUDA). The public part is in tplinear.h (tp_tensor_copy,
 * tp_cuda_*); this is what the floors above share. Includes only core. Internal. */
#ifndef TP_DEVICE_H
#define TP_DEVICE_H

#include "../core/internal.h"

/* bytes of memory on dev: host memory (malloc), or stream-ordered GPU memory on the current stream.
 * *p is NULL on failure. */
tp_status tp_device_alloc(tp_device dev, size_t bytes, void **p);
/* Frees what tp_device_alloc returned (NULL is fine). */
void tp_device_free(tp_device dev, void *p);
/* "cpu" or "cuda", for messages ("%s:%d" with dev.index). */
const char *tp_device_kind(tp_device dev);
/* 1 when a and b are the same device. */
int tp_device_same(tp_device a, tp_device b);

#endif
