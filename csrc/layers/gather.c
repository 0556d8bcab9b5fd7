/* Gathering shards back into the full tensor (all-gather-v along any dim, even or uneven, packed). */
#include <stdlib.h>
#include <string.h>

#include "shard.h"

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
    if (p > 1) TP_CHECK(tp_group_check_device(g, full->device, "gather: the full tensor"));
    TP_CHECK(tp_shard_check(shard, full, dim, ranges, p, nblocks, me, "gather"));
    /* shard is only read below (tp_shard_copy with to_full = 1) */
    if (p == 1) { /* nothing to exchange: the shard's pieces are the full tensor */
        TP_CHECK(tp_shard_copy((tp_tensor *)shard, full, dim, ranges, nblocks, 1));
        goto out;
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
