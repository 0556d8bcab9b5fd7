/* Rendezvous: a small TCP key-value store. Rank 0 runs a server thread (poll loop, one request at a
 * time, no blocking on the server side); every rank, rank 0 included, is a client over TCP. Waiting
 * (get of a missing key, wait_ge) is client-side polling with a growing sleep, bounded by the timeout.
 *
 * Wire format, client -> server: u8 cmd, u32 keylen, key, u32 vallen, val  (little endian, host order)
 *              server -> client: u8 status, u32 len, payload
 * cmd SET stores val; GET replies status 1 + value or status 0 (missing); ADD takes an int64 delta in
 * val and replies the new int64 value. */
#include <errno.h>
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

#include "store.h"
#include "torch_store.h"

enum { CMD_SET = 1, CMD_GET = 2, CMD_ADD = 3 };
#define MAX_KEY 256
#define MAX_VAL (1u << 20)
#define MAX_CLIENTS 1024

typedef struct {
    char *key;
    void *val;
    uint32_t len;
} kv;

typedef struct {
    int listen_fd;
    int wake[2];            /* pipe: a byte asks the server to stop once no client is left */
    pthread_t thread;
    int started;
    double linger_s;        /* how long the server waits for clients to leave after stop */
    kv *items;
    size_t nitems, cap;
} server;

struct tp_store {
    atomic_int refs;
    pthread_mutex_t lock;   /* one request at a time on the socket (groups share the store) */
    int fd;
    int rank, world_size;
    double timeout_s;
    server *srv;            /* rank 0 only */
    char addr[256];
    int port;
    tp_torch_store *torch;  /* torchrun's store instead of ours (tp_store_open_torch): every call goes there */
};

/* ---------------------------------------------------------------- io helpers */

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* 0 on success, -1 on error (errno), 1 on orderly EOF. */
static int read_all(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n > 0) {
        ssize_t k = recv(fd, p, n, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (k == 0) return 1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* ---------------------------------------------------------------- server */

static kv *find(server *s, const char *key)
{
    for (size_t i = 0; i < s->nitems; i++)
        if (strcmp(s->items[i].key, key) == 0) return &s->items[i];
    return NULL;
}

/* Stores a copy of val under key. 0 or -1 (out of memory). */
static int put(server *s, const char *key, const void *val, uint32_t len)
{
    kv *e = find(s, key);
    void *copy = malloc(len > 0 ? len : 1);
    if (copy == NULL) return -1;
    if (len > 0) memcpy(copy, val, len);
    if (e == NULL) {
        if (s->nitems == s->cap) {
            size_t cap = s->cap ? 2 * s->cap : 64;
            kv *items = realloc(s->items, cap * sizeof *items);
            if (items == NULL) {
                free(copy);
                return -1;
            }
            s->items = items;
            s->cap = cap;
        }
        e = &s->items[s->nitems];
        if ((e->key = strdup(key)) == NULL) {
            free(copy);
            return -1;
        }
        e->val = NULL;
        s->nitems++;
    }
    free(e->val);
    e->val = copy;
    e->len = len;
    return 0;
}

static int reply(int fd, uint8_t status, const void *payload, uint32_t len)
{
    unsigned char hdr[5];
    hdr[0] = status;
    memcpy(hdr + 1, &len, 4);
    if (write_all(fd, hdr, 5) < 0) return -1;
    return len > 0 ? write_all(fd, payload, len) : 0;
}

/* Serves one request from fd. 0 ok, -1: drop the client. */
static int serve_one(server *s, int fd)
{
    unsigned char hdr[5];
    uint32_t klen, vlen;
    char key[MAX_KEY + 1];
    void *val = NULL;
    int rc = -1;
    if (read_all(fd, hdr, 5) != 0) return -1;
    memcpy(&klen, hdr + 1, 4);
    if (klen > MAX_KEY || read_all(fd, key, klen) != 0) return -1;
    key[klen] = '\0';
    if (read_all(fd, &vlen, 4) != 0 || vlen > MAX_VAL) return -1;
    if ((val = malloc(vlen > 0 ? vlen : 1)) == NULL) return -1;
    if (vlen > 0 && read_all(fd, val, vlen) != 0) goto out;
    switch (hdr[0]) {
    case CMD_SET:
        rc = put(s, key, val, vlen) == 0 ? reply(fd, 1, NULL, 0) : reply(fd, 2, NULL, 0);
        break;
    case CMD_GET: {
        kv *e = find(s, key);
        rc = e ? reply(fd, 1, e->val, e->len) : reply(fd, 0, NULL, 0);
        break;
    }
    case CMD_ADD: {
        kv *e = find(s, key);
        int64_t cur = 0, delta = 0;
        if (vlen != 8) goto out;
        memcpy(&delta, val, 8);
        if (e && e->len == 8) memcpy(&cur, e->val, 8);
        cur += delta;
        rc = put(s, key, &cur, 8) == 0 ? reply(fd, 1, &cur, 8) : reply(fd, 2, NULL, 0);
        break;
    }
    default:
        break;
    }
out:
    free(val);
    return rc;
}

static void *server_main(void *arg)
{
    server *s = arg;
    struct pollfd fds[MAX_CLIENTS + 2];
    int nclients = 0, stopping = 0, served_any = 0;
    double stop_at = 0.0;
    fds[0] = (struct pollfd){.fd = s->listen_fd, .events = POLLIN};
    fds[1] = (struct pollfd){.fd = s->wake[0], .events = POLLIN};
    for (;;) {
        int n;
        if (stopping && (nclients == 0 || tp_now() - stop_at > s->linger_s)) break;
        n = poll(fds, (nfds_t)(nclients + 2), stopping ? 50 : 1000);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (fds[1].revents & POLLIN) {
            char c;
            if (read(s->wake[0], &c, 1) < 0) break;
            stopping = 1;
            stop_at = tp_now();
            fds[1].events = 0;
        }
        if ((fds[0].revents & POLLIN) && nclients < MAX_CLIENTS) {
            int c = accept(s->listen_fd, NULL, NULL);
            if (c >= 0) {
                int one = 1;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                fds[2 + nclients++] = (struct pollfd){.fd = c, .events = POLLIN};
                served_any = 1;
            }
        }
        for (int i = 2; i < nclients + 2; i++) {
            if (fds[i].revents == 0) continue;
            if ((fds[i].revents & (POLLERR | POLLHUP | POLLNVAL)) && !(fds[i].revents & POLLIN)) {
                close(fds[i].fd);
                fds[i] = fds[--nclients + 2];
                i--;
                continue;
            }
            if ((fds[i].revents & POLLIN) && serve_one(s, fds[i].fd) < 0) {
                close(fds[i].fd);
                fds[i] = fds[--nclients + 2];
                i--;
            }
        }
    }
    (void)served_any;
    for (int i = 2; i < nclients + 2; i++) close(fds[i].fd);
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
    free(s);
}

static tp_status server_start(int port, double linger_s, server **out)
{
    tp_status st = TP_OK;
    server *s = calloc(1, sizeof *s);
    struct sockaddr_in sa;
    int one = 1;
    *out = NULL;
    if (s == NULL) return tp_error(TP_ERR_NOMEM, "store: out of memory");
    s->listen_fd = -1;
    s->wake[0] = s->wake[1] = -1;
    s->linger_s = linger_s;
    if (pipe(s->wake) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: pipe");
        goto out;
    }
    if ((s->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: socket");
        goto out;
    }
    if (setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: setsockopt");
        goto out;
    }
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_ANY);
    sa.sin_port = htons((uint16_t)port);
    if (bind(s->listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: rank 0 cannot serve on port %d (MASTER_PORT)", port);
        goto out;
    }
    if (listen(s->listen_fd, 128) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "store: listen on port %d", port);
        goto out;
    }
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

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static tp_status connect_retry(tp_store *s, double deadline)
{
    tp_status st = TP_OK;
    struct addrinfo hints, *res = NULL;
    char portstr[16];
    int rc, fd = -1, one = 1;
    double pause = 0.001;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof portstr, "%d", s->port);
    if ((rc = getaddrinfo(s->addr, portstr, &hints, &res)) != 0) {
        st = tp_error(TP_ERR_VALUE, "store: cannot resolve MASTER_ADDR '%s': %s", s->addr, gai_strerror(rc));
        goto out;
    }
    for (;;) {
        if ((fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol)) < 0) {
            st = tp_error_errno(TP_ERR_SYSTEM, "store: socket");
            goto out;
        }
        if (connect(fd, res->ai_addr, res->ai_addrlen) == 0) break;
        close(fd);
        fd = -1;
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT,
                          "timed out after %g s connecting to the store of rank 0 at %s:%d (is rank 0 running?)",
                          s->timeout_s, s->addr, s->port);
            goto out;
        }
        sleep_s(pause);
        if (pause < 0.05) pause *= 2;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->fd = fd;
out:
    if (res) freeaddrinfo(res);
    return st;
}

/* One request/reply. *status gets the server's status byte; the payload (up to cap) goes to out. */
static tp_status request(tp_store *s, int cmd, const char *key, const void *val, uint32_t vlen, int *status,
                         void *out, size_t cap, size_t *outlen)
{
    tp_status st = TP_OK;
    unsigned char hdr[5];
    uint32_t klen = (uint32_t)strlen(key), rlen;
    char drain[256];
    int rc;
    if (klen > MAX_KEY || vlen > MAX_VAL) return tp_error(TP_ERR_VALUE, "store: key or value too long");
    pthread_mutex_lock(&s->lock);
    hdr[0] = (unsigned char)cmd;
    memcpy(hdr + 1, &klen, 4);
    if (write_all(s->fd, hdr, 5) < 0 || write_all(s->fd, key, klen) < 0 || write_all(s->fd, &vlen, 4) < 0 ||
        (vlen > 0 && write_all(s->fd, val, vlen) < 0)) {
        st = tp_error_errno(TP_ERR_COMM, "store: lost the connection to rank 0 (did it exit?)");
        goto out;
    }
    if ((rc = read_all(s->fd, hdr, 5)) != 0) {
        st = rc > 0 ? tp_error(TP_ERR_COMM, "store: rank 0 closed the connection (did it exit?)")
                    : tp_error_errno(TP_ERR_COMM, "store: lost the connection to rank 0 (did it exit?)");
        goto out;
    }
    *status = hdr[0];
    memcpy(&rlen, hdr + 1, 4);
    if (outlen) *outlen = rlen;
    for (uint32_t got = 0; got < rlen;) {
        uint32_t k = rlen - got;
        void *dst;
        if (got < cap) {
            if (k > cap - got) k = (uint32_t)(cap - got);
            dst = (char *)out + got;
        } else {
            if (k > sizeof drain) k = sizeof drain;
            dst = drain;
        }
        if (read_all(s->fd, dst, k) != 0) {
            st = tp_error(TP_ERR_COMM, "store: lost the connection to rank 0 (did it exit?)");
            goto out;
        }
        got += k;
    }
    if (*status == 2) st = tp_error(TP_ERR_NOMEM, "store: the server ran out of memory");
out:
    pthread_mutex_unlock(&s->lock);
    return st;
}

tp_status tp_store_set(tp_store *s, const char *key, const void *val, size_t len)
{
    int status;
    if (s->torch) return tp_torch_store_set(s->torch, key, val, len);
    return request(s, CMD_SET, key, val, (uint32_t)len, &status, NULL, 0, NULL);
}

/* One non-waiting get: *found = 0 when the key is missing. */
static tp_status try_get(tp_store *s, const char *key, void *val, size_t cap, size_t *len, int *found)
{
    tp_status st;
    int status = 0;
    st = request(s, CMD_GET, key, NULL, 0, &status, val, cap, len);
    *found = status == 1;
    return st;
}

tp_status tp_store_get(tp_store *s, const char *key, void *val, size_t cap, size_t *len)
{
    tp_status st = TP_OK;
    double deadline = tp_now() + s->timeout_s, pause = 0.0001;
    int found = 0;
    if (s->torch) return tp_torch_store_get(s->torch, key, val, cap, len);
    for (;;) {
        TP_CHECK(try_get(s, key, val, cap, len, &found));
        if (found) break;
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for store key '%s'", s->timeout_s, key);
            goto out;
        }
        sleep_s(pause);
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
    double deadline = tp_now() + s->timeout_s, pause = 0.0001;
    int64_t v = 0;
    if (s->torch) return tp_torch_store_wait_ge(s->torch, key, target);
    for (;;) {
        TP_CHECK(tp_store_add(s, key, 0, &v));
        if (v >= target) break;
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for store key '%s' to reach %lld (at %lld)",
                          s->timeout_s, key, (long long)target, (long long)v);
            goto out;
        }
        sleep_s(pause);
        if (pause < 0.01) pause *= 1.5;
    }
out:
    return st;
}

/* Every rank sets "join/<rank>" and waits for all the others; on timeout names the missing ranks. */
static tp_status join(tp_store *s)
{
    tp_status st = TP_OK;
    char key[64], missing[512];
    double deadline = tp_now() + s->timeout_s, pause = 0.0002;
    int one = 1, found, next = 0, nmiss = 0;
    size_t len, used = 0;
    snprintf(key, sizeof key, "join/%d", s->rank);
    TP_CHECK(tp_store_set(s, key, &one, sizeof one));
    while (next < s->world_size) {
        int v;
        snprintf(key, sizeof key, "join/%d", next);
        TP_CHECK(try_get(s, key, &v, sizeof v, &len, &found));
        if (found) {
            next++;
            continue;
        }
        if (tp_now() > deadline) break;
        sleep_s(pause);
        if (pause < 0.01) pause *= 1.5;
    }
    if (next == s->world_size) goto out;
    missing[0] = '\0';
    for (int r = next; r < s->world_size; r++) {
        int v;
        snprintf(key, sizeof key, "join/%d", r);
        TP_CHECK(try_get(s, key, &v, sizeof v, &len, &found));
        if (found) continue;
        if (used + 16 < sizeof missing)
            used += (size_t)snprintf(missing + used, sizeof missing - used, "%s%d", nmiss ? ", " : "", r);
        nmiss++;
    }
    if (nmiss == 0) goto out;
    st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for rank%s %s of %d to join", s->timeout_s,
                  nmiss > 1 ? "s" : "", missing, s->world_size);
out:
    return st;
}

tp_status tp_store_open(const char *addr, int port, int rank, int world_size, double timeout_s, tp_store **out)
{
    tp_status st = TP_OK;
    tp_store *s = NULL;
    double deadline = tp_now() + timeout_s;
    *out = NULL;
    TP_REQUIRE(port > 0 && port < 65536, "store: MASTER_PORT must be in 1..65535, got %d", port);
    if ((s = calloc(1, sizeof *s)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "store: out of memory");
        goto out;
    }
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->lock, NULL);
    s->fd = -1;
    s->rank = rank;
    s->world_size = world_size;
    s->timeout_s = timeout_s;
    s->port = port;
    snprintf(s->addr, sizeof s->addr, "%s", addr ? addr : "127.0.0.1");
    if (rank == 0) TP_CHECK(server_start(port, timeout_s < 10.0 ? timeout_s : 10.0, &s->srv));
    TP_CHECK(connect_retry(s, deadline));
    TP_CHECK(join(s));
    tp_log(TP_LOG_INFO, "store: rank %d of %d joined at %s:%d", rank, world_size, s->addr, port);
    *out = s;
    s = NULL;
out:
    tp_store_close(s);
    return st;
}

tp_status tp_store_open_torch(const char *addr, int port, const char *ns, int rank, int world_size,
                              double timeout_s, tp_store **out)
{
    tp_status st = TP_OK;
    tp_store *s = NULL;
    *out = NULL;
    if ((s = calloc(1, sizeof *s)) == NULL) return tp_error(TP_ERR_NOMEM, "store: out of memory");
    atomic_init(&s->refs, 1);
    pthread_mutex_init(&s->lock, NULL);
    s->fd = -1;
    s->rank = rank;
    s->world_size = world_size;
    s->timeout_s = timeout_s;
    TP_CHECK(tp_torch_store_open(addr, port, ns, rank, world_size, timeout_s, &s->torch));
    *out = s;
    s = NULL;
out:
    tp_store_close(s);
    return st;
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
    free(s);
}

double tp_store_timeout(const tp_store *s) { return s->timeout_s; }
