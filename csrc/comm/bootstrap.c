/* Rendezvous: the world's shape, its store (through the launcher's channel or at MASTER_ADDR:MASTER_PORT), the
 * hosts of its ranks, and the store's part in making a subgroup. comm/group.c makes the group object and
 * calls these; only they talk to the store while a group is made. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bootstrap.h"
#include "net.h"

/* Ends a bootstrap phase that used the store (nothing without one): every member of `over` (the group
 * itself, or the parent a subgroup was made from) checks in under g's prefix, and world rank 0 (the store's
 * server, when it is a member) returns last, so no rank is left mid-request when rank 0 moves on (or exits). */
tp_status tp_boot_checkout(const tp_group *g, const tp_group *over)
{
    tp_status st = TP_OK;
    char key[128];
    if (g->store == NULL) goto out;
    snprintf(key, sizeof key, "%sdone", g->prefix);
    TP_CHECK(tp_store_arrive(g->store, key, over->rank));
    if (over->world_rank == 0)
        TP_CHECK(tp_store_wait_all(g->store, key, over->size, over->global_ranks, "to finish setting up the group"));
out:
    return st;
}

/* Subgroup g (prefix and size set) of parent shares the parent's store, when it has one, and every rank of
 * the parent must have passed rank 0's list of ranks. */
tp_status tp_boot_subgroup(tp_group *g, const tp_group *parent, const int *ranks)
{
    tp_status st = TP_OK;
    char key[128];
    size_t len = 0, bytes = (size_t)g->size * sizeof *ranks;
    int *other = NULL;
    if (parent->store == NULL) goto out;
    g->store = tp_store_retain(parent->store);
    g->owns_store = 1;
    snprintf(key, sizeof key, "%sranks", g->prefix);
    if (parent->rank == 0) {
        TP_CHECK(tp_store_set(g->store, key, ranks, bytes));
        goto out;
    }
    if ((other = malloc(bytes)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "new_group: out of memory");
        goto out;
    }
    TP_CHECK(tp_store_get(g->store, key, other, bytes, &len));
    TP_REQUIRE(len == bytes && memcmp(other, ranks, len) == 0, "new_group: rank %d of the parent passed different "
               "ranks than rank 0 (every rank must pass the same list)", parent->rank);
out:
    free(other);
    return st;
}

/* The world's shape: each field from opts when given, else from the launcher's environment, else a world
 * of one (local rank and size: -1 when neither says). */
tp_status tp_boot_world_shape(const tp_init_options *opts, int *size, int *rank, int *lrank, int *lsize)
{
    tp_status st = TP_OK;
    tp_world_env env;
    TP_CHECK(tp_world_from_env(&env));
    *size = opts->world_size >= 0 ? opts->world_size : env.world_size >= 0 ? env.world_size : 1;
    *rank = opts->rank >= 0 ? opts->rank : env.rank >= 0 ? env.rank : 0;
    /* -1 when nobody says: a world of more than one counts the ranks of each host at rendezvous */
    *lrank = opts->local_rank >= 0 ? opts->local_rank : env.local_rank;
    *lsize = opts->local_world_size >= 0 ? opts->local_world_size : env.local_world_size;
    TP_REQUIRE(*size >= 1 && *size <= 65536, "init: WORLD_SIZE must be in 1..65536, got %d", *size);
    TP_REQUIRE(*rank >= 0 && *rank < *size, "init: RANK must be in 0..%d (WORLD_SIZE=%d), got %d", *size - 1, *size,
               *rank);
out:
    return st;
}

/* How many worlds of more than one rank this process has started: the generation of the next one. Every
 * rank counts the same, so the n-th init of each meets the n-th of the others, and a rank that re-inits
 * cannot reach the previous world's store (the one counter of the process, like the registry's tables). */
static _Atomic uint64_t g_world_generation;

/* The key namespace in a store that outlives one world (torchrun's agent store serves every restart
 * of a run): the run id and the restart count, so a restarted world never sees an earlier attempt's
 * keys (store.c adds the generation, and proves every value with the world's token). */
static void store_namespace(const tp_launcher *l, char *ns, size_t cap)
{
    snprintf(ns, cap, "tplinear/%s/%d/", l->run_id[0] ? l->run_id : "none", l->restart_count);
}

/* The addresses other hosts may dial to reach this one, comma-separated: MASTER_ADDR when set; else every
 * IPv4 address of an up interface that TPLINEAR_SOCKET_IFNAME admits (default: all but loopback and
 * docker's bridges), which a peer dials at once, keeping the first that answers; else (none admitted by
 * the default) the hostname. *any: the store must listen on every interface (more than one address). */
static tp_status own_addresses(const tp_world_env *env, char *addr, size_t cap, int *any)
{
    tp_status st = TP_OK;
    const char *spec = tp_knob_str(TP_KNOB_SOCKET_IFNAME);
    char seen[512];
    *any = 0;
    if (env->master_addr[0]) {
        snprintf(addr, cap, "%s", env->master_addr);
        goto out;
    }
    TP_CHECK(tp_net_own_addresses(spec, addr, cap, seen, sizeof seen));
    if (addr[0] == '\0' && spec != NULL && spec[0] != '\0') {
        st = tp_error(TP_ERR_VALUE, "init: TPLINEAR_SOCKET_IFNAME=%s admits no interface of rank 0's host that is "
                      "up with an IPv4 address (it has: %s)", spec, seen[0] ? seen : "none");
        goto out;
    }
    if (addr[0] == '\0' && gethostname(addr, cap - 1) < 0) snprintf(addr, cap, "127.0.0.1");
    *any = strchr(addr, ',') != NULL;
out:
    return st;
}

/* What world rank 0 tells the others through the launcher's channel (MPI) before any store exists. */
typedef struct {
    uint64_t generation;          /* rank 0's world generation: every rank must be at the same */
    int port;                     /* where rank 0's store listens (the kernel's pick); 0: it failed, see why */
    char addr[256];               /* where to dial it (comma-separated addresses, tried at once): 127.0.0.1
                                     when the launcher says the world is one host */
    char token[TP_TOKEN_MAX + 1]; /* a fresh random token for this world (2 x 32 hex digits) */
    char why[512];
} boot_msg;

typedef struct {
    tp_group *g;
    boot_msg m;
    int sent;
} boot;

static tp_status boot_send(boot *b)
{
    b->sent = 1;
    return tp_backend_boot_bcast(b->g->rank, b->g->size, &b->m, sizeof b->m, b->g->timeout_s, &b->g->booted_by);
}

/* Rank 0's tp_store_config.on_serving: its store listens, so the others learn where (and the token). */
static tp_status boot_announce(void *ctx, int port)
{
    boot *b = ctx;
    b->m.port = port;
    return boot_send(b);
}

/* Rank 0 could not serve: the others hear why at once instead of waiting for the broadcast's timeout. */
static void boot_fail(boot *b)
{
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", tp_last_error());
    b->m.port = 0;
    snprintf(b->m.why, sizeof b->m.why, "%.*s", (int)sizeof b->m.why - 1, msg);
    (void)boot_send(b);
    tp_error(TP_ERR_COMM, "%s", msg); /* this rank's error stays the one that made it fail */
}

/* Under mpirun/mpiexec/srun: rank 0 will serve on a port the kernel picks, at its own address (loopback for
 * a one-host world), with a fresh random token; once it listens the launcher's channel carries all three
 * to the others (boot_announce), so no port is guessed or raced for and no token is derived. Sets cfg's
 * address, port and fallback token. */
static tp_status boot_through_launcher(const tp_world_env *env, int one_host, boot *b, tp_store_config *cfg)
{
    tp_status st = TP_OK;
    tp_group *g = b->g;
    if (g->rank == 0) {
        unsigned char rnd[32];
        b->m.generation = cfg->generation;
        int any = 0;
        if (one_host)
            snprintf(b->m.addr, sizeof b->m.addr, "127.0.0.1");
        else
            TP_CHECK(own_addresses(env, b->m.addr, sizeof b->m.addr, &any));
        cfg->bind_addr = any ? "0.0.0.0" : NULL;
        TP_CHECK(tp_random_bytes(rnd, sizeof rnd));
        tp_hex(rnd, sizeof rnd, b->m.token);
        memset(rnd, 0, sizeof rnd);
        cfg->port = 0;
        cfg->on_serving = boot_announce;
        cfg->ctx = b;
    } else {
        TP_CHECK(boot_send(b));
        b->m.addr[sizeof b->m.addr - 1] = b->m.token[sizeof b->m.token - 1] = b->m.why[sizeof b->m.why - 1] = '\0';
        if (b->m.port <= 0 || b->m.port > 65535) {
            st = tp_error(TP_ERR_COMM, "init: rank 0 could not serve the rendezvous store: %s", b->m.why);
            goto out;
        }
        TP_REQUIRE(b->m.generation == cfg->generation, "init: rank 0 starts world generation %llu, this rank %llu "
                   "(every rank must call init_process_group the same number of times)",
                   (unsigned long long)b->m.generation, (unsigned long long)cfg->generation);
        cfg->port = b->m.port;
    }
    cfg->addr = b->m.addr;
    cfg->rank0_started = 1;
out:
    return st;
}

/* The rendezvous store of a world of more than one rank:
 * - under torchrun (TORCHELASTIC_USE_AGENT_STORE=True), the agent's own store at MASTER_ADDR:MASTER_PORT,
 *   tplinear's keys under tplinear/<run id>/<restart>/<generation>/, every value proving the token;
 * - under mpirun/mpiexec/srun, rank 0 serves one on a port the kernel picks, with a fresh random token,
 *   both announced through the launcher (MPI); without MPI in this build, MASTER_ADDR/MASTER_PORT as below;
 * - else (tplinear.run, by hand, the C API's options) rank 0 serves one at MASTER_ADDR:MASTER_PORT.
 * A store of our own is served on 127.0.0.1 when the launcher says the world is one host (LOCAL_WORLD_SIZE ==
 * WORLD_SIZE): nothing outside the host can reach it. Every world of the process gets the next generation. */
tp_status tp_boot_open_store(const tp_init_options *opts, tp_group *g)
{
    tp_status st = TP_OK;
    tp_world_env env;
    tp_launcher l;
    tp_store_config cfg;
    boot b;
    char addr[256], ns[TP_STORE_NS_MAX], token[TP_TOKEN_MAX + 1];
    const char *source = NULL;
    int one_host, torch, mpi_boot = 0;
    memset(&cfg, 0, sizeof cfg);
    memset(&b, 0, sizeof b);
    b.g = g;
    TP_CHECK(tp_world_from_env(&env));
    TP_CHECK(tp_launcher_from_env(&l));
    one_host = (opts->local_world_size >= 0 ? opts->local_world_size : env.local_world_size) == g->size;
    torch = l.agent_store && opts->master_port <= 0;
    mpi_boot = opts->master_port <= 0 && (l.kind == TP_LAUNCHER_MPI || l.kind == TP_LAUNCHER_SLURM);
    if (mpi_boot) {
        st = !l.mpi_runtime ? tp_error(TP_ERR_UNSUPPORTED, "the launcher's MPI runtime is not there (no PMIx/PMI "
                                       "variables: the MPI launcher's variables were set by hand?); set MASTER_ADDR "
                                       "and MASTER_PORT")
                            : tp_backend_boot_check();
        if (st != TP_OK && env.master_port <= 0) {
            tp_error_context(st, "init: WORLD_SIZE=%d from %s", g->size, tp_launcher_name(l.kind));
            goto out;
        }
        mpi_boot = st == TP_OK; /* else no MPI to meet through, but the user gave the store's place */
        st = TP_OK;
    }
    snprintf(addr, sizeof addr, "%s", opts->master_addr && opts->master_addr[0] ? opts->master_addr
                                      : env.master_addr[0]                   ? env.master_addr
                                                                             : "127.0.0.1");
    cfg.addr = one_host && !torch ? "127.0.0.1" : addr;
    cfg.port = opts->master_port > 0 ? opts->master_port : env.master_port;
    cfg.rank = g->rank;
    cfg.world_size = g->size;
    cfg.timeout_s = g->timeout_s;
    cfg.generation = atomic_fetch_add(&g_world_generation, 1) + 1;
    if (mpi_boot) {
        TP_CHECK(boot_through_launcher(&env, one_host, &b, &cfg));
        snprintf(addr, sizeof addr, "%s", cfg.addr);
    } else {
        TP_REQUIRE(cfg.port > 0 && cfg.port < 65536,
                   "init: WORLD_SIZE=%d but MASTER_PORT is not set (the TCP port of rank 0's rendezvous store)",
                   g->size);
    }
    TP_CHECK(tp_store_token(opts->token, mpi_boot ? b.m.token : NULL, addr, cfg.port, g->size, token, &source));
    cfg.token = token;
    if (torch) {
        store_namespace(&l, ns, sizeof ns);
        cfg.torch_ns = ns;
    }
    tp_log(TP_LOG_INFO, "init: rank %d of %d (%s), store %s:%d%s, world generation %llu, token from %s, timeout %g s",
           g->rank, g->size, tp_launcher_name(l.kind), cfg.addr, cfg.port,
           torch ? " (torchrun's)" : cfg.port == 0 ? " (a port the kernel picks)" : "", (unsigned long long)cfg.generation,
           source, g->timeout_s);
    TP_CHECK(tp_store_open_world(&cfg, &g->store));
    g->owns_store = 1;
out:
    if (st != TP_OK && mpi_boot && g->rank == 0 && !b.sent) boot_fail(&b);
    memset(token, 0, sizeof token);
    memset(b.m.token, 0, sizeof b.m.token);
    return st;
}

tp_hosts *tp_hosts_retain(tp_hosts *h)
{
    if (h) atomic_fetch_add((_Atomic int *)&h->refs, 1);
    return h;
}

void tp_hosts_release(tp_hosts *h)
{
    if (h == NULL || atomic_fetch_sub((_Atomic int *)&h->refs, 1) != 1) return;
    free(h->host_of);
    free(h->names);
    free(h);
}

/* What a rank publishes about its host. */
typedef struct {
    char id[160];
    char name[64];
} host_rec;

/* Every rank publishes its host identity; ranks with equal ones share a host. Sets g->hosts and this
 * rank's local rank (unless the launcher gave one) and local world size from them. */
tp_status tp_boot_exchange_hosts(tp_group *g, int env_local_rank)
{
    tp_status st = TP_OK;
    char key[128];
    host_rec mine, other, *ids = NULL;
    size_t len = 0;
    tp_hosts *h = calloc(1, sizeof *h);
    int here = 0, before = 0;
    if (h == NULL || (h->host_of = calloc((size_t)g->size, sizeof *h->host_of)) == NULL ||
        (h->names = calloc((size_t)g->size, sizeof *h->names)) == NULL ||
        (ids = calloc((size_t)g->size, sizeof *ids)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "init: out of memory");
        goto out;
    }
    h->refs = 1;
    memset(&mine, 0, sizeof mine);
    TP_CHECK(tp_host_identity(mine.id, sizeof mine.id, mine.name, sizeof mine.name));
    snprintf(key, sizeof key, "%shost/%d", g->prefix, g->rank);
    TP_CHECK(tp_store_set(g->store, key, &mine, sizeof mine));
    /* the records are "<prefix>host/<rank>", the keys of a store barrier: it names a rank that never
     * publishes and fails at once for one that died after joining */
    snprintf(key, sizeof key, "%shost", g->prefix);
    TP_CHECK(tp_store_wait_all(g->store, key, g->size, NULL, "to publish its host"));
    for (int r = 0; r < g->size; r++) {
        int k = 0;
        if (r == g->rank) {
            other = mine;
        } else {
            snprintf(key, sizeof key, "%shost/%d", g->prefix, r);
            TP_CHECK(tp_store_get(g->store, key, &other, sizeof other, &len));
            TP_REQUIRE(len == sizeof other, "init: rank %d published a host record of %zu bytes, expected %zu (another "
                       "tplinear version?)", r, len, sizeof other);
            other.id[sizeof other.id - 1] = other.name[sizeof other.name - 1] = '\0';
        }
        while (k < h->nhosts && strcmp(ids[k].id, other.id) != 0) k++;
        if (k == h->nhosts) {
            ids[k] = other;
            memcpy(h->names[k], other.name, sizeof h->names[k]);
            h->nhosts++;
        }
        h->host_of[r] = k;
    }
    for (int r = 0; r < g->size; r++) {
        if (h->host_of[r] != h->host_of[g->rank]) continue;
        here++;
        if (r < g->rank) before++;
    }
    g->local_world_size = here;
    g->local_rank = env_local_rank >= 0 ? env_local_rank : before;
    g->hosts = h;
    h = NULL;
out:
    tp_hosts_release(h);
    free(ids);
    return st;
}
