/* Internal helpers shared by every part of the C core. Not installed. */
#ifndef TP_INTERNAL_H
#define TP_INTERNAL_H

#include "tplinear.h"

#if defined(__GNUC__)
#define TP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define TP_PRINTF(a, b)
#endif

/* Records a formatted message for tp_last_error() and returns s. */
tp_status tp_error(tp_status s, const char *fmt, ...) TP_PRINTF(2, 3);
/* Like tp_error, with ": strerror(errno)" appended (errno captured first). */
tp_status tp_error_errno(tp_status s, const char *fmt, ...) TP_PRINTF(2, 3);
/* Prefixes the current message with context, keeps the status. */
tp_status tp_error_context(tp_status s, const char *fmt, ...) TP_PRINTF(2, 3);

/* Evaluates expr (a tp_status); on failure jumps to the function's one error path. */
#define TP_CHECK(expr)             \
    do {                           \
        st = (expr);               \
        if (st != TP_OK) goto out; \
    } while (0)

/* Fails with TP_ERR_VALUE unless cond holds. */
#define TP_REQUIRE(cond, ...)                                \
    do {                                                     \
        if (!(cond)) {                                       \
            st = tp_error(TP_ERR_VALUE, __VA_ARGS__);        \
            goto out;                                        \
        }                                                    \
    } while (0)

/* Logging to stderr prefixed with the world rank (never printf on stdout): WARN (on unless TPLINEAR_DEBUG=OFF)
 * for what a user must see although no call fails yet (a hung peer, a refused join); INFO and TRACE at
 * TPLINEAR_DEBUG=INFO|TRACE. */
enum { TP_LOG_OFF = 0, TP_LOG_WARN = 1, TP_LOG_INFO = 2, TP_LOG_TRACE = 3 };
int tp_log_level(void);
void tp_log(int level, const char *fmt, ...) TP_PRINTF(2, 3);
/* The world rank the log prefix names, once a world knows it (before: the environment's RANK or
 * OMPI_COMM_WORLD_RANK, else 0). */
void tp_log_set_rank(int rank);

/* How many cores this process may run on: its CPU affinity (a launcher may bind it to some), else every
 * online core; at least 1 (core/cores.c). */
int tp_cores_available(void);
/* A rank's share of the cores, the rule of every BLAS thread count: the cores the launcher bound it to when
 * they are fewer than the host's, else the host's cores / local_world_size (the ranks of this host; <= 0:
 * all of them); at least 1. */
int tp_cores_per_rank(int local_world_size);

/* Monotonic clock in seconds; a sleep of s seconds (resumed when a signal interrupts it). */
double tp_now(void);
void tp_sleep(double s);

/* The tuning knobs (core/env.c declares each with its type, default and doc); read from the
 * environment once per process. */
typedef enum {
    TP_KNOB_DEBUG,
    TP_KNOB_BACKEND,
    TP_KNOB_SHM_SLOT_KB,
    TP_KNOB_SHM_ONESHOT_KB,
    TP_KNOB_SHM_CHUNK_KB,
    TP_KNOB_SHM_ALGO,
    TP_KNOB_SHM_SPIN_US,
    TP_KNOB_SHM_YIELD_US,
    TP_KNOB_SHM_CMA,
    TP_KNOB_SHM_CMA_KB,
    TP_KNOB_ALLOW_TF32,
    TP_KNOB_NCCL_ASYNC,
    TP_KNOB_HOST_ID,
    TP_KNOB_MPI_ONESHOT_KB,
    TP_KNOB_MPI_CHUNK_KB,
    TP_KNOB_MPI_EAGER_BYTES,
    TP_KNOB_WATCHDOG_S,
    TP_KNOB_SP_CHUNKS,
    TP_KNOB_COUNT
} tp_knob;
/* An int, bool or choice knob's value (a choice: its index in the declared choices, -1 unset), the
 * default when unset; TP_ERR_VALUE naming the variable and what it accepts when its value is invalid
 * (*out is then the default). */
tp_status tp_knob_int(tp_knob k, long *out);
/* TP_ERR_VALUE naming the first knob that is set but malformed (TPLINEAR_DEBUG excepted: a bad level
 * falls back to WARN), so that a world fails on every rank before rendezvous instead of in one backend. */
tp_status tp_knobs_check(void);
/* The same where a call cannot fail: an invalid value gives the default (the INFO log names it). */
long tp_knob_value(tp_knob k);
/* A string knob's value, NULL when unset. */
const char *tp_knob_str(tp_knob k);
/* The environment's world rank (RANK, else OMPI_COMM_WORLD_RANK, ...), -1 when none is a valid one. */
int tp_env_rank(void);

/* Which launcher's variables describe the world (core/env.c), and what torchrun adds about its store. */
typedef enum { TP_LAUNCHER_NONE, TP_LAUNCHER_TORCHRUN, TP_LAUNCHER_MPI, TP_LAUNCHER_SLURM } tp_launcher_kind;
typedef struct {
    tp_launcher_kind kind; /* the family that gave WORLD_SIZE (RANK/WORLD_SIZE: torchrun, tplinear.run, by hand) */
    int agent_store;       /* TORCHELASTIC_USE_AGENT_STORE=True: MASTER_ADDR:MASTER_PORT is torchrun's c10d store */
    int restart_count;     /* TORCHELASTIC_RESTART_COUNT, 0 when unset */
    char run_id[256];      /* TORCHELASTIC_RUN_ID, "" when unset */
    /* An MPI runtime started this process (PMIx's, OpenMPI's or MPICH's own variables are set), so MPI_Init
     * joins the launcher's world; OMPI_COMM_WORLD_* set by hand does not count. */
    int mpi_runtime;
    int omp_threads_set;   /* OMP_NUM_THREADS is set (torchrun and tplinear.run set it; mpirun and srun do not) */
} tp_launcher;
tp_status tp_launcher_from_env(tp_launcher *l);
const char *tp_launcher_name(tp_launcher_kind k);
/* This host's identity (TPLINEAR_HOST_ID, else hostname + kernel boot id), compared at rendezvous, and a
 * readable name for messages (the hostname). */
tp_status tp_host_identity(char *id, size_t cap, char *name, size_t ncap);
/* What the world's token comes from when init is given none (docs/security.md): TPLINEAR_TOKEN, else a
 * derivation from the launcher's job id (TORCHELASTIC_RUN_ID, PMIX_NAMESPACE, OMPI_MCA_ess_base_jobid,
 * SLURM_JOB_ID.SLURM_STEP_ID: the first one set, "" when none). Read at each call; the token is never
 * logged. TP_ERR_VALUE when TPLINEAR_TOKEN is set but empty or longer than TP_TOKEN_MAX. */
#define TP_TOKEN_MAX 256
typedef struct {
    char token[TP_TOKEN_MAX + 1]; /* "" when TPLINEAR_TOKEN is unset */
    char job_id[256];
    const char *job_var;          /* the variable job_id came from, or NULL */
} tp_token_env;
tp_status tp_env_token(tp_token_env *out);

/* ---------------------------------------------------------------- secrets (core/secret.c) */
#define TP_SHA256_BYTES 32
typedef struct {
    uint32_t h[8];
    uint64_t bytes;
    unsigned char buf[64];
    size_t used;
} tp_sha256;
void tp_sha256_init(tp_sha256 *c);
void tp_sha256_update(tp_sha256 *c, const void *data, size_t n);
void tp_sha256_final(tp_sha256 *c, unsigned char out[TP_SHA256_BYTES]);
typedef struct {
    tp_sha256 inner, outer;
} tp_hmac;
void tp_hmac_init(tp_hmac *m, const void *key, size_t klen);
void tp_hmac_update(tp_hmac *m, const void *data, size_t n);
void tp_hmac_final(tp_hmac *m, unsigned char out[TP_SHA256_BYTES]);
/* 1 when the n bytes are equal; the time taken does not depend on where they differ. */
int tp_secret_equal(const void *a, const void *b, size_t n);
/* n bytes from the kernel's random generator (getrandom). */
tp_status tp_random_bytes(void *buf, size_t n);
/* n bytes as 2n lowercase hex digits and a NUL. */
void tp_hex(const unsigned char *bytes, size_t n, char *out);

#endif
