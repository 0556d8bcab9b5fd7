/* The shm backend: collectives between the processes of one host through one POSIX shared segment
 * per group.
 *
 * Segment: header (futex word, failure flag and message) | one control block per rank (step counter,
 * pid, heartbeat, "left" flag, fingerprints) each padded to cache lines | one data slot per rank.
 * Each slot has two halves used alternately by successive rounds ("chunks"), so a rank may fill the
 * next half while slower peers still read the previous one.
 *
 * Synchronisation is one primitive: a rank bumps its own step counter ("post") and waits until every
 * rank's counter has reached the same value ("wait_all"). Because every rank posts the same sequence
 * of steps as long as they call the same collectives, the first step of each collective also checks
 * the fingerprints (sequence number, kind, bytes, dtype, op, root): a mismatch fails every rank
 * instead of corrupting memory. Invariant that makes two halves enough: a rank posts the first step
 * of round i+1 only after it has finished reading the slots of round i.
 *
 * Waiting: spin (adaptive budget up to 50 us, shrunk while spinning keeps failing, e.g. when a peer
 * shares this core; 2 us when there are more ranks than cores), then sched_yield for up to 200 us, then
 * sleep on a shared (not PRIVATE) futex word that every post increments (a poster only calls FUTEX_WAKE
 * when someone sleeps). Each wait is bounded by the group's timeout and checks, every 50 ms, whether
 * the ranks it waits for are alive (kill(pid, 0), zombie state in /proc) or have destroyed the group,
 * and whether the interrupt hook (Python's signal handlers) stops the wait.
 * Any failure (dead peer, timeout, mismatch, abort, interrupt) marks the segment failed (first message wins) and
 * wakes everybody; the group stays unusable afterwards (every call fails at once).
 *
 * Algorithms, by size (the same choice on every rank: sizes are fingerprinted, thresholds come from
 * rank 0's header):
 * - single copy (where every rank may read and write its peers' memory with process_vm_readv/writev,
 *   tested at creation; from 16 KB of the collective's total bytes when every rank has a core, else
 *   for all-reduce and reduce-scatter from 4 MB only; TPLINEAR_SHM_CMA_KB sets one threshold for all):
 *   the ranks' own buffers are read (and, for the all-reduce, written) directly, each byte crossing once.
 *   All-reduce: the ranks take turns over cache-sized pieces; a rank reduces its pieces of every input
 *   and writes each reduced piece into every rank's output (two steps). Reduce-scatter: rank r reduces
 *   block r of every input into its output. All-gather(v) and broadcast: every rank reads the others' inputs into place. Each
 *   takes one step to publish the buffers' addresses and one after the last access, so no buffer is
 *   touched after its owner returned. TPLINEAR_SHM_CMA=0 turns it off (the copying algorithms below).
 * - copying through the segment: an all-reduce of up to TPLINEAR_SHM_ONESHOT_KB (default 64 KB; in
 *   practice up to the single-copy threshold) is one-shot (copy in, one step, every rank reduces all
 *   slots in rank order). Larger ones run in rounds of the chunk size (128 KB, cache-resident, when every
 *   rank has a core; 1 MB otherwise): at 2 ranks one-shot per chunk (same memory traffic as
 *   reduce-scatter + all-gather, half the steps), above that reduce-scatter + all-gather per chunk (two
 *   steps). all_gather(v), reduce_scatter and broadcast take one step per chunk. Rank 0 chooses chunk
 *   and algorithm (env: TPLINEAR_SHM_CHUNK_KB, TPLINEAR_SHM_ALGO=oneshot|rsag, TPLINEAR_SHM_SLOT_KB for
 *   the slot size, default 8 MB, whose half bounds the staging buffer).
 * Reductions are in rank order everywhere (each element is reduced by one rank, or by every rank the same
 * way), so every rank gets bitwise identical results. A row-parallel layer's bias is added right after
 * an element's reduction (tp_all_reduce_bias), not in a second pass over the output.
 *
 * The segment has no name in /dev/shm: rank 0 makes it with memfd_create (sealed against resizing) and
 * the others open it through /proc/<rank 0's pid>/fd/<fd>, a path they learn from the rendezvous store
 * (which only the world's ranks can read) and that only processes of the same user can open; rank 0
 * closes its descriptor once every rank has mapped the segment. Nothing is left behind whoever fails or
 * is killed during setup. The header carries a proof of the world's token (tp_store_proof over the
 * group, its size and the world's generation) that every other rank checks before it trusts the
 * segment: a foreign or stale segment is refused.
 *
 * Watchdog: a wait that lasts TPLINEAR_WATCHDOG_S (default 30) logs once which collective this rank is
 * in and which ranks it waits for (with each one's last collective, pid and liveness), as the timeout's
 * error does.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"

#define CL 64
#define TP_SHM_MAX_RANKS 256 /* the largest group the shm backend serves */
#define SHM_MAGIC 0x74706c696e736d32ull /* "tplinsm2" */
#define MSG_CAP 512

typedef struct {
    _Alignas(CL) _Atomic uint64_t step; /* written only by its rank, read by everyone */
    _Alignas(CL) _Atomic int pid;
    _Atomic int left;
    _Atomic uint64_t heartbeat_ms;
    tp_fingerprint fp[2]; /* by sequence parity */
    /* single-copy collectives: this rank's buffers of the current one (0: the input is in its slot),
     * written before its first step and read by peers only between that step and its last */
    uint64_t cma_src, cma_dst;
    /* creation: where peers probe this process's memory, the value they must find, their verdict */
    uint64_t probe_addr, probe_val;
    _Atomic int cma_ok;
} rank_ctrl;

typedef struct {
    uint64_t magic;
    uint64_t slot_bytes;
    uint64_t chunk_bytes; /* rounds of the chunked algorithms, chosen by rank 0 */
    uint64_t oneshot_bytes; /* all-reduce algorithm choices, by rank 0 so that every rank agrees */
    int32_t oneshot_big;
    int32_t nranks;
    /* single-copy collectives from this many bytes on (UINT64_MAX: never), by rank 0: the reductions
     * (all-reduce, reduce-scatter) and the copies (all-gather, broadcast) */
    uint64_t cma_reduce_bytes, cma_copy_bytes;
    _Alignas(CL) _Atomic uint32_t futex; /* bumped by every post */
    _Atomic int32_t nwaiters;
    _Alignas(CL) _Atomic int failed; /* 0 ok, 1 message being written, 2 failed */
    char fail_msg[MSG_CAP];
    unsigned char proof[TP_SHA256_BYTES]; /* rank 0's proof of the world's token */
} shm_header;

typedef struct {
    char *base;
    size_t map_bytes;
    shm_header *hdr;
    rank_ctrl *ctrl;
    char *slots;
    size_t slot_bytes, half, oneshot, chunk;
    int oneshot_big; /* chunked one-shot for every size */
    uint64_t cma_reduce_bytes, cma_copy_bytes; /* the header's, or UINT64_MAX where refused */
    size_t cma_piece;    /* bytes per peer read into tmp at a time (cache-resident) */
    char *tmp;           /* (p - 1) * cma_piece bytes: peers' pieces of the block this rank reduces */
    uint64_t probe;      /* the value peers must read at &probe when they test single-copy access */
    int p, r;
    const int *granks; /* global rank of each group rank (the group's array) */
    uint64_t step, seq, round;
    double spin_s, yield_s, timeout_s, watchdog_s;
    double spin_cur; /* adaptive spin budget: shrinks while spinning fails (peer not running), regrows */
    int log_level;
    tp_broken broken;
    char name[96];
} shm_impl;

/* ---------------------------------------------------------------- helpers */

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static uint64_t now_ms(void) { return (uint64_t)(tp_now() * 1e3); }

/* "all_reduce of 1024 float32 (sum) as collective #12": the collective and its sequence number. */
static void describe(const tp_fingerprint *f, char *buf, size_t cap)
{
    size_t used;
    if (tp_fp_describe(f, buf, cap) < 0) {
        snprintf(buf, cap, "no collective yet");
        return;
    }
    used = strlen(buf);
    snprintf(buf + used, cap - used, " as collective #%llu", (unsigned long long)f->seq);
}

static void futex_wake_all(_Atomic uint32_t *w)
{
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static void futex_wait(_Atomic uint32_t *w, uint32_t val, double seconds)
{
    struct timespec ts;
    if (seconds < 0) seconds = 0;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    /* EAGAIN (the word moved), ETIMEDOUT and EINTR all just mean "look again" */
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT, val, &ts, NULL, 0);
}

static void wake(shm_impl *im)
{
    atomic_fetch_add(&im->hdr->futex, 1);
    if (atomic_load(&im->hdr->nwaiters) > 0) futex_wake_all(&im->hdr->futex);
}

/* Records the current error message as the group's failure (locally, and in the segment when mark). */
static tp_status fail(shm_impl *im, tp_status st, int mark)
{
    const char *msg = tp_last_error();
    tp_broken_record(&im->broken, st);
    if (mark) {
        int expected = 0;
        if (atomic_compare_exchange_strong(&im->hdr->failed, &expected, 1)) {
            snprintf(im->hdr->fail_msg, sizeof im->hdr->fail_msg, "%s", msg);
            atomic_store(&im->hdr->failed, 2);
        }
        wake(im);
    }
    return st;
}

/* A peer marked the segment failed: adopt its message. */
static tp_status fail_from_segment(shm_impl *im)
{
    double until = tp_now() + 0.1;
    while (atomic_load(&im->hdr->failed) == 1 && tp_now() < until) cpu_relax();
    if (atomic_load(&im->hdr->failed) == 2)
        tp_error(TP_ERR_COMM, "%s", im->hdr->fail_msg);
    else
        tp_error(TP_ERR_COMM, "the process group failed on another rank");
    return fail(im, TP_ERR_COMM, 0);
}

/* 1 if the process is gone (or a zombie), else 0. */
static int pid_dead(int pid)
{
    char path[64], buf[256];
    FILE *f;
    int dead = 0;
    if (pid <= 0) return 0;
    if (kill(pid, 0) < 0 && errno == ESRCH) return 1;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    if ((f = fopen(path, "r")) == NULL) return 0;
    if (fgets(buf, sizeof buf, f) != NULL) {
        char *p = strrchr(buf, ')');
        if (p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X')) dead = 1;
    }
    fclose(f);
    return dead;
}

/* The last collective rank j began (of its two fingerprint slots, the later one). */
static const tp_fingerprint *latest(shm_impl *im, int j)
{
    const tp_fingerprint *a = &im->ctrl[j].fp[0], *b = &im->ctrl[j].fp[1];
    return b->seq > a->seq ? b : a;
}

/* What a wait is stuck on, for the watchdog and the timeout: "all_reduce #12 of 1024 float32 (sum): ...
 * rank 1 (global rank 1, pid 4242, alive, last in all_reduce #11 of 1024 float32 (sum))", the first few
 * ranks whose step is below target. */
static void waiting_for(shm_impl *im, uint64_t target, char *buf, size_t cap, int *count)
{
    size_t used = 0;
    char d[160];
    *count = 0;
    buf[0] = '\0';
    for (int j = 0; j < im->p; j++) {
        const tp_fingerprint *last = latest(im, j);
        int pid;
        if (atomic_load(&im->ctrl[j].step) >= target) continue;
        if ((*count)++ >= 4) continue;
        pid = atomic_load(&im->ctrl[j].pid);
        describe(last, d, sizeof d);
        if (used + 32 < cap)
            used += (size_t)snprintf(buf + used, cap - used, "%srank %d (global rank %d, pid %d, %s, last in %s)",
                                     *count > 1 ? "; " : "", j, im->granks[j], pid, pid_dead(pid) ? "dead" : "alive", d);
    }
    if (*count > 4 && used + 32 < cap) snprintf(buf + used, cap - used, "; and %d more", *count - 4);
}

/* Checks the ranks this rank waits for: gone, or left the group. */
static tp_status check_peers(shm_impl *im, uint64_t target, const char *what)
{
    for (int j = 0; j < im->p; j++) {
        int pid;
        if (j == im->r || atomic_load(&im->ctrl[j].step) >= target) continue;
        pid = atomic_load(&im->ctrl[j].pid);
        if (pid_dead(pid))
            return tp_error(TP_ERR_COMM, "%s: rank %d of the group (global rank %d, pid %d) died", what, j,
                            im->granks[j], pid);
        if (atomic_load(&im->ctrl[j].left))
            return tp_error(TP_ERR_COMM, "%s: rank %d (global rank %d) destroyed the process group while this rank "
                            "waited for it", what, j, im->granks[j]);
    }
    return TP_OK;
}

/* Waits until every rank's step reaches this rank's step. */
static tp_status wait_all(shm_impl *im, const char *what)
{
    const uint64_t target = im->step;
    int j = 0;
    double start, deadline, next_check, watch_at, next_hook = 0.0;
    char mine[160], who[768];
    while (j < im->p && atomic_load_explicit(&im->ctrl[j].step, memory_order_acquire) >= target) j++;
    if (j == im->p) return TP_OK;
    start = tp_now();
    for (unsigned it = 1;; it++) { /* spin */
        while (j < im->p && atomic_load_explicit(&im->ctrl[j].step, memory_order_acquire) >= target) j++;
        if (j == im->p) {
            im->spin_cur = im->spin_cur * 2 < im->spin_s ? im->spin_cur * 2 : im->spin_s;
            return TP_OK;
        }
        cpu_relax();
        if ((it & 31) == 0) {
            if (atomic_load_explicit(&im->hdr->failed, memory_order_relaxed)) return fail_from_segment(im);
            if (tp_now() - start > im->spin_cur) break;
        }
    }
    im->spin_cur = im->spin_cur / 2 > 1e-6 ? im->spin_cur / 2 : 1e-6;
    /* yield: lets a peer that shares this core run (more ranks than cores, or a busy machine) */
    while (tp_now() - start < im->yield_s) {
        sched_yield();
        while (j < im->p && atomic_load_explicit(&im->ctrl[j].step, memory_order_acquire) >= target) j++;
        if (j == im->p) return TP_OK;
        if (atomic_load_explicit(&im->hdr->failed, memory_order_relaxed)) return fail_from_segment(im);
    }
    deadline = start + im->timeout_s;
    next_check = start + 0.05;
    watch_at = im->watchdog_s > 0 ? start + im->watchdog_s : deadline + 1.0;
    atomic_store(&im->ctrl[im->r].heartbeat_ms, now_ms());
    for (;;) {
        uint32_t v = atomic_load(&im->hdr->futex);
        double now;
        while (j < im->p && atomic_load(&im->ctrl[j].step) >= target) j++;
        if (j == im->p) return TP_OK;
        if (atomic_load(&im->hdr->failed)) return fail_from_segment(im);
        if (tp_wait_check(&next_hook, what) != TP_OK) { /* the peers learn who stopped, this rank why */
            describe(&im->ctrl[im->r].fp[im->seq & 1], mine, sizeof mine);
            tp_error(TP_ERR_INTERRUPTED, "%s: rank %d of the group (global rank %d) was interrupted by a signal "
                     "(Ctrl-C, or a signal handler that raised) in %s", what, im->r, im->granks[im->r], mine);
            return fail(im, TP_ERR_INTERRUPTED, 1);
        }
        now = tp_now();
        if (now > next_check) {
            tp_status st = check_peers(im, target, what);
            if (st != TP_OK) return fail(im, st, 1);
            atomic_store(&im->ctrl[im->r].heartbeat_ms, now_ms());
            next_check = now + 0.05;
        }
        if (now > deadline || now > watch_at) {
            int n;
            describe(&im->ctrl[im->r].fp[im->seq & 1], mine, sizeof mine);
            waiting_for(im, target, who, sizeof who, &n);
            if (now <= deadline) { /* the watchdog: once per wait */
                tp_log(TP_LOG_WARN, "%s: rank %d of the group (global rank %d) has waited %.0f s in %s for %s; the "
                       "wait ends at the timeout of %g s", what, im->r, im->granks[im->r], now - start, mine, who,
                       im->timeout_s);
                watch_at = deadline + 1.0;
            } else {
                tp_error(TP_ERR_TIMEOUT, "%s: timed out after %g s in %s waiting for %s (group of %d)", what,
                         im->timeout_s, mine, who, im->p);
                return fail(im, TP_ERR_TIMEOUT, 1);
            }
        }
        atomic_fetch_add(&im->hdr->nwaiters, 1);
        if (atomic_load(&im->ctrl[j].step) < target && !atomic_load(&im->hdr->failed))
            futex_wait(&im->hdr->futex, v, deadline - now < 0.02 ? deadline - now : 0.02);
        atomic_fetch_sub(&im->hdr->nwaiters, 1);
    }
}

static void post(shm_impl *im)
{
    im->step++;
    atomic_store_explicit(&im->ctrl[im->r].step, im->step, memory_order_release);
    atomic_fetch_add(&im->hdr->futex, 1);
    if (atomic_load(&im->hdr->nwaiters) > 0) futex_wake_all(&im->hdr->futex);
}

/* Starts a collective: refuses on a failed group, writes this rank's fingerprint. */
static tp_status begin(shm_impl *im, int kind, uint64_t bytes, tp_dtype dt, int op, int root, uint64_t extra)
{
    tp_fingerprint *f;
    tp_status st = tp_broken_check(&im->broken);
    if (st != TP_OK) return st;
    if (atomic_load(&im->hdr->failed)) return fail_from_segment(im);
    f = &im->ctrl[im->r].fp[im->seq & 1];
    f->seq = im->seq;
    f->kind = kind;
    f->bytes = bytes;
    f->dtype = (int32_t)dt;
    f->op = op;
    f->root = root;
    f->extra = extra;
    return TP_OK;
}

/* After the collective's first wait: every rank's fingerprint must equal rank 0's. The message is the
 * same on every rank (the first rank that differs from rank 0). */
static tp_status check_fingerprints(shm_impl *im)
{
    const tp_fingerprint *f0 = &im->ctrl[0].fp[im->seq & 1];
    for (int j = 1; j < im->p; j++) {
        const tp_fingerprint *fj = &im->ctrl[j].fp[im->seq & 1];
        if (!tp_fp_equal(f0, fj)) {
            char a[160], b[160];
            describe(fj, a, sizeof a);
            describe(f0, b, sizeof b);
            if (fj->seq != f0->seq) { /* out of step: a slot is stale; name the collective each rank is in */
                describe(latest(im, j), a, sizeof a);
                describe(latest(im, 0), b, sizeof b);
                tp_error(TP_ERR_COMM, "collective mismatch: rank %d is in %s while rank 0 is in %s (the ranks called "
                         "different collectives, or a different number of them)", j, a, b);
            }
            else
                tp_error(TP_ERR_COMM, "collective mismatch: rank %d called %s, rank 0 called %s", j, a, b);
            return fail(im, TP_ERR_COMM, 1);
        }
    }
    return TP_OK;
}

/* post + wait; on the collective's first step also the fingerprint check. */
static tp_status sync_step(shm_impl *im, int first, const char *what)
{
    tp_status st;
    post(im);
    if ((st = wait_all(im, what)) != TP_OK) return st;
    return first ? check_fingerprints(im) : TP_OK;
}

static void end(shm_impl *im, int kind, uint64_t bytes, double t0)
{
    im->seq++;
    tp_coll_trace(im->log_level, "shm", kind, im->seq - 1, bytes, im->p, t0);
}

static char *slot(shm_impl *im, int rank, uint64_t chunk)
{
    return im->slots + (size_t)rank * im->slot_bytes + (size_t)(chunk & 1) * im->half;
}

/* ---------------------------------------------------------------- collectives */

/* Block k of p of n elements, in whole cache lines (unit elements each): [*lo, *hi). */
static void block_of(size_t n, size_t unit, int p, int k, size_t *lo, size_t *hi)
{
    size_t units = (n + unit - 1) / unit;
    *lo = units * (size_t)k / (size_t)p * unit;
    *hi = units * (size_t)(k + 1) / (size_t)p * unit;
    if (*hi > n) *hi = n;
    if (*lo > n) *lo = n;
}

/* ---------------------------------------------------------------- single copy (CMA)
 *
 * Large collectives read the peers' own buffers with process_vm_readv (cross-memory attach): each byte
 * crosses once, straight from the process that has it to the one that needs it, instead of being copied
 * into the segment and out again. Each rank publishes its buffers' addresses in its control block before
 * the collective's first step; peers read them only after that step and before its last step, which every
 * rank waits for before it returns (so a buffer is never read after its owner got it back). Used only when
 * every rank could read every peer's memory at creation (same user, no Yama ptrace restriction, no seccomp
 * filter refusing the call); a read refused later fails the group like a dead peer. */

/* Moves n bytes between this process (local) and address `at` of group rank j's process: a read
 * (process_vm_readv) or, with write, a write (process_vm_writev). */
static tp_status cma_move(shm_impl *im, int j, void *local, uint64_t at, size_t n, int write, const char *what)
{
    char *d = local;
    while (n > 0) {
        struct iovec mine = {d, n}, theirs = {(void *)(uintptr_t)at, n};
        int pid = atomic_load(&im->ctrl[j].pid);
        ssize_t got = write ? process_vm_writev(pid, &mine, 1, &theirs, 1, 0)
                            : process_vm_readv(pid, &mine, 1, &theirs, 1, 0);
        if (got > 0) {
            d += got;
            at += (uint64_t)got;
            n -= (size_t)got;
            continue;
        }
        if (got < 0 && errno == EINTR) continue;
        if (got < 0 && (errno == ESRCH || pid_dead(pid)))
            tp_error(TP_ERR_COMM, "%s: rank %d of the group (global rank %d, pid %d) died", what, j, im->granks[j],
                     pid);
        else if (got < 0)
            tp_error_errno(TP_ERR_COMM, "%s: single-copy %s of %zu bytes %s rank %d (global rank %d, pid %d) failed",
                           what, write ? "write" : "read", n, write ? "to" : "from", j, im->granks[j], pid);
        else
            tp_error(TP_ERR_COMM, "%s: single-copy %s rank %d (global rank %d, pid %d) found %zu bytes unmapped",
                     what, write ? "write to" : "read from", j, im->granks[j], pid, n);
        return fail(im, TP_ERR_COMM, 1);
    }
    return TP_OK;
}

static tp_status cma_read(shm_impl *im, int j, void *dst, uint64_t at, size_t n, const char *what)
{
    return cma_move(im, j, dst, at, n, 0, what);
}

/* Publishes this rank's buffers (src NULL: the input is in its slot) and takes the collective's first step. */
static tp_status cma_begin(shm_impl *im, const void *src, const void *dst, const char *what)
{
    im->ctrl[im->r].cma_src = (uint64_t)(uintptr_t)src;
    im->ctrl[im->r].cma_dst = (uint64_t)(uintptr_t)dst;
    return sync_step(im, 1, what);
}

/* out[0, n) = the reduction, in rank order, of elements [at, at + n) of every rank's input (peers' read
 * piecewise into tmp, or straight from their slots where staged; this rank's from src or its slot). */
static tp_status cma_reduce(shm_impl *im, const char *src, size_t at, char *out, size_t n, tp_dtype dt,
                            tp_reduce_op op, const char *what)
{
    tp_status st = TP_OK;
    const size_t es = tp_dtype_size(dt), per = im->cma_piece / es;
    char *in[TP_SHM_MAX_RANKS];
    for (size_t off = 0; off < n; off += per) {
        size_t m = n - off < per ? n - off : per;
        const size_t pos = (at + off) * es;
        for (int j = 0, t = 0; j < im->p; j++) {
            uint64_t peer = im->ctrl[j].cma_src; /* published before the step this rank waited for */
            if (j == im->r) {
                in[j] = src ? (char *)src + pos : slot(im, j, im->round) + pos;
            } else if (peer == 0) {
                in[j] = slot(im, j, im->round) + pos;
            } else {
                in[j] = im->tmp + (size_t)t++ * im->cma_piece;
                TP_CHECK(cma_read(im, j, in[j], peer + pos, m * es, what));
            }
        }
        tp_reduce_ranks(dt, out + off * es, in, im->p, m, (int)op);
    }
out:
    return st;
}

/* All-reduce between the ranks' own buffers: rank r reduces its pieces of every rank's input into its
 * output and writes each reduced piece straight into every peer's output while it is in cache
 * (reduce-scatter whose all-gather is a push). Two steps; per rank, the bytes read and written from memory
 * are twice the buffer, the least an all-reduce can move. A piece of a peer's buffers is read and written
 * only by the rank that reduces it. */
static tp_status all_reduce_cma(shm_impl *im, const void *src, void *dst, size_t count, tp_dtype dt,
                                tp_reduce_op op, const void *bias, size_t width)
{
    tp_status st = TP_OK;
    const size_t es = tp_dtype_size(dt), per = im->cma_piece / es;
    const size_t unit = CL / es;
    size_t npieces, piece;
    TP_CHECK(cma_begin(im, src, dst, "all_reduce"));
    /* pieces of at most per elements in whole cache lines, at least one per rank; rank r reduces pieces
     * r, r + p, ... (interleaved: the ranks sweep the buffers together; processing them backwards, where
     * the producer wrote last, measured the same) */
    piece = (count + (size_t)im->p * unit - 1) / ((size_t)im->p * unit) * unit;
    if (piece > per) piece = per;
    if (piece == 0) piece = unit;
    npieces = (count + piece - 1) / piece;
    for (size_t q = (size_t)im->r; q < npieces; q += (size_t)im->p) {
        size_t off = q * piece;
        size_t m = count - off < piece ? count - off : piece;
        char *mine = (char *)dst + off * es;
        TP_CHECK(cma_reduce(im, src, off, mine, m, dt, op, "all_reduce"));
        if (bias) tp_bias_add_span(dt, mine, off, m, bias, width);
        for (int k = 1; k < im->p; k++) {
            int j = (im->r + k) % im->p;
            TP_CHECK(cma_move(im, j, mine, im->ctrl[j].cma_dst + off * es, m * es, 1, "all_reduce"));
        }
    }
    TP_CHECK(sync_step(im, 0, "all_reduce"));
    im->round++; /* a staged input used this round's slots */
out:
    return st;
}

/* src == NULL: the input is already in this rank's staging half (tp_all_reduce_staged). bias (may be
 * NULL; `width` values): added to every reduced element (index i gets bias[i % width]) right
 * after its reduction, by the rank that reduces it, as a separate pass after the all-reduce would. */
static tp_status all_reduce_impl(tp_group *g, const void *src, void *dst, size_t count, tp_dtype dt,
                                 tp_reduce_op op, const void *bias, size_t width)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    const size_t es = tp_dtype_size(dt);
    const size_t bytes = count * es;
    const double t0 = tp_coll_t0(im->log_level);
    char *in[TP_SHM_MAX_RANKS];
    TP_CHECK(tp_reduce_check_dtype("shm", dt, "all_reduce"));
    TP_CHECK(begin(im, TP_COLL_ALL_REDUCE, bytes, dt, (int)op, -1, 0));
    if (bytes >= im->cma_reduce_bytes) {
        TP_CHECK(all_reduce_cma(im, src, dst, count, dt, op, bias, width));
    } else if (bytes <= im->oneshot || (im->oneshot_big && src != NULL)) {
        /* one-shot, per chunk: copy in, one step, every rank reduces all slots (2 ranks: same traffic as
         * reduce-scatter + all-gather with half the steps) */
        const size_t per = (bytes <= im->oneshot ? im->half : im->chunk) / es;
        int first = 1;
        for (size_t off = 0; first || off < count; off += per) {
            size_t n = count - off < per ? count - off : per;
            if (src && n) memcpy(slot(im, im->r, im->round), (const char *)src + off * es, n * es);
            TP_CHECK(sync_step(im, first, "all_reduce"));
            first = 0;
            for (int j = 0; j < im->p; j++) in[j] = slot(im, j, im->round);
            if (n) tp_reduce_ranks(dt, (char *)dst + off * es, in, im->p, n, (int)op);
            if (n && bias) tp_bias_add_span(dt, (char *)dst + off * es, off, n, bias, width);
            im->round++;
        }
    } else {
        const size_t per = (src ? im->chunk : im->half) / es; /* elements per chunk */
        const size_t unit = CL / es;      /* ranges in whole cache lines */
        int first = 1;
        for (size_t off = 0; off < count; off += per) {
            size_t n = count - off < per ? count - off : per, lo, hi;
            char *mine = slot(im, im->r, im->round);
            block_of(n, unit, im->p, im->r, &lo, &hi);
            if (src) memcpy(mine, (const char *)src + off * es, n * es);
            TP_CHECK(sync_step(im, first, "all_reduce"));
            first = 0;
            for (int j = 0; j < im->p; j++) in[j] = slot(im, j, im->round) + lo * es;
            if (hi > lo) tp_reduce_ranks(dt, mine + lo * es, in, im->p, hi - lo, (int)op);
            if (hi > lo && bias) tp_bias_add_span(dt, mine + lo * es, off + lo, hi - lo, bias, width);
            TP_CHECK(sync_step(im, 0, "all_reduce"));
            for (int k = 0; k < im->p; k++) {
                size_t klo, khi;
                block_of(n, unit, im->p, k, &klo, &khi);
                if (khi > klo)
                    memcpy((char *)dst + (off + klo) * es, slot(im, k, im->round) + klo * es, (khi - klo) * es);
            }
            im->round++;
        }
    }
    end(im, TP_COLL_ALL_REDUCE, bytes, t0);
out:
    return st;
}

static tp_status shm_all_reduce(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op)
{
    return all_reduce_impl(g, buf, buf, count, dt, op, NULL, 0);
}

static tp_status shm_staging(tp_group *g, size_t bytes, void **ptr)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    *ptr = NULL;
    TP_CHECK(tp_broken_check(&im->broken));
    if (bytes <= im->half) *ptr = slot(im, im->r, im->round);
out:
    return st;
}

/* The staged input's checks; what names the caller. */
static tp_status check_staged(shm_impl *im, const void *out, size_t bytes, const char *what)
{
    char *mine = slot(im, im->r, im->round);
    if (bytes > im->half)
        return tp_error(TP_ERR_VALUE, "%s: %zu bytes exceed the staging area of %zu bytes", what, bytes, im->half);
    if ((const char *)out < mine + im->half && (const char *)out + bytes > mine)
        return tp_error(TP_ERR_VALUE, "%s: the output must not be the staging buffer", what);
    return TP_OK;
}

static tp_status shm_all_reduce_staged(tp_group *g, void *out, size_t count, tp_dtype dt, tp_reduce_op op)
{
    tp_status st = TP_OK;
    TP_CHECK(check_staged(g->impl, out, count * tp_dtype_size(dt), "all_reduce_staged"));
    TP_CHECK(all_reduce_impl(g, NULL, out, count, dt, op, NULL, 0));
out:
    return st;
}

static tp_status shm_all_reduce_bias(tp_group *g, const void *in, void *out, size_t count, tp_dtype dt,
                                     const void *bias, size_t width)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    const size_t bytes = count * tp_dtype_size(dt);
    if (in == slot(im, im->r, im->round)) {
        TP_CHECK(check_staged(im, out, bytes, "all_reduce_bias"));
        in = NULL;
    }
    TP_CHECK(all_reduce_impl(g, in, out, count, dt, TP_SUM, bias, width));
out:
    return st;
}

static tp_status shm_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    const size_t es = tp_dtype_size(dt);
    const double t0 = tp_coll_t0(im->log_level);
    size_t total = 0, maxb = 0, displ[TP_SHM_MAX_RANKS];
    int first = 1;
    for (int j = 0; j < im->p; j++) {
        displ[j] = total * es;
        total += counts[j];
        if (counts[j] * es > maxb) maxb = counts[j] * es;
    }
    TP_CHECK(begin(im, TP_COLL_ALL_GATHER, total * es, dt, 0, -1, tp_hash_counts(counts, im->p)));
    if (total * es >= im->cma_copy_bytes) { /* single copy: each rank reads every peer's input into place */
        TP_CHECK(cma_begin(im, send, recv, "all_gather"));
        for (int k = 0; k < im->p; k++) {
            int j = (im->r + k) % im->p; /* not everyone from rank 0 at once */
            size_t b = counts[j] * es;
            if (b > 0 && j != im->r)
                TP_CHECK(cma_read(im, j, (char *)recv + displ[j], im->ctrl[j].cma_src, b, "all_gather"));
            else if (b > 0 && (const char *)recv + displ[j] != (const char *)send)
                memcpy((char *)recv + displ[j], send, b);
        }
        TP_CHECK(sync_step(im, 0, "all_gather"));
    } else {
        for (size_t off = 0; first || off < maxb; off += im->chunk) {
            size_t mine = counts[im->r] * es;
            if (off < mine) memcpy(slot(im, im->r, im->round), (const char *)send + off,
                                   mine - off < im->chunk ? mine - off : im->chunk);
            TP_CHECK(sync_step(im, first, "all_gather"));
            first = 0;
            for (int j = 0; j < im->p; j++) {
                size_t b = counts[j] * es;
                if (off < b && !(j == im->r && (const char *)recv + displ[j] == (const char *)send))
                    memcpy((char *)recv + displ[j] + off, slot(im, j, im->round),
                           b - off < im->chunk ? b - off : im->chunk);
            }
            im->round++;
        }
    }
    end(im, TP_COLL_ALL_GATHER, total * es, t0);
out:
    return st;
}

static tp_status shm_reduce_scatter(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt,
                                    tp_reduce_op op)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    const size_t es = tp_dtype_size(dt);
    const double t0 = tp_coll_t0(im->log_level);
    const size_t piece = (im->chunk / (size_t)im->p) / CL * CL; /* bytes per destination block per round */
    const size_t per = piece / es;
    char *in[TP_SHM_MAX_RANKS];
    int first = 1;
    TP_CHECK(tp_reduce_check_dtype("shm", dt, "reduce_scatter"));
    TP_CHECK(begin(im, TP_COLL_REDUCE_SCATTER, count * es * (size_t)im->p, dt, (int)op, -1, 0));
    if (count * es * (size_t)im->p >= im->cma_reduce_bytes) { /* single copy: rank r reduces block r of every input */
        TP_CHECK(cma_begin(im, send, recv, "reduce_scatter"));
        TP_CHECK(cma_reduce(im, send, (size_t)im->r * count, recv, count, dt, op, "reduce_scatter"));
        TP_CHECK(sync_step(im, 0, "reduce_scatter"));
    } else {
        for (size_t off = 0; first || off < count; off += per) {
            size_t n = count - off < per ? count - off : per;
            char *mine = slot(im, im->r, im->round);
            for (int k = 0; k < im->p && n > 0; k++)
                memcpy(mine + (size_t)k * piece, (const char *)send + ((size_t)k * count + off) * es, n * es);
            TP_CHECK(sync_step(im, first, "reduce_scatter"));
            first = 0;
            for (int j = 0; j < im->p; j++) in[j] = slot(im, j, im->round) + (size_t)im->r * piece;
            if (n > 0) tp_reduce_ranks(dt, (char *)recv + off * es, in, im->p, n, (int)op);
            im->round++;
        }
    }
    end(im, TP_COLL_REDUCE_SCATTER, count * es * (size_t)im->p, t0);
out:
    return st;
}

/* The reduce-scatter of uneven blocks (counts[k] elements for rank k, one after another in send): the same
 * rounds, each destination's piece as long as its block still has elements. */
static tp_status shm_reduce_scatter_v(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt,
                                      tp_reduce_op op)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    const size_t es = tp_dtype_size(dt);
    const double t0 = tp_coll_t0(im->log_level);
    const size_t piece = (im->chunk / (size_t)im->p) / CL * CL;
    const size_t per = piece / es;
    size_t displ[TP_SHM_MAX_RANKS], total = 0, most = 0;
    char *in[TP_SHM_MAX_RANKS];
    int first = 1;
    TP_CHECK(tp_reduce_check_dtype("shm", dt, "reduce_scatter"));
    for (int k = 0; k < im->p; k++) {
        displ[k] = total;
        total += counts[k];
        if (counts[k] > most) most = counts[k];
    }
    TP_CHECK(begin(im, TP_COLL_REDUCE_SCATTER, total * es, dt, (int)op, -1, tp_hash_counts(counts, im->p)));
    for (size_t off = 0; first || off < most; off += per) {
        char *mine = slot(im, im->r, im->round);
        size_t n;
        for (int k = 0; k < im->p; k++) {
            n = off < counts[k] ? (counts[k] - off < per ? counts[k] - off : per) : 0;
            if (n) memcpy(mine + (size_t)k * piece, (const char *)send + (displ[k] + off) * es, n * es);
        }
        TP_CHECK(sync_step(im, first, "reduce_scatter"));
        first = 0;
        n = off < counts[im->r] ? (counts[im->r] - off < per ? counts[im->r] - off : per) : 0;
        for (int j = 0; j < im->p; j++) in[j] = slot(im, j, im->round) + (size_t)im->r * piece;
        if (n > 0) tp_reduce_ranks(dt, (char *)recv + off * es, in, im->p, n, (int)op);
        im->round++;
    }
    end(im, TP_COLL_REDUCE_SCATTER, total * es, t0);
out:
    return st;
}

static tp_status shm_broadcast(tp_group *g, void *buf, size_t count, tp_dtype dt, int root)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    const size_t bytes = count * tp_dtype_size(dt);
    const double t0 = tp_coll_t0(im->log_level);
    int first = 1;
    TP_CHECK(begin(im, TP_COLL_BROADCAST, bytes, dt, 0, root, 0));
    if (bytes >= im->cma_copy_bytes) { /* single copy: every rank reads the root's buffer */
        TP_CHECK(cma_begin(im, buf, buf, "broadcast"));
        if (im->r != root) TP_CHECK(cma_read(im, root, buf, im->ctrl[root].cma_src, bytes, "broadcast"));
        TP_CHECK(sync_step(im, 0, "broadcast"));
    } else {
        for (size_t off = 0; first || off < bytes; off += im->chunk) {
            size_t n = bytes - off < im->chunk ? bytes - off : im->chunk;
            if (im->r == root && n) memcpy(slot(im, root, im->round), (char *)buf + off, n);
            TP_CHECK(sync_step(im, first, "broadcast"));
            first = 0;
            if (im->r != root && n) memcpy((char *)buf + off, slot(im, root, im->round), n);
            im->round++;
        }
    }
    end(im, TP_COLL_BROADCAST, bytes, t0);
out:
    return st;
}

static tp_status shm_barrier(tp_group *g)
{
    tp_status st = TP_OK;
    shm_impl *im = g->impl;
    const double t0 = tp_coll_t0(im->log_level);
    TP_CHECK(begin(im, TP_COLL_BARRIER, 0, TP_FLOAT32, 0, -1, 0));
    TP_CHECK(sync_step(im, 1, "barrier"));
    end(im, TP_COLL_BARRIER, 0, t0);
out:
    return st;
}

static tp_status shm_abort(tp_group *g)
{
    shm_impl *im = g->impl;
    if (im == NULL) return TP_OK;
    tp_error(TP_ERR_COMM, "the process group was aborted by rank %d (global rank %d)", im->r, g->world_rank);
    fail(im, TP_ERR_COMM, 1);
    tp_clear_error();
    return TP_OK;
}

static void shm_destroy(tp_group *g)
{
    shm_impl *im = g->impl;
    if (im == NULL) return;
    if (im->hdr) {
        atomic_store(&im->ctrl[im->r].left, 1);
        wake(im);
    }
    if (im->base) munmap(im->base, im->map_bytes);
    free(im->tmp);
    free(im);
    g->impl = NULL;
}

/* ---------------------------------------------------------------- creation */

static size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* Decides, identically on every rank, whether the single-copy collectives run: rank 0 enabled them
 * (hdr->cma_*_bytes) and every rank could read every peer's probe value with process_vm_readv. Called once
 * every rank has mapped the segment and published its probe; why gets a line for the log. */
static tp_status cma_setup(tp_group *g, shm_impl *im, char *why, size_t cap)
{
    tp_status st = TP_OK;
    char key[160];
    int ok = 1, all = 1;
    im->cma_reduce_bytes = im->cma_copy_bytes = UINT64_MAX;
    if (im->hdr->cma_reduce_bytes == UINT64_MAX && im->hdr->cma_copy_bytes == UINT64_MAX)
        goto out; /* off on rank 0: nobody probes */
    for (int k = 1; k < im->p && ok; k++) {
        int j = (im->r + k) % im->p;
        uint64_t v = 0;
        struct iovec local = {&v, sizeof v}, remote = {(void *)(uintptr_t)im->ctrl[j].probe_addr, sizeof v};
        int pid = atomic_load(&im->ctrl[j].pid);
        ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (got != (ssize_t)sizeof v || v != im->ctrl[j].probe_val) {
            snprintf(why, cap, "off: process_vm_readv from rank %d: %s", j,
                     got < 0 ? strerror(errno) : "read the wrong value (another pid namespace?)");
            ok = 0;
        } else if (process_vm_writev(pid, &local, 1, &remote, 1, 0) != (ssize_t)sizeof v) { /* the same value */
            snprintf(why, cap, "off: process_vm_writev to rank %d: %s", j, strerror(errno));
            ok = 0;
        }
    }
    atomic_store(&im->ctrl[im->r].cma_ok, ok ? 1 : 2);
    snprintf(key, sizeof key, "%sshm/probed", g->prefix);
    TP_CHECK(tp_store_arrive(g->store, key, g->rank));
    TP_CHECK(tp_store_wait_all(g->store, key, g->size, g->global_ranks, "to test single-copy access"));
    for (int j = 0; j < im->p; j++)
        if (atomic_load(&im->ctrl[j].cma_ok) != 1) {
            if (ok) snprintf(why, cap, "off: rank %d cannot read its peers' memory", j);
            all = 0;
        }
    if (!all) goto out;
    /* pieces of up to 256 KB per peer, at most 768 KB in all: they stay in L2 (measured: 64 KB pieces were
     * 15-25 % slower at 1-16 MB, 1 MB pieces no faster) */
    im->cma_piece = (768 * 1024 / (size_t)(im->p - 1)) / 4096 * 4096;
    if (im->cma_piece > 256 * 1024) im->cma_piece = 256 * 1024;
    if (im->cma_piece < 4096) im->cma_piece = 4096;
    if ((im->tmp = aligned_alloc(4096, (size_t)(im->p - 1) * im->cma_piece)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "shm: out of memory");
        goto out;
    }
    im->cma_reduce_bytes = im->hdr->cma_reduce_bytes;
    im->cma_copy_bytes = im->hdr->cma_copy_bytes;
    if (im->cma_copy_bytes == UINT64_MAX)
        snprintf(why, cap, "(process_vm_readv) for reductions from %llu KB",
                 (unsigned long long)(im->cma_reduce_bytes / 1024));
    else
        snprintf(why, cap, "(process_vm_readv) from %llu KB", (unsigned long long)(im->cma_reduce_bytes / 1024));
out:
    return st;
}

/* What the TPLINEAR_SHM_* knobs make of a group of p ranks: each rank's own sizes and waits, and what rank 0
 * publishes in the header for all (chunk, one-shot, single-copy thresholds). */
typedef struct {
    size_t slot_bytes, oneshot, chunk;
    int oneshot_big;
    double spin_s, yield_s;
    uint64_t cma_reduce_bytes, cma_copy_bytes;
} shm_tune;

static tp_status shm_tuning(int p, shm_tune *t)
{
    tp_status st = TP_OK;
    long slot_kb, oneshot_kb, spin_us, chunk_kb, yield_us, algo, cma, cma_kb;
    int spare = p <= tp_cores_available(); /* every rank has a core */
    size_t chunk, line = (size_t)CL * (size_t)p;
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_SLOT_KB, &slot_kb));
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_ONESHOT_KB, &oneshot_kb));
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_SPIN_US, &spin_us));
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_CHUNK_KB, &chunk_kb));
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_YIELD_US, &yield_us));
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_ALGO, &algo));
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_CMA, &cma));
    TP_CHECK(tp_knob_int(TP_KNOB_SHM_CMA_KB, &cma_kb));
    t->slot_bytes = round_up((size_t)slot_kb * 1024, 2 * 4096);
    t->oneshot = (size_t)oneshot_kb * 1024;
    if (t->oneshot > t->slot_bytes / 2) t->oneshot = t->slot_bytes / 2;
    t->spin_s = spin_us >= 0 ? (double)spin_us * 1e-6 : (spare ? 50e-6 : 2e-6);
    /* large all-reduces: chunked one-shot at 2 ranks (same traffic, half the steps), else reduce-scatter +
     * all-gather; TPLINEAR_SHM_ALGO=oneshot|rsag (choice 0 or 1) forces either */
    t->oneshot_big = algo < 0 ? p == 2 : algo == 0;
    t->yield_s = (double)yield_us * 1e-6;
    /* cache-sized rounds when every rank has a core; big rounds (fewer context switches) when not */
    chunk = chunk_kb > 0 ? (size_t)chunk_kb * 1024 : (spare ? 128 * 1024 : 1024 * 1024);
    chunk = chunk / line * line;
    if (chunk > t->slot_bytes / 2) chunk = t->slot_bytes / 2;
    if (chunk < line) chunk = line;
    t->chunk = chunk;
    /* single copy from 16 KB when every rank has a core; with more ranks than cores its extra step
     * (a context switch each) pays off only for reductions from 4 MB, and a peer's data read p-1
     * times from memory makes all-gather and broadcast slower than copying through the segment at
     * every size measured (up to 64 MB): TPLINEAR_SHM_CMA_KB sets one threshold for all */
    t->cma_reduce_bytes = !cma ? UINT64_MAX : cma_kb >= 0 ? (uint64_t)cma_kb * 1024 : (spare ? 16 : 4096) * 1024ull;
    t->cma_copy_bytes = !cma ? UINT64_MAX : cma_kb >= 0 ? (uint64_t)cma_kb * 1024 : spare ? 16 * 1024ull : UINT64_MAX;
out:
    return st;
}

/* Rank 0: a fresh sealed memfd of im->map_bytes (no name in /dev/shm) in *fd, and the path the other ranks
 * open it by. */
static tp_status segment_create(shm_impl *im, char *path, size_t cap, int *fd)
{
    tp_status st = TP_OK;
    unsigned char rnd[12];
    char hex[2 * sizeof rnd + 1];
    TP_CHECK(tp_random_bytes(rnd, sizeof rnd));
    tp_hex(rnd, sizeof rnd, hex);
    snprintf(im->name, sizeof im->name, "tplinear-%s", hex);
    if ((*fd = memfd_create(im->name, MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "shm: memfd_create");
        goto out;
    }
    if (ftruncate(*fd, (off_t)im->map_bytes) < 0 || fcntl(*fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "shm: sizing the segment to %zu bytes", im->map_bytes);
        goto out;
    }
    snprintf(path, cap, "/proc/%d/fd/%d", (int)getpid(), *fd);
out:
    return st;
}

/* The other ranks: rank 0's segment, by the path it published under key, opened in *fd and checked to have
 * im->map_bytes. */
static tp_status segment_open(tp_group *g, shm_impl *im, const char *key, char *path, size_t cap, int *fd)
{
    tp_status st = TP_OK;
    size_t len = 0;
    struct stat sb;
    TP_CHECK(tp_store_get(g->store, key, path, cap - 1, &len));
    path[len < cap ? len : cap - 1] = '\0';
    snprintf(im->name, sizeof im->name, "%s", path);
    if ((*fd = open(path, O_RDWR | O_CLOEXEC)) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "shm: cannot open rank 0's segment %s (the shm backend needs every "
                            "rank of a group on one host, in one PID namespace, as one user; did rank 0 exit?)",
                            path);
        goto out;
    }
    if (fstat(*fd, &sb) < 0 || !S_ISREG(sb.st_mode) || (size_t)sb.st_size != im->map_bytes) {
        st = tp_error(TP_ERR_VALUE,
                      "shm: segment %s has %lld bytes, expected %zu (TPLINEAR_SHM_SLOT_KB must be equal on all "
                      "ranks)", path, (long long)sb.st_size, im->map_bytes);
        goto out;
    }
out:
    return st;
}

/* Maps the segment and lays out header, control blocks and slots (the data from data_off). */
static tp_status segment_map(shm_impl *im, int fd, size_t data_off)
{
    tp_status st = TP_OK;
    im->base = mmap(NULL, im->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (im->base == MAP_FAILED) {
        im->base = NULL;
        st = tp_error_errno(TP_ERR_SYSTEM, "shm: mmap of %zu bytes", im->map_bytes);
        goto out;
    }
    im->hdr = (shm_header *)im->base;
    im->ctrl = (rank_ctrl *)(im->base + round_up(sizeof(shm_header), CL));
    im->slots = im->base + data_off;
out:
    return st;
}

/* Rank 0: the header every rank reads its tuning from, with the proof of the world's token, then the
 * segment's path under key (which the others wait for). */
static tp_status header_publish(tp_group *g, shm_impl *im, const shm_tune *t, const unsigned char *want,
                                const char *key, const char *path)
{
    tp_status st = TP_OK;
    im->hdr->chunk_bytes = t->chunk;
    im->hdr->oneshot_bytes = im->oneshot;
    im->hdr->oneshot_big = im->oneshot_big;
    im->hdr->cma_reduce_bytes = t->cma_reduce_bytes;
    im->hdr->cma_copy_bytes = t->cma_copy_bytes;
    im->hdr->slot_bytes = im->slot_bytes;
    im->hdr->nranks = g->size;
    memcpy(im->hdr->proof, want, TP_SHA256_BYTES);
    im->hdr->magic = SHM_MAGIC;
    TP_CHECK(tp_store_set(g->store, key, path, strlen(path)));
out:
    return st;
}

/* The other ranks: the segment must be a tplinear segment of this group's size proving the world's token. */
static tp_status header_verify(tp_group *g, shm_impl *im, const unsigned char *want)
{
    if (im->hdr->magic != SHM_MAGIC || im->hdr->nranks != g->size)
        return tp_error(TP_ERR_COMM, "shm: segment %s is not a tplinear segment of %d ranks", im->name, g->size);
    if (!tp_secret_equal(im->hdr->proof, want, TP_SHA256_BYTES))
        return tp_error(TP_ERR_COMM, "shm: refused segment %s: it does not prove this world's token (a foreign or "
                        "stale segment)", im->name);
    return TP_OK;
}

/* This rank's control block: the value peers read to test single-copy access (cma_setup), its pid and first
 * heartbeat (the peers' liveness checks). */
static void cma_probe(tp_group *g, shm_impl *im)
{
    im->probe = ((uint64_t)getpid() << 32) ^ (uint64_t)(tp_now() * 1e9) ^ (uint64_t)(uintptr_t)im;
    im->ctrl[g->rank].probe_addr = (uint64_t)(uintptr_t)&im->probe;
    im->ctrl[g->rank].probe_val = im->probe;
    atomic_store(&im->ctrl[g->rank].pid, (int)getpid());
    atomic_store(&im->ctrl[g->rank].heartbeat_ms, now_ms());
}

static tp_status shm_create(tp_group *g)
{
    tp_status st = TP_OK;
    shm_impl *im = NULL;
    shm_tune t;
    char key[160], path[64];
    unsigned char want[TP_SHA256_BYTES];
    size_t data_off;
    int fd = -1;
    char cma_why[192] = "off";
    TP_REQUIRE(g->size >= 2 && g->size <= TP_SHM_MAX_RANKS, "shm: group size %d out of range 2..%d", g->size,
               TP_SHM_MAX_RANKS);
    TP_CHECK(shm_tuning(g->size, &t));
    if ((im = calloc(1, sizeof *im)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "shm: out of memory");
        goto out;
    }
    im->p = g->size;
    im->r = g->rank;
    im->granks = g->global_ranks;
    im->timeout_s = g->timeout_s;
    im->watchdog_s = (double)tp_knob_value(TP_KNOB_WATCHDOG_S);
    im->log_level = tp_log_level();
    im->slot_bytes = t.slot_bytes;
    im->half = im->slot_bytes / 2;
    im->oneshot = t.oneshot;
    im->spin_s = im->spin_cur = t.spin_s;
    im->oneshot_big = t.oneshot_big;
    im->yield_s = t.yield_s;
    data_off = round_up(sizeof(shm_header) + (size_t)g->size * sizeof(rank_ctrl), 4096);
    im->map_bytes = data_off + (size_t)g->size * im->slot_bytes;
    snprintf(key, sizeof key, "%sshm/path", g->prefix);
    if (g->rank == 0)
        TP_CHECK(segment_create(im, path, sizeof path, &fd));
    else
        TP_CHECK(segment_open(g, im, key, path, sizeof path, &fd));
    TP_CHECK(segment_map(im, fd, data_off));
    if (g->rank != 0) { /* rank 0 keeps its descriptor (the others' way in) until every rank has mapped */
        close(fd);
        fd = -1;
    }
    tp_store_proof(g->store, "tplinear-shm-segment", key, strlen(key), want);
    if (g->rank == 0)
        TP_CHECK(header_publish(g, im, &t, want, key, path));
    else
        TP_CHECK(header_verify(g, im, want));
    im->chunk = im->hdr->chunk_bytes;
    im->oneshot = im->hdr->oneshot_bytes;
    im->oneshot_big = im->hdr->oneshot_big;
    cma_probe(g, im);
    snprintf(key, sizeof key, "%sshm/mapped", g->prefix);
    TP_CHECK(tp_store_arrive(g->store, key, g->rank));
    TP_CHECK(tp_store_wait_all(g->store, key, g->size, g->global_ranks, "to map the shm segment"));
    if (fd >= 0) { /* rank 0: every rank has mapped the segment, nobody needs the way in any more */
        close(fd);
        fd = -1;
    }
    TP_CHECK(cma_setup(g, im, cma_why, sizeof cma_why));
    tp_log(TP_LOG_INFO, "shm: group %s rank %d of %d (global rank %d): segment %s of %.1f MB (slot %zu KB, chunk %zu KB, one-shot <= %zu KB, large all-reduce %s, spin %.0f us); single copy %s",
           g->prefix, g->rank, g->size, g->world_rank, im->name, (double)im->map_bytes / 1048576.0,
           im->slot_bytes / 1024, im->chunk / 1024, im->oneshot / 1024,
           im->oneshot_big ? "one-shot" : "reduce-scatter + all-gather", im->spin_s * 1e6, cma_why);
    g->impl = im;
    im = NULL;
out:
    if (fd >= 0) close(fd);
    if (im) {
        if (im->base) munmap(im->base, im->map_bytes);
        free(im->tmp);
        free(im);
        if (st != TP_OK) st = tp_error_context(st, "shm backend setup (rank %d of %d)", g->rank, g->size);
    }
    return st;
}

const tp_backend tp_shm_backend = {
    .name = "shm",
    .devices = 1u << TP_DEVICE_CPU,
    .one_host = 1,
    .groups_of_one = 0,
    .create = shm_create,
    .split = NULL, /* the generic split: members of a subgroup map a segment of their own */
    .all_reduce = shm_all_reduce,
    .all_gatherv = shm_all_gatherv,
    .reduce_scatter = shm_reduce_scatter,
    .reduce_scatter_v = shm_reduce_scatter_v,
    .broadcast = shm_broadcast,
    .barrier = shm_barrier,
    .abort = shm_abort,
    .destroy = shm_destroy,
    .staging = shm_staging,
    .all_reduce_staged = shm_all_reduce_staged,
    .all_reduce_bias = shm_all_reduce_bias,
};
