/* What the process's surroundings say (core/env.c, core/cores.c): the tuning knobs, the launcher, the host's
 * identity, the token's sources and the cores this process may use. Internal. */
#ifndef TP_CORE_ENV_H
#define TP_CORE_ENV_H

#include "error.h"

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
    TP_KNOB_SOCKET_IFNAME,
    TP_KNOB_HALF_SIMD,
    TP_KNOB_PEER_SILENCE_MS,
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

/* How many cores this process may run on: its CPU affinity (a launcher may bind it to some), else every
 * online core; at least 1 (core/cores.c). */
int tp_cores_available(void);
/* A rank's share of the cores, the rule of every BLAS thread count: the cores the launcher bound it to when
 * they are fewer than the host's, else the host's cores / local_world_size (the ranks of this host; <= 0:
 * all of them); at least 1. */
int tp_cores_per_rank(int local_world_size);

#endif
