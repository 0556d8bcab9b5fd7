/* The dtype table (see dtype.h) and the conversions that only tplinear knows (bfloat16 on the host). */
#include <string.h>

#include "dtype.h"

static const tp_dtype_info TABLE[TP_DTYPE_COUNT] = {
    {TP_FLOAT32, "float32", "float", 4, "f", TP_DL_FLOAT, 32, "<f4",
     TP_DTYPE_FLOATING | TP_DTYPE_HOST_MATH | TP_DTYPE_DEVICE_MATH},
    {TP_FLOAT64, "float64", "double", 8, "d", TP_DL_FLOAT, 64, "<f8",
     TP_DTYPE_FLOATING | TP_DTYPE_HOST_MATH | TP_DTYPE_DEVICE_MATH},
    {TP_FLOAT16, "float16", "half", 2, "e", TP_DL_FLOAT, 16, "<f2", TP_DTYPE_FLOATING | TP_DTYPE_DEVICE_MATH},
    {TP_BFLOAT16, "bfloat16", "bf16", 2, "", TP_DL_BFLOAT, 16, NULL, TP_DTYPE_FLOATING | TP_DTYPE_DEVICE_MATH},
    /* 'l' is a C long: 8 bytes on LP64, 4 on LLP64; the itemsize decides */
    {TP_INT32, "int32", NULL, 4, "ilq", TP_DL_INT, 32, "<i4", 0},
    {TP_INT64, "int64", NULL, 8, "ilq", TP_DL_INT, 64, "<i8", 0},
};

const tp_dtype_info *tp_dtype_info_of(tp_dtype dt)
{
    int i = (int)dt;
    return i >= 0 && i < TP_DTYPE_COUNT ? &TABLE[i] : NULL;
}

size_t tp_dtype_size(tp_dtype dt)
{
    const tp_dtype_info *info = tp_dtype_info_of(dt);
    return info ? info->itemsize : 0;
}

const char *tp_dtype_name(tp_dtype dt)
{
    const tp_dtype_info *info = tp_dtype_info_of(dt);
    return info ? info->name : "unknown";
}

const tp_dtype_info *tp_dtype_by_name(const char *name)
{
    if (name == NULL) return NULL;
    for (int i = 0; i < TP_DTYPE_COUNT; i++)
        if (strcmp(name, TABLE[i].name) == 0 || (TABLE[i].alias && strcmp(name, TABLE[i].alias) == 0))
            return &TABLE[i];
    return NULL;
}

const tp_dtype_info *tp_dtype_by_format(const char *format, size_t itemsize)
{
    const char *f = format ? format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++; /* native / little-endian only */
    if (f[0] == '\0' || f[1] != '\0') return NULL;
    for (int i = 0; i < TP_DTYPE_COUNT; i++)
        if (TABLE[i].itemsize == itemsize && strchr(TABLE[i].formats, f[0]) != NULL) return &TABLE[i];
    return NULL;
}

const tp_dtype_info *tp_dtype_by_dlpack(unsigned code, unsigned bits, unsigned lanes)
{
    if (lanes != 1) return NULL;
    for (int i = 0; i < TP_DTYPE_COUNT; i++)
        if (TABLE[i].dl_code == code && TABLE[i].dl_bits == bits) return &TABLE[i];
    return NULL;
}

const tp_dtype_info *tp_dtype_by_typestr(const char *typestr)
{
    if (typestr == NULL || strlen(typestr) != 3 || strchr("<|=", typestr[0]) == NULL) return NULL;
    for (int i = 0; i < TP_DTYPE_COUNT; i++)
        if (TABLE[i].typestr && strcmp(typestr + 1, TABLE[i].typestr + 1) == 0) return &TABLE[i];
    return NULL;
}

void tp_bf16_from_float32(const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], sizeof u);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u)
            dst[i] = 0x7FC0u; /* NaN: the canonical quiet NaN (as torch's c10::BFloat16) */
        else /* adding 0x7FFF plus the kept part's lowest bit rounds to nearest, ties to even */
            dst[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

void tp_bf16_to_float32(const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
}
