/* Process groups: creation, the public collective entry points (argument checks + dispatch through
 * the backend table), and the trivial backend of a group of one. */
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <sched.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "registry.h"

/* ---------------------------------------------------------------- group of one */

static tp_status self_all_reduce(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op)
{
    (void)g; (void)buf; (void)count; (void)dt; (void)op;
    return TP_OK;
}

static tp_status self_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt)
{
    (void)g;
    if (counts[0] > 0 && send != recv) memmove(recv, send, counts[0] * tp_dtype_size(dt));
    return TP_OK;
}

static tp_status self_reduce_scatter(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt,
                                     tp_reduce_op op)
{
    (void)g; (void)op;
    if (count > 0 && send != recv) memmove(recv, send, count * tp_dtype_size(dt));
    return TP_OK;
}

static tp_status self_broadcast(tp_group *g, void *buf, size_t count, tp_dtype dt, int root)
{
    (void)g; (void)buf; (void)count; (void)dt; (void)root;
    return TP_OK;
}

static tp_status self_barrier(tp_group *g) { (void)g; return TP_OK; }
static tp_status self_abort(tp_group *g) { (void)g; return TP_OK; }
static void self_destroy(tp_group *g) { (void)g; }

/* A group of one (the world of a single process, or a subgroup of one rank) of a backend that does not
 * make such groups itself: every collective is a local copy or nothing. Host memory only. */
static const tp_backend self_backend = {
    .name = "self",
    .devices = 1u << TP_DEVICE_CPU,
    .all_reduce = self_all_reduce,
    .all_gatherv = self_all_gatherv,
    .reduce_scatter = self_reduce_scatter,
    .broadcast = self_broadcast,
    .barrier = self_barrier,
    .abort = self_abort,
    .destroy = self_destroy,
};

/* The handle of a rank that is not a member of its group: every entry point refuses before it would
 * dispatch (check_member), abort and destroy have nothing to do. */
static const tp_backend none_backend = {.name = "none", .devices = 1u << TP_DEVICE_CPU};

/* ---------------------------------------------------------------- creation */

void tp_init_options_default(tp_init_options *opts)
{
    const tp_init_options dflt = TP_INIT_OPTIONS_INITIALIZER;
    if (opts != NULL) *opts = dflt;
}

/* The caller's struct must be the one this library was built with (NCCL checks ncclConfig_t the same way):
 * anything else was not initialised with TP_INIT_OPTIONS_INITIALIZER / tp_init_options_default, or comes
 * from another version of tplinear.h. */
static tp_status check_options(const tp_init_options *o)
{
    if (o->size == sizeof(tp_init_options) && o->magic == TP_INIT_OPTIONS_MAGIC && o->version == TP_INIT_OPTIONS_VERSION)
        return TP_OK;
    return tp_error(TP_ERR_VALUE, "init: tp_init_options has size %zu, magic 0x%x, version %u, but this tplinear "
                    "expects size %zu, magic 0x%x, version %u: initialise it with TP_INIT_OPTIONS_INITIALIZER or "
                    "tp_init_options_default and build against this library's tplinear.h", o->size, o->magic,
                    o->version, sizeof(tp_init_options), TP_INIT_OPTIONS_MAGIC, TP_INIT_OPTIONS_VERSION);
}

/* Ends a bootstrap phase that used the store: every member of the parent (index me of members, world
 * ranks in world[]) checks in, and world rank 0 (the store's server, when it is a member) returns last, so
 * no rank is left mid-request when rank 0 moves on (or exits). */
static tp_status store_checkout(tp_store *store, const char *prefix, int me, int members, const int *world,
                                int world_rank)
{
    tp_status st = TP_OK;
    char key[128];
    snprintf(key, sizeof key, "%sdone", prefix);
    TP_CHECK(tp_store_arrive(store, key, me));
    if (world_rank == 0) TP_CHECK(tp_store_wait_all(store, key, members, world, "to finish setting up the group"));
out:
    return st;
}

static tp_group *group_alloc(int size)
{
    tp_group *g = calloc(1, sizeof *g);
    if (g == NULL) return NULL;
    if ((g->global_ranks = calloc((size_t)size, sizeof(int))) == NULL) {
        free(g);
        return NULL;
    }
    return g;
}

/* The world's shape: each field from opts when given, else from the launcher's environment, else a world
 * of one (local rank and size: -1 when neither says). */
static tp_status world_shape(const tp_init_options *opts, int *size, int *rank, int *lrank, int *lsize)
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

/* The address other hosts dial to reach this one: MASTER_ADDR when set, else the first non-loopback
 * IPv4 address of an interface that is up, else the hostname. */
static void own_address(const tp_world_env *env, char *addr, size_t cap)
{
    struct ifaddrs *ifs = NULL;
    if (env->master_addr[0]) {
        snprintf(addr, cap, "%s", env->master_addr);
        return;
    }
    if (getifaddrs(&ifs) == 0) {
        for (struct ifaddrs *i = ifs; i != NULL; i = i->ifa_next) {
            if (i->ifa_addr == NULL || i->ifa_addr->sa_family != AF_INET || (i->ifa_flags & IFF_LOOPBACK) ||
                !(i->ifa_flags & IFF_UP))
                continue;
            if (inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, addr, (socklen_t)cap)) {
                freeifaddrs(ifs);
                return;
            }
        }
        freeifaddrs(ifs);
    }
    if (gethostname(addr, cap - 1) < 0) snprintf(addr, cap, "127.0.0.1");
}

/* What world rank 0 tells the others through the launcher's channel (MPI) before any store exists. */
typedef struct {
    uint64_t generation;          /* rank 0's world generation: every rank must be at the same */
    int port;                     /* where rank 0's store listens (the kernel's pick); 0: it failed, see why */
    char addr[256];               /* where to dial it: 127.0.0.1 when the launcher says the world is one host */
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
        if (one_host)
            snprintf(b->m.addr, sizeof b->m.addr, "127.0.0.1");
        else
            own_address(env, b->m.addr, sizeof b->m.addr);
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
static tp_status open_store(const tp_init_options *opts, tp_group *g)
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

static tp_hosts *hosts_retain(tp_hosts *h)
{
    if (h) atomic_fetch_add((_Atomic int *)&h->refs, 1);
    return h;
}

static void hosts_release(tp_hosts *h)
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
static tp_status exchange_hosts(tp_group *g, int env_local_rank)
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
    hosts_release(h);
    free(ids);
    return st;
}

/* Makes g a group of `family`: its own kind when it has more than one member or the family makes groups
 * of one, else the generic group of one. */
static tp_status make_member(tp_group *g, const tp_backend *family)
{
    tp_status st = TP_OK;
    g->family = family;
    g->backend = &self_backend;
    if (g->size > 1 || family->groups_of_one) {
        TP_CHECK(family->create(g));
        g->backend = family;
    }
out:
    return st;
}

/* Gives this rank its share of the cores for BLAS (docs/architecture.md, section 3: cores / ranks of this host) unless
 * OMP_NUM_THREADS says otherwise (torchrun and tplinear.run set it; mpirun and srun do not). A process
 * the launcher bound to some cores (mpirun --bind-to core) uses those. */
static tp_status share_cores(const tp_group *g)
{
    tp_status st = TP_OK;
    tp_launcher l;
    cpu_set_t set;
    long online = sysconf(_SC_NPROCESSORS_ONLN), mine = online;
    TP_CHECK(tp_launcher_from_env(&l));
    if (l.omp_threads_set || g->size == 1) goto out;
    if (sched_getaffinity(0, sizeof set, &set) == 0) mine = CPU_COUNT(&set);
    if (mine >= online && g->local_world_size > 0) mine = online / g->local_world_size;
    TP_CHECK(tp_set_num_threads(mine > 0 ? (int)mine : 1));
out:
    return st;
}

tp_status tp_group_init_world(const tp_init_options *opts, tp_group **world)
{
    tp_status st = TP_OK;
    tp_group *g = NULL;
    const tp_backend *family = NULL;
    int size, rank, lrank, lsize;
    TP_REQUIRE(world != NULL && opts != NULL, "init: NULL argument");
    *world = NULL;
    TP_CHECK(check_options(opts));
    TP_CHECK(tp_knobs_check()); /* every rank refuses a malformed knob before any of them meets the others */
    TP_CHECK(world_shape(opts, &size, &rank, &lrank, &lsize));
    if ((g = group_alloc(size)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "init: out of memory");
        goto out;
    }
    for (int i = 0; i < size; i++) g->global_ranks[i] = i;
    g->backend = &self_backend;
    g->rank = g->world_rank = rank;
    g->size = g->world_size = size;
    g->local_rank = lrank >= 0 ? lrank : rank;
    g->local_world_size = lsize >= 0 ? lsize : size;
    g->timeout_s = opts->timeout_s > 0 ? opts->timeout_s : 300.0;
    snprintf(g->prefix, sizeof g->prefix, "g0/");
    tp_log_set_rank(rank);
    if (size > 1) { /* a world of one has no store (g->store == NULL) */
        TP_CHECK(open_store(opts, g));
        TP_CHECK(exchange_hosts(g, lrank));
        TP_CHECK(share_cores(g));
    }
    TP_CHECK(tp_backend_choose(opts->backend, opts->device, g, &family));
    TP_CHECK(make_member(g, family));
    if (g->store) TP_CHECK(store_checkout(g->store, g->prefix, g->rank, g->size, g->global_ranks, g->world_rank));
    tp_log(TP_LOG_INFO, "init: backend %s for a world of %d", g->backend->name, size);
    *world = g;
    g = NULL;
out:
    if (g) tp_store_abandon(g->store);
    tp_group_destroy(g);
    return st;
}

tp_status tp_group_new(tp_group *parent, const int *ranks, int n, tp_group **out)
{
    return tp_group_new_backend(parent, ranks, n, NULL, out);
}

tp_status tp_group_new_backend(tp_group *parent, const int *ranks, int n, const char *backend, tp_group **out)
{
    tp_status st = TP_OK;
    tp_group *g = NULL;
    const tp_backend *family = NULL;
    int me = -1, plen;
    int *seen = NULL, *other = NULL;
    char key[128];
    size_t len = 0;
    TP_REQUIRE(out != NULL, "new_group: output is NULL");
    *out = NULL;
    TP_REQUIRE(parent != NULL, "new_group: parent group is NULL");
    TP_REQUIRE(parent->rank >= 0, "new_group: this rank is not a member of the parent group");
    TP_REQUIRE(ranks != NULL && n >= 1 && n <= parent->size, "new_group: need 1..%d ranks, got %d", parent->size, n);
    if ((seen = calloc((size_t)parent->size, sizeof *seen)) == NULL || (other = calloc((size_t)n, sizeof *other)) == NULL ||
        (g = group_alloc(n)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "new_group: out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        TP_REQUIRE(ranks[i] >= 0 && ranks[i] < parent->size, "new_group: rank %d is not in the parent group of %d",
                   ranks[i], parent->size);
        TP_REQUIRE(!seen[ranks[i]], "new_group: rank %d is listed twice", ranks[i]);
        seen[ranks[i]] = 1;
        if (ranks[i] == parent->rank) me = i;
        g->global_ranks[i] = parent->global_ranks[ranks[i]];
    }
    g->backend = &none_backend;
    g->rank = me;
    g->size = n;
    g->world_rank = parent->world_rank;
    g->world_size = parent->world_size;
    g->local_rank = parent->local_rank;
    g->local_world_size = parent->local_world_size;
    g->timeout_s = parent->timeout_s;
    plen = snprintf(g->prefix, sizeof g->prefix, "%s%d/", parent->prefix, parent->next_child++);
    TP_REQUIRE(plen > 0 && (size_t)plen < sizeof g->prefix, "new_group: subgroups nested too deeply");
    if (parent->store) {
        g->store = tp_store_retain(parent->store);
        g->owns_store = 1;
        /* every rank of the parent must pass the same list */
        snprintf(key, sizeof key, "%sranks", g->prefix);
        if (parent->rank == 0) {
            TP_CHECK(tp_store_set(g->store, key, ranks, (size_t)n * sizeof *ranks));
        } else {
            TP_CHECK(tp_store_get(g->store, key, other, (size_t)n * sizeof *other, &len));
            TP_REQUIRE(len == (size_t)n * sizeof *ranks && memcmp(other, ranks, len) == 0,
                       "new_group: rank %d of the parent passed different ranks than rank 0 (every rank must pass "
                       "the same list)", parent->rank);
        }
    }
    g->hosts = hosts_retain(parent->hosts);
    g->booted_by = parent->booted_by;
    /* every rank of the parent decides alike: the same name, the same host table */
    TP_CHECK(tp_backend_choose_sub(backend, g, parent->family, &family));
    g->family = family;
    if (family == parent->family && family->split && parent->backend == family) {
        /* collective over the whole parent (e.g. ncclCommSplit, MPI_Comm_split); non-members (rank -1) get
         * no state */
        TP_CHECK(family->split(parent, g));
        if (me >= 0) g->backend = family;
    } else if (me >= 0) {
        TP_CHECK(make_member(g, family));
    }
    if (g->store)
        TP_CHECK(store_checkout(g->store, g->prefix, parent->rank, parent->size, parent->global_ranks,
                                parent->world_rank));
    tp_log(TP_LOG_INFO, "new_group %s: %d ranks, this rank %d, backend %s", g->prefix, n, me,
           me >= 0 ? g->backend->name : family->name);
    *out = g;
    g = NULL;
out:
    tp_group_destroy(g);
    free(seen);
    free(other);
    return st;
}

void tp_group_destroy(tp_group *g)
{
    if (g == NULL) return;
    if (g->backend && g->backend->destroy) g->backend->destroy(g);
    if (g->owns_store) tp_store_close(g->store);
    hosts_release(g->hosts);
    free(g->global_ranks);
    free(g);
}

tp_status tp_group_abort(tp_group *g)
{
    if (g == NULL || g->backend == NULL || g->backend->abort == NULL) return TP_OK;
    return g->backend->abort(g);
}

int tp_group_rank(const tp_group *g) { return g ? g->rank : -1; }
int tp_group_size(const tp_group *g) { return g ? g->size : 0; }
int tp_group_global_rank(const tp_group *g, int r) { return (g && r >= 0 && r < g->size) ? g->global_ranks[r] : -1; }
const char *tp_group_backend(const tp_group *g) { return g && g->backend ? g->backend->name : "none"; }
double tp_group_timeout(const tp_group *g) { return g ? g->timeout_s : 0.0; }

tp_status tp_group_check_device(const tp_group *g, tp_device dev, const char *what)
{
    char names[128];
    if (dev.type == TP_DEVICE_CPU || (g && g->backend && (g->backend->devices & (1u << (unsigned)dev.type))))
        return TP_OK;
    tp_backend_names_for(dev.type, names, sizeof names);
    if (names[0] == '\0')
        return tp_error(TP_ERR_VALUE, "%s is GPU memory but no backend of this build takes GPU memory", what);
    return tp_error(TP_ERR_VALUE, "%s is GPU memory but the process group's backend is '%s': GPU arrays need a "
                    "group made with backend=%s", what, tp_group_backend(g), names);
}

/* ---------------------------------------------------------------- collectives */

static tp_status check_member(const tp_group *g, const char *what)
{
    if (g == NULL) return tp_error(TP_ERR_VALUE, "%s: process group is NULL", what);
    if (g->rank < 0)
        return tp_error(TP_ERR_VALUE, "%s: this rank (global %d) is not a member of the group", what,
                        g->world_rank);
    return TP_OK;
}

static tp_status check_dtype(tp_dtype dt, tp_reduce_op op, const char *what)
{
    if (tp_dtype_size(dt) == 0) return tp_error(TP_ERR_TYPE, "%s: unknown dtype %d", what, (int)dt);
    if (op < TP_SUM || op > TP_MIN) return tp_error(TP_ERR_VALUE, "%s: unknown reduce op %d", what, (int)op);
    return TP_OK;
}

tp_status tp_all_reduce(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "all_reduce"));
    TP_CHECK(check_dtype(dt, op, "all_reduce"));
    TP_REQUIRE(buf != NULL || count == 0, "all_reduce: buffer is NULL");
    TP_CHECK(g->backend->all_reduce(g, buf, count, dt, op));
out:
    return st;
}

tp_status tp_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "all_gather"));
    TP_CHECK(check_dtype(dt, TP_SUM, "all_gather"));
    TP_REQUIRE(counts != NULL, "all_gather: counts is NULL");
    TP_REQUIRE((send != NULL || counts[g->rank] == 0) && recv != NULL, "all_gather: buffer is NULL");
    TP_CHECK(g->backend->all_gatherv(g, send, recv, counts, dt));
out:
    return st;
}

tp_status tp_all_gather(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt)
{
    tp_status st = TP_OK;
    size_t *counts = NULL;
    TP_CHECK(check_member(g, "all_gather"));
    counts = malloc((size_t)g->size * sizeof *counts);
    if (counts == NULL) {
        st = tp_error(TP_ERR_NOMEM, "all_gather: out of memory");
        goto out;
    }
    for (int r = 0; r < g->size; r++) counts[r] = count;
    TP_CHECK(tp_all_gatherv(g, send, recv, counts, dt));
out:
    free(counts);
    return st;
}

tp_status tp_reduce_scatter(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt, tp_reduce_op op)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "reduce_scatter"));
    TP_CHECK(check_dtype(dt, op, "reduce_scatter"));
    TP_REQUIRE((send != NULL && recv != NULL) || count == 0, "reduce_scatter: buffer is NULL");
    TP_CHECK(g->backend->reduce_scatter(g, send, recv, count, dt, op));
out:
    return st;
}

/* Where a collective's buffer lives: GPU memory only for a backend that takes it (a CUDA build). */
static tp_status buffer_device(const tp_group *g, const void *p, tp_device *dev)
{
    tp_status st = TP_OK;
    int d = -1;
    *dev = (tp_device){TP_DEVICE_CPU, 0};
    if (p == NULL || !(g->backend->devices & (1u << TP_DEVICE_CUDA))) goto out;
    TP_CHECK(tp_cuda_pointer_device(p, &d));
    if (d >= 0) *dev = (tp_device){TP_DEVICE_CUDA, d};
out:
    return st;
}

/* n elements from src to dst, both on dev. */
static tp_status copy_on(tp_device dev, void *dst, const void *src, size_t n, tp_dtype dt)
{
    tp_status st = TP_OK;
    tp_tensor a, b;
    int64_t shape[1] = {(int64_t)n};
    if (n == 0) goto out;
    TP_CHECK(tp_tensor_init(&a, dst, dt, 1, shape));
    TP_CHECK(tp_tensor_init(&b, (void *)src, dt, 1, shape));
    a.device = b.device = dev;
    TP_CHECK(tp_tensor_copy(&a, &b));
out:
    return st;
}

/* The reduce-scatter-v of a backend without its own: reduce_scatter itself when the counts are equal, else
 * reduce_scatter over blocks padded to the largest count (zeros in the padding), staged in memory of the
 * buffers' kind. */
static tp_status generic_reduce_scatter_v(tp_group *g, const void *send, void *recv, const size_t *counts,
                                          tp_dtype dt, tp_reduce_op op)
{
    tp_status st = TP_OK;
    size_t most = 0, at = 0, es = tp_dtype_size(dt), p = (size_t)g->size;
    int equal = 1;
    tp_device dev;
    char *pad = NULL, *mine = NULL;
    for (size_t r = 0; r < p; r++) {
        if (counts[r] > most) most = counts[r];
        if (counts[r] != counts[0]) equal = 0;
    }
    if (equal) {
        TP_CHECK(g->backend->reduce_scatter(g, send, recv, counts[0], dt, op));
        goto out;
    }
    TP_CHECK(buffer_device(g, send != NULL ? send : recv, &dev));
    TP_CHECK(tp_device_alloc(dev, p * most * es, (void **)&pad));
    TP_CHECK(tp_device_alloc(dev, most * es, (void **)&mine));
    if (dev.type == TP_DEVICE_CPU)
        memset(pad, 0, p * most * es);
    else
        TP_CHECK(tp_cuda_memset_zero(dev.index, pad, p * most * es));
    for (size_t r = 0; r < p; r++) {
        TP_CHECK(copy_on(dev, pad + r * most * es, (const char *)send + at * es, counts[r], dt));
        at += counts[r];
    }
    TP_CHECK(g->backend->reduce_scatter(g, pad, mine, most, dt, op));
    TP_CHECK(copy_on(dev, recv, mine, counts[g->rank], dt));
out:
    if (pad) tp_device_free(dev, pad);
    if (mine) tp_device_free(dev, mine);
    return st;
}

tp_status tp_reduce_scatter_v(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt,
                              tp_reduce_op op)
{
    tp_status st = TP_OK;
    size_t total = 0;
    TP_CHECK(check_member(g, "reduce_scatter"));
    TP_CHECK(check_dtype(dt, op, "reduce_scatter"));
    TP_REQUIRE(counts != NULL, "reduce_scatter: counts is NULL");
    for (int r = 0; r < g->size; r++) total += counts[r];
    TP_REQUIRE((send != NULL || total == 0) && (recv != NULL || counts[g->rank] == 0),
               "reduce_scatter: buffer is NULL");
    if (g->backend->reduce_scatter_v)
        TP_CHECK(g->backend->reduce_scatter_v(g, send, recv, counts, dt, op));
    else
        TP_CHECK(generic_reduce_scatter_v(g, send, recv, counts, dt, op));
out:
    return st;
}

tp_status tp_broadcast(tp_group *g, void *buf, size_t count, tp_dtype dt, int root)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "broadcast"));
    TP_CHECK(check_dtype(dt, TP_SUM, "broadcast"));
    TP_REQUIRE(root >= 0 && root < g->size, "broadcast: root %d is not a rank of the group of %d", root, g->size);
    TP_REQUIRE(buf != NULL || count == 0, "broadcast: buffer is NULL");
    TP_CHECK(g->backend->broadcast(g, buf, count, dt, root));
out:
    return st;
}

tp_status tp_barrier(tp_group *g)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "barrier"));
    TP_CHECK(g->backend->barrier(g));
out:
    return st;
}

tp_status tp_all_reduce_staging(tp_group *g, size_t bytes, void **ptr)
{
    tp_status st = TP_OK;
    TP_REQUIRE(ptr != NULL, "all_reduce_staging: ptr is NULL");
    *ptr = NULL;
    TP_CHECK(check_member(g, "all_reduce_staging"));
    if (g->backend->staging) TP_CHECK(g->backend->staging(g, bytes, ptr));
out:
    return st;
}

tp_status tp_all_reduce_staged(tp_group *g, void *out, size_t count, tp_dtype dt, tp_reduce_op op)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "all_reduce_staged"));
    TP_CHECK(check_dtype(dt, op, "all_reduce_staged"));
    if (g->backend->all_reduce_staged == NULL) {
        st = tp_error(TP_ERR_UNSUPPORTED, "all_reduce_staged: the %s backend has no staging buffer", g->backend->name);
        goto out;
    }
    TP_CHECK(g->backend->all_reduce_staged(g, out, count, dt, op));
out:
    return st;
}

void tp_bias_add_span(tp_dtype dt, void *out, size_t first, size_t n, const void *bias, size_t width)
{
    size_t col = first % width;
    for (size_t i = 0; i < n;) {
        size_t m = width - col < n - i ? width - col : n - i;
        if (dt == TP_FLOAT32) {
            float *o = (float *)out + i;
            const float *b = (const float *)bias + col;
            for (size_t k = 0; k < m; k++) o[k] += b[k];
        } else {
            double *o = (double *)out + i;
            const double *b = (const double *)bias + col;
            for (size_t k = 0; k < m; k++) o[k] += b[k];
        }
        i += m;
        col = 0;
    }
}

tp_status tp_all_reduce_bias(tp_group *g, const void *in, void *out, size_t count, tp_dtype dt, const void *bias,
                             size_t width)
{
    tp_status st = TP_OK;
    const size_t bytes = count * tp_dtype_size(dt);
    TP_CHECK(check_member(g, "all_reduce_bias"));
    TP_CHECK(check_dtype(dt, TP_SUM, "all_reduce_bias"));
    TP_REQUIRE(dt == TP_FLOAT32 || dt == TP_FLOAT64 || bias == NULL,
               "all_reduce_bias: a bias needs float32 or float64, got %s", tp_dtype_name(dt));
    TP_REQUIRE(bias == NULL || (width > 0 && count % width == 0),
               "all_reduce_bias: %zu elements are not rows of the bias width %zu", count, width);
    TP_REQUIRE((in != NULL && out != NULL) || count == 0, "all_reduce_bias: buffer is NULL");
    TP_REQUIRE(in == out || (const char *)in >= (const char *)out + bytes || (const char *)out >= (const char *)in + bytes,
               "all_reduce_bias: input and output overlap without being the same buffer");
    if (g->backend->all_reduce_bias) {
        TP_CHECK(g->backend->all_reduce_bias(g, in, out, count, dt, bias, width));
    } else {
        if (in != out && count > 0) memcpy(out, in, bytes);
        TP_CHECK(g->backend->all_reduce(g, out, count, dt, TP_SUM));
        if (bias && count > 0) tp_bias_add_span(dt, out, 0, count, bias, width);
    }
out:
    return st;
}
