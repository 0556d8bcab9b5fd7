/* The environment: one declared table of every tuning knob tplinear reads (name, type, default, doc,
 * as NCCL's NCCL_PARAM declares its parameters), parsed once per process and logged at
 * TPLINEAR_DEBUG=INFO; and the launcher's description of the world (torchrun's RANK, WORLD_SIZE,
 * LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, or OpenMPI's OMPI_COMM_WORLD_*), read by
 * tp_world_from_env at each call so that a process may change it between inits. Nothing else in the
 * library calls getenv. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "env.h"

typedef enum { KNOB_INT, KNOB_BOOL, KNOB_CHOICE, KNOB_STRING } knob_type;

typedef struct {
    const char *name;
    knob_type type;
    const char *dflt; /* as documented */
    long value;       /* the default's value (KNOB_CHOICE: -1, "automatic") */
    long lo, hi;      /* KNOB_INT: accepted range */
    const char *choices; /* KNOB_CHOICE: "a|b|c", matched without regard to case; value = index */
    const char *doc;
} knob_def;

static const knob_def KNOBS[TP_KNOB_COUNT] = {
    [TP_KNOB_DEBUG] = {"TPLINEAR_DEBUG", KNOB_CHOICE, "WARN", -1, 0, 0, "INFO|TRACE|WARN|OFF",
                       "log to stderr, each line prefixed with the world rank: WARN (the default) only what a "
                       "user must see before any call fails (a hung peer, a refused join); INFO also the "
                       "backend choice, ranks, segment sizes and the knobs set; TRACE also every collective "
                       "with its time; OFF nothing"},
    [TP_KNOB_BACKEND] = {"TPLINEAR_BACKEND", KNOB_STRING, "auto", 0, 0, 0, NULL,
                         "the backend a world gets when init asks for none (backend=None or 'auto'): one of "
                         "the backends this build registers (tplinear.distributed.available_backends())"},
    [TP_KNOB_SHM_SLOT_KB] = {"TPLINEAR_SHM_SLOT_KB", KNOB_INT, "8192", 8192, 8, 1L << 22, NULL,
                             "shm: the shared-memory slot per rank in KiB; half of it bounds the row layer's "
                             "staging area (must be equal on all ranks)"},
    [TP_KNOB_SHM_ONESHOT_KB] = {"TPLINEAR_SHM_ONESHOT_KB", KNOB_INT, "64", 64, 0, 1L << 22, NULL,
                                "shm: all-reduces up to this many KiB run one-shot (rank 0's value is used)"},
    [TP_KNOB_SHM_CHUNK_KB] = {"TPLINEAR_SHM_CHUNK_KB", KNOB_INT, "auto", -1, -1, 1L << 22, NULL,
                              "shm: the round size of large collectives in KiB (auto, 0 or -1: 128 when every "
                              "rank has a core, else 1024; rank 0's value is used)"},
    [TP_KNOB_SHM_ALGO] = {"TPLINEAR_SHM_ALGO", KNOB_CHOICE, "auto", -1, 0, 0, "oneshot|rsag",
                          "shm: the large all-reduce, one-shot per chunk or reduce-scatter + all-gather (auto: "
                          "one-shot at 2 ranks; rank 0's value is used)"},
    [TP_KNOB_SHM_SPIN_US] = {"TPLINEAR_SHM_SPIN_US", KNOB_INT, "auto", -1, -1, 1000000, NULL,
                             "shm: how long a wait spins before it yields, in microseconds (auto or -1: 50, "
                             "or 2 when there are more ranks than cores)"},
    [TP_KNOB_SHM_YIELD_US] = {"TPLINEAR_SHM_YIELD_US", KNOB_INT, "200", 200, 0, 10000000, NULL,
                              "shm: how long a wait yields the core before it sleeps on a futex, in "
                              "microseconds"},
    [TP_KNOB_SHM_CMA] = {"TPLINEAR_SHM_CMA", KNOB_BOOL, "1", 1, 0, 1, NULL,
                         "shm: 1 lets large collectives read (and the all-reduce write) the ranks' own buffers "
                         "with process_vm_readv/writev where every rank may (tested when a group is made; "
                         "refused under Yama ptrace_scope >= 1 or a seccomp filter, then the copying "
                         "algorithms run); 0: the copying algorithms always (rank 0's value is used)"},
    [TP_KNOB_SHM_CMA_KB] = {"TPLINEAR_SHM_CMA_KB", KNOB_INT, "auto", -1, -1, 1L << 30, NULL,
                            "shm: collectives of at least this many KiB (the all-reduce's buffer, the "
                            "reduce-scatter's input, the all-gather's output) take the single-copy path (auto "
                            "or -1: 16 when every rank has a core; else all-reduce and reduce-scatter from "
                            "4096, all-gather and broadcast never; rank 0's value is used)"},
    [TP_KNOB_ALLOW_TF32] = {"TPLINEAR_ALLOW_TF32", KNOB_BOOL, "0", 0, 0, 1, NULL,
                            "GPU: the default of tplinear.set_allow_tf32 (1: float32 GEMMs may use TF32 "
                            "tensor cores)"},
    [TP_KNOB_NCCL_ASYNC] = {"TPLINEAR_NCCL_ASYNC", KNOB_BOOL, "0", 0, 0, 1, NULL,
                            "nccl: 1 returns from a collective once it is enqueued; the next collective checks "
                            "without waiting that it has not failed or outlived the timeout, barrier and destroy "
                            "wait (bounded)"},
    [TP_KNOB_HOST_ID] = {"TPLINEAR_HOST_ID", KNOB_STRING, "hostname + boot id", 0, 0, 0, NULL,
                         "the host identity ranks compare at rendezvous: ranks with equal ones share a host "
                         "(local ranks, the shm backend's one-host check, the automatic backend choice)"},
    [TP_KNOB_MPI_ONESHOT_KB] = {"TPLINEAR_MPI_ONESHOT_KB", KNOB_INT, "64", 64, 0, 1L << 22, NULL,
                                "mpi: an all-reduce whose one-shot traffic per rank (size x (ranks - 1)) is at most "
                                "this many KiB sends every buffer to every rank (one round); larger ones "
                                "reduce-scatter + all-gather (rank 0's value is used)"},
    [TP_KNOB_MPI_CHUNK_KB] = {"TPLINEAR_MPI_CHUNK_KB", KNOB_INT, "4096", 4096, 4, 1L << 22, NULL,
                              "mpi: the segment size of large all-reduces (two segments in flight: scratch of up "
                              "to twice this) and the round size of reduce-scatters, in KiB (rank 0's value is "
                              "used)"},
    [TP_KNOB_MPI_EAGER_BYTES] = {"TPLINEAR_MPI_EAGER_BYTES", KNOB_INT, "4096", 4096, 0, 1L << 30, NULL,
                                 "mpi: the MPI's eager limit (messages this large or larger wait for a "
                                 "rendezvous; OpenMPI's shared-memory default is 4096 with its header): a "
                                 "one-shot all-reduce whose buffer is at least this large but whose "
                                 "reduce-scatter blocks are smaller takes the reduce-scatter + all-gather (0: "
                                 "never; rank 0's value is used)"},
    [TP_KNOB_WATCHDOG_S] = {"TPLINEAR_WATCHDOG_S", KNOB_INT, "30", 30, 0, 1L << 30, NULL,
                            "after a rank has waited this many seconds for a peer (a collective, the rendezvous, "
                            "a store key), it logs once which rank and which collective it waits for (0: never); "
                            "the wait itself ends at the group's timeout"},
    [TP_KNOB_SP_CHUNKS] = {"TPLINEAR_SP_CHUNKS", KNOB_INT, "0", 0, 0, 64, NULL,
                           "sequence parallelism: n > 1 pipelines a column layer's forward all-gather with its "
                           "GEMM in n chunks (host memory); 0 or 1: gather, then multiply"},
    [TP_KNOB_SOCKET_IFNAME] = {"TPLINEAR_SOCKET_IFNAME", KNOB_STRING, "^docker,lo", 0, 0, 0, NULL,
                               "the interfaces whose addresses rank 0 announces for its rendezvous store under "
                               "mpirun/srun (NCCL_SOCKET_IFNAME's convention: comma-separated prefixes, '=' for "
                               "exact names, '^' to exclude); MASTER_ADDR wins"},
    [TP_KNOB_HALF_SIMD] = {"TPLINEAR_HALF_SIMD", KNOB_BOOL, "1", 1, 0, 1, NULL,
                           "host bfloat16/float16: 1 converts to and from float32 with AVX2 / F16C where the CPU "
                           "has them; 0 forces the plain C conversions every CPU runs (the same bits; for tests)"},
    [TP_KNOB_PEER_SILENCE_MS] = {"TPLINEAR_PEER_SILENCE_MS", KNOB_INT, "1500", 1500, 0, 1L << 30, NULL,
                                 "a rank whose rendezvous-store connection has carried nothing for this many "
                                 "milliseconds (every rank's store client beats every 250 ms from a thread of its "
                                 "own, busy or not) stopped answering: SIGSTOP, a frozen process, a cut link; the mpi "
                                 "backend's waits then fail naming it (rank 0's value judges the other ranks, each "
                                 "rank's own judges rank 0; below 1000 counts as 1000; 0: never, the group timeout "
                                 "ends such a wait)"},
};

#define VALUE_CAP 128
#define ERR_CAP 256

typedef struct {
    int set;               /* the variable is set and not empty */
    long value;
    char text[VALUE_CAP];  /* as set (truncated) */
    char err[ERR_CAP];     /* "" when valid */
} knob_value;

static knob_value g_values[TP_KNOB_COUNT]; /* written once, under g_once */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_logged;                       /* the INFO dump was written (atomic) */

/* index of s in "a|b|c" (case-insensitive), or -1 */
static long choice_index(const char *choices, const char *s)
{
    long i = 0;
    size_t n = strlen(s);
    for (const char *c = choices; *c; i++) {
        const char *bar = strchr(c, '|');
        size_t len = bar ? (size_t)(bar - c) : strlen(c);
        if (len == n && strncasecmp(c, s, n) == 0) return i;
        if (bar == NULL) break;
        c = bar + 1;
    }
    return -1;
}

static void parse(const knob_def *d, knob_value *v)
{
    const char *s = getenv(d->name);
    char *end = NULL;
    v->value = d->value;
    if (s == NULL || s[0] == '\0') return;
    v->set = 1;
    snprintf(v->text, sizeof v->text, "%s", s);
    switch (d->type) {
    case KNOB_STRING:
        return;
    case KNOB_CHOICE:
        if ((v->value = choice_index(d->choices, s)) < 0)
            snprintf(v->err, sizeof v->err, "environment variable %s must be one of %s, got '%.100s'", d->name,
                     d->choices, s);
        return;
    case KNOB_INT:
    case KNOB_BOOL:
        errno = 0;
        v->value = strtol(s, &end, 10);
        if (errno != 0 || end == s || *end != '\0' || v->value < d->lo || v->value > d->hi) {
            snprintf(v->err, sizeof v->err, "environment variable %s must be an integer in [%ld, %ld], got '%.100s'",
                     d->name, d->lo, d->hi, s);
            v->value = d->value;
        }
        return;
    }
}

static void load(void)
{
    for (int k = 0; k < TP_KNOB_COUNT; k++) parse(&KNOBS[k], &g_values[k]);
}

static const knob_value *values(void)
{
    pthread_once(&g_once, load);
    return g_values;
}

/* The INFO dump of the knobs that are set, once per process, by the first logger that gets here
 * (not from load: logging reads TPLINEAR_DEBUG itself). */
static void log_knobs(void)
{
    const knob_value *v = values();
    if (__atomic_exchange_n(&g_logged, 1, __ATOMIC_ACQ_REL)) return;
    for (int k = 0; k < TP_KNOB_COUNT; k++) {
        if (!v[k].set) continue;
        if (v[k].err[0])
            tp_log(TP_LOG_INFO, "env: %s (the default %s applies where the value cannot fail a call)", v[k].err,
                   KNOBS[k].dflt);
        else
            tp_log(TP_LOG_INFO, "env: %s=%s (default %s)", KNOBS[k].name, v[k].text, KNOBS[k].dflt);
    }
}

int tp_log_level(void)
{
    const knob_value *v = &values()[TP_KNOB_DEBUG];
    static const int levels[] = {TP_LOG_INFO, TP_LOG_TRACE, TP_LOG_WARN, TP_LOG_OFF}; /* the choices' order */
    int level = v->err[0] || v->value < 0 ? TP_LOG_WARN : levels[v->value];
    if (level >= TP_LOG_INFO && !__atomic_load_n(&g_logged, __ATOMIC_ACQUIRE)) log_knobs();
    return level;
}

tp_status tp_knob_int(tp_knob k, long *out)
{
    const knob_value *v = &values()[k];
    *out = v->value;
    if (v->err[0]) return tp_error(TP_ERR_VALUE, "%s", v->err);
    return TP_OK;
}

long tp_knob_value(tp_knob k) { return values()[k].value; }

tp_status tp_knobs_check(void)
{
    const knob_value *v = values();
    for (int k = 0; k < TP_KNOB_COUNT; k++)
        if (k != TP_KNOB_DEBUG && v[k].err[0]) return tp_error(TP_ERR_VALUE, "%s", v[k].err);
    return TP_OK;
}

const char *tp_knob_str(tp_knob k)
{
    const knob_value *v = &values()[k];
    return v->set ? v->text : NULL;
}

int tp_env_knob_count(void) { return TP_KNOB_COUNT; }

tp_status tp_env_knob_at(int i, tp_env_knob *out)
{
    static const char *const types[] = {"int", "bool", "choice", "string"};
    tp_status st = TP_OK;
    TP_REQUIRE(out != NULL && i >= 0 && i < TP_KNOB_COUNT, "env knob %d: out of range 0..%d", i, TP_KNOB_COUNT - 1);
    out->name = KNOBS[i].name;
    out->type = types[KNOBS[i].type];
    out->default_value = KNOBS[i].dflt;
    out->choices = KNOBS[i].choices;
    out->doc = KNOBS[i].doc;
out:
    return st;
}

/* ---------------------------------------------------------------- the world */

/* The launchers whose variables describe a world, in the order they are consulted: a field comes from the
 * first family that sets it (torchrun's names win, so a launcher nested in another sees its own world).
 * Slurm's names count only inside a job step (SLURM_STEP_ID, set by srun: a batch script's own shell has
 * SLURM_NTASKS too, but it is not a rank of anything). Slurm gives no local world size: the rendezvous
 * counts the ranks of each host. */
static const struct {
    tp_launcher_kind kind;
    const char *guard;                /* must be set for the family to count (NULL: always) */
    const char *names[4];             /* rank, world size, local rank, local world size */
} FAMILIES[] = {
    {TP_LAUNCHER_TORCHRUN, NULL, {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}},
    {TP_LAUNCHER_MPI, NULL,
     {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"}},
    {TP_LAUNCHER_MPI, NULL, {"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"}}, /* MPICH, Intel MPI */
    {TP_LAUNCHER_SLURM, "SLURM_STEP_ID", {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", NULL}},
};
#define NFAMILIES ((int)(sizeof FAMILIES / sizeof FAMILIES[0]))

/* An integer >= 0 from the variable name into *out (-1 when unset or empty). Returns name when it is set
 * but not such an integer, else NULL. */
static const char *env_int(const char *name, int *out)
{
    const char *v = name ? getenv(name) : NULL;
    char *end = NULL;
    long x;
    *out = -1;
    if (v == NULL || v[0] == '\0') return NULL;
    errno = 0;
    x = strtol(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || x < 0 || x > 1L << 30) return name;
    *out = (int)x;
    return NULL;
}

/* Field `field` of the world from the first family that sets it; *kind (when not NULL) gets that family. */
static const char *world_int(int field, int *out, tp_launcher_kind *kind)
{
    *out = -1;
    if (kind) *kind = TP_LAUNCHER_NONE;
    for (int i = 0; i < NFAMILIES; i++) {
        const char *bad;
        if (FAMILIES[i].guard && getenv(FAMILIES[i].guard) == NULL) continue;
        if ((bad = env_int(FAMILIES[i].names[field], out)) != NULL) return bad;
        if (*out >= 0) {
            if (kind) *kind = FAMILIES[i].kind;
            return NULL;
        }
    }
    return NULL;
}

enum { F_RANK, F_SIZE, F_LRANK, F_LSIZE };

tp_status tp_world_from_env(tp_world_env *w)
{
    tp_status st = TP_OK;
    const char *bad = NULL, *addr;
    TP_REQUIRE(w != NULL, "world_from_env: NULL argument");
    memset(w, 0, sizeof *w);
    if ((bad = world_int(F_RANK, &w->rank, NULL)) == NULL && (bad = world_int(F_SIZE, &w->world_size, NULL)) == NULL &&
        (bad = world_int(F_LRANK, &w->local_rank, NULL)) == NULL &&
        (bad = world_int(F_LSIZE, &w->local_world_size, NULL)) == NULL)
        bad = env_int("MASTER_PORT", &w->master_port);
    TP_REQUIRE(bad == NULL, "environment variable %s must be a non-negative integer, got '%s'", bad, getenv(bad));
    addr = getenv("MASTER_ADDR");
    if (addr != NULL) {
        TP_REQUIRE(strlen(addr) < sizeof w->master_addr, "environment variable MASTER_ADDR is longer than %zu bytes",
                   sizeof w->master_addr - 1);
        strcpy(w->master_addr, addr);
    }
out:
    return st;
}

/* Set by an MPI runtime for the processes it starts: PMIx (OpenMPI 4/5, Slurm's --mpi=pmix), OpenMPI's
 * ORTE, MPICH's Hydra (PMI_FD / PMI_PORT). */
static const char *const MPI_RUNTIME_VARS[] = {"PMIX_RANK", "PMIX_NAMESPACE", "OMPI_MCA_orte_hnp_uri", "PMI_FD",
                                               "PMI_PORT"};

/* Copies the variable's value into buf (cap bytes); 0 when unset or empty, -1 when too long. */
static int env_copy(const char *name, char *buf, size_t cap)
{
    const char *v = getenv(name);
    buf[0] = '\0';
    if (v == NULL || v[0] == '\0') return 0;
    if (strlen(v) >= cap) return -1;
    strcpy(buf, v);
    return 1;
}

tp_status tp_launcher_from_env(tp_launcher *l)
{
    tp_status st = TP_OK;
    const char *bad, *agent;
    int size = -1;
    memset(l, 0, sizeof *l);
    bad = world_int(F_SIZE, &size, &l->kind);
    TP_REQUIRE(bad == NULL, "environment variable %s must be a non-negative integer, got '%s'", bad, getenv(bad));
    agent = getenv("TORCHELASTIC_USE_AGENT_STORE");
    l->agent_store = l->kind == TP_LAUNCHER_TORCHRUN && agent != NULL && strcasecmp(agent, "true") == 0;
    bad = env_int("TORCHELASTIC_RESTART_COUNT", &l->restart_count);
    TP_REQUIRE(bad == NULL, "environment variable %s must be a non-negative integer, got '%s'", bad, getenv(bad));
    if (l->restart_count < 0) l->restart_count = 0;
    TP_REQUIRE(env_copy("TORCHELASTIC_RUN_ID", l->run_id, sizeof l->run_id) >= 0,
               "environment variable TORCHELASTIC_RUN_ID is longer than %zu bytes", sizeof l->run_id - 1);
    l->omp_threads_set = getenv("OMP_NUM_THREADS") != NULL && getenv("OMP_NUM_THREADS")[0] != '\0';
    for (size_t i = 0; i < sizeof MPI_RUNTIME_VARS / sizeof MPI_RUNTIME_VARS[0]; i++)
        if (getenv(MPI_RUNTIME_VARS[i]) != NULL) l->mpi_runtime = l->kind == TP_LAUNCHER_MPI || l->kind == TP_LAUNCHER_SLURM;
out:
    return st;
}

tp_status tp_env_token(tp_token_env *out)
{
    static const char *const JOB_VARS[] = {"TORCHELASTIC_RUN_ID", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid",
                                           "SLURM_JOB_ID"};
    tp_status st = TP_OK;
    const char *tok = getenv("TPLINEAR_TOKEN");
    memset(out, 0, sizeof *out);
    TP_REQUIRE(tok == NULL || (tok[0] != '\0' && strlen(tok) <= TP_TOKEN_MAX),
               "environment variable TPLINEAR_TOKEN must be 1..%d characters when set, got %zu", TP_TOKEN_MAX,
               tok ? strlen(tok) : (size_t)0);
    if (tok) strcpy(out->token, tok);
    for (size_t i = 0; i < sizeof JOB_VARS / sizeof JOB_VARS[0]; i++) {
        int rc = env_copy(JOB_VARS[i], out->job_id, sizeof out->job_id - 32);
        TP_REQUIRE(rc >= 0, "environment variable %s is longer than %zu bytes", JOB_VARS[i], sizeof out->job_id - 33);
        if (rc == 0) continue;
        out->job_var = JOB_VARS[i];
        if (strcmp(JOB_VARS[i], "SLURM_JOB_ID") == 0) { /* a job's steps are worlds of their own */
            const char *step = getenv("SLURM_STEP_ID");
            size_t n = strlen(out->job_id);
            snprintf(out->job_id + n, sizeof out->job_id - n, ".%.20s", step ? step : "");
        }
        break;
    }
out:
    return st;
}

const char *tp_launcher_name(tp_launcher_kind k)
{
    switch (k) {
    case TP_LAUNCHER_TORCHRUN: return "torchrun's variables";
    case TP_LAUNCHER_MPI: return "an MPI launcher (mpirun/mpiexec)";
    case TP_LAUNCHER_SLURM: return "Slurm (srun)";
    default: return "no launcher";
    }
}

int tp_env_rank(void)
{
    int rank;
    return world_int(F_RANK, &rank, NULL) == NULL ? rank : -1;
}

tp_status tp_host_identity(char *id, size_t cap, char *name, size_t ncap)
{
    tp_status st = TP_OK;
    const char *forced = tp_knob_str(TP_KNOB_HOST_ID);
    char host[256] = "", boot[64] = "";
    FILE *f;
    if (gethostname(host, sizeof host - 1) < 0) snprintf(host, sizeof host, "unknown-host");
    if (forced != NULL) {
        snprintf(id, cap, "%s", forced);
        snprintf(name, ncap, "%s", forced);
        goto out;
    }
    /* the boot id tells apart hosts (or containers' kernels) that share a hostname */
    if ((f = fopen("/proc/sys/kernel/random/boot_id", "r")) != NULL) {
        if (fgets(boot, sizeof boot, f) == NULL) boot[0] = '\0';
        fclose(f);
        boot[strcspn(boot, "\n")] = '\0';
    }
    snprintf(id, cap, "%s/%s", host, boot);
    snprintf(name, ncap, "%s", host);
out:
    return st;
}
