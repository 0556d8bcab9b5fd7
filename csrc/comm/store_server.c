/* The rendezvous store's server: rank 0's thread, one poll loop over non-blocking sockets, bounded
 * connections, bytes and deadlines (the protocol and its bounds: comm/store.c). It also judges the
 * heartbeat: every joined client sends something at least every STORE_BEAT_S, and one whose connection
 * stays silent for silence_s (the rank's process is stopped or frozen, or its link is cut; a thread
 * hung in C does not count: the heartbeat's thread still runs) is dropped and recorded as
 * silent. Time in which the server thread itself did not run (the whole job stopped, a starved thread) is
 * not held against the clients. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "store_server.h"

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
    double seen;     /* ready: when it last sent something (its heartbeat) */
    unsigned char hello[HELLO_BYTES];
    unsigned char snonce[NONCE];
    unsigned char *in;
    size_t in_len, in_cap;
    unsigned char *out;
    size_t out_len, out_off, out_cap;
    char peer[64];
} conn;

struct tp_store_server {
    int listen_fd;
    int wake[2];            /* pipe: a byte asks the server to stop once no client is left */
    pthread_t thread;
    int started;
    double timeout_s;
    double linger_s;        /* how long the server waits for clients to leave after stop */
    double silence_s;       /* a joined client silent this long is dropped (0: never) */
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
};

typedef struct tp_store_server server;

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
    store_put_u32(hdr + 1, len);
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

/* Closes connection i; a joined rank's is recorded as lost/<rank> = how (LOST_CLOSED, LOST_SILENT). */
static void drop(server *s, size_t i, int64_t how)
{
    conn *c = &s->conns[i];
    if (c->state == C_READY) { /* a joined rank is gone: its waiters need not wait for it */
        char key[64];
        int64_t count = 0;
        kv *e;
        snprintf(key, sizeof key, "%llu/lost/%d", (unsigned long long)s->generation, c->rank);
        put(s, key, &how, sizeof how);
        /* how many have gone: what a collective's liveness probe (tp_store_lost) reads in one request */
        snprintf(key, sizeof key, "%llu/lost", (unsigned long long)s->generation);
        if ((e = find(s, key)) != NULL && e->len == 8) memcpy(&count, e->val, 8);
        count++;
        put(s, key, &count, sizeof count);
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
    size = store_get_u32(c->hello + 12);
    if (store_get_u32(c->hello) != STORE_MAGIC || store_get_u32(c->hello + 4) != STORE_VERSION) return -1; /* not ours */
    c->rank = (int)store_get_u32(c->hello + 8);
    memcpy(&gen, c->hello + 16, 8);
    if (stopping || gen != s->generation)
        status = H_RETRY;
    else if (size != (uint32_t)s->world_size)
        status = H_SIZE;
    else if (c->rank < 0 || c->rank >= s->world_size)
        status = H_RANK;
    store_put_u32(ch, STORE_MAGIC);
    store_put_u32(ch + 4, STORE_VERSION);
    store_put_u32(ch + 8, status);
    memcpy(ch + 12, &s->generation, 8);
    store_put_u32(ch + 20, (uint32_t)s->world_size);
    if (status == H_OK) {
        if (tp_random_bytes(c->snonce, NONCE) != TP_OK) return -1;
        memcpy(ch + 24, c->snonce, NONCE);
        store_proof_hs(s->token, "tplinear-store-server", c->hello, c->snonce, ch + 24 + NONCE);
    }
    c->state = status == H_OK ? C_AUTH : C_CLOSE;
    return queue(c, ch, sizeof ch);
}

/* AUTH: the client's proof. */
static int on_auth(server *s, conn *c)
{
    unsigned char want[TP_SHA256_BYTES], st[4];
    uint32_t status = H_OK;
    store_proof_hs(s->token, "tplinear-store-client", c->hello, c->snonce, want);
    if (!tp_secret_equal(want, c->in, TP_SHA256_BYTES)) {
        status = H_TOKEN;
        refuse(s, c, "its token differs from this world's (TPLINEAR_TOKEN, init_process_group(token=...))");
    } else if (s->joined[c->rank]) {
        status = H_DUP;
        refuse(s, c, "that rank has already joined this world (two processes with the same RANK?)");
    }
    store_put_u32(st, status);
    if (status == H_OK) {
        s->joined[c->rank] = 1;
        c->state = C_READY;
        c->deadline = 0.0;
        c->seen = tp_now();
    } else {
        c->state = C_CLOSE;
    }
    return queue(c, st, sizeof st);
}

/* A complete request in c->in. 0, or -1: drop the client. */
static int on_request(server *s, conn *c)
{
    uint32_t klen = store_get_u32(c->in + 1), vlen = store_get_u32(c->in + 5);
    char key[MAX_KEY + 1];
    const unsigned char *val = c->in + REQ_HDR + klen;
    memcpy(key, c->in + REQ_HDR, klen);
    key[klen] = '\0';
    switch (c->in[0]) {
    case CMD_BEAT: /* the heartbeat: its arrival is what counts */
        return queue_reply(c, RS_OK, NULL, 0);
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
        uint32_t klen = store_get_u32(c->in + 1), vlen = store_get_u32(c->in + 5);
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
        /* a flood of silent connections cannot lock ranks out */
        if (pending >= MAX_PENDING) drop(s, oldest, LOST_CLOSED);
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
        double now = tp_now(), wait_s = 1.0, woke;
        size_t nready = 0, nfds = 2;
        int n;
        for (size_t i = 0; i < s->nconns;) { /* per-connection deadlines */
            conn *c = &s->conns[i];
            if (c->deadline > 0.0 && now > c->deadline) {
                drop(s, i, LOST_CLOSED);
                continue;
            }
            if (c->deadline > 0.0 && c->deadline - now < wait_s) wait_s = c->deadline - now;
            if (c->state == C_READY && s->silence_s > 0.0 && c->seen + s->silence_s - now < wait_s)
                wait_s = c->seen + s->silence_s - now;
            nready += c->state == C_READY;
            i++;
        }
        if (wait_s < 0.0) wait_s = 0.0;
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
        woke = now + wait_s + 0.002;
        n = poll(fds, (nfds_t)nfds, (int)(wait_s * 1000) + 1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        now = tp_now();
        if (now - woke > 0.5) /* this thread did not run (the process was stopped, or starved): not their fault */
            for (size_t i = 0; i < s->nconns; i++) s->conns[i].seen += now - woke;
        /* the connections first, in reverse (drop moves the last one into the hole) */
        for (size_t j = nfds; j-- > 2;) {
            size_t i = j - 2;
            conn *c = &s->conns[i];
            short re = fds[j].revents;
            int bad = 0;
            if (re == 0) continue;
            if (c->state == C_READY && (re & POLLIN)) c->seen = now;
            if (re & POLLOUT) bad = flush_out(c) < 0;
            else if (re & POLLIN) bad = on_readable(s, c, stopping) < 0;
            else bad = 1; /* POLLERR / POLLHUP / POLLNVAL */
            if (!bad && c->state == C_CLOSE && c->out_len == 0) bad = 1;
            if (!bad && c->state == C_READY && c->in_len == 0 && c->out_len == 0) c->deadline = 0.0;
            if (bad) drop(s, i, LOST_CLOSED);
        }
        for (size_t i = s->nconns; s->silence_s > 0.0 && i-- > 0;) { /* after reading: what arrived counts */
            conn *c = &s->conns[i];
            if (c->state != C_READY || now - c->seen <= s->silence_s) continue;
            tp_log(TP_LOG_WARN, "store: rank %d (%s) has sent nothing for %.1f s (no heartbeat: stopped or frozen, or "
                   "its link is cut); its connection is dropped", c->rank, c->peer, now - c->seen);
            drop(s, i, LOST_SILENT);
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
    for (size_t i = s->nconns; i-- > 0;) drop(s, i, LOST_CLOSED);
    free(fds);
    return NULL;
}

void tp_store_server_free(server *s)
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

tp_status tp_store_server_start(const tp_store_config *cfg, const char *token, double silence_s, server **out,
                                int *port)
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
    s->silence_s = silence_s;
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
    tp_store_server_free(s);
    return st;
}

void tp_store_server_hurry(server *s)
{
    if (s && s->linger_s > 1.0) s->linger_s = 1.0;
}

void tp_store_server_refusals(server *s, char *buf, size_t cap)
{
    buf[0] = '\0';
    if (s == NULL) return;
    pthread_mutex_lock(&s->lock);
    if (s->refused)
        snprintf(buf, cap, "; the store refused %d connection%s (last %s)", s->refused, s->refused > 1 ? "s" : "",
                 s->refusal);
    pthread_mutex_unlock(&s->lock);
}
