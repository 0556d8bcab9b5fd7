/* Process groups: creation, the public collective entry points (argument checks + dispatch through
 * the backend table), and the trivial backend of a group of one. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

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

static const tp_backend self_backend = {
    "self", self_all_reduce, self_all_gatherv, self_reduce_scatter, self_broadcast, self_barrier, self_abort,
    self_destroy,
};

/* ---------------------------------------------------------------- creation */

void tp_init_options_default(tp_init_options *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->rank = -1;
    opts->world_size = -1;
    opts->local_rank = -1;
    opts->local_world_size = -1;
    opts->master_port = -1;
    opts->timeout_s = 300.0;
}

tp_status tp_group_init_world(const tp_init_options *opts, tp_group **world)
{
    tp_status st = TP_OK;
    tp_group *g = NULL;
    int size = opts->world_size >= 0 ? opts->world_size : (int)tp_env_long("WORLD_SIZE", 1);
    TP_REQUIRE(world != NULL, "init: output is NULL");
    *world = NULL;
    TP_REQUIRE(size == 1, "multi-rank worlds need the shm backend (not built yet)");
    g = calloc(1, sizeof *g);
    if (g == NULL || (g->global_ranks = calloc(1, sizeof(int))) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "init: out of memory");
        goto out;
    }
    g->backend = &self_backend;
    g->rank = 0;
    g->size = 1;
    g->world_size = 1;
    g->local_world_size = 1;
    g->timeout_s = opts->timeout_s > 0 ? opts->timeout_s : 300.0;
    snprintf(g->prefix, sizeof g->prefix, "g0/");
    *world = g;
    g = NULL;
out:
    tp_group_destroy(g);
    return st;
}

void tp_group_destroy(tp_group *g)
{
    if (g == NULL) return;
    if (g->backend && g->backend->destroy) g->backend->destroy(g);
    free(g->global_ranks);
    free(g);
}

tp_status tp_group_abort(tp_group *g)
{
    if (g == NULL || g->backend == NULL) return TP_OK;
    return g->backend->abort(g);
}

int tp_group_rank(const tp_group *g) { return g ? g->rank : -1; }
int tp_group_size(const tp_group *g) { return g ? g->size : 0; }
int tp_group_global_rank(const tp_group *g, int r) { return (g && r >= 0 && r < g->size) ? g->global_ranks[r] : -1; }
const char *tp_group_backend(const tp_group *g) { return g && g->backend ? g->backend->name : "none"; }
double tp_group_timeout(const tp_group *g) { return g ? g->timeout_s : 0.0; }

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
    TP_CHECK(g->backend->all_reduce(g, buf, count, dt, op));
out:
    return st;
}

tp_status tp_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "all_gather"));
    TP_CHECK(check_dtype(dt, TP_SUM, "all_gather"));
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
    TP_CHECK(g->backend->reduce_scatter(g, send, recv, count, dt, op));
out:
    return st;
}

tp_status tp_broadcast(tp_group *g, void *buf, size_t count, tp_dtype dt, int root)
{
    tp_status st = TP_OK;
    TP_CHECK(check_member(g, "broadcast"));
    TP_CHECK(check_dtype(dt, TP_SUM, "broadcast"));
    TP_REQUIRE(root >= 0 && root < g->size, "broadcast: root %d is not a rank of the group of %d", root, g->size);
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

tp_status tp_group_new(tp_group *parent, const int *ranks, int n, tp_group **out)
{
    (void)parent; (void)ranks; (void)n; (void)out;
    return tp_error(TP_ERR_UNSUPPORTED, "new_group: not built yet");
}
