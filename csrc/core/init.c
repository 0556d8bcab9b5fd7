/* Counter-based initialisation: every element's value depends only on (seed, stream, global index),
 * so any shard can be initialised alone and equals the same slice of the full tensor. */
#include <math.h>

#include "error.h"

/* splitmix64's finaliser: a bijective 64-bit mix with full avalanche. Two rounds keyed by the seed
 * and stream decorrelate nearby counters and nearby seeds. */
static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t seed, uint64_t stream, uint64_t index)
{
    uint64_t key = mix64(seed * 0x9e3779b97f4a7c15ULL + mix64(stream + 0x632be59bd9b4e019ULL));
    uint64_t z = mix64(key ^ mix64(index + 0x9e3779b97f4a7c15ULL));
    return (double)(z >> 11) * 0x1.0p-53; /* 53 random bits in [0, 1) */
}

/* A standard normal value for element `index` (Box-Muller on two uniforms of its own, so it too depends
 * only on (seed, stream, index)). */
static double normal01(uint64_t seed, uint64_t stream, uint64_t index)
{
    double u1 = 1.0 - uniform01(seed, stream, 2 * index), u2 = uniform01(seed, stream, 2 * index + 1);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Fills t (1-d or 2-d) with element (i, j) = scale * the value of global position
 * (row_offset + i) * full_cols + col_offset + j: uniform in [-scale, scale), or normal with std scale. */
static tp_status init_values(tp_tensor *t, uint64_t seed, uint64_t stream, double scale, int64_t row_offset,
                             int64_t col_offset, int64_t full_cols, int normal)
{
    tp_status st = TP_OK;
    int64_t rows, cols, rs, cs;
    TP_REQUIRE(t->device.type == TP_DEVICE_CPU, "init: CPU tensors only");
    TP_REQUIRE(t->dtype == TP_FLOAT32 || t->dtype == TP_FLOAT64, "init: float32 or float64, got %s",
               tp_dtype_name(t->dtype));
    TP_REQUIRE(t->ndim == 1 || t->ndim == 2, "init: 1-d or 2-d tensors, got %d-d", t->ndim);
    TP_REQUIRE(row_offset >= 0 && col_offset >= 0 && full_cols >= 0, "init: negative offset");
    rows = t->ndim == 2 ? t->shape[0] : 1;
    cols = t->shape[t->ndim - 1];
    rs = t->ndim == 2 ? t->strides[0] : 0;
    cs = t->strides[t->ndim - 1];
    TP_REQUIRE(col_offset + cols <= full_cols, "init: columns [%lld, %lld) exceed the full width %lld",
               (long long)col_offset, (long long)(col_offset + cols), (long long)full_cols);
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t j = 0; j < cols; j++) {
            uint64_t idx = (uint64_t)((row_offset + i) * full_cols + col_offset + j);
            double v = normal ? normal01(seed, stream, idx) * scale
                              : (2.0 * uniform01(seed, stream, idx) - 1.0) * scale;
            if (t->dtype == TP_FLOAT32)
                ((float *)t->data)[i * rs + j * cs] = (float)v;
            else
                ((double *)t->data)[i * rs + j * cs] = v;
        }
    }
out:
    return st;
}

tp_status tp_init_uniform(tp_tensor *t, uint64_t seed, uint64_t stream, double bound,
                          int64_t row_offset, int64_t col_offset, int64_t full_cols)
{
    return init_values(t, seed, stream, bound, row_offset, col_offset, full_cols, 0);
}

tp_status tp_init_normal(tp_tensor *t, uint64_t seed, uint64_t stream, double std,
                         int64_t row_offset, int64_t col_offset, int64_t full_cols)
{
    return init_values(t, seed, stream, std, row_offset, col_offset, full_cols, 1);
}
