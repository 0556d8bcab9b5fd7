/* tp_shard_packed against tp_gather_packed: in worlds of 1 to 4 forked ranks, for even, uneven (grain and
 * head rules) and packed partitions along every dim, contiguous and column-major tensors, four dtypes and
 * an empty other dim:
 *   shard -> gather: each rank slices its shard out of the full tensor, the shard holds exactly the
 *                    partition's pieces, and gathering the shards rebuilds the full tensor bit for bit;
 *   gather -> shard: each rank builds its shard from the partition alone, gathers, and slicing the
 *                    gathered tensor gives that shard back.
 * Every element's value is a function of its position in the full tensor, so a misplaced piece shows. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "world.h"

typedef struct {
    const char *label;
    int ndim;
    int64_t shape[3]; /* of the full tensor */
    int dim;
    int nblocks;
    int64_t blocks[3];
    int64_t heads[3]; /* 0: no head rule */
    int64_t grain;
    tp_dtype dtype;
    int fortran; /* 2-d only: column-major full and shard */
} shard_case;

static const shard_case CASES[] = {
    {"uneven grains, dim 1", 2, {5, 130}, 1, 1, {130}, {0}, TP_GRAIN_INFERENCE, TP_FLOAT32, 0},
    {"uneven grains, dim 0", 2, {130, 3}, 0, 1, {130}, {0}, TP_GRAIN_INFERENCE, TP_FLOAT64, 0},
    {"training grain 1, uneven, dim 0, column-major", 2, {13, 7}, 0, 1, {13}, {0}, TP_GRAIN_TRAINING, TP_FLOAT32, 1},
    {"packed qkv by heads, dim 0", 2, {40, 5}, 0, 3, {24, 8, 8}, {6, 2, 2}, TP_GRAIN_INFERENCE, TP_INT64, 0},
    {"packed small blocks, 3-d, last dim", 3, {2, 3, 12}, 2, 2, {7, 5}, {0, 0}, TP_GRAIN_INFERENCE, TP_INT32, 0},
    {"packed gate/up, dim 1, column-major", 2, {3, 10}, 1, 2, {5, 5}, {0, 0}, TP_GRAIN_INFERENCE, TP_FLOAT64, 1},
    {"3-d, middle dim", 3, {2, 9, 4}, 1, 1, {9}, {0}, TP_GRAIN_INFERENCE, TP_FLOAT32, 0},
    {"empty other dim", 2, {0, 10}, 1, 1, {10}, {0}, TP_GRAIN_INFERENCE, TP_FLOAT32, 0},
};
#define NCASES ((int)(sizeof CASES / sizeof CASES[0]))

/* The value of the full tensor's element at idx (distinct for every position of these small shapes). */
static int64_t value_at(const int64_t *idx, int ndim) { return 1 + idx[0] * 10007 + (ndim > 1 ? idx[1] * 101 : 0) + (ndim > 2 ? idx[2] : 0); }

static void put(const tp_tensor *t, const int64_t *idx, int64_t v)
{
    int64_t off = 0;
    for (int d = 0; d < t->ndim; d++) off += idx[d] * t->strides[d];
    switch (t->dtype) {
    case TP_FLOAT32: ((float *)t->data)[off] = (float)v; break;
    case TP_FLOAT64: ((double *)t->data)[off] = (double)v; break;
    case TP_INT32: ((int32_t *)t->data)[off] = (int32_t)v; break;
    default: ((int64_t *)t->data)[off] = v; break;
    }
}

static int64_t get(const tp_tensor *t, const int64_t *idx)
{
    int64_t off = 0;
    for (int d = 0; d < t->ndim; d++) off += idx[d] * t->strides[d];
    switch (t->dtype) {
    case TP_FLOAT32: return (int64_t)((float *)t->data)[off];
    case TP_FLOAT64: return (int64_t)((double *)t->data)[off];
    case TP_INT32: return ((int32_t *)t->data)[off];
    default: return ((int64_t *)t->data)[off];
    }
}

/* Steps idx through every position of shape (row-major); 0 when done. */
static int next_index(int64_t *idx, const int64_t *shape, int ndim)
{
    for (int d = ndim - 1; d >= 0; d--) {
        if (++idx[d] < shape[d]) return 1;
        idx[d] = 0;
    }
    return 0;
}

static int has_elements(const int64_t *shape, int ndim)
{
    for (int d = 0; d < ndim; d++)
        if (shape[d] == 0) return 0;
    return 1;
}

/* A tensor of c's dtype and the given shape on a fresh buffer, column-major when c->fortran. */
static void *make(const shard_case *c, const int64_t *shape, tp_tensor *t)
{
    int64_t n = 1;
    void *buf;
    for (int d = 0; d < c->ndim; d++) n *= shape[d];
    buf = calloc((size_t)(n > 0 ? n : 1), tp_dtype_size(c->dtype));
    if (buf == NULL || tp_tensor_init(t, buf, c->dtype, c->ndim, shape) != TP_OK) exit(2);
    if (c->fortran) {
        t->strides[0] = 1;
        t->strides[1] = shape[0] > 0 ? shape[0] : 1;
    }
    return buf;
}

/* The position in the full tensor of element idx of a tensor made of the given pieces of the full one
 * along dim (a shard: the rank's pieces; the full tensor: one piece covering the dim): its coordinate
 * along dim walks the pieces in order. */
static void full_index(const shard_case *c, const tp_range *pieces, int npieces, const int64_t *idx, int64_t *out)
{
    int64_t at = idx[c->dim];
    memcpy(out, idx, sizeof(int64_t) * (size_t)c->ndim);
    for (int i = 0; i < npieces; i++) {
        if (at < pieces[i].size) {
            out[c->dim] = pieces[i].offset + at;
            return;
        }
        at -= pieces[i].size;
    }
    out[c->dim] = -1;
}

/* Fills t from the value function (through the pieces only) or checks it; returns the mismatches. */
static int values(const shard_case *c, const tp_range *pieces, int npieces, const tp_tensor *t, int check)
{
    int64_t idx[3] = {0, 0, 0}, at[3];
    int bad = 0;
    if (!has_elements(t->shape, c->ndim)) return 0;
    do {
        full_index(c, pieces, npieces, idx, at);
        if (!check)
            put(t, idx, value_at(at, c->ndim));
        else if (get(t, idx) != value_at(at, c->ndim))
            bad++;
    } while (next_index(idx, t->shape, c->ndim));
    return bad;
}

static int shard_values(const shard_case *c, const tp_range *pieces, const tp_tensor *shard, int check)
{
    return values(c, pieces, c->nblocks, shard, check);
}

static int full_values(const shard_case *c, const tp_tensor *full, int check)
{
    const tp_range all = {0, c->shape[c->dim]};
    return values(c, &all, 1, full, check);
}

static void one_case(tp_group *g, const shard_case *c)
{
    int p = tp_group_size(g), r = tp_group_rank(g);
    tp_range *ranges = calloc((size_t)(p * c->nblocks), sizeof *ranges);
    int64_t shard_shape[3];
    tp_tensor full, shard, back;
    void *bf, *bs, *bb;
    int bad;
    if (ranges == NULL) exit(2);
    EXPECT_OK(tp_partition_packed(c->blocks, c->nblocks, p, &(tp_split_spec){.grain = c->grain}, c->heads, ranges));
    memcpy(shard_shape, c->shape, sizeof shard_shape);
    shard_shape[c->dim] = 0;
    for (int i = 0; i < c->nblocks; i++) shard_shape[c->dim] += ranges[r * c->nblocks + i].size;
    bf = make(c, c->shape, &full);
    bs = make(c, shard_shape, &shard);
    bb = make(c, shard_shape, &back);

    /* shard -> gather */
    full_values(c, &full, 0);
    EXPECT_OK(tp_shard_packed(&full, c->dim, ranges, p, c->nblocks, r, &shard));
    bad = shard_values(c, ranges + r * c->nblocks, &shard, 1);
    memset(bf, 0, (size_t)(tp_tensor_numel(&full) > 0 ? tp_tensor_numel(&full) : 1) * tp_dtype_size(c->dtype));
    EXPECT_OK(tp_gather_packed(g, &shard, c->dim, ranges, c->nblocks, &full));
    bad += full_values(c, &full, 1);

    /* gather -> shard */
    memset(bf, 0, (size_t)(tp_tensor_numel(&full) > 0 ? tp_tensor_numel(&full) : 1) * tp_dtype_size(c->dtype));
    shard_values(c, ranges + r * c->nblocks, &shard, 0);
    EXPECT_OK(tp_gather_packed(g, &shard, c->dim, ranges, c->nblocks, &full));
    bad += full_values(c, &full, 1);
    EXPECT_OK(tp_shard_packed(&full, c->dim, ranges, p, c->nblocks, r, &back));
    bad += shard_values(c, ranges + r * c->nblocks, &back, 1);
    if (c->nblocks == 1) { /* the unpacked form is the same call */
        memset(bb, 0, (size_t)(tp_tensor_numel(&back) > 0 ? tp_tensor_numel(&back) : 1) * tp_dtype_size(c->dtype));
        EXPECT_OK(tp_shard_dim(&full, c->dim, ranges, p, r, &back));
        bad += shard_values(c, ranges + r * c->nblocks, &back, 1);
    }
    if (bad) {
        fprintf(stderr, "case '%s', rank %d of %d: %d elements misplaced\n", c->label, r, p, bad);
        tp_test_failures++;
    }
    free(bf);
    free(bs);
    free(bb);
    free(ranges);
}

/* Refusals of tp_shard_packed: every one a TP_ERR_VALUE with a message, nothing written. */
static void bad_arguments(void)
{
    float f[24], s[12];
    double d[12];
    tp_tensor full, shard, dshard;
    tp_range halves[2] = {{0, 3}, {3, 3}}, short_[2] = {{0, 3}, {3, 2}}, outside[2] = {{0, 3}, {4, 3}};
    EXPECT_OK(tp_tensor_init(&full, f, TP_FLOAT32, 2, (int64_t[]){4, 6}));
    EXPECT_OK(tp_tensor_init(&shard, s, TP_FLOAT32, 2, (int64_t[]){4, 3}));
    EXPECT_OK(tp_tensor_init(&dshard, d, TP_FLOAT64, 2, (int64_t[]){4, 3}));
    EXPECT_OK(tp_shard_dim(&full, 1, halves, 2, 1, &shard));
    EXPECT_STATUS(tp_shard_dim(&full, 1, halves, 2, 2, &shard), TP_ERR_VALUE);   /* rank out of range */
    EXPECT(strstr(tp_last_error(), "rank 2") != NULL);
    EXPECT_STATUS(tp_shard_dim(&full, 1, halves, 2, -1, &shard), TP_ERR_VALUE);
    EXPECT_STATUS(tp_shard_dim(&full, 0, halves, 2, 0, &shard), TP_ERR_VALUE);   /* other dim differs */
    EXPECT_STATUS(tp_shard_dim(&full, 2, halves, 2, 0, &shard), TP_ERR_VALUE);   /* no such dim */
    EXPECT_STATUS(tp_shard_dim(&full, 1, halves, 2, 0, &dshard), TP_ERR_VALUE);  /* dtype */
    EXPECT(strstr(tp_last_error(), "float64") != NULL);
    EXPECT_STATUS(tp_shard_dim(&full, 1, short_, 2, 0, &shard), TP_ERR_VALUE);   /* does not cover the dim */
    EXPECT(strstr(tp_last_error(), "cover") != NULL);
    EXPECT_STATUS(tp_shard_dim(&full, 1, outside, 2, 0, &shard), TP_ERR_VALUE);  /* past the end */
    EXPECT_STATUS(tp_shard_packed(&full, 1, halves, 1, 2, 0, &shard), TP_ERR_VALUE); /* rank 0's two pieces: 6 wide */
    EXPECT(strstr(tp_last_error(), "partition says 6") != NULL);
    EXPECT_STATUS(tp_shard_packed(&full, 1, halves, 2, 0, 0, &shard), TP_ERR_VALUE); /* no blocks */
}

static int shard_world(int rank, int size, int port)
{
    tp_group *g = NULL;
    EXPECT_OK(world_init(rank, size, port, 30.0, &g));
    if (g == NULL) return 1;
    for (int i = 0; i < NCASES; i++) {
        one_case(g, &CASES[i]);
    }
    tp_group_destroy(g);
    return tp_test_failures;
}

int main(void)
{
    bad_arguments();
    for (int size = 1; size <= 4; size++) EXPECT(run_world(size, shard_world, -1) == 0);
    TEST_MAIN_END();
}
