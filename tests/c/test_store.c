/* The world's closed club (only ranks that prove the token join) from inside the library: SHA-256 and HMAC-SHA-256 against FIPS 180-2 and
 * RFC 4231 vectors, the token's resolution and derivation, the store's handshake (a wrong token refused on
 * both sides, another generation sent away, a rank that joined and died named at once, a stopped one named
 * at its silence bound, the barrier's
 * timeout naming the missing rank), and the shm segment's proof: a rank handed another world's segment
 * refuses to use it. Internal headers: these are the library's own pieces, not its public API. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../csrc/comm/backend.h"
#include "check.h"
#include "world.h"

extern const tp_backend tp_shm_backend;

static void hexof(const unsigned char *b, size_t n, char *out) { tp_hex(b, n, out); }

static int sha_vectors(void)
{
    static const struct {
        const char *msg;
        const char *hex;
    } V[] = {
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
    };
    unsigned char h[TP_SHA256_BYTES];
    char hex[2 * TP_SHA256_BYTES + 1];
    tp_sha256 c;
    for (size_t i = 0; i < sizeof V / sizeof V[0]; i++) {
        tp_sha256_init(&c);
        tp_sha256_update(&c, V[i].msg, strlen(V[i].msg));
        tp_sha256_final(&c, h);
        hexof(h, sizeof h, hex);
        EXPECT(strcmp(hex, V[i].hex) == 0);
    }
    /* a million 'a', fed in uneven pieces */
    {
        char a[1000];
        memset(a, 'a', sizeof a);
        tp_sha256_init(&c);
        for (int i = 0, k = 0; i < 1000000; i += k) {
            k = 1 + (i % 997);
            if (k > 1000000 - i) k = 1000000 - i;
            tp_sha256_update(&c, a, (size_t)k);
        }
        tp_sha256_final(&c, h);
        hexof(h, sizeof h, hex);
        EXPECT(strcmp(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0);
    }
    return 0;
}

static int hmac_vectors(void)
{
    unsigned char key[131], out[TP_SHA256_BYTES];
    char hex[2 * TP_SHA256_BYTES + 1];
    tp_hmac m;
    /* RFC 4231 test case 1 */
    memset(key, 0x0b, 20);
    tp_hmac_init(&m, key, 20);
    tp_hmac_update(&m, "Hi There", 8);
    tp_hmac_final(&m, out);
    hexof(out, sizeof out, hex);
    EXPECT(strcmp(hex, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7") == 0);
    /* test case 2: a short key */
    tp_hmac_init(&m, "Jefe", 4);
    tp_hmac_update(&m, "what do ya want ", 16);
    tp_hmac_update(&m, "for nothing?", 12);
    tp_hmac_final(&m, out);
    hexof(out, sizeof out, hex);
    EXPECT(strcmp(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843") == 0);
    /* test case 6: a key longer than a block is hashed first */
    memset(key, 0xaa, sizeof key);
    tp_hmac_init(&m, key, sizeof key);
    tp_hmac_update(&m, "Test Using Larger Than Block-Size Key - Hash Key First", 54);
    tp_hmac_final(&m, out);
    hexof(out, sizeof out, hex);
    EXPECT(strcmp(hex, "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54") == 0);
    EXPECT(tp_secret_equal("abcd", "abcd", 4) && !tp_secret_equal("abcd", "abce", 4));
    return 0;
}

static int token_resolution(void)
{
    char a[TP_TOKEN_MAX + 1], b[TP_TOKEN_MAX + 1], big[TP_TOKEN_MAX + 2];
    const char *src = NULL;
    unsetenv("TPLINEAR_TOKEN");
    unsetenv("TORCHELASTIC_RUN_ID");
    unsetenv("PMIX_NAMESPACE");
    unsetenv("OMPI_MCA_ess_base_jobid");
    unsetenv("SLURM_JOB_ID");
    EXPECT_OK(tp_store_token("given", NULL, "h", 1, 2, a, &src));
    EXPECT(strcmp(a, "given") == 0 && strstr(src, "token=") != NULL);
    EXPECT_STATUS(tp_store_token("", NULL, "h", 1, 2, a, &src), TP_ERR_VALUE);
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    EXPECT_STATUS(tp_store_token(big, NULL, "h", 1, 2, a, &src), TP_ERR_VALUE);
    setenv("TPLINEAR_TOKEN", "from-env", 1);
    EXPECT_OK(tp_store_token(NULL, NULL, "h", 1, 2, a, &src));
    EXPECT(strcmp(a, "from-env") == 0 && strcmp(src, "TPLINEAR_TOKEN") == 0);
    /* rank 0's fresh token through the launcher (MPI) comes after init's and TPLINEAR_TOKEN, before the
     * derivation */
    EXPECT_OK(tp_store_token(NULL, "fresh", "h", 1, 2, a, &src));
    EXPECT(strcmp(a, "from-env") == 0);
    EXPECT_OK(tp_store_token("given", "fresh", "h", 1, 2, a, &src));
    EXPECT(strcmp(a, "given") == 0);
    unsetenv("TPLINEAR_TOKEN");
    EXPECT_OK(tp_store_token(NULL, "fresh", "h", 1, 2, a, &src));
    EXPECT(strcmp(a, "fresh") == 0 && strstr(src, "rank 0") != NULL);
    setenv("TPLINEAR_TOKEN", "from-env", 1);
    setenv("TPLINEAR_TOKEN", "", 1);
    EXPECT_STATUS(tp_store_token(NULL, NULL, "h", 1, 2, a, &src), TP_ERR_VALUE);
    unsetenv("TPLINEAR_TOKEN");
    /* derived: the same inputs give the same token, any difference another one */
    setenv("TORCHELASTIC_RUN_ID", "job-1", 1);
    EXPECT_OK(tp_store_token(NULL, NULL, "host0", 29500, 4, a, &src));
    EXPECT(strcmp(src, "TORCHELASTIC_RUN_ID") == 0 && strlen(a) == 64);
    EXPECT_OK(tp_store_token(NULL, NULL, "host0", 29500, 4, b, &src));
    EXPECT(strcmp(a, b) == 0);
    EXPECT_OK(tp_store_token(NULL, NULL, "host0", 29501, 4, b, &src));
    EXPECT(strcmp(a, b) != 0);
    EXPECT_OK(tp_store_token(NULL, NULL, "host0", 29500, 8, b, &src));
    EXPECT(strcmp(a, b) != 0);
    setenv("TORCHELASTIC_RUN_ID", "job-2", 1);
    EXPECT_OK(tp_store_token(NULL, NULL, "host0", 29500, 4, b, &src));
    EXPECT(strcmp(a, b) != 0);
    unsetenv("TORCHELASTIC_RUN_ID");
    setenv("SLURM_JOB_ID", "77", 1);
    setenv("SLURM_STEP_ID", "0", 1);
    EXPECT_OK(tp_store_token(NULL, NULL, "host0", 29500, 4, a, &src));
    setenv("SLURM_STEP_ID", "1", 1);
    EXPECT_OK(tp_store_token(NULL, NULL, "host0", 29500, 4, b, &src));
    EXPECT(strcmp(a, b) != 0 && strcmp(src, "SLURM_JOB_ID") == 0); /* job steps are worlds of their own */
    unsetenv("SLURM_JOB_ID");
    unsetenv("SLURM_STEP_ID");
    return 0;
}

static tp_status open_store(int rank, int size, int port, const char *token, uint64_t gen, double timeout,
                            tp_store **s)
{
    tp_store_config cfg = {.addr = "127.0.0.1", .port = port, .rank = rank, .world_size = size,
                           .timeout_s = timeout, .token = token, .generation = gen};
    return tp_store_open_world(&cfg, s);
}

static int store_ok(int rank, int size, int port)
{
    tp_store *s = NULL;
    char buf[16];
    size_t len = 0;
    int64_t v = 0;
    EXPECT_OK(open_store(rank, size, port, "secret", 1, 10.0, &s));
    if (s == NULL) return 1;
    if (rank == 0) EXPECT_OK(tp_store_set(s, "k", "hello", 5));
    EXPECT_OK(tp_store_get(s, "k", buf, sizeof buf, &len));
    EXPECT(len == 5 && memcmp(buf, "hello", 5) == 0);
    EXPECT_OK(tp_store_add(s, "n", rank + 1, &v));
    EXPECT_OK(tp_store_wait_ge(s, "n", 1 + 2 + 3));
    EXPECT_OK(tp_store_arrive(s, "b", rank));
    EXPECT_OK(tp_store_wait_all(s, "b", size, NULL, "at b"));
    EXPECT(tp_store_generation(s) == 1);
    EXPECT_OK(tp_store_arrive(s, "end", rank)); /* nobody leaves (and takes rank 0's server) too early */
    EXPECT_OK(tp_store_wait_all(s, "end", size, NULL, "at the end"));
    tp_store_close(s);
    return tp_test_failures;
}

static int wrong_token(int rank, int size, int port)
{
    tp_store *s = NULL;
    (void)size;
    if (rank == 0) {
        EXPECT_STATUS(open_store(0, 2, port, "world", 1, 2.0, &s), TP_ERR_TIMEOUT);
        EXPECT(strstr(tp_last_error(), "waiting for rank 1 of 2 to join") != NULL);
        EXPECT(strstr(tp_last_error(), "refused 1 connection") != NULL);
        EXPECT(strstr(tp_last_error(), "token differs") != NULL);
    } else {
        EXPECT_STATUS(open_store(1, 2, port, "intruder", 1, 2.0, &s), TP_ERR_COMM);
        EXPECT(strstr(tp_last_error(), "token differs") != NULL);
    }
    EXPECT(s == NULL);
    return tp_test_failures;
}

static int other_generation(int rank, int size, int port)
{
    tp_store *s = NULL;
    (void)size;
    EXPECT_STATUS(open_store(rank, 2, port, "world", rank == 0 ? 1 : 2, 1.5, &s), TP_ERR_TIMEOUT);
    if (rank == 1)
        EXPECT(strstr(tp_last_error(), "serves world generation 1") != NULL &&
               strstr(tp_last_error(), "this rank is at generation 2") != NULL);
    return tp_test_failures;
}

static int joined_then_died(int rank, int size, int port)
{
    tp_store *s = NULL;
    EXPECT_OK(open_store(rank, size, port, "world", 1, 10.0, &s));
    if (s == NULL) return 1;
    if (rank == 2) _exit(0); /* joined, then gone without a word */
    EXPECT_OK(tp_store_arrive(s, "next", rank));
    EXPECT_STATUS(tp_store_wait_all(s, "next", size, NULL, "at the next phase"), TP_ERR_COMM);
    EXPECT(strstr(tp_last_error(), "rank 2 of 3 (global rank 2) lost its connection") != NULL);
    tp_store_abandon(s);
    tp_store_close(s);
    return tp_test_failures;
}

/* A rank that stops (SIGSTOP after the rendezvous) closes nothing: the others learn of its silence (no
 * heartbeat for TPLINEAR_PEER_SILENCE_MS, 1.5 s by default) in a store wait, not at its 20 s timeout: from
 * rank 0's server when another rank stops ("stopped answering"), from their own unanswered request when rank 0
 * does. The stopped rank is killed by the last one. */
static int stopped(int rank, int size, int port, int victim)
{
    tp_store *s = NULL;
    tp_status st;
    int64_t pid = getpid();
    size_t len = 0;
    double t0, waited;
    char key[16];
    EXPECT_OK(open_store(rank, size, port, "world", 1, 20.0, &s));
    if (s == NULL) return 1;
    if (rank == victim) EXPECT_OK(tp_store_set(s, "pid", &pid, sizeof pid));
    EXPECT_OK(tp_store_get(s, "pid", &pid, sizeof pid, &len));
    if (rank != victim) EXPECT_OK(tp_store_add(s, "ready", 1, NULL));
    if (rank == victim) { /* only the victim waits for the others: a rank that waited too could find rank 0
                           * stopped already, at this wait instead of the next */
        EXPECT_OK(tp_store_wait_ge(s, "ready", size - 1));
        raise(SIGSTOP);
        return 1; /* killed while stopped */
    }
    t0 = tp_now();
    st = tp_store_arrive(s, "next", rank); /* when rank 0 has stopped already, this request finds out */
    if (st == TP_OK) st = tp_store_wait_all(s, "next", size, NULL, "at the next phase");
    EXPECT(st == TP_ERR_COMM);
    waited = tp_now() - t0;
    snprintf(key, sizeof key, "rank %d", victim);
    EXPECT(strstr(tp_last_error(), key) != NULL && strstr(tp_last_error(), "stopped answering") != NULL);
    EXPECT(waited < 6.0); /* 1.5 s, and a loaded machine's slack: far from the 20 s timeout */
    if (rank == (victim == size - 1 ? size - 2 : size - 1)) kill((pid_t)pid, SIGKILL);
    tp_store_abandon(s);
    tp_store_close(s);
    return tp_test_failures;
}

static int stopped_rank0(int rank, int size, int port) { return stopped(rank, size, port, 0); }
static int stopped_rank2(int rank, int size, int port) { return stopped(rank, size, port, 2); }

/* Rank 0 sets up a segment of a world whose token is "A"; rank 1 is handed the segment's path through a
 * store of token "B" (the same generation) and must refuse it. */
static int foreign_segment(int rank, int size, int port)
{
    static int granks[2] = {0, 1};
    tp_store *a = NULL, *b = NULL;
    tp_group g;
    char path[64];
    size_t len = 0;
    EXPECT_OK(open_store(rank, size, port, "A", 1, 10.0, &a));
    if (a == NULL) return 1;
    memset(&g, 0, sizeof g);
    g.size = 2;
    g.world_size = 2;
    g.local_world_size = 2;
    g.global_ranks = granks;
    g.timeout_s = 2.0;
    snprintf(g.prefix, sizeof g.prefix, "seg/");
    if (rank == 0) {
        g.rank = 0;
        g.store = a;
        EXPECT_STATUS(tp_shm_backend.create(&g), TP_ERR_COMM); /* rank 1 refused it, and left */
        EXPECT(strstr(tp_last_error(), "rank 1 of 2 (global rank 1) lost its connection") != NULL &&
               strstr(tp_last_error(), "to map the shm segment") != NULL);
    } else {
        int port_b = free_port();
        EXPECT_OK(tp_store_get(a, "seg/shm/path", path, sizeof path - 1, &len));
        path[len] = '\0';
        EXPECT(strncmp(path, "/proc/", 6) == 0);
        EXPECT_OK(open_store(0, 1, port_b, "B", 1, 10.0, &b));
        if (b == NULL) return 1;
        EXPECT_OK(tp_store_set(b, "seg/shm/path", path, len));
        g.rank = 1;
        g.store = b;
        EXPECT_STATUS(tp_shm_backend.create(&g), TP_ERR_COMM);
        EXPECT(strstr(tp_last_error(), "does not prove this world's token") != NULL);
        EXPECT(g.impl == NULL);
        tp_store_close(b);
    }
    if (rank == 0) tp_store_abandon(a);
    tp_store_close(a);
    return tp_test_failures;
}

static tp_status note_port(void *ctx, int port)
{
    *(int *)ctx = port;
    return TP_OK;
}

/* Rank 0 of a world bootstrapped through a launcher's channel serves on a port the kernel picks and hears
 * which before anyone joins; port 0 is refused where nobody could be told. */
static int kernel_port(void)
{
    tp_store *s = NULL;
    int port = 0;
    char buf[8];
    size_t len = 0;
    tp_store_config cfg = {.addr = "127.0.0.1", .port = 0, .rank = 0, .world_size = 1, .timeout_s = 5.0,
                           .token = "t", .generation = 1, .on_serving = note_port, .ctx = &port};
    EXPECT_OK(tp_store_open_world(&cfg, &s));
    EXPECT(port > 0 && port < 65536);
    EXPECT_OK(tp_store_set(s, "k", "v", 1));
    EXPECT_OK(tp_store_get(s, "k", buf, sizeof buf, &len));
    EXPECT(len == 1 && buf[0] == 'v');
    tp_store_close(s);
    s = NULL;
    cfg.on_serving = NULL;
    EXPECT_STATUS(tp_store_open_world(&cfg, &s), TP_ERR_VALUE);
    cfg.on_serving = note_port;
    cfg.rank = 1;
    cfg.world_size = 2;
    EXPECT_STATUS(tp_store_open_world(&cfg, &s), TP_ERR_VALUE);
    EXPECT(s == NULL);
    return 0;
}

int main(void)
{
    sha_vectors();
    hmac_vectors();
    token_resolution();
    kernel_port();
    EXPECT(run_world(3, store_ok, -1) == 0);
    EXPECT(run_world(2, wrong_token, -1) == 0);
    EXPECT(run_world(2, other_generation, -1) == 0);
    EXPECT(run_world(3, joined_then_died, -1) == 0);
    EXPECT(run_world(3, stopped_rank2, 2) == 0);
    EXPECT(run_world(2, stopped_rank0, 0) == 0);
    EXPECT(run_world(2, foreign_segment, -1) == 0);
    TEST_MAIN_END();
}
