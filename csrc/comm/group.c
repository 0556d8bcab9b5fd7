/* Process groups: the group object (made around comm/bootstrap.c's rendezvous), the public collective entry
 * points (argument checks + dispatch through the backend table), and the trivial backend of a group of one. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bootstrap.h"

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
 * make such groups itself: every collective is a local copy or nothing. Host memory only: the entry points
 * that know where their memory lives (the layers, the Python collectives) refuse GPU memory for it as for
 * any host backend (tp_group_check_device), whatever the group's size; a pointer is not asked about here,
 * which would make a CUDA context in a host-only program. */
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

tp_status tp_world_new(const tp_init_options *opts, tp_group **world)
{
    tp_status st = TP_OK;
    tp_group *g = NULL;
    const tp_backend *family = NULL;
    int size, rank, lrank, lsize;
    TP_REQUIRE(world != NULL && opts != NULL, "init: NULL argument");
    *world = NULL;
    TP_CHECK(check_options(opts));
    TP_CHECK(tp_knobs_check()); /* every rank refuses a malformed knob before any of them meets the others */
    TP_CHECK(tp_boot_world_shape(opts, &size, &rank, &lrank, &lsize));
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
        TP_CHECK(tp_boot_open_store(opts, g));
        TP_CHECK(tp_boot_exchange_hosts(g, lrank));
    }
    TP_CHECK(tp_backend_choose(opts->backend, opts->device, g, &family));
    TP_CHECK(make_member(g, family));
    TP_CHECK(tp_boot_checkout(g, g));
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
    int *seen = NULL;
    TP_REQUIRE(out != NULL, "new_group: output is NULL");
    *out = NULL;
    TP_REQUIRE(parent != NULL, "new_group: parent group is NULL");
    TP_REQUIRE(parent->rank >= 0, "new_group: this rank is not a member of the parent group");
    TP_REQUIRE(ranks != NULL && n >= 1 && n <= parent->size, "new_group: need 1..%d ranks, got %d", parent->size, n);
    if ((seen = calloc((size_t)parent->size, sizeof *seen)) == NULL || (g = group_alloc(n)) == NULL) {
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
    TP_CHECK(tp_boot_subgroup(g, parent, ranks));
    g->hosts = tp_hosts_retain(parent->hosts);
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
    TP_CHECK(tp_boot_checkout(g, parent));
    tp_log(TP_LOG_INFO, "new_group %s: %d ranks, this rank %d, backend %s", g->prefix, n, me,
           me >= 0 ? g->backend->name : family->name);
    *out = g;
    g = NULL;
out:
    tp_group_destroy(g);
    free(seen);
    return st;
}

void tp_group_destroy(tp_group *g)
{
    if (g == NULL) return;
    if (g->backend && g->backend->destroy) g->backend->destroy(g);
    if (g->owns_store) tp_store_close(g->store);
    tp_hosts_release(g->hosts);
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

/* The one alias a collective with an input and an output takes (torch's and NCCL's in-place form): this
 * rank's slot of the larger buffer, exactly (for an all-gather the input is the output's slot; for a
 * reduce-scatter the output is the input's slot). Any other overlap would read bytes that peers' data
 * already overwrote: TP_ERR_VALUE. big/small are the two buffers, slot where small may sit in big. */
static tp_status check_alias(const char *what, const void *big, size_t big_bytes, const void *small,
                             size_t small_bytes, size_t slot, const char *small_name)
{
    const char *b = big, *s = small;
    if (big_bytes == 0 || small_bytes == 0 || s == b + slot || s >= b + big_bytes || b >= s + small_bytes)
        return TP_OK;
    return tp_error(TP_ERR_VALUE, "%s: the %s overlaps the %s other than as exactly this rank's slot of it (bytes "
                    "%zu..%zu, the one in-place alias); its data would be overwritten by peers' before it is read: "
                    "pass separate arrays or exactly that slot", what, small_name,
                    strcmp(small_name, "input") == 0 ? "output" : "input", slot, slot + small_bytes);
}

tp_status tp_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt)
{
    tp_status st = TP_OK;
    size_t es, total = 0, before = 0;
    TP_CHECK(check_member(g, "all_gather"));
    TP_CHECK(check_dtype(dt, TP_SUM, "all_gather"));
    TP_REQUIRE(counts != NULL, "all_gather: counts is NULL");
    TP_REQUIRE((send != NULL || counts[g->rank] == 0) && recv != NULL, "all_gather: buffer is NULL");
    es = tp_dtype_size(dt);
    for (int r = 0; r < g->size; r++) {
        if (r < g->rank) before += counts[r];
        total += counts[r];
    }
    TP_CHECK(check_alias("all_gather", recv, total * es, send, counts[g->rank] * es, before * es, "input"));
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
    TP_CHECK(check_alias("reduce_scatter", send, (size_t)g->size * count * tp_dtype_size(dt), recv,
                         count * tp_dtype_size(dt), (size_t)g->rank * count * tp_dtype_size(dt), "output"));
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
    size_t total = 0, before = 0, es = tp_dtype_size(dt);
    TP_CHECK(check_member(g, "reduce_scatter"));
    TP_CHECK(check_dtype(dt, op, "reduce_scatter"));
    TP_REQUIRE(counts != NULL, "reduce_scatter: counts is NULL");
    for (int r = 0; r < g->size; r++) {
        if (r < g->rank) before += counts[r];
        total += counts[r];
    }
    TP_REQUIRE((send != NULL || total == 0) && (recv != NULL || counts[g->rank] == 0),
               "reduce_scatter: buffer is NULL");
    TP_CHECK(check_alias("reduce_scatter", send, total * es, recv, counts[g->rank] * es, before * es, "output"));
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

tp_status tp_all_reduce_bias(tp_group *g, const void *in, void *out, size_t count, tp_dtype dt, const void *bias,
                             size_t width)
{
    tp_status st = TP_OK;
    const size_t bytes = count * tp_dtype_size(dt);
    TP_CHECK(check_member(g, "all_reduce_bias"));
    TP_CHECK(check_dtype(dt, TP_SUM, "all_reduce_bias"));
    TP_REQUIRE(dt == TP_FLOAT32 || dt == TP_FLOAT64 || dt == TP_BFLOAT16 || dt == TP_FLOAT16 || bias == NULL,
               "all_reduce_bias: a bias needs a floating dtype, got %s", tp_dtype_name(dt));
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
