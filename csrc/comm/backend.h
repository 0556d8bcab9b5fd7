/* Process groups: the group object and the backend function table. Internal. */
#ifndef TP_COMM_BACKEND_H
#define TP_COMM_BACKEND_H

#include "../core/internal.h"
#include "store.h"

typedef struct tp_backend tp_backend;

/* A backend is a table of function pointers; layers never know which one runs.
 * `impl` is the backend's per-group state. All functions are collective over the group's members
 * and return within the group's timeout. */
struct tp_backend {
    const char *name;
    tp_status (*all_reduce)(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op);
    tp_status (*all_gatherv)(tp_group *g, const void *send, void *recv, const size_t *counts,
                             tp_dtype dt);
    tp_status (*reduce_scatter)(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt,
                                tp_reduce_op op);
    tp_status (*broadcast)(tp_group *g, void *buf, size_t count, tp_dtype dt, int root);
    tp_status (*barrier)(tp_group *g);
    tp_status (*abort)(tp_group *g);
    void (*destroy)(tp_group *g);
};

/* Largest group the shm backend serves. */
#define TP_SHM_MAX_RANKS 256

struct tp_group {
    const tp_backend *backend;
    void *impl;             /* backend state */
    tp_store *store;        /* shared bootstrap store (owned by the world group) */
    int owns_store;
    int rank;               /* rank in this group, -1 for a non-member */
    int size;
    int *global_ranks;      /* size entries: world rank of each group rank */
    int world_rank;
    int world_size;
    int local_rank;         /* on this host */
    int local_world_size;
    double timeout_s;
    char prefix[64];        /* unique store key prefix of this group ("g3/") */
    int next_child;         /* counter for subgroup ids (identical on every rank of the group) */
};

/* Backend constructors: fill g->backend and g->impl for an already-filled group (rank, size, ranks,
 * store, prefix, timeout). Collective over g's members. */
tp_status tp_shm_create(tp_group *g);
tp_status tp_nccl_create(tp_group *g); /* csrc/cuda/nccl.c, or the stub of a build without CUDA */
/* Called by every rank of an nccl parent: members of child (rank >= 0) get a communicator split from
 * the parent's; a non-member passes its rank -1 child and gets none. */
tp_status tp_nccl_split(tp_group *parent, tp_group *child);

/* The shm backend's row-parallel fast path (see tp_all_reduce_staging in tplinear.h); g must be a
 * member of an shm group (tp_shm_owns). */
int tp_shm_owns(const tp_group *g);
tp_status tp_shm_staging(tp_group *g, size_t bytes, void **ptr);
tp_status tp_shm_all_reduce_staged(tp_group *g, void *out, size_t count, tp_dtype dt, tp_reduce_op op);
/* tp_all_reduce_bias on an shm group: the bias added inside the reduction (in: out, another buffer, or the
 * staging area). */
tp_status tp_shm_all_reduce_bias(tp_group *g, const void *in, void *out, size_t count, tp_dtype dt, const void *bias,
                                 size_t width);
/* out[i] += bias[(first + i) % width] for i < n (float32 / float64): a row bias added to elements
 * [first, first + n) of a row-major array `width` wide, one addition per element. */
void tp_bias_add_span(tp_dtype dt, void *out, size_t first, size_t n, const void *bias, size_t width);

#endif
