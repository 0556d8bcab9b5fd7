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
 * Only the primitives live here (set, a non-waiting get, add): waiting, the join and barriers are
 * comm/store.c's, the same for both stores. Every read and write of the socket is bounded by the store's
 * timeout, so a dead agent is an error, not a hang.
 *
 * Every key is put under the namespace the caller gives (store.c: "tplinear/<run id>/<restart count>/<generation>/"),
 * so a world restarted by --max-restarts, or the next init of the same processes, never reads the keys of
 * the world before it, and tplinear's keys never meet torch's own ("/worker/attempt_N/...").
 *
 * torch's store has no authentication: any process that reaches the agent's port reads and writes every key.
 * So every value tplinear sets carries a proof of the world's token, HMAC-SHA-256(token, label | namespaced
 * key | value), appended to it, and every value it reads must prove it: a rank given another token, or a
 * process that is not a rank of this world, cannot make a value that the ranks accept (a join record
 * included), and a value copied from another key, namespace (another run, restart or generation) or world
 * does not prove its new place. Counters (add) are the store's own arithmetic and cannot carry a proof;
 * tplinear's barriers use proved per-rank keys instead (store.c's arrive / wait_all). What torch's store
 * cannot give is secrecy: the values (segment paths, NCCL ids, host names) are readable by whoever reaches
 * the port, as torch's own are (docs/security.md). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "net.h"
#include "torch_store.h"

enum { Q_VALIDATE = 0, Q_SET = 1, Q_GET = 3, Q_ADD = 4, Q_CHECK = 5 };
#define VALIDATION_MAGIC 0x3C85F7CEu
#define CHECK_READY 0
#define MAX_VALUE (64u << 20)
#define PROOF_LABEL "tplinear-torch-store-v1"

struct tp_torch_store {
    pthread_mutex_t lock; /* one request at a time on the socket (groups share the store) */
    int fd;
    double timeout_s;
    char addr[256];
    int port;
    char ns[384];
    char token[TP_TOKEN_MAX + 1];
};

/* The proof that the world's token wrote val under key. */
static void prove(const tp_torch_store *s, const char *key, const void *val, size_t len,
                  unsigned char out[TP_SHA256_BYTES])
{
    tp_hmac m;
    tp_hmac_init(&m, s->token, strlen(s->token));
    tp_hmac_update(&m, PROOF_LABEL, sizeof PROOF_LABEL);
    tp_hmac_update(&m, s->ns, strlen(s->ns));
    tp_hmac_update(&m, key, strlen(key) + 1);
    tp_hmac_update(&m, val, len);
    tp_hmac_final(&m, out);
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

/* The namespaced key. */
static void put_key(msg *m, const tp_torch_store *s, const char *key)
{
    uint64_t n = strlen(s->ns) + strlen(key);
    put(m, &n, sizeof n);
    put(m, s->ns, strlen(s->ns));
    put(m, key, strlen(key));
}

static tp_status io_error(const tp_torch_store *s, int rc)
{
    if (rc == TP_IO_INTR) return TP_ERR_INTERRUPTED; /* the message is set */
    if (rc == TP_IO_TIMEOUT)
        return tp_error(TP_ERR_TIMEOUT, "torchrun store at %s:%d: timed out after %g s waiting for it to answer (the "
                        "torchrun agent stopped or hung?)", s->addr, s->port, s->timeout_s);
    if (rc == TP_IO_EOF)
        return tp_error(TP_ERR_COMM, "torchrun store at %s:%d closed the connection (did the torchrun agent exit?)",
                        s->addr, s->port);
    return tp_error_errno(TP_ERR_COMM, "torchrun store at %s:%d: lost the connection (did the torchrun agent exit?)",
                          s->addr, s->port);
}

/* Sends m (and frees it) and reads the reply by one deadline: reply_len bytes into reply, or with value
 * != NULL a u64 length and that many bytes into a new buffer (*value, *value_len; the caller frees it). */
static tp_status exchange(tp_torch_store *s, msg *m, void *reply, size_t reply_len, unsigned char **value,
                          size_t *value_len)
{
    tp_status st = TP_OK;
    uint64_t n = 0;
    double deadline;
    int rc;
    if (m->failed) {
        free(m->buf);
        return tp_error(TP_ERR_NOMEM, "torchrun store: out of memory");
    }
    pthread_mutex_lock(&s->lock);
    deadline = tp_now() + s->timeout_s;
    rc = tp_net_io(s->fd, m->buf, m->len, deadline, 1);
    if (rc == TP_IO_OK && reply) rc = tp_net_io(s->fd, reply, reply_len, deadline, 0);
    if (rc == TP_IO_OK && value) rc = tp_net_io(s->fd, &n, sizeof n, deadline, 0);
    if (rc != TP_IO_OK) {
        st = io_error(s, rc);
        goto out;
    }
    if (value) {
        if (n > MAX_VALUE) {
            st = tp_error(TP_ERR_COMM, "torchrun store at %s:%d: a value of %llu bytes (more than tplinear ever "
                          "stores)", s->addr, s->port, (unsigned long long)n);
            goto out;
        }
        if ((*value = malloc(n > 0 ? (size_t)n : 1)) == NULL) {
            st = tp_error(TP_ERR_NOMEM, "torchrun store: out of memory");
            goto out;
        }
        *value_len = (size_t)n;
        if ((rc = tp_net_io(s->fd, *value, (size_t)n, deadline, 0)) != TP_IO_OK) {
            free(*value);
            *value = NULL;
            st = io_error(s, rc);
        }
    }
out:
    pthread_mutex_unlock(&s->lock);
    free(m->buf);
    return st;
}

tp_status tp_torch_store_set(tp_torch_store *s, const char *key, const void *val, size_t len)
{
    unsigned char tag[TP_SHA256_BYTES];
    uint64_t n = (uint64_t)len + sizeof tag;
    msg m = {0};
    prove(s, key, val, len, tag);
    put_u8(&m, Q_SET);
    put_key(&m, s, key);
    put(&m, &n, sizeof n);
    put(&m, val, len);
    put(&m, tag, sizeof tag);
    return exchange(s, &m, NULL, 0, NULL, NULL);
}

tp_status tp_torch_store_add(tp_torch_store *s, const char *key, int64_t delta, int64_t *result)
{
    tp_status st = TP_OK;
    int64_t v = 0;
    msg m = {0};
    put_u8(&m, Q_ADD);
    put_key(&m, s, key);
    put(&m, &delta, sizeof delta);
    TP_CHECK(exchange(s, &m, &v, sizeof v, NULL, NULL));
    if (result) *result = v;
out:
    return st;
}

/* A value that does not prove this world's token. */
static tp_status refused(const tp_torch_store *s, const char *key)
{
    return tp_error(TP_ERR_COMM, "torchrun store at %s:%d: the value of '%s%s' does not prove this world's token: "
                    "the rank that wrote it was given another token (TPLINEAR_TOKEN or init_process_group(token=...) "
                    "differ between ranks), or a process that is not a rank of this world wrote it", s->addr,
                    s->port, s->ns, key);
}

tp_status tp_torch_store_try_get(tp_torch_store *s, const char *key, void *val, size_t cap, size_t *len, int *found)
{
    tp_status st = TP_OK;
    uint64_t one = 1;
    uint8_t ready = 1;
    unsigned char *v = NULL, want[TP_SHA256_BYTES];
    size_t n = 0;
    msg m = {0};
    put_u8(&m, Q_CHECK); /* CHECK first: torch's GET of a missing key would wait in the server */
    put(&m, &one, sizeof one);
    put_key(&m, s, key);
    TP_CHECK(exchange(s, &m, &ready, 1, NULL, NULL));
    *found = ready == CHECK_READY;
    if (!*found) goto out;
    memset(&m, 0, sizeof m);
    put_u8(&m, Q_GET);
    put_key(&m, s, key);
    TP_CHECK(exchange(s, &m, NULL, 0, &v, &n));
    if (n < sizeof want) {
        st = refused(s, key);
        goto out;
    }
    n -= sizeof want;
    prove(s, key, v, n, want);
    if (!tp_secret_equal(want, v + n, sizeof want)) {
        st = refused(s, key);
        goto out;
    }
    memcpy(val, v, n < cap ? n : cap);
    if (len) *len = n;
out:
    free(v);
    return st;
}

tp_status tp_torch_store_open(const char *addr, int port, const char *ns, const char *token, double timeout_s,
                              tp_torch_store **out)
{
    tp_status st = TP_OK;
    tp_torch_store *s = NULL;
    msg m = {0};
    uint32_t magic = VALIDATION_MAGIC;
    *out = NULL;
    TP_REQUIRE(port > 0 && port < 65536, "torchrun store: MASTER_PORT must be in 1..65535, got %d", port);
    TP_REQUIRE(strlen(ns) < sizeof s->ns, "torchrun store: the key namespace '%s' is too long", ns);
    TP_REQUIRE(token != NULL && token[0] != '\0' && strlen(token) <= TP_TOKEN_MAX, "torchrun store: no token");
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
    snprintf(s->token, sizeof s->token, "%s", token);
    TP_CHECK(tp_net_dial("torchrun's store", s->addr, port, timeout_s, tp_now() + timeout_s, NULL, NULL,
                         "TORCHELASTIC_USE_AGENT_STORE is set: is the torchrun agent running?", 0, &s->fd));
    put_u8(&m, Q_VALIDATE);
    put(&m, &magic, sizeof magic);
    TP_CHECK(exchange(s, &m, NULL, 0, NULL, NULL));
    tp_log(TP_LOG_INFO, "store: connected to torchrun's store at %s:%d (keys under '%s')", s->addr, port, s->ns);
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
    memset(s->token, 0, sizeof s->token);
    free(s);
}
