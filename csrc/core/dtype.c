/* The dtype table (see dtype.h) and the host conversions of bfloat16 and float16 to and from float32. */
#include <string.h>

#include "dtype.h"
#include "env.h"

static const tp_dtype_info TABLE[TP_DTYPE_COUNT] = {
    {TP_FLOAT32, "float32", "float", 4, "f", TP_DL_FLOAT, 32, "<f4",
     TP_DTYPE_FLOATING | TP_DTYPE_HOST_MATH | TP_DTYPE_DEVICE_MATH},
    {TP_FLOAT64, "float64", "double", 8, "d", TP_DL_FLOAT, 64, "<f8",
     TP_DTYPE_FLOATING | TP_DTYPE_HOST_MATH | TP_DTYPE_DEVICE_MATH},
    {TP_FLOAT16, "float16", "half", 2, "e", TP_DL_FLOAT, 16, "<f2",
     TP_DTYPE_FLOATING | TP_DTYPE_HOST_MATH | TP_DTYPE_DEVICE_MATH},
    {TP_BFLOAT16, "bfloat16", "bf16", 2, "", TP_DL_BFLOAT, 16, NULL,
     TP_DTYPE_FLOATING | TP_DTYPE_HOST_MATH | TP_DTYPE_DEVICE_MATH},
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

/* ---------------------------------------------------------------- bfloat16 and float16 <-> float32 */

static uint16_t bf16_round(uint32_t u)
{
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u; /* NaN: the canonical quiet NaN (as torch's c10::BFloat16) */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); /* + 0x7FFF + the kept lowest bit: ties to even */
}

static uint16_t f16_round(uint32_t u)
{
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu, e = a >> 23, m, q, rem, half;
    int shift;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu)); /* NaN, made quiet (F16C) */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 (and infinity): infinity */
    if (a >= 0x38800000u) {                                    /* normal: >= 2^-14 */
        uint32_t r = a - 0x38000000u;                          /* exponent rebased from 127 to 15 */
        return (uint16_t)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13)); /* a carry into the exponent is right */
    }
    if (e < 102) return sign; /* below 2^-25: rounds to zero */
    m = (a & 0x7FFFFFu) | 0x800000u; /* subnormal: round(value / 2^-24) = m >> (126 - e), ties to even */
    shift = 126 - (int)e;
    q = m >> shift;
    rem = m & ((1u << shift) - 1u);
    half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++; /* q == 0x400 is the smallest normal, encoded right */
    return (uint16_t)(sign | q);
}

static uint32_t f16_widen(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return sign | 0x7F800000u | (m ? 0x400000u | (m << 13) : 0); /* inf; NaN made quiet (F16C) */
    if (e != 0) return sign | ((e + 112u) << 23) | (m << 13);
    if (m == 0) return sign;
    e = 113; /* subnormal m * 2^-24: normalised */
    while (!(m & 0x400u)) {
        m <<= 1;
        e--;
    }
    return sign | (e << 23) | ((m & 0x3FFu) << 13);
}

static void plain_to_float32(tp_dtype dt, const uint16_t *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u = dt == TP_BFLOAT16 ? (uint32_t)src[i] << 16 : f16_widen(src[i]);
        memcpy(&dst[i], &u, sizeof u);
    }
}

static void plain_from_float32(tp_dtype dt, const float *src, uint16_t *dst, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], sizeof u);
        dst[i] = dt == TP_BFLOAT16 ? bf16_round(u) : f16_round(u);
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define TP_HAVE_HALF_SIMD 1

/* 8 elements per step; the tails (n not a multiple of 8) take the plain C path, which gives the same bits */
__attribute__((target("avx2"))) static void bf16_to_float32_avx2(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(w, 16));
    }
    plain_to_float32(TP_BFLOAT16, src + i, dst + i, n - i);
}

__attribute__((target("avx2"))) static void bf16_from_float32_avx2(const float *src, uint16_t *dst, size_t n)
{
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), abs = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i inf = _mm256_set1_epi32(0x7F800000), qnan = _mm256_set1_epi32(0x7FC0);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf); /* both sides non-negative */
        r = _mm256_blendv_epi8(r, qnan, nan);
        r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8); /* lanes' halves in order */
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_castsi256_si128(r));
    }
    plain_from_float32(TP_BFLOAT16, src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void f16_to_float32_f16c(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    plain_to_float32(TP_FLOAT16, src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void f16_from_float32_f16c(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    plain_from_float32(TP_FLOAT16, src + i, dst + i, n - i);
}
#endif

int tp_half_simd_usable(tp_dtype dt)
{
#ifdef TP_HAVE_HALF_SIMD
    if (dt == TP_BFLOAT16) return __builtin_cpu_supports("avx2");
    if (dt == TP_FLOAT16) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    (void)dt;
    return 0;
}

int tp_dtype_is_half(tp_dtype dt) { return dt == TP_BFLOAT16 || dt == TP_FLOAT16; }

void tp_half_to_float32_with(int simd, tp_dtype dt, const void *src, float *dst, size_t n)
{
#ifdef TP_HAVE_HALF_SIMD
    if (simd && tp_half_simd_usable(dt)) {
        if (dt == TP_BFLOAT16)
            bf16_to_float32_avx2(src, dst, n);
        else
            f16_to_float32_f16c(src, dst, n);
        return;
    }
#endif
    (void)simd;
    plain_to_float32(dt, src, dst, n);
}

void tp_half_from_float32_with(int simd, tp_dtype dt, const float *src, void *dst, size_t n)
{
#ifdef TP_HAVE_HALF_SIMD
    if (simd && tp_half_simd_usable(dt)) {
        if (dt == TP_BFLOAT16)
            bf16_from_float32_avx2(src, dst, n);
        else
            f16_from_float32_f16c(src, dst, n);
        return;
    }
#endif
    (void)simd;
    plain_from_float32(dt, src, dst, n);
}

void tp_half_to_float32(tp_dtype dt, const void *src, float *dst, size_t n)
{
    tp_half_to_float32_with((int)tp_knob_value(TP_KNOB_HALF_SIMD), dt, src, dst, n);
}

void tp_half_from_float32(tp_dtype dt, const float *src, void *dst, size_t n)
{
    tp_half_from_float32_with((int)tp_knob_value(TP_KNOB_HALF_SIMD), dt, src, dst, n);
}

void tp_bf16_from_float32(const float *src, uint16_t *dst, size_t n) { tp_half_from_float32(TP_BFLOAT16, src, dst, n); }

void tp_bf16_to_float32(const uint16_t *src, float *dst, size_t n) { tp_half_to_float32(TP_BFLOAT16, src, dst, n); }
