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

/* In the order an automatic choice considers them. */
static const tp_backend *const BACKENDS[] = {
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
    {"mpi", DEVICE_BIT(TP_DEVICE_CPU),
     "tplinear has no MPI backend yet (it will come as comm/mpi.c, built when an MPI compiler is found, as "
     "nccl is built when CUDA is)"},
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

static int serves_hosts(const tp_backend *b, int size, int local_size)
{
    return !b->one_host || size == 1 || local_size == size;
}

static tp_status one_host_error(const tp_backend *b, int size, int local_size)
{
    return tp_error(TP_ERR_UNSUPPORTED, "init: the %s backend needs every rank on one host (LOCAL_WORLD_SIZE=%d, "
                    "WORLD_SIZE=%d); the multi-host 'mpi' backend is not built", b->name, local_size, size);
}

tp_status tp_backend_choose(const char *name, tp_device_type device, int size, int local_size, const tp_backend **out)
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
            if (!serves_hosts(BACKENDS[i], size, local_size)) return one_host_error(BACKENDS[i], size, local_size);
            *out = BACKENDS[i];
            return TP_OK;
        }
        for (size_t i = 0; i < sizeof MISSING / sizeof MISSING[0]; i++)
            if (strcmp(name, MISSING[i].name) == 0)
                return tp_error(TP_ERR_UNSUPPORTED, "init: the '%s' backend%s is not built into this tplinear: %s; "
                                "this build has %s", name, from, MISSING[i].why, names);
        return tp_error(TP_ERR_VALUE, "init: backend must be None, 'auto' or one of %s, got '%s'%s", names, name,
                        from);
    }
    for (int i = 0; i < NBACKENDS; i++) {
        if (!(BACKENDS[i]->devices & DEVICE_BIT(device))) continue;
        if (!serves_hosts(BACKENDS[i], size, local_size)) {
            if (st == TP_OK) st = one_host_error(BACKENDS[i], size, local_size); /* unless a later one serves */
            continue;
        }
        *out = BACKENDS[i];
        return TP_OK;
    }
    if (st != TP_OK) return st;
    for (size_t i = 0; i < sizeof MISSING / sizeof MISSING[0]; i++)
        if (MISSING[i].devices & DEVICE_BIT(device))
            return tp_error(TP_ERR_UNSUPPORTED, "init: no backend of this build takes %s memory ('%s' is not built: "
                            "%s)", device == TP_DEVICE_CUDA ? "GPU" : "host", MISSING[i].name, MISSING[i].why);
    return tp_error(TP_ERR_UNSUPPORTED, "init: no backend of this build takes %s memory",
                    device == TP_DEVICE_CUDA ? "GPU" : "host");
}
