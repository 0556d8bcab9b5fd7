/* The one table of dtypes: for each tp_dtype its name, size and how the array protocols spell it
 * (buffer-protocol format characters, DLPack type code and bits, __cuda_array_interface__ typestr).
 * Every binding that maps a foreign description to a tp_dtype reads this table; so does Python,
 * through tplinear._C.dtypes(). Not installed: the public API is tp_dtype_size / tp_dtype_name. */
#ifndef TP_CORE_DTYPE_H
#define TP_CORE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#include "tplinear.h"

#define TP_DTYPE_COUNT 6

/* DLPack's DLDataTypeCode values (dlpack.h, ABI 1.x), as stored in the table. */
enum { TP_DL_INT = 0, TP_DL_UINT = 1, TP_DL_FLOAT = 2, TP_DL_BFLOAT = 4 };

/* What the C core can do with a dtype. */
enum {
    TP_DTYPE_FLOATING = 1 << 0,   /* a floating-point format */
    TP_DTYPE_HOST_MATH = 1 << 1,  /* CPU GEMMs, initialisation and layers (gemm/openblas) */
    TP_DTYPE_DEVICE_MATH = 1 << 2 /* GPU GEMMs and layers (gemm/cublas) */
};

typedef struct {
    tp_dtype dtype;
    const char *name;     /* "float32": tp_dtype_name, NumPy's and torch's name */
    const char *alias;    /* another accepted spelling ("float", "half"), or NULL */
    size_t itemsize;      /* bytes */
    const char *formats;  /* buffer-protocol format characters meaning this dtype at itemsize ("" none) */
    uint8_t dl_code;      /* DLPack DLDataType.code ... */
    uint8_t dl_bits;      /* ... and .bits (lanes is always 1) */
    const char *typestr;  /* __cuda_array_interface__ / NumPy typestr, little-endian ("<f4"); NULL: none */
    unsigned flags;       /* TP_DTYPE_* */
} tp_dtype_info;

/* The entry of dt, or NULL for a value that is not a tp_dtype. */
const tp_dtype_info *tp_dtype_info_of(tp_dtype dt);
/* The entry named name (or its alias), or NULL. */
const tp_dtype_info *tp_dtype_by_name(const char *name);
/* A buffer-protocol format ("f", "<d", "=q"; NULL means "B") of itemsize bytes; NULL if none fits. */
const tp_dtype_info *tp_dtype_by_format(const char *format, size_t itemsize);
/* A DLPack dtype (code, bits, lanes); NULL if none fits. */
const tp_dtype_info *tp_dtype_by_dlpack(unsigned code, unsigned bits, unsigned lanes);
/* A __cuda_array_interface__ typestr ("<f4"; '|' and '=' byte orders too); NULL if none fits. */
const tp_dtype_info *tp_dtype_by_typestr(const char *typestr);

/* float32 -> bfloat16 bit patterns: round to nearest, ties to even; NaN stays a (quiet) NaN. */
void tp_bf16_from_float32(const float *src, uint16_t *dst, size_t n);
/* bfloat16 bit patterns -> float32 (exact). */
void tp_bf16_to_float32(const uint16_t *src, float *dst, size_t n);

#endif
