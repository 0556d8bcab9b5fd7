/* Process groups and the shm backend: worlds of 2, 3 and 4 forked processes exercise every collective
 * (all dtypes and ops, counts 0 / 1 / odd / several chunks) through the copying and the single-copy
 * algorithms, subgroups, the staging fast path and the fused bias, mismatch detection, a killed rank, a
 * rank that never joins, and a kernel that refuses single-copy reads (a seccomp filter) at creation and
 * later. The parent only forks and collects exit codes. */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include "check.h"
#include "world.h"

#include "../../csrc/comm/backend.h" /* white box: the generic reduce-scatter-v of a backend without its own */

/* rank k's value at i (small integers: float sums are exact) */
static int64_t val(int k, size_t i, int salt) { return (int64_t)((i * 7 + (size_t)(13 * k + salt)) % 101) - 50; }

static double get(const void *buf, tp_dtype dt, size_t i)
{
    switch (dt) {
    case TP_FLOAT32: return ((const float *)buf)[i];
    case TP_FLOAT64: return ((const double *)buf)[i];
    case TP_INT32: return ((const int32_t *)buf)[i];
    default: return (double)((const int64_t *)buf)[i];
    }
}

static void set(void *buf, tp_dtype dt, size_t i, int64_t v)
{
    switch (dt) {
    case TP_FLOAT32: ((float *)buf)[i] = (float)v; break;
    case TP_FLOAT64: ((double *)buf)[i] = (double)v; break;
    case TP_INT32: ((int32_t *)buf)[i] = (int32_t)v; break;
    default: ((int64_t *)buf)[i] = v; break;
    }
}

static double expect_reduced(int p, size_t i, int salt, tp_reduce_op op, tp_dtype dt)
{
    int64_t s = 0, mx = INT64_MIN, mn = INT64_MAX;
    for (int k = 0; k < p; k++) {
        int64_t v = val(k, i, salt);
        s += v;
        if (v > mx) mx = v;
        if (v < mn) mn = v;
    }
    if (op == TP_MAX) return (double)mx;
    if (op == TP_MIN) return (double)mn;
    if (op == TP_SUM) return (double)s;
    if (dt == TP_INT32 || dt == TP_INT64) return (double)(s / p);
    return dt == TP_FLOAT32 ? (double)((float)s / (float)p) : (double)s / p;
}

static int collectives(tp_group *g)
{
    const int p = tp_group_size(g), r = tp_group_rank(g);
    const tp_dtype dts[] = {TP_FLOAT32, TP_FLOAT64, TP_INT32, TP_INT64};
    const size_t counts[] = {0, 1, 7, 3001};
    for (int d = 0; d < 4; d++) {
        tp_dtype dt = dts[d];
        size_t es = tp_dtype_size(dt);
        for (int c = 0; c < 4; c++) {
            size_t n = counts[c], vc[8], total = 0;
            char *a = malloc((n * (size_t)p + 3 * (size_t)p + 8) * es), *b = malloc((n * (size_t)p + 3 * (size_t)p + 8) * es);
            if (!a || !b) return 1;
            for (int op = TP_SUM; op <= TP_MIN; op++) {
                for (size_t i = 0; i < n; i++) set(a, dt, i, val(r, i, 0));
                EXPECT_OK(tp_all_reduce(g, a, n, dt, (tp_reduce_op)op));
                for (size_t i = 0; i < n; i++) EXPECT(get(a, dt, i) == expect_reduced(p, i, 0, (tp_reduce_op)op, dt));
                /* reduce-scatter of p blocks of n */
                for (size_t i = 0; i < n * (size_t)p; i++) set(a, dt, i, val(r, i, 3));
                EXPECT_OK(tp_reduce_scatter(g, a, b, n, dt, (tp_reduce_op)op));
                for (size_t i = 0; i < n; i++)
                    EXPECT(get(b, dt, i) == expect_reduced(p, (size_t)r * n + i, 3, (tp_reduce_op)op, dt));
            }
            /* all-gather */
            for (size_t i = 0; i < n; i++) set(a, dt, i, val(r, i, 5));
            EXPECT_OK(tp_all_gather(g, a, b, n, dt));
            for (int k = 0; k < p; k++)
                for (size_t i = 0; i < n; i++) EXPECT(get(b, dt, (size_t)k * n + i) == (double)val(k, i, 5));
            /* variable counts */
            for (int k = 0; k < p; k++) total += (vc[k] = n + 3 * (size_t)k);
            for (size_t i = 0; i < vc[r]; i++) set(a, dt, i, val(r, i, 9));
            EXPECT_OK(tp_all_gatherv(g, a, b, vc, dt));
            for (size_t k = 0, off = 0; k < (size_t)p; off += vc[k], k++)
                for (size_t i = 0; i < vc[k]; i++) EXPECT(get(b, dt, off + i) == (double)val((int)k, i, 9));
            EXPECT(total > 0 || n == 0);
            /* reduce-scatter with variable counts, every op: the backend's own, then group.c's generic one
             * (blocks padded to the largest) as a backend without reduce_scatter_v gets it */
            for (int generic = 0; generic < 2; generic++) {
                tp_backend plain = *g->backend;
                const tp_backend *own = g->backend;
                plain.reduce_scatter_v = NULL;
                if (generic) g->backend = &plain;
                for (int op = TP_SUM; op <= TP_MIN; op++) {
                    for (size_t i = 0; i < total; i++) set(a, dt, i, val(r, i, 13));
                    EXPECT_OK(tp_reduce_scatter_v(g, a, b, vc, dt, (tp_reduce_op)op));
                    for (size_t k = 0, off = 0; k < (size_t)p; off += vc[k], k++)
                        if ((int)k == r)
                            for (size_t i = 0; i < vc[k]; i++)
                                EXPECT(get(b, dt, i) == expect_reduced(p, off + i, 13, (tp_reduce_op)op, dt));
                }
                g->backend = own;
            }
            /* broadcast from every root */
            for (int root = 0; root < p; root++) {
                for (size_t i = 0; i < n; i++) set(a, dt, i, val(r, i, 11));
                EXPECT_OK(tp_broadcast(g, a, n, dt, root));
                for (size_t i = 0; i < n; i++) EXPECT(get(a, dt, i) == (double)val(root, i, 11));
            }
            EXPECT_OK(tp_barrier(g));
            free(a);
            free(b);
        }
    }
    return 0;
}

static int staging(tp_group *g)
{
    const int p = tp_group_size(g), r = tp_group_rank(g);
    float out[1000];
    void *ptr = NULL;
    EXPECT_OK(tp_all_reduce_staging(g, sizeof out, &ptr));
    if (ptr != NULL) {
        for (int i = 0; i < 1000; i++) ((float *)ptr)[i] = (float)(i + r);
        EXPECT_STATUS(tp_all_reduce_staged(g, ptr, 1000, TP_FLOAT32, TP_SUM), TP_ERR_VALUE); /* out = staging */
        EXPECT_OK(tp_all_reduce_staged(g, out, 1000, TP_FLOAT32, TP_SUM));
        for (int i = 0; i < 1000; i++) EXPECT(out[i] == (float)(p * i + p * (p - 1) / 2));
    }
    EXPECT_OK(tp_all_reduce_staging(g, (size_t)1 << 40, &ptr)); /* too large: no staging, not an error */
    EXPECT(ptr == NULL);
    return 0;
}

/* tp_all_reduce_bias: (sum in rank order) + bias, bitwise as adding the bias after the sum, from the
 * staging area, in place and into another buffer, for rows of 7 (a row crosses every block boundary). */
static int fused_bias(tp_group *g)
{
    const int p = tp_group_size(g), r = tp_group_rank(g);
    enum { W = 7 };
    const size_t counts[] = {0, 7, 700, 7 * 3001};
    float bias[W];
    for (int j = 0; j < W; j++) bias[j] = 0.25f * (float)j - 0.3f;
    for (int c = 0; c < 4; c++) {
        size_t n = counts[c];
        float *a = malloc((n + 1) * sizeof(float)), *b = malloc((n + 1) * sizeof(float));
        float *want = malloc((n + 1) * sizeof(float));
        void *ptr = NULL;
        if (!a || !b || !want) return 1;
        for (size_t i = 0; i < n; i++) { /* the rank-order float sum of the same values, then + bias */
            float s = 0.0f;
            for (int k = 0; k < p; k++) s = k ? s + (float)val(k, i, 1) / 3.0f : (float)val(k, i, 1) / 3.0f;
            want[i] = s + bias[i % W];
        }
        for (int mode = 0; mode < 3; mode++) {
            const float *in = a;
            for (size_t i = 0; i < n; i++) a[i] = (float)val(r, i, 1) / 3.0f;
            if (mode == 0) {
                EXPECT_OK(tp_all_reduce_staging(g, n * sizeof(float), &ptr));
                if (ptr == NULL) continue; /* larger than the staging area */
                memcpy(ptr, a, n * sizeof(float));
                in = ptr;
            }
            EXPECT_OK(tp_all_reduce_bias(g, in, mode == 1 ? a : b, n, TP_FLOAT32, bias, W));
            EXPECT(n == 0 || memcmp(mode == 1 ? a : b, want, n * sizeof(float)) == 0);
        }
        EXPECT_OK(tp_all_reduce_bias(g, a, a, n, TP_FLOAT32, NULL, 0)); /* no bias: a plain all-reduce */
        free(a);
        free(b);
        free(want);
    }
    {
        float x[14];
        memset(x, 0, sizeof x);
        EXPECT_STATUS(tp_all_reduce_bias(g, x, x, 14, TP_FLOAT32, bias, 4), TP_ERR_VALUE); /* not whole rows */
        EXPECT_STATUS(tp_all_reduce_bias(g, x, x + 1, 13, TP_FLOAT32, NULL, 0), TP_ERR_VALUE); /* overlap */
        EXPECT_STATUS(tp_all_reduce_bias(g, x, x, 14, TP_INT32, bias, 7), TP_ERR_VALUE);
    }
    return 0;
}

static int world(int rank, int size, int port)
{
    tp_group *w = NULL, *even = NULL, *all = NULL;
    int evens[4], ne = 0;
    float x[16];
    EXPECT_OK(world_init(rank, size, port, 30.0, &w));
    if (w == NULL) return 1;
    EXPECT(tp_group_rank(w) == rank && tp_group_size(w) == size && strcmp(tp_group_backend(w), "shm") == 0);
    collectives(w);
    staging(w);
    fused_bias(w);
    /* subgroup of the even ranks (in reverse order) */
    for (int k = size - 1; k >= 0; k--)
        if (k % 2 == 0) evens[ne++] = k;
    EXPECT_OK(tp_group_new(w, evens, ne, &even));
    EXPECT_STATUS(tp_group_new(w, evens, 0, &all), TP_ERR_VALUE); /* invalid: refused on every rank */
    if (rank % 2 == 0) {
        EXPECT(tp_group_rank(even) == (ne - 1 - rank / 2) && tp_group_global_rank(even, 0) == evens[0]);
        for (int i = 0; i < 16; i++) x[i] = (float)rank;
        EXPECT_OK(tp_all_reduce(even, x, 16, TP_FLOAT32, TP_SUM));
        EXPECT(x[3] == (float)(ne * (ne - 1)));
    } else {
        EXPECT(tp_group_rank(even) == -1);
        EXPECT_STATUS(tp_all_reduce(even, x, 16, TP_FLOAT32, TP_SUM), TP_ERR_VALUE);
    }
    /* mismatch: the last rank broadcasts while the others all-reduce */
    {
        int ranks[4] = {0, 1, 2, 3};
        EXPECT_OK(tp_group_new(w, ranks, size, &all));
        if (rank == size - 1)
            EXPECT_STATUS(tp_broadcast(all, x, 16, TP_FLOAT32, 0), TP_ERR_COMM);
        else
            EXPECT_STATUS(tp_all_reduce(all, x, 16, TP_FLOAT32, TP_SUM), TP_ERR_COMM);
        EXPECT(strstr(tp_last_error(), "collective mismatch") != NULL);
        EXPECT_STATUS(tp_barrier(all), TP_ERR_COMM); /* unusable afterwards */
    }
    /* the world goes first; the subgroup still works */
    tp_group_destroy(w);
    if (rank % 2 == 0) EXPECT_OK(tp_barrier(even));
    tp_group_destroy(even);
    tp_group_destroy(all);
    return tp_test_failures;
}

/* Makes the kernel refuse this process's single-copy calls (process_vm_readv / writev) with EPERM, as a
 * container's seccomp profile or Yama's ptrace scope would. Returns 0 when the filter is in place. */
static int refuse_cma(void)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_readv, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_writev, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
    };
    struct sock_fprog prog = {(unsigned short)(sizeof f / sizeof f[0]), f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

/* Rank 1 cannot read its peers' memory: the group notices at creation and every collective takes the
 * copying path (TPLINEAR_SHM_CMA_KB=0 would send every size through single copy otherwise). */
static int refused_at_creation(int rank, int size, int port)
{
    if (rank == 1) EXPECT(refuse_cma() == 0);
    return world(rank, size, port);
}

/* The kernel starts refusing after creation: the next single-copy collective fails on every rank with
 * the reason, and the group stays unusable. */
static int refused_later(int rank, int size, int port)
{
    tp_group *w = NULL;
    double x[4096] = {0};
    EXPECT_OK(world_init(rank, size, port, 10.0, &w));
    if (w == NULL) return 1;
    EXPECT_OK(tp_all_reduce(w, x, 4096, TP_FLOAT64, TP_SUM));
    if (rank == 1) EXPECT(refuse_cma() == 0);
    EXPECT_STATUS(tp_all_reduce(w, x, 4096, TP_FLOAT64, TP_SUM), TP_ERR_COMM);
    EXPECT(strstr(tp_last_error(), "single-copy") != NULL && strstr(tp_last_error(), "rank") != NULL);
    EXPECT(strstr(tp_last_error(), strerror(EPERM)) != NULL);
    EXPECT_STATUS(tp_barrier(w), TP_ERR_COMM);
    tp_group_destroy(w);
    return tp_test_failures;
}

/* A group of one has no fused reduction: tp_all_reduce_bias falls back to the group's all-reduce and a
 * bias pass, with the same result. */
static int alone(int rank, int size, int port)
{
    tp_group *w = NULL;
    EXPECT_OK(world_init(rank, size, port, 10.0, &w));
    if (w == NULL) return 1;
    fused_bias(w);
    tp_group_destroy(w);
    return tp_test_failures;
}

static size_t killed_count = 64; /* all-reduced before and after the kill */

static int killed(int rank, int size, int port)
{
    tp_group *w = NULL;
    double *x = calloc(killed_count, sizeof(double));
    tp_status st = TP_OK;
    if (x == NULL) return 1;
    EXPECT_OK(world_init(rank, size, port, 10.0, &w));
    if (w == NULL) return 1;
    EXPECT_OK(tp_all_reduce(w, x, killed_count, TP_FLOAT64, TP_SUM));
    if (rank == 1) raise(SIGKILL);
    for (int i = 0; i < 1000000 && st == TP_OK; i++) st = tp_all_reduce(w, x, killed_count, TP_FLOAT64, TP_SUM);
    free(x);
    EXPECT(st == TP_ERR_COMM);
    EXPECT(strstr(tp_last_error(), "rank 1") != NULL && strstr(tp_last_error(), "died") != NULL);
    tp_group_destroy(w);
    return tp_test_failures;
}

static int never_joins(int rank, int size, int port)
{
    tp_group *w = NULL;
    if (rank == size - 1) return 0; /* never arrives */
    EXPECT_STATUS(world_init(rank, size, port, 2.0, &w), TP_ERR_TIMEOUT);
    EXPECT(strstr(tp_last_error(), "waiting for rank 2 of 3 to join") != NULL);
    EXPECT(w == NULL);
    return tp_test_failures;
}

int main(void)
{
    setenv("TPLINEAR_SHM_SLOT_KB", "16", 1); /* 8 KB chunks: 3001 elements take several */
    for (int size = 2; size <= 4; size++) EXPECT(run_world(size, world, -1) == 0);
    EXPECT(run_world(1, alone, -1) == 0);
    setenv("TPLINEAR_SHM_ALGO", "oneshot", 1);
    EXPECT(run_world(3, world, -1) == 0);
    setenv("TPLINEAR_SHM_ALGO", "rsag", 1);
    EXPECT(run_world(2, world, -1) == 0);
    unsetenv("TPLINEAR_SHM_ALGO");
    EXPECT(run_world(3, killed, 1) == 0);
    killed_count = 1 << 20; /* 8 MB: single copy */
    EXPECT(run_world(3, killed, 1) == 0);
    EXPECT(run_world(3, never_joins, -1) == 0);
    /* every size through single copy (if this kernel allows it), then none */
    setenv("TPLINEAR_SHM_CMA_KB", "0", 1);
    setenv("TPLINEAR_SHM_ONESHOT_KB", "0", 1);
    for (int size = 2; size <= 4; size++) EXPECT(run_world(size, world, -1) == 0);
    EXPECT(run_world(3, refused_at_creation, -1) == 0);
    EXPECT(run_world(2, refused_later, -1) == 0);
    setenv("TPLINEAR_SHM_CMA", "0", 1);
    EXPECT(run_world(3, world, -1) == 0);
    unsetenv("TPLINEAR_SHM_CMA");
    unsetenv("TPLINEAR_SHM_CMA_KB");
    unsetenv("TPLINEAR_SHM_ONESHOT_KB");
    TEST_MAIN_END();
}
