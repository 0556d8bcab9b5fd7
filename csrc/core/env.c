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

#include "internal.h"

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
    [TP_KNOB_DEBUG] = {"TPLINEAR_DEBUG", KNOB_CHOICE, "off", -1, 0, 0, "INFO|TRACE",
                       "log to stderr, each line prefixed with the world rank: INFO the backend choice, ranks, "
                       "segment sizes and the knobs set; TRACE also every collective with its time (any other "
                       "value: off)"},
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
                            "nccl: 1 returns from a collective once it is enqueued and waits (still bounded by "
                            "the timeout) at the group's next call"},
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
    int level = v->err[0] ? TP_LOG_OFF : (int)v->value + 1; /* -1 unset, 0 INFO, 1 TRACE */
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

/* The first set variable of names (torchrun's, then OpenMPI's) as an integer >= 0 into *out (-1 when
 * none is set). Returns the name of a variable that is set but not such an integer, else NULL. */
static const char *world_int(const char *const names[2], int *out)
{
    *out = -1;
    for (int i = 0; i < 2; i++) {
        const char *v = names[i] ? getenv(names[i]) : NULL;
        char *end = NULL;
        long x;
        if (v == NULL || v[0] == '\0') continue;
        errno = 0;
        x = strtol(v, &end, 10);
        if (errno != 0 || end == v || *end != '\0' || x < 0 || x > 1L << 30) return names[i];
        *out = (int)x;
        return NULL;
    }
    return NULL;
}

static const char *const W_RANK[2] = {"RANK", "OMPI_COMM_WORLD_RANK"};
static const char *const W_SIZE[2] = {"WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"};
static const char *const W_LRANK[2] = {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"};
static const char *const W_LSIZE[2] = {"LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"};
static const char *const W_PORT[2] = {"MASTER_PORT", NULL};

tp_status tp_world_from_env(tp_world_env *w)
{
    tp_status st = TP_OK;
    const char *bad = NULL, *addr;
    TP_REQUIRE(w != NULL, "world_from_env: NULL argument");
    memset(w, 0, sizeof *w);
    if ((bad = world_int(W_RANK, &w->rank)) == NULL && (bad = world_int(W_SIZE, &w->world_size)) == NULL &&
        (bad = world_int(W_LRANK, &w->local_rank)) == NULL && (bad = world_int(W_LSIZE, &w->local_world_size)) == NULL)
        bad = world_int(W_PORT, &w->master_port);
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

int tp_env_rank(void)
{
    int rank;
    return world_int(W_RANK, &rank) == NULL ? rank : -1;
}
