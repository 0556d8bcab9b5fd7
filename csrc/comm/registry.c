/* The registry: the backends this build has, the names it knows but lacks, and the choice for "auto".
 * Adding a backend: define its table in its own file (comm/<name>.c), declare it and list it below, and
 * compile the file in tools/buildcfg.py. Nothing else names a backend. */
#include <stdio.h>
#include <string.h>

#include "registry.h"

#define DEVICE_BIT(d) (1u << (unsigned)(d))

extern const tp_backend tp_shm_backend; /* comm/shm.c */
#if TPLINEAR_CUDA
extern const tp_backend tp_nccl_backend; /* comm/nccl.c */
#endif
#if TPLINEAR_MPI
extern const tp_backend tp_mpi_backend; /* comm/mpi.c */
#endif

/* In the order an automatic choice considers them: mpi first, which takes only worlds that its launcher
 * started (mpirun/mpiexec/srun), then shm for the ranks of one host. */
static const tp_backend *const BACKENDS[] = {
#if TPLINEAR_MPI
    &tp_mpi_backend,
#endif
    &tp_shm_backend,
#if TPLINEAR_CUDA
    &tp_nccl_backend,
#endif
};
#define NBACKENDS ((int)(sizeof BACKENDS / sizeof BACKENDS[0]))

/* Names this build knows but does not have: the device memory each would take, and what brings it. */
static const struct {
    const char *name;
    unsigned devices;
    const char *why;
} MISSING[] = {
#if !TPLINEAR_CUDA
    {"nccl", DEVICE_BIT(TP_DEVICE_CUDA), "tplinear was built without CUDA (set TPLINEAR_CUDA=1 and a CUDA toolkit)"},
#endif
#if !TPLINEAR_MPI
    {"mpi", DEVICE_BIT(TP_DEVICE_CPU),
     "tplinear was built without MPI: install an MPI (apt-get install libopenmpi-dev, or libmpich-dev) and "
     "reinstall tplinear (TPLINEAR_MPI=1 makes a build without one fail; MPI_HOME or an mpicc on PATH finds it)"},
#endif
    {NULL, 0, NULL}, /* the end */
};

int tp_backend_count(void) { return NBACKENDS; }

const char *tp_backend_name(int i) { return i >= 0 && i < NBACKENDS ? BACKENDS[i]->name : NULL; }

/* The registered names whose devices include any of mask, as "'a', 'b'". */
static void names_for(unsigned mask, char *buf, size_t cap)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < NBACKENDS; i++) {
        int n;
        if (!(BACKENDS[i]->devices & mask)) continue;
        n = snprintf(buf + used, cap - used, "%s'%s'", used ? ", " : "", BACKENDS[i]->name);
        if (n < 0 || (size_t)n >= cap - used) break;
        used += (size_t)n;
    }
}

void tp_backend_names_for(tp_device_type dev, char *buf, size_t cap) { names_for(DEVICE_BIT(dev), buf, cap); }

static void append(char *buf, size_t cap, size_t *used, const char *fmt, const char *name, int rank)
{
    int k = snprintf(buf + *used, cap - *used, fmt, name, rank);
    if (k > 0 && (size_t)k < cap - *used) *used += (size_t)k;
}

/* The hosts g's members span, as "a (ranks 0, 1), b (ranks 2, 3)" (world ranks) into buf; returns how
 * many. */
static int spanned_hosts(const tp_group *g, char *buf, size_t cap)
{
    int n = 0;
    size_t used = 0;
    buf[0] = '\0';
    if (g->hosts == NULL) return 1;
    for (int h = 0; h < g->hosts->nhosts; h++) {
        int members = 0;
        for (int i = 0; i < g->size; i++) {
            int w = g->global_ranks[i];
            if (g->hosts->host_of[w] != h) continue;
            if (members++ == 0)
                append(buf, cap, &used, n++ ? ", %s (ranks %d" : "%s (ranks %d", g->hosts->names[h], w);
            else
                append(buf, cap, &used, "%s, %d", "", w);
        }
        if (members) append(buf, cap, &used, "%s)", "", 0);
    }
    return n;
}

/* TP_OK when backend b can serve group g; else the reason, as an error naming the backend and prefixed
 * `who` (init or new_group: each refusal says what can be done from there). */
static tp_status serves(const tp_backend *b, const tp_group *g, const char *who)
{
    char hosts[512];
    int sub = strcmp(who, "init") != 0;
    if (g->size > 1 && b->launcher_world && g->booted_by != b)
        return tp_error(TP_ERR_UNSUPPORTED, "%s: the %s backend needs processes started by an MPI launcher "
                        "(mpirun, mpiexec or srun, so that they share MPI_COMM_WORLD); this world comes from %s",
                        who, b->name, g->booted_by ? "another launcher" : "torchrun's variables (RANK, WORLD_SIZE)");
    if (g->size > 1 && b->one_host && spanned_hosts(g, hosts, sizeof hosts) > 1) {
        if (sub)
            return tp_error(TP_ERR_UNSUPPORTED, "%s: the %s backend needs every rank of a group on one host, but "
                            "this group spans hosts %s: give each host's ranks a group of their own "
                            "(new_group(ranks, backend='%s')), or leave backend unset (the world's backend)", who,
                            b->name, hosts, b->name);
        return tp_error(TP_ERR_UNSUPPORTED, "%s: the %s backend needs every rank of a group on one host, but this "
                        "world spans hosts %s: launch with mpirun/mpiexec/srun and init_process_group(backend='mpi') "
                        "(or 'nccl' for GPUs), then new_group(ranks, backend='%s') for each host's ranks; or start "
                        "one world per host (each host's ranks with their own MASTER_ADDR, MASTER_PORT and "
                        "WORLD_SIZE)", who, b->name, hosts, b->name);
    }
    return TP_OK;
}

static tp_status choose(const char *name, tp_device_type device, const tp_group *g, const char *who,
                        const tp_backend **out)
{
    tp_status st = TP_OK;
    const char *from = "";
    char names[256];
    *out = NULL;
    names_for(~0u, names, sizeof names);
    if (name == NULL || strcmp(name, "auto") == 0) {
        name = tp_knob_str(TP_KNOB_BACKEND);
        from = " (from TPLINEAR_BACKEND)";
        if (name != NULL && strcmp(name, "auto") == 0) name = NULL;
    }
    if (name != NULL) {
        for (int i = 0; i < NBACKENDS; i++) {
            if (strcmp(name, BACKENDS[i]->name) != 0) continue;
            TP_CHECK(serves(BACKENDS[i], g, who));
            *out = BACKENDS[i];
            return TP_OK;
        }
        for (size_t i = 0; MISSING[i].name != NULL; i++)
            if (strcmp(name, MISSING[i].name) == 0)
                return tp_error(TP_ERR_UNSUPPORTED, "%s: the '%s' backend%s is not built into this tplinear: %s; "
                                "this build has %s", who, name, from, MISSING[i].why, names);
        return tp_error(TP_ERR_VALUE, "%s: backend must be None, 'auto' or one of %s, got '%s'%s", who, names, name,
                        from);
    }
    for (int i = 0; i < NBACKENDS; i++) {
        tp_status why;
        if (!(BACKENDS[i]->devices & DEVICE_BIT(device))) continue;
        if (BACKENDS[i]->launcher_world && g->booted_by != BACKENDS[i]) continue; /* not an error: not its world */
        if ((why = serves(BACKENDS[i], g, who)) != TP_OK) {
            if (st == TP_OK) st = why; /* unless a later one serves */
            continue;
        }
        *out = BACKENDS[i];
        tp_clear_error();
        return TP_OK;
    }
    if (st != TP_OK) return st;
    for (size_t i = 0; MISSING[i].name != NULL; i++)
        if (MISSING[i].devices & DEVICE_BIT(device))
            return tp_error(TP_ERR_UNSUPPORTED, "%s: no backend of this build takes %s memory ('%s' is not built: "
                            "%s)", who, device == TP_DEVICE_CUDA ? "GPU" : "host", MISSING[i].name, MISSING[i].why);
    return tp_error(TP_ERR_UNSUPPORTED, "%s: no backend of this build takes %s memory", who,
                    device == TP_DEVICE_CUDA ? "GPU" : "host");
out:
    return st;
}

tp_status tp_backend_choose(const char *name, tp_device_type device, const tp_group *g, const tp_backend **out)
{
    return choose(name, device, g, "init", out);
}

tp_status tp_backend_choose_sub(const char *name, const tp_group *g, const tp_backend *parent, const tp_backend **out)
{
    *out = parent;
    if (name == NULL) return TP_OK;
    if (strcmp(name, "auto") != 0) return choose(name, TP_DEVICE_CPU, g, "new_group", out);
    for (int i = 0; i < NBACKENDS; i++) {
        if (!BACKENDS[i]->one_host || !(BACKENDS[i]->devices & parent->devices)) continue;
        if (serves(BACKENDS[i], g, "new_group") == TP_OK) {
            *out = BACKENDS[i];
            break;
        }
    }
    tp_clear_error();
    return TP_OK;
}

tp_status tp_backend_boot_check(void)
{
    for (int i = 0; i < NBACKENDS; i++)
        if (BACKENDS[i]->boot_bcast != NULL) return TP_OK;
#if TPLINEAR_MPI
    return tp_error(TP_ERR_UNSUPPORTED, "no backend of this build bootstraps through this launcher");
#else
    return tp_error(TP_ERR_UNSUPPORTED, "tplinear was built without MPI, so it cannot bootstrap through mpirun/srun: "
                    "install an MPI (apt-get install libopenmpi-dev, or libmpich-dev) and reinstall tplinear, or set "
                    "MASTER_ADDR and MASTER_PORT (rank 0 serves its rendezvous store there)");
#endif
}

tp_status tp_backend_boot_bcast(int rank, int size, void *buf, size_t len, double timeout_s, const tp_backend **by)
{
    *by = NULL;
    for (int i = 0; i < NBACKENDS; i++) {
        tp_status st;
        if (BACKENDS[i]->boot_bcast == NULL) continue;
        st = BACKENDS[i]->boot_bcast(rank, size, buf, len, timeout_s);
        if (st == TP_ERR_UNSUPPORTED) continue;
        if (st == TP_OK) *by = BACKENDS[i];
        return st;
    }
    return tp_backend_boot_check();
}
