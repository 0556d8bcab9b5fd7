/* Slicing a rank's shard out of the full tensor (the inverse of gather.c, no communication), and the
 * piece copies both directions share. The copies run on the tensors' device (tp_tensor_copy), so GPU
 * parameters re-partition without a trip through the host. */
#include "shard.h"

tp_status tp_shard_check(const tp_tensor *shard, const tp_tensor *full, int dim, const tp_range *ranges, int p,
                         int nblocks, int rank, const char *what)
{
    tp_status st = TP_OK;
    int64_t covered = 0, width = 0;
    TP_REQUIRE(shard != NULL && full != NULL && ranges != NULL, "%s: NULL argument", what);
    TP_REQUIRE(p >= 1 && nblocks >= 1, "%s: need a group size and a block count >= 1, got %d and %d", what, p,
               nblocks);
    TP_REQUIRE(rank >= 0 && rank < p, "%s: rank %d is not in 0..%d", what, rank, p - 1);
    TP_REQUIRE(tp_device_same(shard->device, full->device), "%s: the shard is on %s:%d but the full tensor on %s:%d",
               what, tp_device_kind(shard->device), shard->device.index, tp_device_kind(full->device),
               full->device.index);
    TP_REQUIRE(shard->dtype == full->dtype, "%s: shard is %s but the full tensor is %s", what,
               tp_dtype_name(shard->dtype), tp_dtype_name(full->dtype));
    TP_REQUIRE(shard->ndim == full->ndim && dim >= 0 && dim < full->ndim,
               "%s: shard and full tensor must have the same rank and dim %d must exist", what, dim);
    for (int d = 0; d < full->ndim; d++)
        TP_REQUIRE(d == dim || shard->shape[d] == full->shape[d], "%s: shard dim %d is %lld, expected %lld", what, d,
                   (long long)shard->shape[d], (long long)full->shape[d]);
    for (int i = 0; i < p * nblocks; i++) {
        TP_REQUIRE(ranges[i].offset >= 0 && ranges[i].size >= 0 &&
                       ranges[i].offset + ranges[i].size <= full->shape[dim],
                   "%s: range %d [%lld, %lld) is outside dim %d of size %lld", what, i, (long long)ranges[i].offset,
                   (long long)(ranges[i].offset + ranges[i].size), dim, (long long)full->shape[dim]);
        covered += ranges[i].size;
        if (i / nblocks == rank) width += ranges[i].size;
    }
    TP_REQUIRE(covered == full->shape[dim], "%s: shards cover %lld of dim %d's %lld", what, (long long)covered, dim,
               (long long)full->shape[dim]);
    TP_REQUIRE(width == shard->shape[dim], "%s: rank %d's shard has %lld along dim %d, the partition says %lld", what,
               rank, (long long)shard->shape[dim], dim, (long long)width);
out:
    return st;
}

tp_status tp_shard_copy(tp_tensor *packed, tp_tensor *full, int dim, const tp_range *pieces, int nblocks,
                        int to_full)
{
    tp_status st = TP_OK;
    int64_t at = 0;
    for (int i = 0; i < nblocks; i++) {
        tp_tensor in_packed, in_full;
        TP_CHECK(tp_tensor_narrow(packed, dim, at, pieces[i].size, &in_packed));
        TP_CHECK(tp_tensor_narrow(full, dim, pieces[i].offset, pieces[i].size, &in_full));
        TP_CHECK(to_full ? tp_tensor_copy(&in_full, &in_packed) : tp_tensor_copy(&in_packed, &in_full));
        at += pieces[i].size;
    }
out:
    return st;
}

tp_status tp_shard_packed(const tp_tensor *full, int dim, const tp_range *ranges, int p, int nblocks, int rank,
                          tp_tensor *shard)
{
    tp_status st = TP_OK;
    TP_CHECK(tp_shard_check(shard, full, dim, ranges, p, nblocks, rank, "shard"));
    /* full is only read (to_full = 0) */
    TP_CHECK(tp_shard_copy(shard, (tp_tensor *)full, dim, ranges + (size_t)rank * (size_t)nblocks, nblocks, 0));
out:
    return st;
}

tp_status tp_shard_dim(const tp_tensor *full, int dim, const tp_range *ranges, int p, int rank, tp_tensor *shard)
{
    return tp_shard_packed(full, dim, ranges, p, 1, rank, shard);
}
