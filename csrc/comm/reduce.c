/* Element-wise kernels of the collectives on the host: the reduction of the ranks' buffers, shared by the
 * backends that reduce on the host (shm, mpi), in rank order, so every backend and every rank gets the same
 * bits; the dtypes it reduces; and the row bias the row layer's all-reduce adds (group.c, shm). bfloat16 and
 * float16 are reduced in float32 (the float32 reduction's operations, in the same order) and rounded once. */
#include <string.h>

#include "../core/dtype.h"
#include "backend.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define REDUCE_CLONES __attribute__((target_clones("avx2", "default"))) /* as MPI's own ops: wide vectors */
#else
#define REDUCE_CLONES
#endif

#define RED_BLK 512

/* out[i] = in[0][i] op in[1][i] op ... in rank order; out may alias any input (each block of inputs is
 * read before its output is written). Integer sums wrap (computed unsigned). AVG divides the sum by p
 * (integer division, truncating, for integer dtypes). */
#define DEFINE_REDUCE(NAME, T, UT)                                                                      \
    REDUCE_CLONES static void NAME(void *outv, char *const *in, int p, size_t n, int op)                \
    {                                                                                                   \
        T acc[RED_BLK];                                                                                 \
        T *out = outv;                                                                                  \
        for (size_t b = 0; b < n; b += RED_BLK) {                                                       \
            size_t m = n - b < RED_BLK ? n - b : RED_BLK;                                               \
            memcpy(acc, (const T *)in[0] + b, m * sizeof(T));                                           \
            for (int j = 1; j < p; j++) {                                                               \
                const T *s = (const T *)in[j] + b;                                                      \
                if (op == TP_SUM || op == TP_AVG)                                                       \
                    for (size_t i = 0; i < m; i++) acc[i] = (T)((UT)acc[i] + (UT)s[i]);                 \
                else if (op == TP_MAX)                                                                  \
                    for (size_t i = 0; i < m; i++) acc[i] = s[i] > acc[i] ? s[i] : acc[i];              \
                else                                                                                    \
                    for (size_t i = 0; i < m; i++) acc[i] = s[i] < acc[i] ? s[i] : acc[i];              \
            }                                                                                           \
            if (op == TP_AVG)                                                                           \
                for (size_t i = 0; i < m; i++) acc[i] = (T)(acc[i] / (T)p);                             \
            memcpy(out + b, acc, m * sizeof(T));                                                        \
        }                                                                                               \
    }

DEFINE_REDUCE(reduce_f32, float, float)
DEFINE_REDUCE(reduce_f64, double, double)
DEFINE_REDUCE(reduce_i32, int32_t, uint32_t)
DEFINE_REDUCE(reduce_i64, int64_t, uint64_t)

/* The same reduction when out overlaps no input, or is in[0] or in[1] itself and overlaps no other:
 * out = in0 op in1, then out op= in[j] (one pass per input, no staging block; the same order of
 * operations, so the same bits). */
#define RED_OP(op, x, y, UT, T)                                                                         \
    ((op) == TP_MAX ? ((y) > (x) ? (y) : (x)) : (op) == TP_MIN ? ((y) < (x) ? (y) : (x))                \
                                                               : (T)((UT)(x) + (UT)(y)))
#define DEFINE_REDUCE_NOALIAS(NAME, T, UT)                                                              \
    REDUCE_CLONES static void NAME##_first(T *restrict out, const T *restrict a, const T *restrict b, size_t n, \
                             int op)                                                                    \
    {                                                                                                   \
        if (op == TP_SUM || op == TP_AVG)                                                               \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_SUM, a[i], b[i], UT, T);                  \
        else if (op == TP_MAX)                                                                          \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_MAX, a[i], b[i], UT, T);                  \
        else                                                                                            \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_MIN, a[i], b[i], UT, T);                  \
    }                                                                                                   \
    REDUCE_CLONES static void NAME##_more(T *restrict out, const T *restrict b, size_t n, int op)       \
    {                                                                                                   \
        if (op == TP_SUM || op == TP_AVG)                                                               \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_SUM, out[i], b[i], UT, T);                \
        else if (op == TP_MAX)                                                                          \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_MAX, out[i], b[i], UT, T);                \
        else                                                                                            \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_MIN, out[i], b[i], UT, T);                \
    }                                                                                                   \
    /* out = a op out: the first step when out is in[1] (each element read before it is written) */   \
    REDUCE_CLONES static void NAME##_second(T *out, const T *restrict a, size_t n, int op)              \
    {                                                                                                   \
        if (op == TP_SUM || op == TP_AVG)                                                               \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_SUM, a[i], out[i], UT, T);                \
        else if (op == TP_MAX)                                                                          \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_MAX, a[i], out[i], UT, T);                \
        else                                                                                            \
            for (size_t i = 0; i < n; i++) out[i] = RED_OP(TP_MIN, a[i], out[i], UT, T);                \
    }                                                                                                   \
    REDUCE_CLONES static void NAME(void *outv, char *const *in, int p, size_t n, int op)                \
    {                                                                                                   \
        T *out = outv;                                                                                  \
        if (p == 1) {                                                                                   \
            if ((char *)out != in[0]) memcpy(out, in[0], n * sizeof(T));                                \
        } else {                                                                                        \
            if ((char *)out == in[0])                                                                   \
                NAME##_more(out, (const T *)in[1], n, op);                                              \
            else if ((char *)out == in[1])                                                              \
                NAME##_second(out, (const T *)in[0], n, op);                                            \
            else                                                                                        \
                NAME##_first(out, (const T *)in[0], (const T *)in[1], n, op);                           \
            for (int j = 2; j < p; j++) NAME##_more(out, (const T *)in[j], n, op);                      \
        }                                                                                               \
        if (op == TP_AVG)                                                                               \
            for (size_t i = 0; i < n; i++) out[i] = (T)(out[i] / (T)p);                                 \
    }

DEFINE_REDUCE_NOALIAS(reduce_na_f32, float, float)
DEFINE_REDUCE_NOALIAS(reduce_na_f64, double, double)
DEFINE_REDUCE_NOALIAS(reduce_na_i32, int32_t, uint32_t)
DEFINE_REDUCE_NOALIAS(reduce_na_i64, int64_t, uint64_t)

/* bfloat16 / float16: a block of every input converted to float32 (core/dtype.c), reduced there as reduce_f32
 * does, and rounded once into out (nearest, ties to even); out may alias any input, as in DEFINE_REDUCE. */
static void reduce_half(tp_dtype dt, void *out, char *const *in, int p, size_t n, int op)
{
    float acc[RED_BLK], s[RED_BLK];
    for (size_t b = 0; b < n; b += RED_BLK) {
        size_t m = n - b < RED_BLK ? n - b : RED_BLK;
        tp_half_to_float32(dt, (const uint16_t *)in[0] + b, acc, m);
        for (int j = 1; j < p; j++) {
            tp_half_to_float32(dt, (const uint16_t *)in[j] + b, s, m);
            if (op == TP_SUM || op == TP_AVG)
                for (size_t i = 0; i < m; i++) acc[i] += s[i];
            else if (op == TP_MAX)
                for (size_t i = 0; i < m; i++) acc[i] = s[i] > acc[i] ? s[i] : acc[i];
            else
                for (size_t i = 0; i < m; i++) acc[i] = s[i] < acc[i] ? s[i] : acc[i];
        }
        if (op == TP_AVG)
            for (size_t i = 0; i < m; i++) acc[i] = acc[i] / (float)p;
        tp_half_from_float32(dt, acc, (uint16_t *)out + b, m);
    }
}

void tp_reduce_ranks(tp_dtype dt, void *out, char *const *in, int p, size_t n, int op)
{
    const size_t bytes = n * tp_dtype_size(dt);
    int alias = 0;
    if (tp_dtype_is_half(dt)) {
        reduce_half(dt, out, in, p, n, op);
        return;
    }
    /* out may be in[0] or in[1] itself (the streaming passes read each element before writing it) */
    for (int j = 0; j < p; j++)
        if ((char *)out < in[j] + bytes && in[j] < (char *)out + bytes && !(j < 2 && in[j] == (char *)out && (p < 2 || in[0] != in[1])))
            alias = 1;
    if (!alias) {
        switch (dt) {
        case TP_FLOAT32: reduce_na_f32(out, in, p, n, op); return;
        case TP_FLOAT64: reduce_na_f64(out, in, p, n, op); return;
        case TP_INT32: reduce_na_i32(out, in, p, n, op); return;
        case TP_INT64: reduce_na_i64(out, in, p, n, op); return;
        default: return;
        }
    }
    switch (dt) {
    case TP_FLOAT32: reduce_f32(out, in, p, n, op); break;
    case TP_FLOAT64: reduce_f64(out, in, p, n, op); break;
    case TP_INT32: reduce_i32(out, in, p, n, op); break;
    case TP_INT64: reduce_i64(out, in, p, n, op); break;
    default: break;
    }
}

tp_status tp_reduce_check_dtype(const char *backend, tp_dtype dt, const char *what)
{
    if (dt == TP_FLOAT32 || dt == TP_FLOAT64 || dt == TP_INT32 || dt == TP_INT64 || tp_dtype_is_half(dt)) return TP_OK;
    return tp_error(TP_ERR_TYPE, "%s: the %s backend reduces float32, float64, bfloat16, float16, int32 and int64, not %s",
                    what, backend, tp_dtype_name(dt));
}

void tp_bias_add_span(tp_dtype dt, void *out, size_t first, size_t n, const void *bias, size_t width)
{
    size_t col = first % width;
    for (size_t i = 0; i < n;) {
        size_t m = width - col < n - i ? width - col : n - i;
        if (tp_dtype_is_half(dt)) { /* the rounded sum + bias in float32, rounded again (a second rounding) */
            float o[RED_BLK], b[RED_BLK];
            for (size_t k0 = 0; k0 < m; k0 += RED_BLK) {
                size_t w = m - k0 < RED_BLK ? m - k0 : RED_BLK;
                uint16_t *oh = (uint16_t *)out + i + k0;
                tp_half_to_float32(dt, oh, o, w);
                tp_half_to_float32(dt, (const uint16_t *)bias + col + k0, b, w);
                for (size_t k = 0; k < w; k++) o[k] += b[k];
                tp_half_from_float32(dt, o, oh, w);
            }
        } else if (dt == TP_FLOAT32) {
            float *o = (float *)out + i;
            const float *b = (const float *)bias + col;
            for (size_t k = 0; k < m; k++) o[k] += b[k];
        } else {
            double *o = (double *)out + i;
            const double *b = (const double *)bias + col;
            for (size_t k = 0; k < m; k++) o[k] += b[k];
        }
        i += m;
        col = 0;
    }
}
