/* The pieces of a packed shard, shared by shard.c and gather.c. Internal. */
#ifndef TP_LAYERS_SHARD_H
#define TP_LAYERS_SHARD_H

#include "../device/device.h"

/* Checks that `shard` can hold rank `rank`'s shard of `full` along dim under ranges ([p][nblocks],
 * from tp_partition_packed): same dtype, device and number of dims, equal sizes except along dim,
 * shard's size along dim = the rank's pieces together, the ranges covering full's dim. what ("gather",
 * "shard") starts the messages. */
tp_status tp_shard_check(const tp_tensor *shard, const tp_tensor *full, int dim, const tp_range *ranges, int p,
                         int nblocks, int rank, const char *what);

/* Copies between a rank's packed shard and its pieces of full: pieces (nblocks entries, that rank's
 * row of the ranges) along dim; to_full = 1 writes full from packed, 0 writes packed from full. Both on
 * one device, shapes already checked. */
tp_status tp_shard_copy(tp_tensor *packed, tp_tensor *full, int dim, const tp_range *pieces, int nblocks,
                        int to_full);

#endif
