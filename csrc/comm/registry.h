/* The backends of this build (comm/registry.c). Internal. */
#ifndef TP_COMM_REGISTRY_H
#define TP_COMM_REGISTRY_H

#include "backend.h"

/* The backend a world of `size` ranks (`local_size` on this host) gets for the requested name: a
 * registered name; NULL or "auto": TPLINEAR_BACKEND when set, else the first registered backend that
 * takes `device` memory and serves these hosts. A known name this build lacks is TP_ERR_UNSUPPORTED
 * saying what would bring it; any other name is TP_ERR_VALUE listing the registered ones. */
tp_status tp_backend_choose(const char *name, tp_device_type device, int size, int local_size, const tp_backend **out);

/* The registered backends that take dev memory, as "'a', 'b'" into buf ("" when none). */
void tp_backend_names_for(tp_device_type dev, char *buf, size_t cap);

#endif
