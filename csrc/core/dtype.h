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

/* The half-precision dtypes of the host GEMMs and reductions: TP_BFLOAT16 and TP_FLOAT16. */
int tp_dtype_is_half(tp_dtype dt);
/* n elements of dt (bfloat16 or float16) -> float32, exact (a NaN stays a NaN: float16's payload shifted and
 * made quiet, as F16C does). */
void tp_half_to_float32(tp_dtype dt, const void *src, float *dst, size_t n);
/* n float32 -> dt (bfloat16 or float16), rounded to nearest, ties to even, once; out-of-range values become
 * infinities, NaN stays NaN (bfloat16: 0x7FC0, as torch's c10::BFloat16; float16: the payload's top bits, made
 * quiet, as F16C). Both use the AVX2 (bfloat16) / F16C (float16) kernels where the CPU has them, unless
 * TPLINEAR_HALF_SIMD=0, else plain C: the same bits either way. */
void tp_half_from_float32(tp_dtype dt, const float *src, void *dst, size_t n);
/* The same with the kernel chosen by the caller (the tests): simd != 0 asks for the vector kernels, which run
 * only where tp_half_simd_usable(dt) says the CPU has them (else plain C). */
void tp_half_to_float32_with(int simd, tp_dtype dt, const void *src, float *dst, size_t n);
void tp_half_from_float32_with(int simd, tp_dtype dt, const float *src, void *dst, size_t n);
/* 1 when this CPU has the vector conversions of dt (AVX2 for bfloat16, AVX2 + F16C for float16). */
int tp_half_simd_usable(tp_dtype dt);

#endif
