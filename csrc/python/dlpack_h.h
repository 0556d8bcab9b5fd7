/* The DLPack structures tplinear reads and writes, written from the DLPack specification
 * (https://dmlc.github.io/dlpack/latest/c_api.html, ABI version 1.x). Only what is used here. */
#ifndef TP_DLPACK_H_H
#define TP_DLPACK_H_H

#include <stdint.h>

#define TP_DLPACK_MAJOR 1
#define TP_DLPACK_MINOR 0

/* DLDeviceType */
enum {
    TP_kDLCPU = 1,
    TP_kDLCUDA = 2,
    TP_kDLCUDAHost = 3,
    TP_kDLCUDAManaged = 13,
};

/* DLDataTypeCode */
enum {
    TP_kDLInt = 0,
    TP_kDLUInt = 1,
    TP_kDLFloat = 2,
    TP_kDLBfloat = 4,
};

typedef struct {
    int32_t device_type; /* a C enum in the specification: int-sized */
    int32_t device_id;
} tp_DLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} tp_DLDataType;

typedef struct {
    void *data;
    tp_DLDevice device;
    int32_t ndim;
    tp_DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL: compact row-major */
    uint64_t byte_offset;
} tp_DLTensor;

typedef struct tp_DLManagedTensor {
    tp_DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct tp_DLManagedTensor *self);
} tp_DLManagedTensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} tp_DLPackVersion;

#define TP_DLPACK_FLAG_READ_ONLY ((uint64_t)1 << 0)
#define TP_DLPACK_FLAG_IS_COPIED ((uint64_t)1 << 1)

typedef struct tp_DLManagedTensorVersioned {
    tp_DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct tp_DLManagedTensorVersioned *self);
    uint64_t flags;
    tp_DLTensor dl_tensor;
} tp_DLManagedTensorVersioned;

#endif
