/* The world group as the public API makes it: comm's world (comm/group.c, its rendezvous in
 * comm/bootstrap.c), then this process's share of the cores for BLAS. The share needs both the host's
 * ranks (comm) and the BLAS threads (gemm), so it is applied here, on the floor above both. */
#include "../comm/backend.h"
#include "../gemm/gemm.h"

/* Gives this rank its share of the cores for BLAS (docs/architecture.md, section 3; core/cores.c's rule)
 * unless OMP_NUM_THREADS says otherwise (torchrun and tplinear.run set it; mpirun and srun do not) or the
 * world is one process. */
static tp_status share_cores(const tp_group *g)
{
    tp_status st = TP_OK;
    tp_launcher l;
    TP_CHECK(tp_launcher_from_env(&l));
    if (l.omp_threads_set || g->size == 1) goto out;
    TP_CHECK(tp_set_num_threads(tp_cores_per_rank(g->local_world_size)));
out:
    return st;
}

tp_status tp_group_init_world(const tp_init_options *opts, tp_group **world)
{
    tp_status st = TP_OK;
    tp_group *g = NULL;
    TP_REQUIRE(world != NULL && opts != NULL, "init: NULL argument");
    *world = NULL;
    TP_CHECK(tp_world_new(opts, &g));
    TP_CHECK(share_cores(g));
    *world = g;
    g = NULL;
out:
    tp_group_destroy(g);
    return st;
}
