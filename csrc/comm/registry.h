/* The backends of this build (comm/registry.c). Internal. */
#ifndef TP_COMM_REGISTRY_H
#define TP_COMM_REGISTRY_H

#include "backend.h"

/* The backend group g (size, global_ranks, hosts and booted_by set) gets for the requested name: a
 * registered name that serves it; NULL or "auto": TPLINEAR_BACKEND when set, else the first registered
 * backend that takes `device` memory and serves g: mpi for a world its launcher started, shm when the
 * members share a host. A backend that cannot serve g (one host only, its launcher only) is
 * TP_ERR_UNSUPPORTED naming the hosts; a known name this build lacks is TP_ERR_UNSUPPORTED saying what
 * would bring it; any other name is TP_ERR_VALUE listing the registered ones. */
tp_status tp_backend_choose(const char *name, tp_device_type device, const tp_group *g, const tp_backend **out);

/* The backend of subgroup g of a group whose backend is `parent`: name NULL, parent; "auto", a one-host
 * backend (shm) when g's members share a host and it takes the parent's memory, else parent; any other
 * name as tp_backend_choose (host memory). */
tp_status tp_backend_choose_sub(const char *name, const tp_group *g, const tp_backend *parent, const tp_backend **out);

/* TP_OK when a backend of this build has a launcher's channel (mpi), else TP_ERR_UNSUPPORTED saying what
 * would bring one. */
tp_status tp_backend_boot_check(void);
/* World rank 0's len bytes of buf to every rank through the first backend whose launcher started the
 * processes (mpi under mpirun/srun); *by gets that backend. TP_ERR_UNSUPPORTED (saying what would help)
 * when none did. */
tp_status tp_backend_boot_bcast(int rank, int size, void *buf, size_t len, double timeout_s, const tp_backend **by);

/* The registered backends that take dev memory, as "'a', 'b'" into buf ("" when none). */
void tp_backend_names_for(tp_device_type dev, char *buf, size_t cap);

#endif
