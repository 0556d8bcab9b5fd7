/* Rendezvous: a small TCP key-value store served by rank 0 (bootstrap only). Internal.
 *
 * A world is a closed club (docs/security.md): every connection proves the world's token (HMAC-SHA-256
 * challenge and response, both ways), every key lives under the world's generation, every send and
 * receive on both sides has a deadline, and the server bounds its connections and bytes. */
#ifndef TP_COMM_STORE_H
#define TP_COMM_STORE_H

#include "../core/internal.h"

typedef struct tp_store tp_store;

/* Rank 0 serves at addr:port (and is also a client of itself); others connect, retrying until
 * timeout_s. After connecting, every rank registers itself, and tp_store_open waits until all
 * world_size ranks have arrived; a rank that never does yields TP_ERR_TIMEOUT naming it
 * ("timed out after 30 s waiting for rank 3 of 4 to join"). The token is the one tp_store_token
 * resolves from the environment alone, the generation 0, and the server binds addr. */
tp_status tp_store_open(const char *addr, int port, int rank, int world_size, double timeout_s,
                        tp_store **out);

/* Liveness for a collective's long wait: *who = the first of the n world ranks `ranks` whose connection to
 * the store ended (it died or exited) or fell silent (no heartbeat for TPLINEAR_PEER_SILENCE_MS: stopped,
 * hung, its link cut) once more ranks than *seen have gone (*seen: updated; start at 0), else -1; why
 * (cap bytes) then says which ("lost its connection ..." / "stopped answering ..."). One request while
 * nobody has gone. When this rank's own connection to rank 0 is gone (rank 0 died or stopped answering):
 * rank 0's index when it is one of ranks, else TP_ERR_COMM. No record under torchrun's store (*who = -1). */
tp_status tp_store_lost(tp_store *s, const int *ranks, int n, int64_t *seen, int *who, char *why, size_t cap);

/* Everything tp_store_open_world needs. */
typedef struct {
    const char *addr;      /* where the clients connect (rank 0's address, or 127.0.0.1) */
    const char *bind_addr; /* rank 0: the local address the server listens on (NULL: addr; "0.0.0.0": all) */
    int port;
    int rank, world_size;
    double timeout_s;
    const char *token;     /* the world's secret (tp_store_token); NULL: tp_store_token(NULL, ...) */
    uint64_t generation;   /* the same on every rank: the how-many-th world of the processes; a client
                              of another generation is sent away (it retries until its own world's store
                              is up), and every key is stored under it */
    const char *torch_ns;  /* not NULL: join torchrun's agent store at addr:port (no server of our own),
                              keys under "<torch_ns><generation>/" */
    /* Rank 0: called once its server listens, with the port, before any rank can join (the launcher's
     * channel announces it); with port 0 the kernel picks the port, so no other program can take it first. */
    tp_status (*on_serving)(void *ctx, int port);
    void *ctx;
    int rank0_started;     /* the launcher started rank 0, which announced addr once it served (error hints) */
} tp_store_config;
#define TP_STORE_NS_MAX 320
tp_status tp_store_open_world(const tp_store_config *cfg, tp_store **out);

/* The world's token into out (TP_TOKEN_MAX + 1 bytes): `given` when not NULL (init's token=); else
 * TPLINEAR_TOKEN; else `fallback` when not NULL (the fresh random token rank 0 sent through the launcher's
 * channel: MPI); else derived (docs/security.md) from the user id, MASTER_ADDR, MASTER_PORT, WORLD_SIZE
 * and the launcher's job id (TORCHELASTIC_RUN_ID, PMIX_NAMESPACE, OMPI_MCA_ess_base_jobid,
 * SLURM_JOB_ID.SLURM_STEP_ID). *source (may be NULL) names where it came from, for logs. */
tp_status tp_store_token(const char *given, const char *fallback, const char *master_addr, int port, int world_size,
                         char *out, const char **source);

/* Stores are reference counted (a subgroup keeps its world's store alive): retain adds a reference,
 * close drops one and frees on the last. Rank 0's last close stops accepting connections at once and
 * lingers (bounded by the timeout, at most 10 s) until the other ranks have disconnected, so nobody
 * loses the server mid-request. */
tp_store *tp_store_retain(tp_store *s);
void tp_store_close(tp_store *s);
/* The world failed to form: rank 0's last close lingers at most a second for the others (NULL is fine). */
void tp_store_abandon(tp_store *s);
double tp_store_timeout(const tp_store *s);
uint64_t tp_store_generation(const tp_store *s);
tp_status tp_store_set(tp_store *s, const char *key, const void *val, size_t len);
/* Waits (bounded by the store's timeout) until key exists, then copies up to cap bytes. */
tp_status tp_store_get(tp_store *s, const char *key, void *val, size_t cap, size_t *len);
/* Atomically adds delta to an integer key (missing = 0) and returns the new value. */
tp_status tp_store_add(tp_store *s, const char *key, int64_t delta, int64_t *result);
/* Waits until an integer key reaches at least target (bounded by the timeout). */
tp_status tp_store_wait_ge(tp_store *s, const char *key, int64_t target);
/* A barrier of n ranks through the store: each calls arrive with its index me in [0, n) (sets
 * "<key>/<me>"); wait_all waits until all n have (bounded by the timeout). world[i] is the world rank of
 * the i-th (NULL: i): one whose connection to the store is gone (it died or exited) fails the wait at
 * once (TP_ERR_COMM naming it); the timeout names the missing ones ("waiting for rank 2 of 3 <what>"),
 * and so does the watchdog's log line. */
tp_status tp_store_arrive(tp_store *s, const char *key, int me);
tp_status tp_store_wait_all(tp_store *s, const char *key, int n, const int *world, const char *what);
/* HMAC-SHA-256 under the world's token of (label, the generation, data): what a backend puts where
 * only the world's ranks may trust it (the shm segment's header), without the token leaving the store. */
void tp_store_proof(const tp_store *s, const char *label, const void *data, size_t len,
                    unsigned char out[TP_SHA256_BYTES]);

#endif
