/* Process groups: the backend function table and the group object. Internal. */
#ifndef TP_COMM_BACKEND_H
#define TP_COMM_BACKEND_H

#include "../device/device.h"
#include "store.h"

typedef struct tp_backend tp_backend;

/* The hosts of a world, found at rendezvous by comparing host identities (core/env.c's
 * tp_host_identity): shared by the world and its subgroups (reference counted). */
typedef struct {
    int refs;          /* atomic */
    int nhosts;
    int *host_of;      /* world_size entries: the host index of each world rank */
    char (*names)[64]; /* nhosts entries: a readable name (the hostname) of each host */
} tp_hosts;

/* A backend is a table: group.c, the layers and the bindings never know which one runs. Each backend
 * defines its table in its own file (comm/shm.c, comm/nccl.c) and comm/registry.c lists the tables this
 * build has. `impl` of a group is the backend's per-group state. Every function is collective over the
 * group's members and returns within the group's timeout. */
struct tp_backend {
    const char *name;
    /* bit (1u << tp_device_type) for each device whose memory the collectives take in place; host memory
     * is accepted by every backend. An automatic choice takes the first backend with the asked device. */
    unsigned devices;
    int one_host;      /* serves only groups whose ranks share one host (compared at rendezvous) */
    /* Serves only worlds whose processes its own launcher started (mpi: mpirun/mpiexec/srun, whose
     * processes share MPI_COMM_WORLD): the world must have been bootstrapped by this backend. */
    int launcher_world;
    /* Optional: a launcher's own channel before any store exists (mpi: MPI_Init, then MPI_Bcast). Every
     * rank of a world of `size` calls it with the rank the environment gives; world rank 0's len bytes of
     * buf reach every rank, within timeout_s. TP_ERR_UNSUPPORTED when the processes were not started
     * by this backend's launcher (the caller then needs MASTER_ADDR/MASTER_PORT). */
    tp_status (*boot_bcast)(int rank, int size, void *buf, size_t len, double timeout_s);
    int groups_of_one; /* also makes groups of one (else group.c gives them its generic group of one) */
    /* Fills g->impl for a group whose rank, size, ranks, store, prefix and timeout are set. On failure
     * g->impl stays NULL. */
    tp_status (*create)(tp_group *g);
    /* A subgroup, called by every rank of parent: members (child->rank >= 0) get child->impl. NULL: the
     * generic split (the ranks agree through the store, then members call create). */
    tp_status (*split)(tp_group *parent, tp_group *child);
    tp_status (*all_reduce)(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op);
    tp_status (*all_gatherv)(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt);
    tp_status (*reduce_scatter)(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt,
                                tp_reduce_op op);
    /* Uneven blocks (counts[r] elements for rank r, one after another in send); NULL: group.c's generic
     * reduce-scatter-v (reduce_scatter when the counts are equal, else through blocks padded to the largest). */
    tp_status (*reduce_scatter_v)(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt,
                                  tp_reduce_op op);
    tp_status (*broadcast)(tp_group *g, void *buf, size_t count, tp_dtype dt, int root);
    tp_status (*barrier)(tp_group *g);
    /* Marks the group failed and wakes its waiters; safe from any thread. */
    tp_status (*abort)(tp_group *g);
    void (*destroy)(tp_group *g);
    /* The row-parallel fast path of tp_all_reduce_staging / tp_all_reduce_staged; NULL when the backend
     * has no staging area. */
    tp_status (*staging)(tp_group *g, size_t bytes, void **ptr);
    tp_status (*all_reduce_staged)(tp_group *g, void *out, size_t count, tp_dtype dt, tp_reduce_op op);
    /* tp_all_reduce_bias with the bias added inside the reduction (in: out, another buffer, or the staging
     * area); NULL: group.c all-reduces, then adds the bias. */
    tp_status (*all_reduce_bias)(tp_group *g, const void *in, void *out, size_t count, tp_dtype dt,
                                 const void *bias, size_t width);
};

struct tp_group {
    const tp_backend *backend;
    const tp_backend *family; /* the registered backend of the world; its subgroups are made with it */
    void *impl;             /* backend state */
    tp_store *store;        /* shared bootstrap store (owned by the world group) */
    tp_hosts *hosts;        /* the world's hosts (shared with the world; NULL for a world of one) */
    const tp_backend *booted_by; /* the backend whose launcher channel bootstrapped the world, or NULL */
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

/* The world group (comm/group.c): tp_group_init_world but for this process's share of the cores for BLAS,
 * which layers/world.c adds on top, so that comm never calls gemm. */
tp_status tp_world_new(const tp_init_options *opts, tp_group **world);

/* out[i] += bias[(first + i) % width] for i < n (float32 / float64; bfloat16 / float16: added in float32 and
 * rounded, a second rounding after the reduction's): a row bias added to elements [first, first + n) of a
 * row-major array `width` wide, one addition per element (comm/reduce.c). */
void tp_bias_add_span(tp_dtype dt, void *out, size_t first, size_t n, const void *bias, size_t width);

/* out[i] = in[0][i] op in[1][i] op ... op in[p-1][i] for i < n, in rank order (comm/reduce.c): float32,
 * float64, int32, int64, and bfloat16 / float16 (in float32, rounded once); integer sums wrap, TP_AVG divides
 * the sum by p (truncating for integers). out may overlap any input. The shm and mpi backends both reduce with it, so they agree to the bit. */
void tp_reduce_ranks(tp_dtype dt, void *out, char *const *in, int p, size_t n, int op);
/* TP_OK when tp_reduce_ranks reduces dt, else TP_ERR_TYPE: "<what>: the <backend> backend reduces ...". */
tp_status tp_reduce_check_dtype(const char *backend, tp_dtype dt, const char *what);

/* What a backend that keeps its own failure record (shm, mpi) shares around its collectives (comm/frame.c):
 * once a collective failed, the group refuses every later call with the first failure's message. */
#define TP_BROKEN_MSG_CAP 512
typedef struct {
    int broken;
    tp_status status;
    char msg[TP_BROKEN_MSG_CAP];
} tp_broken;
/* Records the calling thread's current error message (tp_last_error) as the group's failure, status st. */
void tp_broken_record(tp_broken *b, tp_status st);
/* TP_OK for a group that has not failed, else its status with "process group unusable after an earlier
 * failure: <message>". */
tp_status tp_broken_check(const tp_broken *b);
/* When a collective starts, for its TRACE line: the clock only when log_level (the group's tp_log_level())
 * traces, else 0. */
static inline double tp_coll_t0(int log_level) { return log_level >= TP_LOG_TRACE ? tp_now() : 0.0; }
/* The TRACE line at the end of collective number seq (kind, bytes, over p ranks, started at tp_now() t0),
 * when log_level (the group's tp_log_level()) asks for it. */
void tp_coll_trace(int log_level, const char *backend, int kind, uint64_t seq, uint64_t bytes, int p, double t0);

/* A collective call as ranks compare it (comm/fingerprint.c): the shm backend keeps each rank's in its
 * segment, the mpi backend hashes it into message tags and sends it after a mismatch. */
enum { TP_COLL_ALL_REDUCE = 1, TP_COLL_ALL_GATHER = 2, TP_COLL_REDUCE_SCATTER = 3, TP_COLL_BROADCAST = 4,
       TP_COLL_BARRIER = 5 };
typedef struct {
    uint64_t seq;
    uint64_t bytes;
    uint64_t extra; /* all_gatherv / reduce_scatter_v: tp_hash_counts of the counts */
    int32_t kind, dtype, op, root;
} tp_fingerprint;
const char *tp_coll_name(int kind); /* "all_reduce", ... ("?" for no collective) */
/* "all_reduce of 1024 float32 (sum)" into buf; -1 (buf untouched) when f is no collective. */
int tp_fp_describe(const tp_fingerprint *f, char *buf, size_t cap);
int tp_fp_equal(const tp_fingerprint *a, const tp_fingerprint *b);
uint64_t tp_hash_counts(const size_t *counts, int p);

#endif
