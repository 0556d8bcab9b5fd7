/* A client of torch's c10d TCPStore (comm/torch_store.c), reached through the tp_store_* calls of a
 * store opened with tp_store_open_torch. Internal. */
#ifndef TP_COMM_TORCH_STORE_H
#define TP_COMM_TORCH_STORE_H

#include "../core/internal.h"

typedef struct tp_torch_store tp_torch_store;

/* Connects to the store at addr:port (retrying until timeout_s), validates, puts every key under ns and
 * joins as tp_store_open does (every rank registers, then waits for all world_size). */
tp_status tp_torch_store_open(const char *addr, int port, const char *ns, int rank, int world_size, double timeout_s,
                              tp_torch_store **out);
void tp_torch_store_close(tp_torch_store *s);
tp_status tp_torch_store_set(tp_torch_store *s, const char *key, const void *val, size_t len);
tp_status tp_torch_store_get(tp_torch_store *s, const char *key, void *val, size_t cap, size_t *len);
tp_status tp_torch_store_add(tp_torch_store *s, const char *key, int64_t delta, int64_t *result);
tp_status tp_torch_store_wait_ge(tp_torch_store *s, const char *key, int64_t target);

#endif
