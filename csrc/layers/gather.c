/* Gathering shards back into the full tensor (all-gather-v along any dim, even or uneven, packed). */
#include <stdlib.h>
#include <string.h>

#include "shard.h"

/* The all-gather-v of shards that are consecutive rows (dim 0, ranges in rank order) of a contiguous
 * full tensor: every rank's shard lands in place, without staging (the sequence-parallel gather). */
static tp_status gather_rows(tp_group *g, const tp_tensor *shard, const tp_range *ranges, tp_tensor *full)
{
    tp_status st = TP_OK;
    int p = tp_group_size(g), me = tp_group_rank(g);
    size_t row = 1, item = tp_dtype_size(full->dtype), *counts = NULL;
    void *send = shard->data;
    tp_tensor packed;
    for (int d = 1; d < full->ndim; d++) row *= (size_t)full->shape[d];
    if ((counts = calloc((size_t)p, sizeof *counts)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "gather: out of memory");
        goto out;
    }
    for (int r = 0; r < p; r++) counts[r] = (size_t)ranges[r].size * row;
    if (!tp_tensor_is_contiguous(shard) && counts[me] > 0) { /* a strided view: packed first */
        TP_CHECK(tp_device_alloc(full->device, counts[me] * item, &send));
        TP_CHECK(tp_tensor_init(&packed, send, shard->dtype, shard->ndim, shard->shape));
        packed.device = full->device;
        TP_CHECK(tp_tensor_copy(&packed, shard));
    }
    TP_CHECK(tp_all_gatherv(g, send, full->data, counts, full->dtype));
out:
    if (send != shard->data) tp_device_free(full->device, send);
    free(counts);
    return st;
}

tp_status tp_gather_packed(tp_group *g, const tp_tensor *shard, int dim, const tp_range *ranges, int nblocks,
                           tp_tensor *full)
{
    tp_status st = TP_OK;
    int p, me;
    int64_t other = 1; /* product of the dims other than `dim` */
    int64_t *widths = NULL; /* each rank's size along dim */
    size_t *counts = NULL, item = tp_dtype_size(full->dtype), total = 0;
    void *send = NULL, *recv = NULL;
    tp_tensor flat;
    TP_REQUIRE(g != NULL && tp_group_rank(g) >= 0, "gather: this rank is not a member of the group");
    p = tp_group_size(g);
    me = tp_group_rank(g);
    TP_CHECK(tp_group_check_device(g, full->device, "gather: the full tensor"));
    TP_CHECK(tp_shard_check(shard, full, dim, ranges, p, nblocks, me, "gather"));
    /* shard is only read below (tp_shard_copy with to_full = 1) */
    if (p == 1) { /* nothing to exchange: the shard's pieces are the full tensor */
        TP_CHECK(tp_shard_copy((tp_tensor *)shard, full, dim, ranges, nblocks, 1));
        goto out;
    }
    if (nblocks == 1 && dim == 0 && tp_tensor_is_contiguous(full)) { /* rows in rank order: in place */
        int64_t at = 0;
        for (int r = 0; r < p && ranges[r].offset == at; r++) at += ranges[r].size;
        if (at == full->shape[0]) {
            TP_CHECK(gather_rows(g, shard, ranges, full));
            goto out;
        }
    }
    for (int d = 0; d < full->ndim; d++)
        if (d != dim) other *= full->shape[d];
    counts = calloc((size_t)p, sizeof *counts);
    widths = calloc((size_t)p, sizeof *widths);
    if (counts == NULL || widths == NULL) {
        st = tp_error(TP_ERR_NOMEM, "gather: out of memory");
        goto out;
    }
    for (int r = 0; r < p; r++) {
        for (int i = 0; i < nblocks; i++) widths[r] += ranges[r * nblocks + i].size;
        counts[r] = (size_t)(widths[r] * other);
        total += counts[r];
    }
    /* staging buffers live where the tensors do (GPU tensors: device memory, so NCCL reads them in place) */
    TP_CHECK(tp_device_alloc(full->device, counts[me] * item, &send));
    TP_CHECK(tp_device_alloc(full->device, total * item, &recv));
    TP_CHECK(tp_tensor_init(&flat, send, shard->dtype, shard->ndim, shard->shape));
    flat.device = full->device;
    TP_CHECK(tp_tensor_copy(&flat, shard));
    TP_CHECK(tp_all_gatherv(g, send, recv, counts, full->dtype));
    {
        char *base = recv;
        for (int r = 0; r < p; r++) {
            int64_t shape[TP_MAX_DIMS];
            memcpy(shape, full->shape, sizeof shape);
            shape[dim] = widths[r];
            TP_CHECK(tp_tensor_init(&flat, base, full->dtype, full->ndim, shape));
            flat.device = full->device;
            TP_CHECK(tp_shard_copy(&flat, full, dim, ranges + (size_t)r * (size_t)nblocks, nblocks, 1));
            base += counts[r] * item;
        }
    }
out:
    free(counts);
    free(widths);
    tp_device_free(full->device, send);
    tp_device_free(full->device, recv);
    return st;
}

tp_status tp_gather_dim(tp_group *g, const tp_tensor *shard, int dim, const tp_range *ranges, tp_tensor *full)
{
    return tp_gather_packed(g, shard, dim, ranges, 1, full);
}
