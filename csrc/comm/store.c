/* Rendezvous: a small TCP key-value store. Rank 0 runs a server thread (comm/store_server.c); every rank,
 * rank 0 included, is a client over TCP (this file). Waiting (get of a missing key, wait_ge) is client-side
 * polling with a growing sleep, bounded by the timeout.
 *
 * A closed club (docs/security.md). A connection starts with a handshake in which both sides prove the
 * world's token without sending it (HMAC-SHA-256 over both sides' random nonces):
 *   client -> server  HELLO      magic, version, rank, world size, generation, client nonce
 *   server -> client  CHALLENGE  magic, version, status, server generation, world size, server nonce,
 *                                server proof = HMAC(token, "server" | HELLO | server nonce)
 *   client -> server  AUTH       client proof = HMAC(token, "client" | HELLO | server nonce)
 *   server -> client  WELCOME    status
 * A client whose proof is wrong is refused (and rank 0 says so, in a warning and in its join timeout);
 * a client that finds the server's proof wrong has reached another world's store and says so. A server
 * that is closing, or serves another generation (the previous world of a re-initialising process), sends
 * the client away to retry until its own world's store is up. Each rank joins once per world.
 *
 * Requests, client -> server: u8 cmd, u32 keylen, u32 vallen, key, val;
 *           server -> client: u8 status, u32 len, payload (little endian, host order).
 * SET stores val; GET replies status RS_OK + value or RS_MISSING; ADD takes an int64 delta in val and
 * replies the new int64 value. Every key is stored under "<generation>/".
 *
 * Bounded everywhere: the client puts a deadline on every connect, send and receive (a stopped rank 0 or
 * a silent program on MASTER_PORT is a timeout, never a hang); the server never blocks (non-blocking
 * sockets multiplexed by poll), gives a connection STORE_HANDSHAKE_S (at most) to prove itself and a
 * started request the timeout to arrive and its reply to be read, keeps at most MAX_PENDING connections
 * that have not proved themselves (the oldest goes first) and one per rank, and holds at most MAX_STORED
 * bytes. When a joined rank's connection ends, the server records "lost/<rank>", so the rendezvous names a
 * rank that died instead of waiting for it.
 *
 * The heartbeat (TPLINEAR_PEER_SILENCE_MS): a vanished rank (SIGSTOP, a frozen process, a cut link) closes
 * nothing, so every client also sends BEAT every STORE_BEAT_S from a thread of its own (it runs while the
 * rank computes, in Python or BLAS, as while it waits), and the server drops a joined rank that has sent
 * nothing for the silence bound, recording "lost/<rank>" = LOST_SILENT. The other way round, a request
 * whose reply does not come within the bound means rank 0 stopped answering: the connection is marked
 * broken (silent), and tp_store_lost names rank 0. Time this process did not run is not counted (net.c).
 *
 * Under torchrun the same calls go to the agent's c10d store instead (comm/torch_store.c, a client only):
 * set, get and add are forwarded there, everything above them (waits, the join, barriers, the watchdog) is
 * this file's, and the generation goes into the key namespace. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "net.h"
#include "store.h"
#include "store_server.h"
#include "torch_store.h"

struct tp_store {
    atomic_int refs;
    pthread_mutex_t lock;   /* one request at a time on the socket (groups share the store) */
    int fd;
    int rank, world_size;
    double timeout_s, watchdog_s;
    uint64_t generation;
    tp_store_server *srv;   /* rank 0 only */
    char addr[256];
    int port;
    char token[TP_TOKEN_MAX + 1];
    char broken[384];       /* why the connection is gone, once it is */
    int rank0_started;      /* the launcher started rank 0 and it announced its addresses (MPI, srun) */
    tp_torch_store *torch;  /* under torchrun: the agent's store, where set/get/add go instead */
    double silence_s;       /* TPLINEAR_PEER_SILENCE_MS: rank 0 silent this long stopped answering (0: never) */
    int silent;             /* the connection broke because rank 0 stopped answering (under lock) */
    /* the heartbeat thread: beats until stop (under beat_lock) */
    pthread_t beat;
    int beating, beat_stop;
    pthread_mutex_t beat_lock;
    pthread_cond_t beat_cond;
};

/* ---------------------------------------------------------------- client */

static int send_all(int fd, const void *buf, size_t n, double deadline) { return tp_net_io(fd, (void *)buf, n, deadline, 1); }
static int recv_all(int fd, void *buf, size_t n, double deadline) { return tp_net_io(fd, buf, n, deadline, 0); }

/* The client's half of the handshake on a fresh connection (tp_net_greet): TP_DIAL_RETRY when it is not
 * (yet) this world's store, with the reason in why; TP_DIAL_FAIL with *st holding the error. */
static int handshake(void *ctx, int fd, double deadline, tp_status *st, char *why, size_t cap)
{
    tp_store *s = ctx;
    unsigned char hello[HELLO_BYTES], ch[CHALLENGE_BYTES], mine[TP_SHA256_BYTES], want[TP_SHA256_BYTES], wb[4];
    uint32_t status, welcome;
    uint64_t their_gen;
    int rc, server_ok;
    store_put_u32(hello, STORE_MAGIC);
    store_put_u32(hello + 4, STORE_VERSION);
    store_put_u32(hello + 8, (uint32_t)s->rank);
    store_put_u32(hello + 12, (uint32_t)s->world_size);
    memcpy(hello + 16, &s->generation, 8);
    if ((*st = tp_random_bytes(hello + 24, NONCE)) != TP_OK) return TP_DIAL_FAIL;
    if ((rc = send_all(fd, hello, sizeof hello, deadline)) == TP_IO_OK) rc = recv_all(fd, ch, sizeof ch, deadline);
    if (rc == TP_IO_INTR) {
        *st = TP_ERR_INTERRUPTED;
        return TP_DIAL_FAIL;
    }
    if (rc == TP_IO_TIMEOUT) {
        *st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s: the process at %s:%d accepted the connection but "
                       "did not answer as a tplinear store (rank 0 stopped or hung, or another program listens on "
                       "MASTER_PORT)", s->timeout_s, s->addr, s->port);
        return TP_DIAL_FAIL;
    }
    if (rc != TP_IO_OK) { /* closed: evicted as a slow newcomer, or a store that was closing */
        snprintf(why, cap, "the connection to %s:%d was closed during the handshake", s->addr, s->port);
        return TP_DIAL_RETRY;
    }
    if (store_get_u32(ch) != STORE_MAGIC || store_get_u32(ch + 4) != STORE_VERSION) {
        *st = tp_error(TP_ERR_COMM, "the process at %s:%d is not a tplinear store of this version (another "
                       "program listens on MASTER_PORT?)", s->addr, s->port);
        return TP_DIAL_FAIL;
    }
    status = store_get_u32(ch + 8);
    memcpy(&their_gen, ch + 12, 8);
    switch (status) {
    case H_OK: break;
    case H_RETRY:
        snprintf(why, cap, "the store at %s:%d serves world generation %llu (closing, or another world), this "
                 "rank is at generation %llu (every rank must call init_process_group the same number of times)",
                 s->addr, s->port, (unsigned long long)their_gen, (unsigned long long)s->generation);
        return TP_DIAL_RETRY;
    case H_SIZE:
        *st = tp_error(TP_ERR_VALUE, "the world at %s:%d has %u ranks, this rank was started for %d (WORLD_SIZE "
                       "differs between ranks)", s->addr, s->port, store_get_u32(ch + 20), s->world_size);
        return TP_DIAL_FAIL;
    default:
        *st = tp_error(TP_ERR_VALUE, "the world at %s:%d has %u ranks: rank %d is not one of them", s->addr,
                       s->port, store_get_u32(ch + 20), s->rank);
        return TP_DIAL_FAIL;
    }
    store_proof_hs(s->token, "tplinear-store-server", hello, ch + 24, want);
    server_ok = tp_secret_equal(want, ch + 24 + NONCE, TP_SHA256_BYTES);
    store_proof_hs(s->token, "tplinear-store-client", hello, ch + 24, mine); /* sent either way: rank 0 reports it */
    if ((rc = send_all(fd, mine, sizeof mine, deadline)) == TP_IO_OK) rc = recv_all(fd, wb, sizeof wb, deadline);
    if (rc == TP_IO_INTR) {
        *st = TP_ERR_INTERRUPTED;
        return TP_DIAL_FAIL;
    }
    welcome = rc == TP_IO_OK ? store_get_u32(wb) : H_TOKEN;
    if (server_ok && rc != TP_IO_OK) {
        snprintf(why, cap, "the connection to %s:%d was closed during the handshake", s->addr, s->port);
        return TP_DIAL_RETRY;
    }
    if (!server_ok || welcome == H_TOKEN) {
        *st = tp_error(TP_ERR_COMM, "the store at %s:%d refused this rank, or this rank refused it: the world's "
                       "token differs (another world or job on MASTER_PORT %d, or ranks given different "
                       "TPLINEAR_TOKEN / init_process_group(token=...))", s->addr, s->port, s->port);
        return TP_DIAL_FAIL;
    }
    if (welcome == H_DUP) {
        *st = tp_error(TP_ERR_COMM, "the store at %s:%d refused this rank: rank %d has already joined this world "
                       "(two processes with the same RANK?)", s->addr, s->port, s->rank);
        return TP_DIAL_FAIL;
    }
    if (welcome != H_OK) {
        snprintf(why, cap, "the store at %s:%d turned this rank away (status %u)", s->addr, s->port, welcome);
        return TP_DIAL_RETRY;
    }
    return TP_DIAL_OK;
}

static tp_status connect_retry(tp_store *s, double deadline)
{
    return tp_net_dial("the store of rank 0", s->addr, s->port, s->timeout_s, deadline, handshake, s,
                       s->rank0_started ? "rank 0 is running: the launcher started it and it announced these "
                       "addresses once its store listened; none answered from this host: set "
                       "TPLINEAR_SOCKET_IFNAME to the interface the hosts share (e.g. eth0, or ^docker,lo), or "
                       "MASTER_ADDR to an address of rank 0's host that this host reaches"
                                        : "is rank 0 running? Is MASTER_ADDR an address of rank 0's host that this "
                       "host reaches?", s->rank0_started, &s->fd);
}

/* Marks the connection gone (every later request fails with this message) and returns st. */
static tp_status broken(tp_store *s, tp_status st)
{
    snprintf(s->broken, sizeof s->broken, "%s", tp_last_error());
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    return st;
}

/* One request/reply, within the timeout (a polling wait checks its own deadline between requests).
 * *status gets the server's status byte; the payload (up to cap) goes to out. */
static tp_status request(tp_store *s, int cmd, const char *key, const void *val, uint32_t vlen, int *status,
                         void *out, size_t cap, size_t *outlen)
{
    tp_status st = TP_OK;
    double deadline;
    unsigned char hdr[REQ_HDR];
    char full[MAX_KEY + 1];
    int n = snprintf(full, sizeof full, "%llu/%s", (unsigned long long)s->generation, key), rc;
    uint32_t rlen;
    char drain[256];
    double wait_s;
    if (n < 0 || (size_t)n >= sizeof full || vlen > MAX_VAL)
        return tp_error(TP_ERR_VALUE, "store: key or value too long");
    pthread_mutex_lock(&s->lock);
    /* from here: the lock may have been held by another request; rank 0's server answers at once */
    wait_s = s->silence_s > 0.0 && s->silence_s < s->timeout_s ? s->silence_s : s->timeout_s;
    deadline = tp_now() + wait_s;
    if (s->fd < 0) {
        st = tp_error(TP_ERR_COMM, "store: no connection to rank 0 (%s)", s->broken);
        goto out;
    }
    hdr[0] = (unsigned char)cmd;
    store_put_u32(hdr + 1, (uint32_t)n);
    store_put_u32(hdr + 5, vlen);
    if ((rc = send_all(s->fd, hdr, sizeof hdr, deadline)) == TP_IO_OK && (rc = send_all(s->fd, full, (size_t)n, deadline)) == TP_IO_OK &&
        vlen > 0)
        rc = send_all(s->fd, val, vlen, deadline);
    if (rc == TP_IO_OK) rc = recv_all(s->fd, hdr, 5, deadline);
    if (rc == TP_IO_OK) {
        *status = hdr[0];
        rlen = store_get_u32(hdr + 1);
        if (outlen) *outlen = rlen;
        for (uint32_t got = 0; rc == TP_IO_OK && got < rlen;) {
            uint32_t k = rlen - got;
            void *dst = drain;
            if (got < cap) {
                if (k > cap - got) k = (uint32_t)(cap - got);
                dst = (char *)out + got;
            } else if (k > sizeof drain) {
                k = sizeof drain;
            }
            rc = recv_all(s->fd, dst, k, deadline);
            got += k;
        }
    }
    if (rc == TP_IO_INTR) {
        st = broken(s, TP_ERR_INTERRUPTED); /* mid-request: the connection cannot be reused */
    } else if (rc == TP_IO_TIMEOUT && wait_s < s->timeout_s) {
        s->silent = 1;
        st = broken(s, tp_error(TP_ERR_COMM, "store: rank 0 stopped answering: its store at %s:%d sent nothing for "
                                "%g s (TPLINEAR_PEER_SILENCE_MS; its process stopped or frozen, or the link to it cut)",
                                s->addr, s->port, wait_s));
    } else if (rc == TP_IO_TIMEOUT) {
        st = broken(s, tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for the store of rank 0 at %s:%d to "
                                "answer (rank 0 stopped or hung?)", s->timeout_s, s->addr, s->port));
    } else if (rc != TP_IO_OK) {
        st = broken(s, rc == TP_IO_EOF ? tp_error(TP_ERR_COMM, "store: rank 0 closed the connection (did it exit?)")
                                    : tp_error_errno(TP_ERR_COMM, "store: lost the connection to rank 0 (did it "
                                                     "exit?)"));
    } else if (*status == RS_NOMEM) {
        st = tp_error(TP_ERR_NOMEM, "store: the server ran out of memory");
    } else if (*status == RS_FULL) {
        st = tp_error(TP_ERR_NOMEM, "store: the server holds its limit of %zu MB", MAX_STORED >> 20);
    }
out:
    pthread_mutex_unlock(&s->lock);
    return st;
}

tp_status tp_store_set(tp_store *s, const char *key, const void *val, size_t len)
{
    int status;
    if (len > MAX_VAL) return tp_error(TP_ERR_VALUE, "store: value of %zu bytes exceeds %u", len, MAX_VAL);
    if (s->torch) return tp_torch_store_set(s->torch, key, val, len);
    return request(s, CMD_SET, key, val, (uint32_t)len, &status, NULL, 0, NULL);
}

/* One non-waiting get: *found = 0 when the key is missing. */
static tp_status try_get(tp_store *s, const char *key, void *val, size_t cap, size_t *len, int *found)
{
    tp_status st;
    int status = RS_MISSING;
    if (s->torch) return tp_torch_store_try_get(s->torch, key, val, cap, len, found);
    st = request(s, CMD_GET, key, NULL, 0, &status, val, cap, len);
    *found = status == RS_OK;
    return st;
}

/* The heartbeat thread: a BEAT every STORE_BEAT_S until tp_store_close stops it, or until the connection is
 * gone (a failed beat marks it broken: the next request, or tp_store_lost, says why). */
static void *beat_main(void *arg)
{
    tp_store *s = arg;
    struct timespec ts;
    tp_status st;
    int status;
    pthread_mutex_lock(&s->beat_lock);
    while (!s->beat_stop) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)(STORE_BEAT_S * 1e9);
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&s->beat_cond, &s->beat_lock, &ts);
        if (s->beat_stop) break;
        pthread_mutex_unlock(&s->beat_lock);
        st = request(s, CMD_BEAT, "", NULL, 0, &status, NULL, 0, NULL);
        pthread_mutex_lock(&s->beat_lock);
        if (st != TP_OK) break;
    }
    pthread_mutex_unlock(&s->beat_lock);
    return NULL;
}

/* Starts the heartbeat thread (its condition variable on the monotonic clock). */
static tp_status beat_start(tp_store *s)
{
    pthread_condattr_t attr;
    int rc;
    if (pthread_condattr_init(&attr) != 0) return tp_error(TP_ERR_SYSTEM, "store: pthread_condattr_init");
    rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0) rc = pthread_cond_init(&s->beat_cond, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0) return tp_error(TP_ERR_SYSTEM, "store: cannot make the heartbeat's condition variable");
    pthread_mutex_init(&s->beat_lock, NULL);
    if (pthread_create(&s->beat, NULL, beat_main, s) != 0) {
        pthread_cond_destroy(&s->beat_cond);
        pthread_mutex_destroy(&s->beat_lock);
        return tp_error(TP_ERR_SYSTEM, "store: cannot start the heartbeat thread");
    }
    s->beating = 1;
    return TP_OK;
}

static void beat_end(tp_store *s)
{
    if (!s->beating) return;
    pthread_mutex_lock(&s->beat_lock);
    s->beat_stop = 1;
    pthread_cond_signal(&s->beat_cond);
    pthread_mutex_unlock(&s->beat_lock);
    pthread_join(s->beat, NULL);
    pthread_cond_destroy(&s->beat_cond);
    pthread_mutex_destroy(&s->beat_lock);
    s->beating = 0;
}

/* The watchdog of a store wait: logs once, after TPLINEAR_WATCHDOG_S, what this rank still waits for. */
static void watchdog(tp_store *s, double start, int *logged, const char *what)
{
    double waited = tp_now() - start;
    if (*logged || s->watchdog_s <= 0 || waited < s->watchdog_s) return;
    *logged = 1;
    tp_log(TP_LOG_WARN, "store: rank %d has waited %.0f s for %s (the store of rank 0 at %s:%d; the wait ends "
           "at the timeout of %g s)", s->rank, waited, what, s->addr, s->port, s->timeout_s);
}

tp_status tp_store_get(tp_store *s, const char *key, void *val, size_t cap, size_t *len)
{
    tp_status st = TP_OK;
    double start = tp_now(), deadline = start + s->timeout_s, pause = 0.0001;
    int found = 0, logged = 0;
    char what[MAX_KEY + 16];
    for (double next_hook = 0.0;;) {
        TP_CHECK(try_get(s, key, val, cap, len, &found));
        if (found) break;
        TP_CHECK(tp_wait_check(&next_hook, "store"));
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for store key '%s'", s->timeout_s, key);
            goto out;
        }
        snprintf(what, sizeof what, "store key '%s'", key);
        watchdog(s, start, &logged, what);
        tp_sleep(pause);
        if (pause < 0.01) pause *= 1.5;
    }
out:
    return st;
}

tp_status tp_store_add(tp_store *s, const char *key, int64_t delta, int64_t *result)
{
    tp_status st = TP_OK;
    int status;
    int64_t v = 0;
    if (s->torch) return tp_torch_store_add(s->torch, key, delta, result);
    TP_CHECK(request(s, CMD_ADD, key, &delta, 8, &status, &v, 8, NULL));
    if (result) *result = v;
out:
    return st;
}

tp_status tp_store_wait_ge(tp_store *s, const char *key, int64_t target)
{
    tp_status st = TP_OK;
    double start = tp_now(), deadline = start + s->timeout_s, pause = 0.0001;
    int64_t v = 0;
    int logged = 0;
    char what[MAX_KEY + 64];
    for (double next_hook = 0.0;;) {
        TP_CHECK(tp_store_add(s, key, 0, &v));
        if (v >= target) break;
        TP_CHECK(tp_wait_check(&next_hook, "store"));
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for store key '%s' to reach %lld (at %lld)",
                          s->timeout_s, key, (long long)target, (long long)v);
            goto out;
        }
        snprintf(what, sizeof what, "store key '%s' to reach %lld (at %lld)", key, (long long)target, (long long)v);
        watchdog(s, start, &logged, what);
        tp_sleep(pause);
        if (pause < 0.01) pause *= 1.5;
    }
out:
    return st;
}

/* What happened to a rank whose record lost/<rank> holds how (LOST_CLOSED, LOST_SILENT), for messages. */
static void gone_why(const tp_store *s, int64_t how, char *why, size_t cap)
{
    if (how == LOST_SILENT)
        snprintf(why, cap, "stopped answering (nothing from it for %g s, TPLINEAR_PEER_SILENCE_MS: stopped or frozen, "
                 "or its link is cut)", s->silence_s);
    else
        snprintf(why, cap, "lost its connection to the rendezvous store (it died or exited)");
}

tp_status tp_store_lost(tp_store *s, const int *ranks, int n, int64_t *seen, int *who, char *why, size_t cap)
{
    tp_status st = TP_OK;
    int64_t count = 0, v = 0;
    size_t len;
    int found = 0;
    char key[64];
    *who = -1;
    if (s->torch) goto out;
    if ((st = try_get(s, "lost", &count, sizeof count, &len, &found)) == TP_ERR_COMM) {
        for (int i = 0; i < n && *who < 0; i++) /* rank 0 itself is gone: a member? */
            if (ranks[i] == 0) *who = i;
        if (*who < 0) goto out;
        pthread_mutex_lock(&s->lock);
        gone_why(s, s->silent ? LOST_SILENT : LOST_CLOSED, why, cap);
        pthread_mutex_unlock(&s->lock);
        st = TP_OK;
        goto out;
    }
    TP_CHECK(st);
    if (!found || count <= *seen) goto out;
    *seen = count;
    for (int i = 0; i < n && *who < 0; i++) {
        snprintf(key, sizeof key, "lost/%d", ranks[i]);
        TP_CHECK(try_get(s, key, &v, sizeof v, &len, &found));
        if (found) {
            *who = i;
            gone_why(s, v, why, cap);
        }
    }
out:
    return st;
}

tp_status tp_store_arrive(tp_store *s, const char *key, int me)
{
    char k[MAX_KEY];
    int one = 1;
    snprintf(k, sizeof k, "%s/%d", key, me);
    return tp_store_set(s, k, &one, sizeof one);
}

/* The ones of n from `from` on that have not arrived at key, as "2, 5" (*count of them). */
static tp_status not_arrived(tp_store *s, const char *key, int from, int n, const int *world, char *buf, size_t cap,
                             int *count)
{
    tp_status st = TP_OK;
    char k[MAX_KEY];
    size_t used = 0, len;
    int v, found;
    buf[0] = '\0';
    *count = 0;
    for (int i = from; i < n; i++) {
        snprintf(k, sizeof k, "%s/%d", key, i);
        TP_CHECK(try_get(s, k, &v, sizeof v, &len, &found));
        if (found) continue;
        if (used + 24 < cap)
            used += (size_t)(world && world[i] != i ? snprintf(buf + used, cap - used, "%s%d (global %d)",
                                                               *count ? ", " : "", i, world[i])
                                                    : snprintf(buf + used, cap - used, "%s%d", *count ? ", " : "", i));
        (*count)++;
    }
out:
    return st;
}

tp_status tp_store_wait_all(tp_store *s, const char *key, int n, const int *world, const char *what)
{
    tp_status st = TP_OK;
    char k[MAX_KEY], missing[512], refused[320] = "", msg[640], why[192];
    double start = tp_now(), deadline = start + s->timeout_s, pause = 0.0002, next_hook = 0.0;
    int next = 0, nmiss = 0, logged = 0, v, found;
    int64_t how = 0;
    size_t len;
    while (next < n) {
        snprintf(k, sizeof k, "%s/%d", key, next);
        TP_CHECK(try_get(s, k, &v, sizeof v, &len, &found));
        if (found) {
            next++;
            continue;
        }
        snprintf(k, sizeof k, "lost/%d", world ? world[next] : next);
        found = 0;
        if (!s->torch) TP_CHECK(try_get(s, k, &how, sizeof how, &len, &found)); /* torch's store keeps none */
        if (found) {
            gone_why(s, how, why, sizeof why);
            st = tp_error(TP_ERR_COMM, "rank %d of %d (global rank %d) %s while this rank waited for it %s", next, n,
                          world ? world[next] : next, why, what);
            goto out;
        }
        if (tp_now() > deadline) break;
        TP_CHECK(tp_wait_check(&next_hook, "store"));
        if (!logged && s->watchdog_s > 0 && tp_now() - start >= s->watchdog_s) {
            TP_CHECK(not_arrived(s, key, next, n, world, missing, sizeof missing, &nmiss));
            snprintf(msg, sizeof msg, "rank%s %s of %d %s", nmiss > 1 ? "s" : "", missing, n, what);
            watchdog(s, start, &logged, msg);
        }
        tp_sleep(pause);
        if (pause < 0.01) pause *= 1.5;
    }
    if (next == n) goto out;
    TP_CHECK(not_arrived(s, key, next, n, world, missing, sizeof missing, &nmiss));
    if (nmiss == 0) goto out;
    tp_store_server_refusals(s->srv, refused, sizeof refused);
    st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for rank%s %s of %d %s%s", s->timeout_s,
                  nmiss > 1 ? "s" : "", missing, n, what, refused);
out:
    return st;
}

/* ---------------------------------------------------------------- open / close */

tp_status tp_store_token(const char *given, const char *fallback, const char *master_addr, int port, int world_size,
                         char *out, const char **source)
{
    tp_status st = TP_OK;
    tp_token_env env;
    const char *src;
    if (given != NULL) {
        TP_REQUIRE(given[0] != '\0' && strlen(given) <= TP_TOKEN_MAX,
                   "init: token must be a string of 1..%d characters, got %zu", TP_TOKEN_MAX, strlen(given));
        strcpy(out, given);
        src = "init_process_group(token=...)";
    } else {
        TP_CHECK(tp_env_token(&env));
        if (env.token[0] != '\0') {
            strcpy(out, env.token);
            src = "TPLINEAR_TOKEN";
        } else if (fallback != NULL) {
            snprintf(out, TP_TOKEN_MAX + 1, "%s", fallback);
            src = "rank 0, through the launcher (a fresh random token for this world)";
        } else {
            /* docs/security.md: the derivation that plain torchrun / mpirun worlds share */
            unsigned char h[TP_SHA256_BYTES];
            char num[64];
            tp_sha256 c;
            tp_sha256_init(&c);
            tp_sha256_update(&c, "tplinear-token-v1", 18);
            snprintf(num, sizeof num, "%u", (unsigned)geteuid());
            tp_sha256_update(&c, num, strlen(num) + 1);
            tp_sha256_update(&c, master_addr ? master_addr : "", strlen(master_addr ? master_addr : "") + 1);
            snprintf(num, sizeof num, "%d", port);
            tp_sha256_update(&c, num, strlen(num) + 1);
            snprintf(num, sizeof num, "%d", world_size);
            tp_sha256_update(&c, num, strlen(num) + 1);
            tp_sha256_update(&c, env.job_id, strlen(env.job_id) + 1);
            tp_sha256_final(&c, h);
            tp_hex(h, sizeof h, out);
            src = env.job_var ? env.job_var : "no job id (set TPLINEAR_TOKEN for a secret one)";
        }
    }
    if (source) *source = src;
out:
    return st;
}

tp_status tp_store_open_world(const tp_store_config *cfg, tp_store **out)
{
    tp_status st = TP_OK;
    tp_store *s = NULL;
    const char *source = "given";
    long watchdog_s, silence_ms;
    double deadline;
    *out = NULL;
    TP_REQUIRE((cfg->port > 0 || (cfg->port == 0 && cfg->rank == 0 && cfg->on_serving)) && cfg->port < 65536,
               "store: MASTER_PORT must be in 1..65535, got %d", cfg->port);
    TP_REQUIRE(cfg->world_size >= 1 && cfg->rank >= 0 && cfg->rank < cfg->world_size,
               "store: rank %d of a world of %d", cfg->rank, cfg->world_size);
    TP_CHECK(tp_knob_int(TP_KNOB_WATCHDOG_S, &watchdog_s));
    TP_CHECK(tp_knob_int(TP_KNOB_PEER_SILENCE_MS, &silence_ms));
    deadline = tp_now() + cfg->timeout_s;
    if ((s = calloc(1, sizeof *s)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "store: out of memory");
        goto out;
    }
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->lock, NULL);
    s->fd = -1;
    s->rank = cfg->rank;
    s->world_size = cfg->world_size;
    s->timeout_s = cfg->timeout_s;
    s->watchdog_s = (double)watchdog_s;
    s->silence_s = silence_ms == 0 ? 0.0 : silence_ms < 1000 * STORE_SILENCE_MIN_S ? STORE_SILENCE_MIN_S
                                                                                    : 1e-3 * (double)silence_ms;
    s->generation = cfg->generation;
    s->port = cfg->port;
    s->rank0_started = cfg->rank0_started;
    snprintf(s->addr, sizeof s->addr, "%s", cfg->addr ? cfg->addr : "127.0.0.1");
    if (cfg->token != NULL)
        snprintf(s->token, sizeof s->token, "%s", cfg->token);
    else
        TP_CHECK(tp_store_token(NULL, NULL, s->addr, cfg->port, cfg->world_size, s->token, &source));
    if (cfg->torch_ns) {
        char ns[TP_STORE_NS_MAX + 32];
        TP_REQUIRE(strlen(cfg->torch_ns) < TP_STORE_NS_MAX, "store: the key namespace '%s' is too long", cfg->torch_ns);
        snprintf(ns, sizeof ns, "%s%llu/", cfg->torch_ns, (unsigned long long)cfg->generation);
        TP_CHECK(tp_torch_store_open(s->addr, cfg->port, ns, s->token, cfg->timeout_s, &s->torch));
    } else {
        if (cfg->rank == 0) {
            TP_CHECK(tp_store_server_start(cfg, s->token, s->silence_s, &s->srv, &s->port));
            if (cfg->on_serving) TP_CHECK(cfg->on_serving(cfg->ctx, s->port));
        }
        TP_CHECK(connect_retry(s, deadline));
        TP_CHECK(beat_start(s)); /* from here on: a rank that stops is told from one that computes */
    }
    /* the rendezvous: every rank arrives and waits for the others (a rank that died after connecting
     * fails it at once; the timeout names the missing ranks and, on rank 0, refused connections) */
    TP_CHECK(tp_store_arrive(s, "join", s->rank));
    st = tp_store_wait_all(s, "join", s->world_size, NULL, "to join");
    if (st == TP_ERR_TIMEOUT && s->torch) /* no server to send another generation away: say what to check */
        tp_error_context(st, "init of world generation %llu of this process through torchrun's store (every rank "
                         "must call init_process_group the same number of times)",
                         (unsigned long long)cfg->generation);
    TP_CHECK(st);
    tp_log(TP_LOG_INFO, "store: rank %d of %d joined world generation %llu at %s:%d%s (token: %s)", cfg->rank,
           cfg->world_size, (unsigned long long)cfg->generation, s->addr, s->port,
           s->torch ? " (torchrun's store)" : "", source);
    *out = s;
    s = NULL;
out:
    tp_store_abandon(s); /* the world never formed: nobody needs the server any more */
    tp_store_close(s);
    return st;
}

tp_status tp_store_open(const char *addr, int port, int rank, int world_size, double timeout_s, tp_store **out)
{
    tp_store_config cfg = {.addr = addr, .port = port, .rank = rank, .world_size = world_size, .timeout_s = timeout_s};
    return tp_store_open_world(&cfg, out);
}

tp_store *tp_store_retain(tp_store *s)
{
    if (s) atomic_fetch_add(&s->refs, 1);
    return s;
}

void tp_store_close(tp_store *s)
{
    if (s == NULL || atomic_fetch_sub(&s->refs, 1) != 1) return;
    beat_end(s);
    if (s->fd >= 0) close(s->fd);
    tp_torch_store_close(s->torch);
    tp_store_server_free(s->srv); /* rank 0: lingers (bounded) until the other ranks have disconnected */
    pthread_mutex_destroy(&s->lock);
    memset(s->token, 0, sizeof s->token);
    free(s);
}

void tp_store_abandon(tp_store *s)
{
    /* a second for the others to hit their own error (and so report why) rather than a closed connection */
    if (s) tp_store_server_hurry(s->srv);
}

double tp_store_timeout(const tp_store *s) { return s->timeout_s; }

uint64_t tp_store_generation(const tp_store *s) { return s->generation; }

void tp_store_proof(const tp_store *s, const char *label, const void *data, size_t len,
                    unsigned char out[TP_SHA256_BYTES])
{
    tp_hmac m;
    tp_hmac_init(&m, s->token, strlen(s->token));
    tp_hmac_update(&m, label, strlen(label) + 1);
    tp_hmac_update(&m, &s->generation, sizeof s->generation);
    tp_hmac_update(&m, data, len);
    tp_hmac_final(&m, out);
}
