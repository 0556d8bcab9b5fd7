/* The cores a process may use, and a rank's share of them: the one rule behind every BLAS thread count
 * (tp_set_num_threads(n <= 0) and the share tp_group_init_world gives each rank). */
#include <sched.h>
#include <unistd.h>

#include "env.h"

int tp_cores_available(void)
{
    cpu_set_t set;
    long n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int tp_cores_per_rank(int local_world_size)
{
    long online = sysconf(_SC_NPROCESSORS_ONLN), mine = tp_cores_available();
    if (mine >= online && local_world_size > 0) mine = online / local_world_size;
    return mine > 0 ? (int)mine : 1;
}
