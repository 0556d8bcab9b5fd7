/* Rendezvous: a small TCP key-value store served by rank 0 (bootstrap only). Internal. */
#ifndef TP_COMM_STORE_H
#define TP_COMM_STORE_H

#include "../core/internal.h"

typedef struct tp_store tp_store;

/* Rank 0 serves at addr:port (and is also a client of itself); others connect, retrying until
 * timeout_s. After connecting, every rank registers itself, and tp_store_open waits until all
 * world_size ranks have arrived; a rank that never does yields TP_ERR_TIMEOUT naming it
 * ("timed out after 30 s waiting for rank 3 of 4 to join"). */
tp_status tp_store_open(const char *addr, int port, int rank, int world_size, double timeout_s,
                        tp_store **out);
/* The same over torch's c10d TCPStore that torchrun's agent serves at addr:port (comm/torch_store.c):
 * no server of our own; every key is put under ns (a run's namespace). */
tp_status tp_store_open_torch(const char *addr, int port, const char *ns, int rank, int world_size,
                              double timeout_s, tp_store **out);
/* Stores are reference counted (a subgroup keeps its world's store alive): retain adds a reference,
 * close drops one and frees on the last. Rank 0's last close lingers (bounded by the timeout) until
 * the other ranks have disconnected, so nobody loses the server mid-request. */
tp_store *tp_store_retain(tp_store *s);
void tp_store_close(tp_store *s);
double tp_store_timeout(const tp_store *s);
tp_status tp_store_set(tp_store *s, const char *key, const void *val, size_t len);
/* Waits (bounded by the store's timeout) until key exists, then copies up to cap bytes. */
tp_status tp_store_get(tp_store *s, const char *key, void *val, size_t cap, size_t *len);
/* Atomically adds delta to an integer key (missing = 0) and returns the new value. */
tp_status tp_store_add(tp_store *s, const char *key, int64_t delta, int64_t *result);
/* Waits until an integer key reaches at least target (bounded by the timeout). */
tp_status tp_store_wait_ge(tp_store *s, const char *key, int64_t target);

#endif
