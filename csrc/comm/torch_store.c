/* A client of torch's c10d TCPStore: under torchrun, the elastic agent already serves one on
 * MASTER_ADDR:MASTER_PORT and tells its workers to use it (TORCHELASTIC_USE_AGENT_STORE=True), so
 * tplinear joins that store instead of serving a second one on the same port.
 *
 * Wire protocol (torch/csrc/distributed/c10d/TCPStoreBackend.hpp and TCPStoreLibUvBackend.cpp; both
 * server back ends speak it), host byte order throughout:
 *   - on connect the client sends VALIDATE: u8 0, u32 0x3C85F7CE (no reply);
 *   - a string or a payload is u64 length + bytes;
 *   - SET (1): key, payload; no reply;
 *   - GET (3): key; reply payload (torch's own client WAITs for the key first: we CHECK first);
 *   - ADD (4): key, i64 delta; reply i64 new value (a missing key counts as 0);
 *   - CHECK (5): u64 n, n keys; reply u8 0 (READY: all exist) or 1 (NOT_READY).
 * Waiting is client-side polling (CHECK / ADD 0) with a growing sleep, bounded by the store's timeout,
 * and every read and write of the socket is bounded by it too, so a dead agent is an error, not a hang.
 *
 * Every key is put under the namespace the caller gives (group.c: "tplinear/<run id>/<restart count>/"),
 * so a world restarted by --max-restarts never reads the keys of the attempt before it, and tplinear's
 * keys never meet torch's own ("/worker/attempt_N/..."). */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "torch_store.h"

enum { Q_VALIDATE = 0, Q_SET = 1, Q_GET = 3, Q_ADD = 4, Q_CHECK = 5 };
#define VALIDATION_MAGIC 0x3C85F7CEu
#define CHECK_READY 0
#define MAX_VALUE (64u << 20)

struct tp_torch_store {
    pthread_mutex_t lock; /* one request at a time on the socket (groups share the store) */
    int fd;
    double timeout_s;
    char addr[256];
    int port;
    char ns[192];
};

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static tp_status lost(const tp_torch_store *s, const char *what)
{
    return tp_error_errno(TP_ERR_COMM, "torchrun store at %s:%d: %s (did the torchrun agent exit?)", s->addr, s->port,
                          what);
}

/* Waits until fd is ready for `events`, bounded by the store's timeout. */
static tp_status wait_fd(const tp_torch_store *s, short events, const char *what)
{
    struct pollfd p = {.fd = s->fd, .events = events};
    double deadline = tp_now() + s->timeout_s;
    for (;;) {
        double left = deadline - tp_now();
        int n;
        if (left <= 0)
            return tp_error(TP_ERR_TIMEOUT, "torchrun store at %s:%d: timed out after %g s %s", s->addr, s->port,
                            s->timeout_s, what);
        n = poll(&p, 1, (int)(left * 1e3) + 1);
        if (n > 0) return TP_OK;
        if (n < 0 && errno != EINTR) return lost(s, "poll");
    }
}

static tp_status send_all(tp_torch_store *s, const void *buf, size_t n)
{
    tp_status st = TP_OK;
    const char *p = buf;
    while (n > 0) {
        ssize_t k = send(s->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                TP_CHECK(wait_fd(s, POLLOUT, "sending a request"));
                continue;
            }
            return lost(s, "send");
        }
        p += k;
        n -= (size_t)k;
    }
out:
    return st;
}

static tp_status recv_all(tp_torch_store *s, void *buf, size_t n)
{
    tp_status st = TP_OK;
    char *p = buf;
    while (n > 0) {
        ssize_t k;
        TP_CHECK(wait_fd(s, POLLIN, "waiting for a reply"));
        k = recv(s->fd, p, n, MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            return lost(s, "recv");
        }
        if (k == 0) return tp_error(TP_ERR_COMM, "torchrun store at %s:%d closed the connection (did the torchrun "
                                    "agent exit?)", s->addr, s->port);
        p += k;
        n -= (size_t)k;
    }
out:
    return st;
}

/* A request being built: the command byte, then strings and values. */
typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} msg;

static void put(msg *m, const void *p, size_t n)
{
    if (m->failed) return;
    if (m->len + n > m->cap) {
        size_t cap = m->cap ? m->cap : 256;
        char *b;
        while (cap < m->len + n) cap *= 2;
        if ((b = realloc(m->buf, cap)) == NULL) {
            m->failed = 1;
            return;
        }
        m->buf = b;
        m->cap = cap;
    }
    memcpy(m->buf + m->len, p, n);
    m->len += n;
}

static void put_u8(msg *m, uint8_t v) { put(m, &v, 1); }

static void put_bytes(msg *m, const void *p, uint64_t n)
{
    put(m, &n, sizeof n);
    put(m, p, (size_t)n);
}

/* The namespaced key. */
static void put_key(msg *m, const tp_torch_store *s, const char *key)
{
    uint64_t n = strlen(s->ns) + strlen(key);
    put(m, &n, sizeof n);
    put(m, s->ns, strlen(s->ns));
    put(m, key, strlen(key));
}

/* Sends m (and frees it); with reply != NULL reads reply_len bytes back. Under the lock. */
static tp_status exchange(tp_torch_store *s, msg *m, void *reply, size_t reply_len)
{
    tp_status st = TP_OK;
    if (m->failed) {
        free(m->buf);
        return tp_error(TP_ERR_NOMEM, "torchrun store: out of memory");
    }
    pthread_mutex_lock(&s->lock);
    TP_CHECK(send_all(s, m->buf, m->len));
    if (reply) TP_CHECK(recv_all(s, reply, reply_len));
out:
    pthread_mutex_unlock(&s->lock);
    free(m->buf);
    return st;
}

tp_status tp_torch_store_set(tp_torch_store *s, const char *key, const void *val, size_t len)
{
    msg m = {0};
    put_u8(&m, Q_SET);
    put_key(&m, s, key);
    put_bytes(&m, val, len);
    return exchange(s, &m, NULL, 0);
}

tp_status tp_torch_store_add(tp_torch_store *s, const char *key, int64_t delta, int64_t *result)
{
    tp_status st = TP_OK;
    int64_t v = 0;
    msg m = {0};
    put_u8(&m, Q_ADD);
    put_key(&m, s, key);
    put(&m, &delta, sizeof delta);
    TP_CHECK(exchange(s, &m, &v, sizeof v));
    if (result) *result = v;
out:
    return st;
}

/* Whether key exists (one CHECK, no waiting). */
static tp_status check(tp_torch_store *s, const char *key, int *found)
{
    tp_status st = TP_OK;
    uint64_t one = 1;
    uint8_t r = 1;
    msg m = {0};
    put_u8(&m, Q_CHECK);
    put(&m, &one, sizeof one);
    put_key(&m, s, key);
    TP_CHECK(exchange(s, &m, &r, 1));
    *found = r == CHECK_READY;
out:
    return st;
}

/* GET of a key known to exist: the value (up to cap bytes into val, the rest drained), its length. */
static tp_status get_now(tp_torch_store *s, const char *key, void *val, size_t cap, size_t *len)
{
    tp_status st = TP_OK;
    uint64_t n = 0;
    char drain[256];
    msg m = {0};
    int locked = 0;
    put_u8(&m, Q_GET);
    put_key(&m, s, key);
    if (m.failed) {
        st = tp_error(TP_ERR_NOMEM, "torchrun store: out of memory");
        goto out;
    }
    pthread_mutex_lock(&s->lock);
    locked = 1;
    TP_CHECK(send_all(s, m.buf, m.len));
    TP_CHECK(recv_all(s, &n, sizeof n));
    if (n > MAX_VALUE) {
        st = tp_error(TP_ERR_COMM, "torchrun store: the value of '%s%s' has %llu bytes", s->ns, key,
                      (unsigned long long)n);
        goto out;
    }
    if (len) *len = (size_t)n;
    for (uint64_t got = 0; got < n;) {
        size_t k = (size_t)(n - got);
        void *dst;
        if (got < cap) {
            if (k > cap - got) k = (size_t)(cap - got);
            dst = (char *)val + got;
        } else {
            if (k > sizeof drain) k = sizeof drain;
            dst = drain;
        }
        TP_CHECK(recv_all(s, dst, k));
        got += k;
    }
out:
    if (locked) pthread_mutex_unlock(&s->lock);
    free(m.buf);
    return st;
}

tp_status tp_torch_store_get(tp_torch_store *s, const char *key, void *val, size_t cap, size_t *len)
{
    tp_status st = TP_OK;
    double deadline = tp_now() + s->timeout_s, pause = 0.0001;
    int found = 0;
    for (;;) {
        TP_CHECK(check(s, key, &found));
        if (found) break;
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for store key '%s'", s->timeout_s, key);
            goto out;
        }
        sleep_s(pause);
        if (pause < 0.01) pause *= 1.5;
    }
    TP_CHECK(get_now(s, key, val, cap, len));
out:
    return st;
}

tp_status tp_torch_store_wait_ge(tp_torch_store *s, const char *key, int64_t target)
{
    tp_status st = TP_OK;
    double deadline = tp_now() + s->timeout_s, pause = 0.0001;
    int64_t v = 0;
    for (;;) {
        TP_CHECK(tp_torch_store_add(s, key, 0, &v));
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

/* Every rank sets "join/<rank>" and waits for all the others; on timeout names the missing ones. */
static tp_status join(tp_torch_store *s, int rank, int world_size)
{
    tp_status st = TP_OK;
    char key[64], missing[512];
    double deadline = tp_now() + s->timeout_s, pause = 0.0002;
    int one = 1, found = 0, next = 0, nmiss = 0;
    size_t used = 0;
    snprintf(key, sizeof key, "join/%d", rank);
    TP_CHECK(tp_torch_store_set(s, key, &one, sizeof one));
    while (next < world_size) {
        snprintf(key, sizeof key, "join/%d", next);
        TP_CHECK(check(s, key, &found));
        if (found) {
            next++;
            continue;
        }
        if (tp_now() > deadline) break;
        sleep_s(pause);
        if (pause < 0.01) pause *= 1.5;
    }
    if (next == world_size) goto out;
    missing[0] = '\0';
    for (int r = next; r < world_size; r++) {
        snprintf(key, sizeof key, "join/%d", r);
        TP_CHECK(check(s, key, &found));
        if (found) continue;
        if (used + 16 < sizeof missing)
            used += (size_t)snprintf(missing + used, sizeof missing - used, "%s%d", nmiss ? ", " : "", r);
        nmiss++;
    }
    if (nmiss == 0) goto out;
    st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s waiting for rank%s %s of %d to join (through torchrun's store "
                  "at %s:%d)", s->timeout_s, nmiss > 1 ? "s" : "", missing, world_size, s->addr, s->port);
out:
    return st;
}

static tp_status connect_retry(tp_torch_store *s, double deadline)
{
    tp_status st = TP_OK;
    struct addrinfo hints, *res = NULL;
    char portstr[16];
    int rc, fd = -1, one = 1;
    double pause = 0.001;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof portstr, "%d", s->port);
    if ((rc = getaddrinfo(s->addr, portstr, &hints, &res)) != 0) {
        st = tp_error(TP_ERR_VALUE, "torchrun store: cannot resolve MASTER_ADDR '%s': %s", s->addr, gai_strerror(rc));
        goto out;
    }
    for (;;) {
        for (struct addrinfo *a = res; a != NULL && fd < 0; a = a->ai_next) {
            if ((fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol)) < 0) continue;
            if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
            close(fd);
            fd = -1;
        }
        if (fd >= 0) break;
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s connecting to torchrun's store at %s:%d "
                          "(TORCHELASTIC_USE_AGENT_STORE is set: is the torchrun agent running?)", s->timeout_s,
                          s->addr, s->port);
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

tp_status tp_torch_store_open(const char *addr, int port, const char *ns, int rank, int world_size, double timeout_s,
                              tp_torch_store **out)
{
    tp_status st = TP_OK;
    tp_torch_store *s = NULL;
    msg m = {0};
    uint32_t magic = VALIDATION_MAGIC;
    *out = NULL;
    TP_REQUIRE(port > 0 && port < 65536, "torchrun store: MASTER_PORT must be in 1..65535, got %d", port);
    TP_REQUIRE(strlen(ns) < sizeof s->ns, "torchrun store: the key namespace '%s' is too long", ns);
    if ((s = calloc(1, sizeof *s)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "torchrun store: out of memory");
        goto out;
    }
    pthread_mutex_init(&s->lock, NULL);
    s->fd = -1;
    s->timeout_s = timeout_s;
    s->port = port;
    snprintf(s->addr, sizeof s->addr, "%s", addr && addr[0] ? addr : "127.0.0.1");
    snprintf(s->ns, sizeof s->ns, "%s", ns);
    TP_CHECK(connect_retry(s, tp_now() + timeout_s));
    put_u8(&m, Q_VALIDATE);
    put(&m, &magic, sizeof magic);
    TP_CHECK(exchange(s, &m, NULL, 0));
    TP_CHECK(join(s, rank, world_size));
    tp_log(TP_LOG_INFO, "store: rank %d of %d joined torchrun's store at %s:%d (keys under '%s')", rank, world_size,
           s->addr, port, s->ns);
    *out = s;
    s = NULL;
out:
    tp_torch_store_close(s);
    return st;
}

void tp_torch_store_close(tp_torch_store *s)
{
    if (s == NULL) return;
    if (s->fd >= 0) close(s->fd);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
