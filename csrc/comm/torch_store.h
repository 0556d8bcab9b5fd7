/* A client of torch's c10d TCPStore (comm/torch_store.c), reached through the tp_store_* calls of a
 * store opened with tp_store_config.torch_ns. Internal. */
#ifndef TP_COMM_TORCH_STORE_H
#define TP_COMM_TORCH_STORE_H

#include "../core/internal.h"

typedef struct tp_torch_store tp_torch_store;

/* Connects to the store at addr:port (retrying until timeout_s) and validates; every key is put under ns,
 * and every value carries (set) and must carry (get) a proof of the world's token. Joining (every rank
 * registers, then waits for all) is comm/store.c's, as for its own store. */
tp_status tp_torch_store_open(const char *addr, int port, const char *ns, const char *token, double timeout_s,
                              tp_torch_store **out);
void tp_torch_store_close(tp_torch_store *s);
tp_status tp_torch_store_set(tp_torch_store *s, const char *key, const void *val, size_t len);
/* One non-waiting get: *found = 0 when the key is missing, else up to cap bytes into val and its length;
 * TP_ERR_COMM when the value does not prove the world's token. */
tp_status tp_torch_store_try_get(tp_torch_store *s, const char *key, void *val, size_t cap, size_t *len, int *found);
tp_status tp_torch_store_add(tp_torch_store *s, const char *key, int64_t delta, int64_t *result);

#endif
