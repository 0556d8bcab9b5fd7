/* Rendezvous: a small TCP key-value store. Rank 0 runs a server thread; every rank, rank 0 included, is
 * a client over TCP. Waiting (get of a missing key, wait_ge) is client-side polling with a growing sleep,
 * bounded by the timeout.
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
 * Under torchrun the same calls go to the agent's c10d store instead (comm/torch_store.c, a client only):
 * set, get and add are forwarded there, everything above them (waits, the join, barriers, the watchdog) is
 * this file's, and the generation goes into the key namespace. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "net.h"
#include "store.h"
#include "torch_store.h"

enum { CMD_SET = 1, CMD_GET = 2, CMD_ADD = 3 };
enum { RS_MISSING = 0, RS_OK = 1, RS_NOMEM = 2, RS_FULL = 3 };
enum { H_OK = 0, H_RETRY = 1, H_SIZE = 2, H_RANK = 3, H_TOKEN = 4, H_DUP = 5 };
#define MAX_KEY 256
#define MAX_VAL (1u << 20)
#define REQ_HDR 9
#define MAX_PENDING 64
#define MAX_STORED ((size_t)64 << 20)
#define STORE_HANDSHAKE_S 10.0
#define STORE_MAGIC 0x5453504cu /* "LPST" */
#define STORE_VERSION 2u
#define NONCE 16
#define HELLO_BYTES (4 + 4 + 4 + 4 + 8 + NONCE)
#define CHALLENGE_BYTES (4 + 4 + 4 + 8 + 4 + NONCE + TP_SHA256_BYTES)

typedef struct {
    char *key;
    void *val;
    uint32_t len;
} kv;

enum { C_HELLO, C_AUTH, C_READY, C_CLOSE };

typedef struct {
    int fd;
    int state;
    int rank;
    double deadline; /* handshake: its end; ready: the current request's (0 when idle) */
    double since;    /* when it connected (the oldest pending connection is evicted first) */
    unsigned char hello[HELLO_BYTES];
    unsigned char snonce[NONCE];
    unsigned char *in;
    size_t in_len, in_cap;
    unsigned char *out;
    size_t out_len, out_off, out_cap;
    char peer[64];
} conn;

typedef struct {
    int listen_fd;
    int wake[2];            /* pipe: a byte asks the server to stop once no client is left */
    pthread_t thread;
    int started;
    double timeout_s;
    double linger_s;        /* how long the server waits for clients to leave after stop */
    int world_size;
    uint64_t generation;
    char token[TP_TOKEN_MAX + 1];
    kv *items;
    size_t nitems, cap, stored;
    conn *conns;
    size_t nconns, conns_cap;
    unsigned char *joined; /* per rank: proved itself in this world */
    pthread_mutex_t lock;   /* guards the refusal record, read by rank 0's rendezvous */
    int refused;
    char refusal[256];
} server;

struct tp_store {
    atomic_int refs;
    pthread_mutex_t lock;   /* one request at a time on the socket (groups share the store) */
    int fd;
    int rank, world_size;
    double timeout_s, watchdog_s;
    uint64_t generation;
    server *srv;            /* rank 0 only */
    char addr[256];
    int port;
    char token[TP_TOKEN_MAX + 1];
    char broken[384];       /* why the connection is gone, once it is */
    tp_torch_store *torch;  /* under torchrun: the agent's store, where set/get/add go instead */
};

static void put_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* HMAC(token, label | hello | snonce): the proofs of both sides. */
static void proof(const char *token, const char *label, const unsigned char *hello, const unsigned char *snonce,
                  unsigned char out[TP_SHA256_BYTES])
{
    tp_hmac m;
    tp_hmac_init(&m, token, strlen(token));
    tp_hmac_update(&m, label, strlen(label) + 1);
    tp_hmac_update(&m, hello, HELLO_BYTES);
    tp_hmac_update(&m, snonce, NONCE);
    tp_hmac_final(&m, out);
}

/* ---------------------------------------------------------------- server */

static kv *find(server *s, const char *key)
{
    for (size_t i = 0; i < s->nitems; i++)
        if (strcmp(s->items[i].key, key) == 0) return &s->items[i];
    return NULL;
}

/* Stores a copy of val under key. RS_OK, RS_NOMEM, or RS_FULL (the store's byte bound). */
static int put(server *s, const char *key, const void *val, uint32_t len)
{
    kv *e = find(s, key);
    size_t total = s->stored - (e ? e->len : 0) + len + (e ? 0 : strlen(key) + 1);
    void *copy;
    if (total > MAX_STORED) return RS_FULL;
    if ((copy = malloc(len > 0 ? len : 1)) == NULL) return RS_NOMEM;
    if (len > 0) memcpy(copy, val, len);
    if (e == NULL) {
        if (s->nitems == s->cap) {
            size_t cap = s->cap ? 2 * s->cap : 64;
            kv *items = realloc(s->items, cap * sizeof *items);
            if (items == NULL) {
                free(copy);
                return RS_NOMEM;
            }
            s->items = items;
            s->cap = cap;
        }
        e = &s->items[s->nitems];
        if ((e->key = strdup(key)) == NULL) {
            free(copy);
            return RS_NOMEM;
        }
        e->val = NULL;
        s->nitems++;
    }
    free(e->val);
    e->val = copy;
    e->len = len;
    s->stored = total;
    return RS_OK;
}

/* Queues bytes for the client (sent as the socket takes them). 0, or -1 when out of memory. */
static int queue(conn *c, const void *data, size_t n)
{
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_len + n;
        unsigned char *p = realloc(c->out, cap);
        if (p == NULL) return -1;
        c->out = p;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
    return 0;
}

static int queue_reply(conn *c, uint8_t status, const void *payload, uint32_t len)
{
    unsigned char hdr[5];
    hdr[0] = status;
    put_u32(hdr + 1, len);
    if (queue(c, hdr, 5) < 0) return -1;
    return len > 0 ? queue(c, payload, len) : 0;
}

/* Sends what the socket takes. 0, or -1: drop the client. */
static int flush_out(conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t k = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        }
        c->out_off += (size_t)k;
    }
    c->out_off = c->out_len = 0;
    return 0;
}

static void refuse(server *s, conn *c, const char *why)
{
    pthread_mutex_lock(&s->lock);
    s->refused++;
    snprintf(s->refusal, sizeof s->refusal, "from %s claiming rank %d: %s", c->peer, c->rank, why);
    pthread_mutex_unlock(&s->lock);
    tp_log(TP_LOG_WARN, "store: refused a connection from %s claiming rank %d of %d: %s", c->peer, c->rank,
           s->world_size, why);
}

static void drop(server *s, size_t i)
{
    conn *c = &s->conns[i];
    if (c->state == C_READY) { /* a joined rank is gone: its waiters need not wait for it */
        char key[64];
        int64_t one = 1;
        snprintf(key, sizeof key, "%llu/lost/%d", (unsigned long long)s->generation, c->rank);
        put(s, key, &one, sizeof one);
    }
    close(c->fd);
    free(c->in);
    free(c->out);
    s->conns[i] = s->conns[--s->nconns];
}

/* HELLO: the claim. Answers with the server's proof, or with why the client cannot join. */
static int on_hello(server *s, conn *c, int stopping)
{
    unsigned char ch[CHALLENGE_BYTES] = {0};
    uint32_t status = H_OK, size;
    uint64_t gen;
    memcpy(c->hello, c->in, HELLO_BYTES);
    size = get_u32(c->hello + 12);
    if (get_u32(c->hello) != STORE_MAGIC || get_u32(c->hello + 4) != STORE_VERSION) return -1; /* not ours */
    c->rank = (int)get_u32(c->hello + 8);
    memcpy(&gen, c->hello + 16, 8);
    if (stopping || gen != s->generation)
        status = H_RETRY;
    else if (size != (uint32_t)s->world_size)
        status = H_SIZE;
    else if (c->rank < 0 || c->rank >= s->world_size)
        status = H_RANK;
    put_u32(ch, STORE_MAGIC);
    put_u32(ch + 4, STORE_VERSION);
    put_u32(ch + 8, status);
    memcpy(ch + 12, &s->generation, 8);
    put_u32(ch + 20, (uint32_t)s->world_size);
    if (status == H_OK) {
        if (tp_random_bytes(c->snonce, NONCE) != TP_OK) return -1;
        memcpy(ch + 24, c->snonce, NONCE);
        proof(s->token, "tplinear-store-server", c->hello, c->snonce, ch + 24 + NONCE);
    }
    c->state = status == H_OK ? C_AUTH : C_CLOSE;
    return queue(c, ch, sizeof ch);
}

/* AUTH: the client's proof. */
static int on_auth(server *s, conn *c)
{
    unsigned char want[TP_SHA256_BYTES], st[4];
    uint32_t status = H_OK;
    proof(s->token, "tplinear-store-client", c->hello, c->snonce, want);
    if (!tp_secret_equal(want, c->in, TP_SHA256_BYTES)) {
        status = H_TOKEN;
        refuse(s, c, "its token differs from this world's (TPLINEAR_TOKEN, init_process_group(token=...))");
    } else if (s->joined[c->rank]) {
        status = H_DUP;
        refuse(s, c, "that rank has already joined this world (two processes with the same RANK?)");
    }
    put_u32(st, status);
    if (status == H_OK) {
        s->joined[c->rank] = 1;
        c->state = C_READY;
        c->deadline = 0.0;
    } else {
        c->state = C_CLOSE;
    }
    return queue(c, st, sizeof st);
}

/* A complete request in c->in. 0, or -1: drop the client. */
static int on_request(server *s, conn *c)
{
    uint32_t klen = get_u32(c->in + 1), vlen = get_u32(c->in + 5);
    char key[MAX_KEY + 1];
    const unsigned char *val = c->in + REQ_HDR + klen;
    memcpy(key, c->in + REQ_HDR, klen);
    key[klen] = '\0';
    switch (c->in[0]) {
    case CMD_SET:
        return queue_reply(c, (uint8_t)put(s, key, val, vlen), NULL, 0);
    case CMD_GET: {
        kv *e = find(s, key);
        return e ? queue_reply(c, RS_OK, e->val, e->len) : queue_reply(c, RS_MISSING, NULL, 0);
    }
    case CMD_ADD: {
        kv *e = find(s, key);
        int64_t cur = 0, delta = 0;
        int rc;
        if (vlen != 8) return -1;
        memcpy(&delta, val, 8);
        if (e && e->len == 8) memcpy(&cur, e->val, 8);
        cur = (int64_t)((uint64_t)cur + (uint64_t)delta);
        rc = put(s, key, &cur, 8);
        return rc == RS_OK ? queue_reply(c, RS_OK, &cur, 8) : queue_reply(c, (uint8_t)rc, NULL, 0);
    }
    }
    return -1;
}

/* The bytes the current frame still needs (0 when it is complete), or -1 for a malformed one. */
static long frame_need(const conn *c)
{
    size_t want;
    if (c->state == C_HELLO) want = HELLO_BYTES;
    else if (c->state == C_AUTH) want = TP_SHA256_BYTES;
    else if (c->in_len < REQ_HDR) want = REQ_HDR;
    else {
        uint32_t klen = get_u32(c->in + 1), vlen = get_u32(c->in + 5);
        if (klen > MAX_KEY || vlen > MAX_VAL) return -1;
        want = REQ_HDR + klen + vlen;
    }
    return (long)(want - c->in_len);
}

/* Reads what the client sent and handles complete frames. 0, or -1: drop the client. */
static int on_readable(server *s, conn *c, int stopping)
{
    for (;;) {
        long need = frame_need(c);
        ssize_t k;
        if (need < 0) return -1;
        if (need == 0) {
            int rc = c->state == C_HELLO ? on_hello(s, c, stopping)
                   : c->state == C_AUTH  ? on_auth(s, c)
                                         : on_request(s, c);
            c->in_len = 0;
            if (rc < 0) return -1;
            if (c->out_len > 0) return flush_out(c); /* one frame at a time: its answer first */
            continue;
        }
        if (c->in_len + (size_t)need > c->in_cap) {
            size_t cap = c->in_len + (size_t)need;
            unsigned char *p = realloc(c->in, cap);
            if (p == NULL) return -1;
            c->in = p;
            c->in_cap = cap;
        }
        k = recv(c->fd, c->in + c->in_len, (size_t)need, MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        }
        if (k == 0) return -1;
        if (c->state == C_READY && c->in_len == 0) c->deadline = tp_now() + s->timeout_s;
        c->in_len += (size_t)k;
    }
}

static void accept_new(server *s, double now)
{
    for (int n = 0; n < MAX_PENDING; n++) {
        struct sockaddr_in sa;
        socklen_t len = sizeof sa;
        int fd = accept4(s->listen_fd, (struct sockaddr *)&sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC), one = 1;
        size_t pending = 0, oldest = 0;
        conn *c;
        if (fd < 0) return; /* EAGAIN, or out of descriptors: the caller pauses accepting */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        for (size_t i = 0; i < s->nconns; i++) {
            if (s->conns[i].state == C_READY) continue;
            if (pending == 0 || s->conns[i].since < s->conns[oldest].since) oldest = i;
            pending++;
        }
        if (pending >= MAX_PENDING) drop(s, oldest); /* a flood of silent connections cannot lock ranks out */
        if (s->nconns == s->conns_cap) {
            size_t cap = s->conns_cap ? 2 * s->conns_cap : 16;
            conn *p = realloc(s->conns, cap * sizeof *p);
            if (p == NULL) {
                close(fd);
                return;
            }
            s->conns = p;
            s->conns_cap = cap;
        }
        c = &s->conns[s->nconns++];
        memset(c, 0, sizeof *c);
        c->fd = fd;
        c->state = C_HELLO;
        c->rank = -1;
        c->since = now;
        c->deadline = now + (s->timeout_s < STORE_HANDSHAKE_S ? s->timeout_s : STORE_HANDSHAKE_S);
        if (!inet_ntop(AF_INET, &sa.sin_addr, c->peer, sizeof c->peer)) strcpy(c->peer, "?");
        snprintf(c->peer + strlen(c->peer), sizeof c->peer - strlen(c->peer), ":%d", ntohs(sa.sin_port));
    }
}

static void *server_main(void *arg)
{
    server *s = arg;
    struct pollfd *fds = NULL;
    size_t fds_cap = 0;
    int stopping = 0;
    double stop_at = 0.0, accept_paused_until = 0.0;
    for (;;) {
        double now = tp_now(), wait_s = 1.0;
        size_t nready = 0, nfds = 2;
        int n;
        for (size_t i = 0; i < s->nconns;) { /* per-connection deadlines */
            if (s->conns[i].deadline > 0.0 && now > s->conns[i].deadline) {
                drop(s, i);
                continue;
            }
            if (s->conns[i].deadline > 0.0 && s->conns[i].deadline - now < wait_s) wait_s = s->conns[i].deadline - now;
            nready += s->conns[i].state == C_READY;
            i++;
        }
        if (stopping && (nready == 0 || now - stop_at > s->linger_s)) break;
        if (stopping && wait_s > 0.05) wait_s = 0.05;
        if (s->nconns + 2 > fds_cap) {
            size_t cap = s->nconns + 2 + 16;
            struct pollfd *p = realloc(fds, cap * sizeof *p);
            if (p == NULL) break;
            fds = p;
            fds_cap = cap;
        }
        fds[0] = (struct pollfd){.fd = s->listen_fd >= 0 && now >= accept_paused_until ? s->listen_fd : -1,
                                 .events = POLLIN};
        if (s->listen_fd >= 0 && now < accept_paused_until && accept_paused_until - now < wait_s)
            wait_s = accept_paused_until - now;
        fds[1] = (struct pollfd){.fd = stopping ? -1 : s->wake[0], .events = POLLIN};
        for (size_t i = 0; i < s->nconns; i++)
            fds[nfds++] = (struct pollfd){.fd = s->conns[i].fd, .events = s->conns[i].out_len ? POLLOUT : POLLIN};
        n = poll(fds, (nfds_t)nfds, (int)(wait_s * 1000) + 1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        now = tp_now();
        /* the connections first, in reverse (drop moves the last one into the hole) */
        for (size_t j = nfds; j-- > 2;) {
            size_t i = j - 2;
            conn *c = &s->conns[i];
            short re = fds[j].revents;
            int bad = 0;
            if (re == 0) continue;
            if (re & POLLOUT) bad = flush_out(c) < 0;
            else if (re & POLLIN) bad = on_readable(s, c, stopping) < 0;
            else bad = 1; /* POLLERR / POLLHUP / POLLNVAL */
            if (!bad && c->state == C_CLOSE && c->out_len == 0) bad = 1;
            if (!bad && c->state == C_READY && c->in_len == 0 && c->out_len == 0) c->deadline = 0.0;
            if (bad) drop(s, i);
        }
        if (fds[1].revents & POLLIN) {
            char ch;
            if (read(s->wake[0], &ch, 1) < 0) break;
            stopping = 1;
            stop_at = now;
            close(s->listen_fd); /* a re-initialising rank must not reach this world: refused, it retries */
            s->listen_fd = -1;
        } else if (fds[0].fd >= 0 && (fds[0].revents & POLLIN)) {
            size_t before = s->nconns;
            accept_new(s, now);
            if (s->nconns == before) accept_paused_until = now + 0.1; /* out of descriptors: no busy loop */
        }
    }
    for (size_t i = s->nconns; i-- > 0;) drop(s, i);
    free(fds);
    return NULL;
}

static void server_free(server *s)
{
    if (s == NULL) return;
    if (s->started) {
        char c = 'x';
        if (write(s->wake[1], &c, 1) == 1) pthread_join(s->thread, NULL);
        else pthread_detach(s->thread);
    }
    if (s->listen_fd >= 0) close(s->listen_fd);
    if (s->wake[0] >= 0) close(s->wake[0]);
    if (s->wake[1] >= 0) close(s->wake[1]);
    for (size_t i = 0; i < s->nitems; i++) {
        free(s->items[i].key);
        free(s->items[i].val);
    }
    free(s->items);
    free(s->conns);
    free(s->joined);
    pthread_mutex_destroy(&s->lock);
    memset(s->token, 0, sizeof s->token);
    free(s);
}

/* The address the server listens on: bind_addr (numeric or a name), falling back to every interface
 * when it is not an address of this host; port 0: one the kernel picks. *bound: the port it listens on. */
static tp_status server_bind(server *s, const char *bind_addr, int port, int *bound)
{
    tp_status st = TP_OK;
    struct addrinfo hints, *res = NULL;
    struct sockaddr_in sa;
    socklen_t salen = sizeof sa;
    char portstr[16];
    int one = 1, rc;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    if (strcmp(bind_addr, "0.0.0.0") != 0) {
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        snprintf(portstr, sizeof portstr, "%d", port);
        if ((rc = getaddrinfo(bind_addr, portstr, &hints, &res)) != 0) {
            st = tp_error(TP_ERR_VALUE, "store: cannot resolve MASTER_ADDR '%s': %s", bind_addr, gai_strerror(rc));
            goto out;
        }
        memcpy(&sa, res->ai_addr, sizeof sa);
    }
    if ((s->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0 ||
        setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: socket");
        goto out;
    }
    rc = bind(s->listen_fd, (struct sockaddr *)&sa, sizeof sa);
    if (rc < 0 && errno == EADDRNOTAVAIL) {
        tp_log(TP_LOG_INFO, "store: MASTER_ADDR %s is not an address of this host; listening on all interfaces",
               bind_addr);
        sa.sin_addr.s_addr = htonl(INADDR_ANY);
        rc = bind(s->listen_fd, (struct sockaddr *)&sa, sizeof sa);
    }
    if (rc < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: rank 0 cannot serve on %s:%d (MASTER_PORT; another program, "
                            "or another world, uses it)", bind_addr, port);
        goto out;
    }
    if (listen(s->listen_fd, 128) < 0 || getsockname(s->listen_fd, (struct sockaddr *)&sa, &salen) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: listen on port %d", port);
        goto out;
    }
    *bound = ntohs(sa.sin_port);
out:
    if (res) freeaddrinfo(res);
    return st;
}

static tp_status server_start(const tp_store_config *cfg, const char *token, server **out, int *port)
{
    tp_status st = TP_OK;
    server *s = calloc(1, sizeof *s);
    *out = NULL;
    if (s == NULL) return tp_error(TP_ERR_NOMEM, "store: out of memory");
    s->listen_fd = -1;
    s->wake[0] = s->wake[1] = -1;
    pthread_mutex_init(&s->lock, NULL);
    s->timeout_s = cfg->timeout_s;
    s->linger_s = cfg->timeout_s < 10.0 ? cfg->timeout_s : 10.0;
    s->world_size = cfg->world_size;
    s->generation = cfg->generation;
    snprintf(s->token, sizeof s->token, "%s", token);
    if ((s->joined = calloc((size_t)cfg->world_size, 1)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "store: out of memory");
        goto out;
    }
    if (pipe2(s->wake, O_CLOEXEC) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: pipe");
        goto out;
    }
    TP_CHECK(server_bind(s, cfg->bind_addr ? cfg->bind_addr : cfg->addr, cfg->port, port));
    if (pthread_create(&s->thread, NULL, server_main, s) != 0) {
        st = tp_error(TP_ERR_SYSTEM, "store: cannot start the server thread");
        goto out;
    }
    s->started = 1;
    *out = s;
    s = NULL;
out:
    server_free(s);
    return st;
}

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
    put_u32(hello, STORE_MAGIC);
    put_u32(hello + 4, STORE_VERSION);
    put_u32(hello + 8, (uint32_t)s->rank);
    put_u32(hello + 12, (uint32_t)s->world_size);
    memcpy(hello + 16, &s->generation, 8);
    if ((*st = tp_random_bytes(hello + 24, NONCE)) != TP_OK) return TP_DIAL_FAIL;
    if ((rc = send_all(fd, hello, sizeof hello, deadline)) == TP_IO_OK) rc = recv_all(fd, ch, sizeof ch, deadline);
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
    if (get_u32(ch) != STORE_MAGIC || get_u32(ch + 4) != STORE_VERSION) {
        *st = tp_error(TP_ERR_COMM, "the process at %s:%d is not a tplinear store of this version (another "
                       "program listens on MASTER_PORT?)", s->addr, s->port);
        return TP_DIAL_FAIL;
    }
    status = get_u32(ch + 8);
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
                       "differs between ranks)", s->addr, s->port, get_u32(ch + 20), s->world_size);
        return TP_DIAL_FAIL;
    default:
        *st = tp_error(TP_ERR_VALUE, "the world at %s:%d has %u ranks: rank %d is not one of them", s->addr,
                       s->port, get_u32(ch + 20), s->rank);
        return TP_DIAL_FAIL;
    }
    proof(s->token, "tplinear-store-server", hello, ch + 24, want);
    server_ok = tp_secret_equal(want, ch + 24 + NONCE, TP_SHA256_BYTES);
    proof(s->token, "tplinear-store-client", hello, ch + 24, mine); /* sent either way: rank 0 reports it */
    if ((rc = send_all(fd, mine, sizeof mine, deadline)) == TP_IO_OK) rc = recv_all(fd, wb, sizeof wb, deadline);
    welcome = rc == TP_IO_OK ? get_u32(wb) : H_TOKEN;
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
                       "is rank 0 running?", &s->fd);
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
    if (n < 0 || (size_t)n >= sizeof full || vlen > MAX_VAL)
        return tp_error(TP_ERR_VALUE, "store: key or value too long");
    pthread_mutex_lock(&s->lock);
    deadline = tp_now() + s->timeout_s; /* from here: the lock may have been held by another request */
    if (s->fd < 0) {
        st = tp_error(TP_ERR_COMM, "store: no connection to rank 0 (%s)", s->broken);
        goto out;
    }
    hdr[0] = (unsigned char)cmd;
    put_u32(hdr + 1, (uint32_t)n);
    put_u32(hdr + 5, vlen);
    if ((rc = send_all(s->fd, hdr, sizeof hdr, deadline)) == TP_IO_OK && (rc = send_all(s->fd, full, (size_t)n, deadline)) == TP_IO_OK &&
        vlen > 0)
        rc = send_all(s->fd, val, vlen, deadline);
    if (rc == TP_IO_OK) rc = recv_all(s->fd, hdr, 5, deadline);
    if (rc == TP_IO_OK) {
        *status = hdr[0];
        rlen = get_u32(hdr + 1);
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
    if (rc == TP_IO_TIMEOUT) {
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
    for (;;) {
        TP_CHECK(try_get(s, key, val, cap, len, &found));
        if (found) break;
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
    for (;;) {
        TP_CHECK(tp_store_add(s, key, 0, &v));
        if (v >= target) break;
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
    char k[MAX_KEY], missing[512], refused[320] = "", msg[640];
    double start = tp_now(), deadline = start + s->timeout_s, pause = 0.0002;
    int next = 0, nmiss = 0, logged = 0, v, found;
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
        if (!s->torch) TP_CHECK(try_get(s, k, &v, sizeof v, &len, &found)); /* torch's store keeps no such record */
        if (found) {
            st = tp_error(TP_ERR_COMM, "rank %d of %d (global rank %d) lost its connection to the store (it died or "
                          "exited) while this rank waited for it %s", next, n, world ? world[next] : next, what);
            goto out;
        }
        if (tp_now() > deadline) break;
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
    if (s->srv) {
        pthread_mutex_lock(&s->srv->lock);
        if (s->srv->refused)
            snprintf(refused, sizeof refused, "; the store refused %d connection%s (last %s)", s->srv->refused,
                     s->srv->refused > 1 ? "s" : "", s->srv->refusal);
        pthread_mutex_unlock(&s->srv->lock);
    }
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
    long watchdog_s;
    double deadline;
    *out = NULL;
    TP_REQUIRE((cfg->port > 0 || (cfg->port == 0 && cfg->rank == 0 && cfg->on_serving)) && cfg->port < 65536,
               "store: MASTER_PORT must be in 1..65535, got %d", cfg->port);
    TP_REQUIRE(cfg->world_size >= 1 && cfg->rank >= 0 && cfg->rank < cfg->world_size,
               "store: rank %d of a world of %d", cfg->rank, cfg->world_size);
    TP_CHECK(tp_knob_int(TP_KNOB_WATCHDOG_S, &watchdog_s));
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
    s->generation = cfg->generation;
    s->port = cfg->port;
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
            TP_CHECK(server_start(cfg, s->token, &s->srv, &s->port));
            if (cfg->on_serving) TP_CHECK(cfg->on_serving(cfg->ctx, s->port));
        }
        TP_CHECK(connect_retry(s, deadline));
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
    if (s->fd >= 0) close(s->fd);
    tp_torch_store_close(s->torch);
    server_free(s->srv); /* rank 0: lingers (bounded) until the other ranks have disconnected */
    pthread_mutex_destroy(&s->lock);
    memset(s->token, 0, sizeof s->token);
    free(s);
}

void tp_store_abandon(tp_store *s)
{
    /* a second for the others to hit their own error (and so report why) rather than a closed connection */
    if (s && s->srv && s->srv->linger_s > 1.0) s->srv->linger_s = 1.0;
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
