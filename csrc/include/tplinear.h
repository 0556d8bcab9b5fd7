/*
 * tplinear — tensor-parallel linear layers, C API.
 *
 * Conventions (docs/architecture.md, section 1):
 *  - every function returns tp_status; on failure tp_last_error() holds a thread-local message;
 *  - handles (tp_group) are opaque; tensors (tp_tensor) are plain descriptors the caller owns;
 *  - no function prints, exits or aborts.
 */
#ifndef TPLINEAR_H
#define TPLINEAR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TPLINEAR_VERSION "0.1.0"

/* Marks the library's public functions: the library is compiled with -fvisibility=hidden, so only
 * these are exported from a shared object that links it. */
#if defined(__GNUC__)
#define TP_API __attribute__((visibility("default")))
#else
#define TP_API
#endif

/* ------------------------------------------------------------------ status and errors */

typedef enum {
    TP_OK = 0,
    TP_ERR_VALUE = 1,       /* bad argument value or shape            -> ValueError          */
    TP_ERR_TYPE = 2,        /* wrong dtype or kind of object           -> TypeError           */
    TP_ERR_NOMEM = 3,       /* allocation failed                       -> MemoryError         */
    TP_ERR_COMM = 4,        /* peer failure, mismatch, protocol error  -> tplinear.CommError  */
    TP_ERR_TIMEOUT = 5,     /* a wait ran past the group's timeout     -> tplinear.CommError  */
    TP_ERR_UNSUPPORTED = 6, /* not built in / not available here       -> NotImplementedError */
    TP_ERR_SYSTEM = 7,      /* an OS call failed (errno in message)    -> OSError             */
    TP_ERR_CUDA = 8,        /* CUDA / cuBLAS / NCCL failure            -> RuntimeError        */
    TP_ERR_INTERRUPTED = 9  /* the interrupt hook stopped a wait       -> KeyboardInterrupt   */
} tp_status;

/* The message of the last failure on this thread ("" if none). */
TP_API const char *tp_last_error(void);
/* A short constant name for a status ("TP_ERR_VALUE"). */
TP_API const char *tp_status_name(tp_status s);
/* Clears this thread's message. */
TP_API void tp_clear_error(void);

/* Every wait of the library (collectives, the rendezvous store, connecting to it) calls fn(ctx) at least
 * every 100 ms while it waits; a nonzero return stops the wait with TP_ERR_INTERRUPTED (a collective's
 * group is then failed, and its other ranks get TP_ERR_COMM naming this rank). fn runs on the waiting
 * thread; NULL removes the hook. The Python binding installs one that runs pending signal handlers
 * (Ctrl-C, a SIGTERM handler). */
typedef int (*tp_interrupt_fn)(void *ctx);
TP_API void tp_set_interrupt_hook(tp_interrupt_fn fn, void *ctx);

/* ------------------------------------------------------------------ tensors */

typedef enum {
    TP_FLOAT32 = 0,
    TP_FLOAT64 = 1,
    TP_FLOAT16 = 2,  /* GPU; host: the linear ops (tp_linear_*) */
    TP_BFLOAT16 = 3, /* GPU; host: the linear ops (tp_linear_*) */
    TP_INT32 = 4,    /* collectives only */
    TP_INT64 = 5     /* collectives only */
} tp_dtype;

typedef enum { TP_DEVICE_CPU = 0, TP_DEVICE_CUDA = 1 } tp_device_type;

typedef struct {
    tp_device_type type;
    int index; /* GPU ordinal; 0 for the CPU */
} tp_device;

#define TP_MAX_DIMS 8

/* A strided view: element (i0..ik) lives at data + sum(i_d * strides[d]) * itemsize.
 * Strides are in elements and may be any value (views, transposes). */
typedef struct {
    void *data;
    tp_dtype dtype;
    int ndim;
    int64_t shape[TP_MAX_DIMS];
    int64_t strides[TP_MAX_DIMS];
    tp_device device;
} tp_tensor;

TP_API size_t tp_dtype_size(tp_dtype dt);
TP_API const char *tp_dtype_name(tp_dtype dt);
/* Fills a row-major contiguous descriptor. */
TP_API tp_status tp_tensor_init(tp_tensor *t, void *data, tp_dtype dt, int ndim, const int64_t *shape);
TP_API int64_t tp_tensor_numel(const tp_tensor *t);
TP_API int tp_tensor_is_contiguous(const tp_tensor *t);
/* A view of t restricted to [start, start+length) along dim (no copy). */
TP_API tp_status tp_tensor_narrow(const tp_tensor *t, int dim, int64_t start, int64_t length, tp_tensor *out);
/* Copies src into dst elementwise (same shape and dtype, any non-negative strides, stride 0 included in
 * the source; on the GPU see tp_cuda_tensor_copy). */
TP_API tp_status tp_tensor_copy(tp_tensor *dst, const tp_tensor *src);

/* ------------------------------------------------------------------ partition math */

/* DeepSpeed's tp_grain_size defaults: its training engine's (tensor_parallel.tp_grain_size) and its
 * inference engine's. */
#define TP_GRAIN_TRAINING 1
#define TP_GRAIN_INFERENCE 64

typedef struct {
    int64_t offset;
    int64_t size;
} tp_range;

/* How a dimension is split. Zero-initialise it and set what applies.
 *  grain         >= 1: DeepSpeed's tp_grain_size (TP_GRAIN_TRAINING or TP_GRAIN_INFERENCE).
 *  kv_heads      DeepSpeed's model-wide num_kv_heads (tplinear's set_num_kv_heads), 0: none. Used as
 *                DeepSpeed uses it: only where it divides the dimension and the name allows heads.
 *  name          the layer's name or NULL; names containing "mlp", "gate_proj", "up_proj",
 *                "down_proj", "w1", "w2", "w3", or equal to "lm_head"/"embed_out", never take kv_heads.
 *  num_heads, num_kv_heads, head_dim
 *                the layer's own attention heads (0: none; num_kv_heads 0 means num_heads, multi-head
 *                attention; head_dim 0: not checked). They override kv_heads and the name: the split
 *                dimension is made of these heads, a dimension they do not tile is TP_ERR_VALUE, and
 *                the split unit is the KV group (the GQA rule, tp_attention_heads). */
typedef struct {
    int64_t grain;
    int64_t kv_heads;
    const char *name;
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
} tp_split_spec;

/* Size and offset of every rank's shard of a dimension of n elements over p ranks: DeepSpeed 0.19's
 * tp_shard.get_shard_size_list, the one rule for training and inference (they differ in the grain).
 * With h head units (the layer's KV groups, or kv_heads where it applies): rank r gets
 * h/p (+1 for r < h%p) units of n/h. Otherwise, n >= grain: n/grain grains dealt the same way, the
 * n%grain tail to the last rank; n < grain: single elements dealt the same way.
 * out has p entries, offsets ascending. */
TP_API tp_status tp_partition(int64_t n, int p, const tp_split_spec *spec, tp_range *out);

/* Packed split: the dimension is nblocks consecutive blocks (fused QKV, gate/up), each split on its
 * own by tp_partition's rule. block_heads (NULL: none) gives the heads of each block (0: a block
 * without heads). Heads of a packed block follow their KV group: with k the fewest heads of any
 * block that has heads (the KV head count), every such block's heads must be a multiple of k and tile
 * the block, and each is dealt as k units, so a rank holds the Q heads of exactly its KV heads; a
 * packed dimension whose heads cannot be split that way is TP_ERR_VALUE. Without block_heads, the
 * layer's own heads (with head_dim: block i holds block_sizes[i]/head_dim heads) or kv_heads apply to
 * every block. out is [p][nblocks] row-major: out[r*nblocks+i] is rank r's piece of block i, with
 * offset in the full dimension. A rank's shard is its pieces concatenated in block order. */
TP_API tp_status tp_partition_packed(const int64_t *block_sizes, int nblocks, int p, const tp_split_spec *spec,
                                     const int64_t *block_heads, tp_range *out);

/* The GQA rule: which attention heads rank r holds when num_heads query heads share num_kv_heads
 * key/value heads (num_kv_heads 0: num_heads) over p ranks. KV heads are dealt as whole heads
 * (rank r gets num_kv_heads/p, +1 for r < num_kv_heads%p) and every query head goes with its KV group
 * (query head j belongs to KV head j / (num_heads/num_kv_heads)), so kv[r] = that range of KV heads and
 * q[r] = the query heads of those groups. num_heads % num_kv_heads != 0 is TP_ERR_VALUE. q and kv
 * have p entries each (in heads, not elements). tp_partition with the same heads gives these ranges
 * times head_dim, for q_proj, k_proj, v_proj, a packed QKV and the attention output projection. */
TP_API tp_status tp_attention_heads(int64_t num_heads, int64_t num_kv_heads, int p, tp_range *q, tp_range *kv);

/* ------------------------------------------------------------------ initialisation */

/* nn.Linear's initial distribution, uniform in [-bound, bound), from a counter-based generator:
 * element (i, j) of t (2-D) or (j) (1-D) gets the value that global position
 * (row_offset + i) * full_cols + (col_offset + j) of stream `stream` yields for `seed`.
 * A shard therefore equals the same slice of the full tensor. CPU, float32/float64. */
TP_API tp_status tp_init_uniform(tp_tensor *t, uint64_t seed, uint64_t stream, double bound,
                                 int64_t row_offset, int64_t col_offset, int64_t full_cols);
/* The same with a normal distribution of mean 0 and standard deviation std (nn.Embedding's N(0, 1)). */
TP_API tp_status tp_init_normal(tp_tensor *t, uint64_t seed, uint64_t stream, double std,
                                int64_t row_offset, int64_t col_offset, int64_t full_cols);

/* ------------------------------------------------------------------ BLAS threads */

/* Sets the BLAS thread count for this process (n <= 0: the cores this process may run on, by its CPU
   affinity, divided among the ranks on this host). */
TP_API tp_status tp_set_num_threads(int n);
TP_API int tp_get_num_threads(void);

/* ------------------------------------------------------------------ dense math (one rank) */

/* Y[..., out] = X[..., in] @ W[out, in]^T (+ b[out]). Leading dims of X are flattened. */
TP_API tp_status tp_linear_forward(const tp_tensor *x, const tp_tensor *w, const tp_tensor *b, tp_tensor *y);
/* dX[..., in] = dY[..., out] @ W[out, in]. */
TP_API tp_status tp_linear_backward_input(const tp_tensor *dy, const tp_tensor *w, tp_tensor *dx);
/* dW[out, in] += dY^T X ; db[out] += sum over leading dims of dY (db may be NULL). */
TP_API tp_status tp_linear_backward_params(const tp_tensor *dy, const tp_tensor *x, tp_tensor *dw,
                                           tp_tensor *db);

/* How a backward writes the parameter gradients dw and db (the *_mode variants below and of the layers). */
typedef enum {
    TP_GRAD_ACCUMULATE = 0, /* dw += dY^T X ; db += sum(dY): what the functions without _mode do */
    TP_GRAD_ASSIGN = 1      /* dw = dY^T X ; db = sum(dY): dw and db need not be initialised (their contents,
                               NaN included, are never read), and a small batch writes dw in one pass over
                               memory instead of a zeroing pass plus an accumulating one */
} tp_grad_mode;
/* tp_linear_backward_params with the gradient mode named; another value is TP_ERR_VALUE. */
TP_API tp_status tp_linear_backward_params_mode(const tp_tensor *dy, const tp_tensor *x, tp_tensor *dw,
                                                tp_tensor *db, tp_grad_mode mode);
/* y += b broadcast along the last dim. */
TP_API tp_status tp_add_bias(tp_tensor *y, const tp_tensor *b);

/* ------------------------------------------------------------------ environment */

/* The world as the launcher's environment describes it, each field from the first launcher that sets it:
 * torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; OpenMPI's OMPI_COMM_WORLD_RANK, _SIZE,
 * _LOCAL_RANK, _LOCAL_SIZE; MPICH's / Intel MPI's PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS;
 * inside a Slurm job step (SLURM_STEP_ID set, i.e. under srun) SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
 * and MASTER_ADDR, MASTER_PORT. Read at each call. A variable that is set but not a non-negative integer
 * is TP_ERR_VALUE naming it. */
typedef struct {
    int rank;              /* -1 where the environment does not say */
    int world_size;
    int local_rank;
    int local_world_size;
    int master_port;
    char master_addr[256]; /* "" when unset */
} tp_world_env;
TP_API tp_status tp_world_from_env(tp_world_env *w);

/* The tuning knobs tplinear reads from the environment (TPLINEAR_DEBUG, TPLINEAR_SHM_SLOT_KB, ...):
 * one table, read once per process, the knobs that are set logged at TPLINEAR_DEBUG=INFO. */
typedef struct {
    const char *name;
    const char *type;          /* "int", "bool" (0 or 1), "choice" or "string" */
    const char *default_value; /* as documented ("auto" where the library decides) */
    const char *choices;       /* "choice": "a|b" (any case); else NULL */
    const char *doc;
} tp_env_knob;
TP_API int tp_env_knob_count(void);
TP_API tp_status tp_env_knob_at(int i, tp_env_knob *out);

/* ------------------------------------------------------------------ process groups */

typedef struct tp_group tp_group;

typedef enum { TP_SUM = 0, TP_AVG = 1, TP_MAX = 2, TP_MIN = 3 } tp_reduce_op;

#define TP_INIT_OPTIONS_MAGIC 0x74706f70u /* "tpop" */
#define TP_INIT_OPTIONS_VERSION 2u

typedef struct {
    /* What the caller's header declared: filled by TP_INIT_OPTIONS_INITIALIZER or tp_init_options_default,
     * checked by tp_group_init_world (a struct of another size or version is refused, not misread). */
    size_t size;
    unsigned int magic;
    unsigned int version;
    const char *backend;     /* NULL or "auto" (TPLINEAR_BACKEND, else chosen for `device`), or a name
                                from tp_backend_name (e.g. "shm", "nccl") */
    double timeout_s;        /* every wait is bounded by this; <= 0 means 300 */
    /* Negative / NULL fields are read from the environment (tp_world_from_env); none set: a world of 1. */
    int rank;
    int world_size;
    int local_rank;
    int local_world_size;
    const char *master_addr;
    int master_port;
    /* With backend NULL / "auto": the memory the group's buffers will live in, so that the choice
     * takes it (TP_DEVICE_CUDA: a backend that takes GPU memory). */
    tp_device_type device;
    /* The world's secret, the same on every rank (1..256 characters): every rank proves it to join the
     * rendezvous and to map the world's shared memory. NULL: TPLINEAR_TOKEN (tplinear.run sets a fresh
     * one per run), else under an MPI launcher a fresh one from rank 0 through MPI, else a value derived
     * from the launcher's job id, address and port (docs/security.md). */
    const char *token;
} tp_init_options;

/* Everything from the environment, automatic backend, 300 s. */
#define TP_INIT_OPTIONS_INITIALIZER                                                                   \
    {                                                                                                 \
        sizeof(tp_init_options), TP_INIT_OPTIONS_MAGIC, TP_INIT_OPTIONS_VERSION, NULL, 300.0, -1, -1, -1, -1, \
            NULL, -1, TP_DEVICE_CPU, NULL                                                             \
    }

/* Fills opts as TP_INIT_OPTIONS_INITIALIZER does. */
TP_API void tp_init_options_default(tp_init_options *opts);

/* Creates the world group (collective over all ranks). A world of more than one rank meets at a
 * rendezvous store (docs/security.md, docs/launching.md): under torchrun the agent's own (keys under
 * tplinear/<run id>/<restart>/<generation>/, every value proving the token); under mpirun/mpiexec/srun in
 * MPI builds rank 0's, on a port the kernel picks, announced with a fresh token through MPI; else rank 0's
 * at MASTER_ADDR:MASTER_PORT. Rank 0's store listens on 127.0.0.1 when the launcher says the world is one
 * host (LOCAL_WORLD_SIZE == WORLD_SIZE) whatever MASTER_ADDR says, else on its address only. Each call of
 * a process starts a fresh world: the n-th init of every rank meets the n-th init of the others (a
 * re-initialising rank that reaches the previous world's store is sent away until its new one is up; a
 * rank of another generation is told so). A rank whose token differs is refused on both sides
 * (TP_ERR_COMM); every wait is bounded by timeout_s. */
TP_API tp_status tp_group_init_world(const tp_init_options *opts, tp_group **world);
/* Collective over every rank of parent: ranks (n entries, ranks of parent, ascending or not, no
 * repeats) form a new group. A rank of parent not listed gets a non-member handle whose
 * collectives fail with TP_ERR_VALUE. */
TP_API tp_status tp_group_new(tp_group *parent, const int *ranks, int n, tp_group **out);
/* The same with the new group's backend named: NULL keeps the parent's (its subgroups are made the
 * way the parent's backend makes them, e.g. ncclCommSplit / MPI_Comm_split); a name ("shm", "mpi",
 * "nccl") makes the members a group of that backend, e.g. an shm group of the ranks of one host inside
 * an mpi world; "auto" takes shm when the members share a host (and the parent's backend takes host
 * memory), else the parent's. Every rank of parent passes the same name. */
TP_API tp_status tp_group_new_backend(tp_group *parent, const int *ranks, int n, const char *backend,
                                      tp_group **out);
/* Frees the group's resources (not collective; call on every rank). NULL is fine. It must not run while
 * another thread is inside a call on g: call tp_group_abort (safe from any thread) first, which makes
 * such calls return TP_ERR_COMM at once, and destroy after they have returned (the Python binding does
 * this for destroy_process_group). */
TP_API void tp_group_destroy(tp_group *g);
/* Marks the group failed and wakes/aborts anything waiting on it (safe from another thread). */
TP_API tp_status tp_group_abort(tp_group *g);

TP_API int tp_group_rank(const tp_group *g);       /* -1 for a non-member */
TP_API int tp_group_size(const tp_group *g);
TP_API int tp_group_global_rank(const tp_group *g, int group_rank);
TP_API const char *tp_group_backend(const tp_group *g);
TP_API double tp_group_timeout(const tp_group *g);
/* TP_OK when the group's backend can take buffers on dev (host memory works everywhere; GPU memory needs
 * a backend that takes it, e.g. nccl), else TP_ERR_VALUE saying so. what names the buffer in the message. */
TP_API tp_status tp_group_check_device(const tp_group *g, tp_device dev, const char *what);

/* The backends this build registers, in the order "auto" considers them: i in [0, tp_backend_count()),
 * NULL out of range. */
TP_API int tp_backend_count(void);
TP_API const char *tp_backend_name(int i);

/* In place on `count` elements of buf: host memory, or GPU memory where the group's backend takes it
 * (tp_group_check_device). */
TP_API tp_status tp_all_reduce(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op);
/* recv holds size(g) * count elements; rank r's send lands at recv + r*count. */
TP_API tp_status tp_all_gather(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt);
/* Variable counts: counts[r] elements from rank r, placed one after another in recv. */
TP_API tp_status tp_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt);
/* send holds size(g) * count elements; recv gets the reduction of block `rank`. */
TP_API tp_status tp_reduce_scatter(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt,
                                   tp_reduce_op op);
/* Variable counts: send holds sum(counts) elements, rank r's block (counts[r] elements, after the blocks of
 * the ranks before it) is reduced into rank r's recv of counts[rank] elements. Every rank passes the same
 * counts (as for tp_all_gatherv). Backends without their own use reduce_scatter on blocks padded to the
 * largest count. */
TP_API tp_status tp_reduce_scatter_v(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt,
                                     tp_reduce_op op);
TP_API tp_status tp_broadcast(tp_group *g, void *buf, size_t count, tp_dtype dt, int root);
TP_API tp_status tp_barrier(tp_group *g);

/* Reductions: sum/avg/max/min over float32, float64, int32, int64. Integer sums wrap around; avg of
 * integers is the sum divided by the group size with C's truncating integer division. Results are
 * bitwise identical on every rank (reductions run in rank order).
 * Failures: a peer that died, destroyed the group, called a different collective (the fingerprint of
 * sequence number, kind, count, dtype, op, root differs) or did not arrive within the timeout fails the
 * collective on every rank with TP_ERR_COMM / TP_ERR_TIMEOUT; the group is unusable afterwards. */

/* Row-parallel fast path (zero-copy input). tp_all_reduce_staging sets *ptr to `bytes` of this rank's
 * staging buffer inside the backend's shared memory, or to NULL when the backend has none or bytes is
 * larger than it (then use tp_all_reduce). Write the input there (e.g. as a GEMM's output), then make
 * tp_all_reduce_staged(g, out, count, dt, op) the next collective on g: it all-reduces the staged data
 * into out (any buffer except the staging area itself) without copying it in first. The pointer is
 * valid only until the next collective on g. */
TP_API tp_status tp_all_reduce_staging(tp_group *g, size_t bytes, void **ptr);
TP_API tp_status tp_all_reduce_staged(tp_group *g, void *out, size_t count, tp_dtype dt, tp_reduce_op op);
/* The row-parallel layer's reduction: out = (sum over ranks of in) + bias, where bias (NULL: none) is a row
 * of `width` values added to every row of out after the sum, bitwise as a separate pass would, but inside
 * the reduction where the backend can (shm: no second pass over out). in is out itself, a buffer that
 * does not overlap it, or this rank's staging buffer (tp_all_reduce_staging). CPU memory; float32 /
 * float64 with a bias, any reducible dtype without. */
TP_API tp_status tp_all_reduce_bias(tp_group *g, const void *in, void *out, size_t count, tp_dtype dt,
                                    const void *bias, size_t width);

/* ------------------------------------------------------------------ tensor-parallel layers */

/* Row-parallel forward: y = all_reduce_g(x_r @ w_r^T) + b (b added once, may be NULL).
 * x_r is this rank's slice of the input's last dim (width = w_r's in). */
TP_API tp_status tp_row_forward(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                                tp_tensor *y);
/* Row-parallel backward, no collective: dx = dy @ w_r ; dw += dy^T x_r ; db += sum(dy).
 * dx, dw, db may each be NULL to skip. */
TP_API tp_status tp_row_backward(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                                 tp_tensor *dx, tp_tensor *dw, tp_tensor *db);
/* The same with the gradient mode named (tp_grad_mode; TP_GRAD_ASSIGN: dw = dy^T x_r ; db = sum(dy)); a bad
 * mode fails before anything is written. */
TP_API tp_status tp_row_backward_mode(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                                      tp_tensor *dx, tp_tensor *dw, tp_tensor *db, tp_grad_mode mode);
/* Column-parallel forward: y_r = x @ w_r^T + b_r (b may be NULL). */
TP_API tp_status tp_col_forward(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                                tp_tensor *y);
/* Column-parallel backward: dx = all_reduce_g(dy_r @ w_r) ; dw += dy_r^T x ; db += sum(dy_r).
 * overlap != 0 runs the dx all-reduce concurrently with the dw GEMM (same results). */
TP_API tp_status tp_col_backward(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                                 tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap);
/* The same with the gradient mode named (TP_GRAD_ASSIGN: dw = dy_r^T x ; db = sum(dy_r)); a bad mode fails
 * before anything is written or reduced. */
TP_API tp_status tp_col_backward_mode(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                                      tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap,
                                      tp_grad_mode mode);

/* ------------------------------------------------------------------ sequence parallelism */

/* Megatron's sequence parallelism: between layers, activations are split along their sequence dim, the
 * first dim. seq has size(g) entries, every rank's rows of it, consecutive and in rank order (from
 * tp_partition at grain 1, or any such split); every rank passes the same seq. Every array keeps its
 * other dims. Checks run before the first collective.
 *
 * Column-parallel: x is this rank's rows [seq[rank].size, ..., in]; y = all_gather_rows(x) @ w_r^T + b_r,
 * the whole sequence [S, ..., out_r]. chunks > 1 (host memory) pipelines the gather with the GEMM: a helper
 * thread gathers each rank's rows in `chunks` pieces while this thread multiplies the piece gathered
 * before (the full input is then never assembled); chunks 0 or 1 gathers, then multiplies; chunks < 0
 * takes TPLINEAR_SP_CHUNKS (default 0). */
TP_API tp_status tp_col_forward_sp(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                                   const tp_range *seq, tp_tensor *y, int chunks);
/* dy [S, ..., out_r], x this rank's rows of the input (as in forward): dx (this rank's rows) =
 * reduce_scatter_rows(dy @ w_r) ; dw += dy^T all_gather_rows(x) ; db += sum(dy). dw, db may be NULL (then x
 * is not gathered). overlap != 0 (host memory) runs the gather under the dx GEMM and the reduce-scatter
 * under the dw GEMM on a helper thread, as Megatron-core does (same results). */
TP_API tp_status tp_col_backward_sp(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                                    const tp_range *seq, tp_tensor *dx, tp_tensor *dw, tp_tensor *db, int overlap);
/* Row-parallel: x [S, ..., in_r] (the whole sequence, this rank's features); y (this rank's rows
 * [seq[rank].size, ..., out]) = reduce_scatter_rows(x @ w_r^T) + b, b added once after the reduction. */
TP_API tp_status tp_row_forward_sp(tp_group *g, const tp_tensor *x, const tp_tensor *w, const tp_tensor *b,
                                   const tp_range *seq, tp_tensor *y);
/* dy this rank's rows [seq[rank].size, ..., out]: with dY = all_gather_rows(dy), dx = dY @ w_r ;
 * dw += dY^T x ; db += sum(dY) (the whole gradient of the replicated bias, the same on every rank).
 * dx, dw, db may each be NULL. */
TP_API tp_status tp_row_backward_sp(tp_group *g, const tp_tensor *dy, const tp_tensor *x, const tp_tensor *w,
                                    const tp_range *seq, tp_tensor *dx, tp_tensor *dw, tp_tensor *db);
/* The sum over the group of full ([S, ...], any strides) into this rank's rows seq[rank] of it (part,
 * contiguous): a reduce-scatter-v along the first dim. Its inverse pair is tp_gather_dim(g, part, 0, seq,
 * full), an all-gather-v that writes each rank's rows in place when full is contiguous. */
TP_API tp_status tp_reduce_scatter_rows(tp_group *g, const tp_tensor *full, const tp_range *seq, tp_tensor *part);

/* ------------------------------------------------------------------ vocabulary parallelism */

/* Megatron's VocabParallelEmbedding: w [vocab_r, hidden] holds rows [vocab_offset, vocab_offset + vocab_r)
 * of the table of vocab_size rows. ids (int32 / int64, any shape, the same on every rank) must lie in
 * [0, vocab_size) (else TP_ERR_VALUE on every rank, before any collective). This rank looks up the ids in
 * its rows, zeros elsewhere, then: seq == NULL: y [*ids.shape, hidden] = all_reduce of the lookups;
 * seq != NULL (sequence parallelism, ids' first dim is the sequence): y [seq[rank].size, *ids.shape[1:],
 * hidden] = reduce_scatter_rows of them. Host memory. */
TP_API tp_status tp_embedding_forward(tp_group *g, const tp_tensor *ids, const tp_tensor *w, int64_t vocab_offset,
                                      int64_t vocab_size, const tp_range *seq, tp_tensor *y);
/* dw [vocab_r, hidden] += the rows of dy whose ids fall in this rank's rows (in id order, so repeated
 * ids add in a fixed order). dy: [*ids.shape, hidden] (seq == NULL; the gradient of the replicated
 * output, no collective) or this rank's rows of it (seq != NULL; all-gathered first). */
TP_API tp_status tp_embedding_backward(tp_group *g, const tp_tensor *ids, const tp_tensor *dy, int64_t vocab_offset,
                                       const tp_range *seq, tp_tensor *dw);

typedef enum { TP_LOSS_MEAN = 0, TP_LOSS_SUM = 1, TP_LOSS_NONE = 2 } tp_loss_reduction;

/* Cross-entropy over logits split by vocabulary, as torch.nn.functional.cross_entropy with class-index
 * targets, without gathering the logits: one max all-reduce and one sum all-reduce (of the sum of
 * exponentials, the target logit and, with label smoothing, the sum of logits) of a few values per token.
 * logits [..., vocab_r] (float32 / float64, host) hold columns [vocab_offset, vocab_offset + vocab_r) of
 * vocab_size; targets (int32 / int64) have logits' leading shape, the same on every rank, each in
 * [0, vocab_size) or ignore_index (else TP_ERR_VALUE before any collective). With p = softmax over the
 * whole vocabulary and e = label_smoothing in [0, 1], token i's loss is
 *   (1 - e) * -log p[i, t_i] + e * mean_c(-log p[i, c])      (0 for an ignored token);
 * *loss (may be NULL) is their mean over the tokens not ignored (TP_LOSS_MEAN; NaN when there is none, as
 * torch), their sum (TP_LOSS_SUM), or their sum too (TP_LOSS_NONE, which also asks for losses).
 * losses (NULL or floating, targets' shape, contiguous) gets every token's loss. grad (NULL or like logits,
 * contiguous in its last dim; it may be logits itself, which is then overwritten) gets the gradient of
 * *loss: scale * (p - (1 - e) * onehot(t) - e / vocab_size) for tokens not ignored, 0 for ignored ones,
 * scale = 1 / (tokens not ignored) for TP_LOSS_MEAN, else 1 (TP_LOSS_NONE: the gradient of the sum).
 * Sums accumulate in float64; the result is the same on every rank. */
TP_API tp_status tp_vocab_cross_entropy(tp_group *g, const tp_tensor *logits, const tp_tensor *targets,
                                        int64_t vocab_offset, int64_t vocab_size, int64_t ignore_index,
                                        double label_smoothing, tp_loss_reduction reduction, tp_tensor *losses,
                                        tp_tensor *grad, double *loss);

/* All-gathers shards of a tensor along dim: rank r holds `shard` (all dims equal to full's except
 * dim, whose size is ranges[r].size); full receives every rank's shard at ranges[r].offset along dim.
 * ranges has size(g) entries (from tp_partition). Uneven shards are fine. */
TP_API tp_status tp_gather_dim(tp_group *g, const tp_tensor *shard, int dim, const tp_range *ranges,
                               tp_tensor *full);
/* The packed form: ranges is [p][nblocks] from tp_partition_packed. */
TP_API tp_status tp_gather_packed(tp_group *g, const tp_tensor *shard, int dim, const tp_range *ranges,
                                  int nblocks, tp_tensor *full);

/* The inverse of tp_gather_packed, on this process alone (no collective): writes rank `rank`'s shard of
 * full into shard, i.e. its pieces ranges[rank*nblocks + i] along dim, concatenated in block order.
 * ranges is [p][nblocks] from tp_partition_packed (p*nblocks entries covering full's dim). shard has
 * full's shape except along dim, where it has the rank's pieces together. Both on one device; the copy
 * runs there (any strides, as for tp_tensor_copy). */
TP_API tp_status tp_shard_packed(const tp_tensor *full, int dim, const tp_range *ranges, int p, int nblocks,
                                 int rank, tp_tensor *shard);
/* The unpacked form: ranges has p entries (from tp_partition). */
TP_API tp_status tp_shard_dim(const tp_tensor *full, int dim, const tp_range *ranges, int p, int rank,
                              tp_tensor *shard);

/* ------------------------------------------------------------------ GPU (TPLINEAR_CUDA builds) */

/* 1 when the library was built with CUDA and a GPU is visible, else 0. */
TP_API int tp_cuda_available(void);
/* 1 when the library was built with the CUDA path. */
TP_API int tp_cuda_compiled(void);
/* Number of visible GPUs (0 without CUDA or without a driver). */
TP_API int tp_cuda_device_count(void);

/* The stream every GPU operation on `device` is enqueued on (GEMMs, NCCL collectives, copies): one per
 * device, since a stream belongs to one GPU. A cudaStream_t as a pointer; NULL (the default) is the
 * device's legacy default stream; device -1 is the thread's current device (0 without a GPU). Process-wide,
 * so helper threads (the overlapped all-reduce) use the caller's stream too. TP_ERR_VALUE for an ordinal
 * that is not a visible GPU (without one: of 64 or more). */
TP_API tp_status tp_cuda_set_stream(int device, void *stream);
TP_API void *tp_cuda_get_stream(int device);
/* Makes device's stream wait (on the device, not the host) for the work queued so far on `other`
 * (a foreign producer's or consumer's stream), or the other way round when `other_waits` is set. */
TP_API tp_status tp_cuda_stream_order(int device, void *other, int other_waits);
/* Blocks the host until device's stream has finished. */
TP_API tp_status tp_cuda_synchronize(int device);
/* float32 GEMMs may use TF32 tensor cores (off unless asked; TPLINEAR_ALLOW_TF32=1 sets the default). */
TP_API void tp_cuda_set_allow_tf32(int allow);
TP_API int tp_cuda_get_allow_tf32(void);

/* Device memory, stream-ordered on the current stream. */
TP_API tp_status tp_cuda_malloc(int device, size_t bytes, void **ptr);
TP_API tp_status tp_cuda_free(int device, void *ptr);
TP_API tp_status tp_cuda_memset_zero(int device, void *ptr, size_t bytes);
/* Copies bytes between any two of host and device memory (unified addressing); returns once the
 * copy is complete when either side is host memory. */
TP_API tp_status tp_cuda_memcpy(int device, void *dst, const void *src, size_t bytes);
/* tp_tensor_copy when either side is on the GPU: any non-negative strides (a broadcast source of stride 0
 * needs a contiguous destination); unit-stride rows are one 2-D copy, other strides one copy per row. */
TP_API tp_status tp_cuda_tensor_copy(tp_tensor *dst, const tp_tensor *src);
/* Where ptr lives: *device = GPU ordinal or -1 for host memory (not registered with CUDA). */
TP_API tp_status tp_cuda_pointer_device(const void *ptr, int *device);

#ifdef __cplusplus
}
#endif
#endif /* TPLINEAR_H */
