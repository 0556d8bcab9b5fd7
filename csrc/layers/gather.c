/* Gathering shards back into the full tensor (all-gather-v along any dim, even or uneven, packed). */
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"

/* Staging buffers live where the tensors do (GPU tensors: device memory, so NCCL reads them in place). */
static tp_status buf_alloc(const tp_tensor *like, size_t bytes, void **p)
{
    if (like->device.type == TP_DEVICE_CUDA) return tp_cuda_malloc(like->device.index, bytes, p);
    *p = malloc(bytes);
    return *p ? TP_OK : tp_error(TP_ERR_NOMEM, "gather: out of memory for %zu bytes", bytes);
}

static void buf_free(const tp_tensor *like, void *p)
{
    if (p == NULL) return;
    if (like->device.type == TP_DEVICE_CUDA)
        (void)tp_cuda_free(like->device.index, p);
    else
        free(p);
}

tp_status tp_gather_packed(tp_group *g, const tp_tensor *shard, int dim, const tp_range *ranges, int nblocks,
                           tp_tensor *full)
{
    tp_status st = TP_OK;
    int p, me;
    int64_t other = 1; /* product of the dims other than `dim` */
    size_t *counts = NULL, item = tp_dtype_size(full->dtype), total = 0;
    void *send = NULL, *recv = NULL;
    tp_tensor flat;
    TP_REQUIRE(g != NULL && tp_group_rank(g) >= 0, "gather: this rank is not a member of the group");
    TP_REQUIRE(nblocks >= 1, "gather: need at least one block");
    if (tp_group_size(g) > 1) TP_CHECK(tp_group_check_device(g, full->device, "gather: the full tensor"));
    TP_REQUIRE(shard->device.type == full->device.type && shard->device.index == full->device.index,
               "gather: the shard is on %s:%d but the full tensor on %s:%d",
               shard->device.type == TP_DEVICE_CUDA ? "cuda" : "cpu", shard->device.index,
               full->device.type == TP_DEVICE_CUDA ? "cuda" : "cpu", full->device.index);
    TP_REQUIRE(shard->dtype == full->dtype, "gather: shard is %s but the full tensor is %s",
               tp_dtype_name(shard->dtype), tp_dtype_name(full->dtype));
    TP_REQUIRE(shard->ndim == full->ndim && dim >= 0 && dim < full->ndim,
               "gather: shard and full tensor must have the same rank and dim %d must exist", dim);
    p = tp_group_size(g);
    me = tp_group_rank(g);
    for (int d = 0; d < full->ndim; d++) {
        if (d == dim) continue;
        TP_REQUIRE(shard->shape[d] == full->shape[d], "gather: shard dim %d is %lld, expected %lld", d,
                   (long long)shard->shape[d], (long long)full->shape[d]);
        other *= full->shape[d];
    }
    counts = calloc((size_t)p, sizeof *counts);
    if (counts == NULL) {
        st = tp_error(TP_ERR_NOMEM, "gather: out of memory");
        goto out;
    }
    {
        int64_t covered = 0;
        for (int r = 0; r < p; r++) {
            int64_t width = 0;
            for (int i = 0; i < nblocks; i++) width += ranges[r * nblocks + i].size;
            counts[r] = (size_t)(width * other);
            total += counts[r];
            covered += width;
            if (r == me)
                TP_REQUIRE(width == shard->shape[dim],
                           "gather: rank %d's shard has %lld along dim %d, the partition says %lld", me,
                           (long long)shard->shape[dim], dim, (long long)width);
        }
        TP_REQUIRE(covered == full->shape[dim], "gather: shards cover %lld of dim %d's %lld",
                   (long long)covered, dim, (long long)full->shape[dim]);
    }
    if (p == 1) { /* nothing to exchange: the shard is the full tensor (ranges[0] covers it) */
        tp_tensor dst;
        int64_t at = 0;
        for (int i = 0; i < nblocks; i++) {
            tp_tensor src;
            TP_CHECK(tp_tensor_narrow(shard, dim, at, ranges[i].size, &src));
            TP_CHECK(tp_tensor_narrow(full, dim, ranges[i].offset, ranges[i].size, &dst));
            TP_CHECK(tp_tensor_copy(&dst, &src));
            at += ranges[i].size;
        }
        goto out;
    }
    TP_CHECK(buf_alloc(full, counts[me] * item + 1, &send));
    TP_CHECK(buf_alloc(full, total * item + 1, &recv));
    TP_CHECK(tp_tensor_init(&flat, send, shard->dtype, shard->ndim, shard->shape));
    flat.device = full->device;
    TP_CHECK(tp_tensor_copy(&flat, shard));
    TP_CHECK(tp_all_gatherv(g, send, recv, counts, full->dtype));
    {
        char *base = recv;
        for (int r = 0; r < p; r++) {
            int64_t shape[TP_MAX_DIMS], at = 0;
            memcpy(shape, full->shape, sizeof shape);
            shape[dim] = (int64_t)(counts[r] / (size_t)(other > 0 ? other : 1));
            if (other == 0) shape[dim] = 0;
            TP_CHECK(tp_tensor_init(&flat, base, full->dtype, full->ndim, shape));
            flat.device = full->device;
            for (int i = 0; i < nblocks; i++) {
                tp_tensor src, dst;
                const tp_range *rg = &ranges[r * nblocks + i];
                TP_CHECK(tp_tensor_narrow(&flat, dim, at, rg->size, &src));
                TP_CHECK(tp_tensor_narrow(full, dim, rg->offset, rg->size, &dst));
                TP_CHECK(tp_tensor_copy(&dst, &src));
                at += rg->size;
            }
            base += counts[r] * item;
        }
    }
out:
    free(counts);
    buf_free(full, send);
    buf_free(full, recv);
    return st;
}

tp_status tp_gather_dim(tp_group *g, const tp_tensor *shard, int dim, const tp_range *ranges, tp_tensor *full)
{
    return tp_gather_packed(g, shard, dim, ranges, 1, full);
}
