/* The mpi backend: CPU collectives between processes that an MPI launcher started (mpirun, mpiexec,
 * srun), on one host or many, over whatever transport the MPI library picks (shared memory, TCP,
 * InfiniBand, ...).
 *
 * The collectives are built here on MPI's non-blocking point-to-point calls (MPI_Isend / MPI_Irecv,
 * polled with MPI_Testsome) rather than on MPI's own collectives, for three reasons:
 *   - every wait is bounded by the group's timeout: a request that does not complete in time becomes
 *     TP_ERR_TIMEOUT naming the ranks it waits for (MPI's blocking collectives cannot be bounded, and its
 *     non-blocking ones, libnbc in OpenMPI, are several times slower);
 *   - the fingerprint check costs nothing: every message of a collective carries a tag hashed from its
 *     fingerprint (sequence number, kind, bytes, dtype, op, root, counts) and receives take only that
 *     tag, so a message of a different collective never lands in a buffer sized for this one; a wait
 *     that lasts probes its peers for such a message instead (probe_peer). The ranks then swap
 *     their full fingerprints on the group's notice communicator, and every rank fails with the same
 *     text as the shm backend ("collective mismatch: rank 1 called ...");
 *   - results are bitwise identical on every rank and equal the shm backend's: every element is reduced
 *     once, in rank order, by one rank (or by each rank alike), and AVG / integer wrap-around follow the
 *     same code as shm.
 * Algorithms (rank 0's choices, published at creation so that all ranks agree): an all_reduce whose
 * one-shot traffic per rank (bytes x (ranks - 1)) is at most TPLINEAR_MPI_ONESHOT_KB sends every buffer
 * to every rank and reduces locally (one round: 64 KB at 2 ranks, 21 KB at 4), unless its buffer is at
 * least the MPI's eager limit (TPLINEAR_MPI_EAGER_BYTES) while a reduce-scatter block is not: a message
 * past the limit waits for a rendezvous with its receiver, and two rounds of eager messages are faster
 * (4 KB at 2 ranks: 3.6 us against 4.3 us one-shot, 4-12 KB at 4 ranks: a third less); the others
 * reduce-scatter + all-gather with every peer at once, pipelined in segments of TPLINEAR_MPI_CHUNK_KB with
 * two segments in flight (ar_scatter: segment i + 2's transfers are posted once segment i is reduced, and
 * each step waits only for the requests it needs, wait_label);
 * all_gather(v) and reduce_scatter exchange pieces with every peer at once (so every rank sees every
 * rank's tag); barrier is a dissemination of empty messages; broadcast such a dissemination (the root
 * receives nothing otherwise) then a binomial tree.
 *
 * Liveness: a wait that lasts asks the world's rendezvous store every LIVENESS_S whether a member's
 * connection to it ended or fell silent (tp_store_lost: one request while nobody has gone; every rank's
 * store client beats from a thread of its own, comm/store.c), so a dead peer on any host fails the group in
 * about a second, and a vanished one (its process stopped or frozen, its link cut) once TPLINEAR_PEER_SILENCE_MS has
 * passed, instead of at the timeout; the interrupt hook (Python's signal handlers) is asked every 50 ms.
 *
 * Failures: a timeout, a mismatch, a lost member, an interrupt, a peer's notice or tp_group_abort marks
 * the group failed (first message wins), cancels its pending receives, and sends the message to every
 * peer on the group's notice communicator (a duplicate of its data communicator with one receive always posted), so that peers
 * blocked in the same group fail at once with the same text. A group is unusable afterwards. MPI errors
 * are returned (MPI_ERRORS_RETURN) and become TP_ERR_COMM.
 *
 * The process: MPI is initialised (MPI_THREAD_MULTIPLE asked) by the first world that bootstraps through
 * it, unless the program already did (mpi4py); tplinear then finalises it at exit, or, when a group has
 * failed (peers may be blocked in a collective that will never complete), calls MPI_Abort so that the
 * launcher stops the job instead of hanging in MPI_Finalize. That flag and MPI's own initialisation are
 * the only process-wide state (they are MPI's: a process has one MPI). */
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "backend.h"

#define MSG_CAP 512
#define MAX_MSG (1u << 30) /* bytes per MPI message: counts are ints */
#define CL 64
#define NOTICE_TAG 1
#define LIVENESS_S 0.2 /* how often a lasting wait asks the store whether a member has gone */
#define MISMATCH_WAIT_S 10.0 /* how long ranks wait for each other's fingerprints after a mismatch */

extern const tp_backend tp_mpi_backend;

enum { N_FAIL = 1, N_MISMATCH = 2 };

/* What a rank tells its peers on the notice communicator. */
typedef struct {
    int32_t type;
    int32_t from;
    tp_fingerprint fp; /* N_MISMATCH: the sender's current collective */
    char text[MSG_CAP];
} notice;

typedef struct {
    MPI_Request req;
    int peer;       /* group rank */
    int recv;       /* a receive (else a send) */
    size_t bytes;   /* bytes of the message */
    void *buf;      /* a receive's buffer (to post it again after a probe) */
    int label;      /* what wait_label waits for: the pipeline stage that posted it */
} pending;

typedef struct {
    MPI_Comm comm, ctl;
    MPI_Request ctl_req;
    notice inbox;
    int p, r;
    const int *granks;
    tp_store *store;          /* the world's rendezvous store (the group's): liveness of peers on any host */
    int64_t lost_seen;        /* how many ranks had lost their store connection at the last probe */
    uint64_t seq;
    int tag, tag_mask;
    size_t oneshot, chunk, eager;
    char *scratch;
    size_t scratch_cap;
    pending *pend;
    int npend, pend_cap;
    int label;                /* the label of the requests posted next */
    MPI_Request *reqs;        /* wait_all's arrays, pend_cap entries each */
    int *idx;
    MPI_Status *stats;
    double timeout_s;
    int log_level;
    tp_fingerprint fp;           /* the collective in progress */
    tp_fingerprint *peer_fp;     /* after a mismatch: each rank's tp_fingerprint */
    char *have_fp;
    int fp_sent;
    _Atomic int abort_requested;
    pthread_mutex_t busy;     /* held while a thread runs one of the group's calls */
    tp_broken broken;
} mpi_impl;

/* ---------------------------------------------------------------- the process */

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_init_error;          /* MPI error code of MPI_Init_thread, 0 when fine */
static int g_thread_level;        /* what MPI provides */
static _Atomic int g_world_failed; /* a group failed: abort instead of finalize at exit */

static void at_exit(void)
{
    int fin = 0;
    if (MPI_Finalized(&fin) != MPI_SUCCESS || fin) return;
    if (atomic_load(&g_world_failed))
        MPI_Abort(MPI_COMM_WORLD, 1); /* peers may be blocked for good: let the launcher stop the job */
    else
        MPI_Finalize();
}

static void init_once(void)
{
    int inited = 0;
    Dl_info info;
    if (MPI_Initialized(&inited) != MPI_SUCCESS) {
        g_init_error = MPI_ERR_OTHER;
        return;
    }
    if (inited) {
        MPI_Query_thread(&g_thread_level);
        return;
    }
    /* Python loads extensions with RTLD_LOCAL: OpenMPI's plugins need libmpi's symbols global */
    if (dladdr((void *)MPI_Init_thread, &info) && info.dli_fname) dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    g_init_error = MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &g_thread_level);
    if (g_init_error == MPI_SUCCESS) {
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
        atexit(at_exit);
    }
}

static tp_status mpi_error(int rc, const char *what)
{
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) snprintf(text, sizeof text, "error %d", rc);
    return tp_error(TP_ERR_COMM, "mpi %s: %s", what, text);
}

#define MPI_CHECK(call, what)                  \
    do {                                       \
        int rc_ = (call);                      \
        if (rc_ != MPI_SUCCESS) {              \
            st = mpi_error(rc_, what);         \
            goto out;                          \
        }                                      \
    } while (0)

static tp_status mpi_init(void)
{
    int fin = 0;
    pthread_once(&g_once, init_once);
    if (g_init_error != MPI_SUCCESS) return mpi_error(g_init_error, "MPI_Init_thread");
    if (MPI_Finalized(&fin) == MPI_SUCCESS && fin)
        return tp_error(TP_ERR_COMM, "mpi: MPI was finalized in this process (by the program?)");
    return TP_OK;
}

static void sleep_briefly(unsigned *spins)
{
    if (++*spins > 1000) sched_yield(); /* more ranks than cores: let the peer run */
}

/* Waits for one request within timeout_s (bootstrap only: no group yet). */
static tp_status wait_one(MPI_Request *req, double timeout_s, const char *what)
{
    tp_status st = TP_OK;
    double deadline = tp_now() + timeout_s, next_hook = 0.0;
    unsigned spins = 0;
    for (int done = 0; !done;) {
        MPI_CHECK(MPI_Test(req, &done, MPI_STATUS_IGNORE), what);
        TP_CHECK(tp_wait_check(&next_hook, what));
        if (!done && tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "mpi %s: timed out after %g s (a rank never called init?)", what,
                          timeout_s);
            goto out;
        }
        sleep_briefly(&spins);
    }
out:
    return st;
}

static tp_status mpi_boot_bcast(int rank, int size, void *buf, size_t len, double timeout_s)
{
    tp_status st = TP_OK;
    int wr = -1, ws = -1;
    MPI_Request req;
    TP_CHECK(mpi_init());
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &wr), "MPI_Comm_rank");
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &ws), "MPI_Comm_size");
    if (ws != size || wr != rank) {
        st = tp_error(TP_ERR_VALUE, "mpi: the environment says rank %d of %d but MPI_COMM_WORLD says rank %d of %d "
                      "(an MPI launcher's variables from an outer job?)", rank, size, wr, ws);
        goto out;
    }
    MPI_CHECK(MPI_Ibcast(buf, (int)len, MPI_BYTE, 0, MPI_COMM_WORLD, &req), "MPI_Ibcast (bootstrap)");
    TP_CHECK(wait_one(&req, timeout_s, "bootstrap broadcast"));
    tp_log(TP_LOG_INFO, "mpi: bootstrapped through MPI_COMM_WORLD (rank %d of %d, thread level %d)", rank, size,
           g_thread_level);
out:
    return st;
}

/* ---------------------------------------------------------------- fingerprints */

static void describe(const tp_fingerprint *f, char *buf, size_t cap)
{
    if (tp_fp_describe(f, buf, cap) < 0) snprintf(buf, cap, "no collective of this group (kind %d)", f->kind);
}

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdull;
    return h ^ (h >> 33);
}

static int fp_tag(const tp_fingerprint *f, int mask)
{
    uint64_t h = 0x243f6a8885a308d3ull;
    h = mix(h, f->seq);
    h = mix(h, f->bytes);
    h = mix(h, f->extra);
    h = mix(h, (uint64_t)(uint32_t)f->kind << 32 | (uint32_t)f->dtype);
    h = mix(h, (uint64_t)(uint32_t)f->op << 32 | (uint32_t)f->root);
    return (int)(h & (uint64_t)mask);
}

/* ---------------------------------------------------------------- failures */

static void post_inbox(mpi_impl *im)
{
    if (MPI_Irecv(&im->inbox, (int)sizeof im->inbox, MPI_BYTE, MPI_ANY_SOURCE, NOTICE_TAG, im->ctl, &im->ctl_req) !=
        MPI_SUCCESS)
        im->ctl_req = MPI_REQUEST_NULL;
}

/* Sends n to every peer, giving the sends a moment to leave (a dead peer's never may): linger_s, after
 * which the sends go on with the process's later MPI calls. */
static void notify_peers(mpi_impl *im, const notice *n, double linger_s)
{
    MPI_Request *reqs = malloc((size_t)im->p * sizeof *reqs);
    double until = tp_now() + linger_s;
    int k = 0, done = 0;
    if (reqs == NULL) return;
    for (int j = 0; j < im->p; j++)
        if (j != im->r && MPI_Isend(n, (int)sizeof *n, MPI_BYTE, j, NOTICE_TAG, im->ctl, &reqs[k]) == MPI_SUCCESS) k++;
    while (!done && tp_now() < until)
        if (MPI_Testall(k, reqs, &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS) break;
    for (int i = 0; !done && i < k; i++)
        if (reqs[i] != MPI_REQUEST_NULL) MPI_Request_free(&reqs[i]);
    free(reqs);
}

/* Cancels this rank's pending requests of the collective in progress (the group is failing). */
static void drop_pending(mpi_impl *im)
{
    for (int i = 0; i < im->npend; i++) {
        if (im->pend[i].req == MPI_REQUEST_NULL) continue;
        if (im->pend[i].recv) { /* a cancelled receive completes at once (MPI 3.1, 3.8.4): nothing lands later */
            MPI_Cancel(&im->pend[i].req);
            MPI_Wait(&im->pend[i].req, MPI_STATUS_IGNORE);
        } else { /* a send only reads its buffer, and its peer has cancelled the receive it would meet */
            MPI_Request_free(&im->pend[i].req);
        }
    }
    im->npend = 0;
}

/* Records the current error as the group's failure; tells the peers unless the failure came from one. */
static tp_status fail(mpi_impl *im, tp_status st, int tell)
{
    const char *msg = tp_last_error();
    if (!im->broken.broken) {
        tp_broken_record(&im->broken, st);
        if (st == TP_ERR_TIMEOUT) atomic_store(&g_world_failed, 1); /* a peer may be blocked for good */
        drop_pending(im);
        if (tell) {
            notice n;
            memset(&n, 0, sizeof n);
            n.type = N_FAIL;
            n.from = im->r;
            snprintf(n.text, sizeof n.text, "%s", msg);
            notify_peers(im, &n, st == TP_ERR_INTERRUPTED ? 0.1 : 1.0); /* Ctrl-C must answer at once */
        }
    }
    return st;
}

/* After a mismatch: every rank tells every other its fingerprint (once), and all compose the same
 * message from the full table: the first rank whose call differs from rank 0's. */
static tp_status resolve_mismatch(mpi_impl *im, int seen_from)
{
    double deadline = tp_now() + (im->timeout_s < MISMATCH_WAIT_S ? im->timeout_s : MISMATCH_WAIT_S);
    int have = 1;
    char a[160], b[160];
    im->peer_fp[im->r] = im->fp;
    im->have_fp[im->r] = 1;
    if (!im->fp_sent) {
        notice n;
        memset(&n, 0, sizeof n);
        n.type = N_MISMATCH;
        n.from = im->r;
        n.fp = im->fp;
        im->fp_sent = 1;
        notify_peers(im, &n, 1.0);
    }
    for (int j = 0; j < im->p; j++) have += j != im->r && im->have_fp[j];
    while (have < im->p && tp_now() < deadline && im->ctl_req != MPI_REQUEST_NULL) {
        int done = 0;
        if (MPI_Test(&im->ctl_req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) break;
        if (!done) {
            sched_yield();
            continue;
        }
        if (im->inbox.type == N_MISMATCH && im->inbox.from >= 0 && im->inbox.from < im->p &&
            !im->have_fp[im->inbox.from]) {
            im->peer_fp[im->inbox.from] = im->inbox.fp;
            im->have_fp[im->inbox.from] = 1;
            have++;
        }
        post_inbox(im);
    }
    if (have == im->p) {
        for (int j = 1; j < im->p; j++) {
            if (tp_fp_equal(&im->peer_fp[0], &im->peer_fp[j])) continue;
            describe(&im->peer_fp[j], a, sizeof a);
            describe(&im->peer_fp[0], b, sizeof b);
            tp_error(TP_ERR_COMM, "collective mismatch: rank %d called %s, rank 0 called %s (collective #%llu)", j, a,
                     b, (unsigned long long)im->peer_fp[0].seq);
            return fail(im, TP_ERR_COMM, 0);
        }
    }
    describe(&im->fp, b, sizeof b);
    tp_error(TP_ERR_COMM, "collective mismatch: rank %d called another collective than this rank's %s (collective "
             "#%llu; not every rank answered within %g s)", seen_from, b, (unsigned long long)im->fp.seq,
             im->timeout_s < MISMATCH_WAIT_S ? im->timeout_s : MISMATCH_WAIT_S);
    return fail(im, TP_ERR_COMM, 0);
}

/* A notice arrived in the inbox: adopt a peer's failure, or join the mismatch resolution. */
static tp_status on_notice(mpi_impl *im)
{
    notice n = im->inbox;
    n.text[MSG_CAP - 1] = '\0';
    post_inbox(im);
    if (n.type == N_MISMATCH && n.from >= 0 && n.from < im->p) {
        im->peer_fp[n.from] = n.fp;
        im->have_fp[n.from] = 1;
        return resolve_mismatch(im, n.from);
    }
    tp_error(TP_ERR_COMM, "%s", n.text);
    return fail(im, TP_ERR_COMM, 0);
}

/* Checks the inbox and the abort flag (between requests and while waiting). */
static tp_status check_notices(mpi_impl *im)
{
    int done = 0;
    if (atomic_load(&im->abort_requested)) {
        tp_error(TP_ERR_COMM, "the process group was aborted by rank %d (global rank %d)", im->r, im->granks[im->r]);
        return fail(im, TP_ERR_COMM, 1);
    }
    if (im->ctl_req == MPI_REQUEST_NULL) return TP_OK;
    if (MPI_Test(&im->ctl_req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || !done) return TP_OK;
    return on_notice(im);
}

/* ---------------------------------------------------------------- requests */

static tp_status add_pending(mpi_impl *im, MPI_Request req, int peer, int recv, size_t bytes, void *buf)
{
    if (im->npend == im->pend_cap) {
        int cap = im->pend_cap ? 2 * im->pend_cap : 64;
        pending *p = realloc(im->pend, (size_t)cap * sizeof *p);
        MPI_Request *r = NULL;
        int *x = NULL;
        MPI_Status *t = NULL;
        if (p == NULL) {
            MPI_Request_free(&req);
            return tp_error(TP_ERR_NOMEM, "mpi: out of memory");
        }
        im->pend = p;
        if ((r = realloc(im->reqs, (size_t)cap * sizeof *r)) != NULL) im->reqs = r;
        if ((x = realloc(im->idx, (size_t)cap * sizeof *x)) != NULL) im->idx = x;
        if ((t = realloc(im->stats, (size_t)cap * sizeof *t)) != NULL) im->stats = t;
        if (r == NULL || x == NULL || t == NULL) {
            MPI_Request_free(&req);
            return tp_error(TP_ERR_NOMEM, "mpi: out of memory");
        }
        im->pend_cap = cap;
    }
    im->pend[im->npend++] = (pending){req, peer, recv, bytes, buf, im->label};
    return TP_OK;
}

/* Posts the receive of `bytes` from group rank peer with the collective's tag, in messages of at most
 * MAX_MSG bytes. A message of another collective does not match it (and so never lands in a buffer sized
 * for this one): wait_all probes for it. */
static tp_status post_recv(mpi_impl *im, void *buf, size_t bytes, int peer)
{
    tp_status st = TP_OK;
    size_t off = 0;
    do {
        size_t n = bytes - off < MAX_MSG ? bytes - off : MAX_MSG;
        MPI_Request req;
        MPI_CHECK(MPI_Irecv((char *)buf + off, (int)n, MPI_BYTE, peer, im->tag, im->comm, &req), "MPI_Irecv");
        TP_CHECK(add_pending(im, req, peer, 1, n, (char *)buf + off));
        off += n;
    } while (off < bytes);
out:
    return st;
}

static tp_status post_send(mpi_impl *im, const void *buf, size_t bytes, int peer)
{
    tp_status st = TP_OK;
    size_t off = 0;
    do {
        size_t n = bytes - off < MAX_MSG ? bytes - off : MAX_MSG;
        MPI_Request req;
        MPI_CHECK(MPI_Isend((const char *)buf + off, (int)n, MPI_BYTE, peer, im->tag, im->comm, &req), "MPI_Isend");
        TP_CHECK(add_pending(im, req, peer, 0, n, NULL));
        off += n;
    } while (off < bytes);
out:
    return st;
}

/* Names the peers whose requests are still pending. */
static void lagging(mpi_impl *im, char *buf, size_t cap, int *count)
{
    size_t used = 0;
    *count = 0;
    buf[0] = '\0';
    for (int j = 0; j < im->p; j++) {
        int waiting = 0;
        for (int i = 0; i < im->npend && !waiting; i++) waiting = im->pend[i].req != MPI_REQUEST_NULL && im->pend[i].peer == j;
        if (!waiting) continue;
        if (used + 16 < cap) used += (size_t)snprintf(buf + used, cap - used, "%s%d", *count ? ", " : "", j);
        (*count)++;
    }
}

/* Whether peer's next message to this rank belongs to another collective (*foreign), without a race:
 * messages between two ranks match in the order they were sent, and a rank sends a collective's messages
 * before any of its next one's. So this rank's pending receives from peer are cancelled, last first; one
 * that had matched already cannot be (nor can any before it): then there is nothing to see. When none had
 * matched, the first message from peer that has arrived (MPI_Iprobe) is the one they wait for, unless its
 * tag is another collective's. The cancelled receives are posted again, in order. */
static tp_status probe_peer(mpi_impl *im, int peer, int *foreign)
{
    tp_status st = TP_OK;
    int first = -1, cancelled = 1, flag = 0;
    MPI_Status stat;
    *foreign = 0;
    for (int i = im->npend - 1; i >= 0; i--) {
        pending *pd = &im->pend[i];
        int was = 0;
        if (!pd->recv || pd->peer != peer || pd->req == MPI_REQUEST_NULL) continue;
        MPI_CHECK(MPI_Cancel(&pd->req), "MPI_Cancel");
        MPI_CHECK(MPI_Wait(&pd->req, &stat), "MPI_Wait (cancelled receive)");
        MPI_CHECK(MPI_Test_cancelled(&stat, &was), "MPI_Test_cancelled");
        if (!was) { /* it had matched (and now is complete): so had every receive before it */
            int got = 0;
            MPI_Get_count(&stat, MPI_BYTE, &got);
            if ((size_t)got != pd->bytes) *foreign = 1; /* the same tag, another size: a tag collision */
            cancelled = 0;
            break;
        }
        pd->req = MPI_REQUEST_NULL;
        pd->recv = 2; /* to be posted again */
        first = i;
    }
    if (cancelled && first >= 0) {
        MPI_CHECK(MPI_Iprobe(peer, MPI_ANY_TAG, im->comm, &flag, &stat), "MPI_Iprobe");
        if (flag && stat.MPI_TAG != im->tag) *foreign = 1;
    }
    for (int i = 0; i < im->npend; i++) { /* post the cancelled receives again, in their order */
        pending *pd = &im->pend[i];
        if (pd->recv != 2) continue;
        pd->recv = 1;
        MPI_CHECK(MPI_Irecv(pd->buf, (int)pd->bytes, MPI_BYTE, peer, im->tag, im->comm, &pd->req), "MPI_Irecv");
    }
out:
    return st;
}

/* The first peer whose next message to this rank belongs to another collective, or -1. */
static tp_status foreign_message(mpi_impl *im, int *who)
{
    tp_status st = TP_OK;
    *who = -1;
    for (int i = 0; i < im->npend && *who < 0; i++) {
        int foreign = 0, peer = im->pend[i].peer, seen = 0;
        if (im->pend[i].req == MPI_REQUEST_NULL || !im->pend[i].recv) continue;
        for (int k = 0; k < i && !seen; k++) seen = im->pend[k].recv && im->pend[k].peer == peer;
        if (seen) continue; /* probed with its first receive */
        TP_CHECK(probe_peer(im, peer, &foreign));
        if (foreign) *who = peer;
    }
out:
    return st;
}

/* How many of the requests in reqs (im->pend's, as wait_label sees them) labelled label (any when label < 0)
 * are still pending. */
static int left_of(const mpi_impl *im, const MPI_Request *reqs, int label)
{
    int left = 0;
    for (int i = 0; i < im->npend; i++)
        left += reqs[i] != MPI_REQUEST_NULL && (label < 0 || im->pend[i].label == label);
    return left;
}

/* Waits until every pending request labelled label (every one when label < 0) completes, progressing the
 * others as well, probing for messages of other collectives, polling the inbox and the abort flag,
 * bounded by the group's timeout. The completed requests leave the list; the others keep their order
 * (receives from one peer match in the order they were posted, and probe_peer relies on it). */
static tp_status wait_label(mpi_impl *im, int label, const char *what)
{
    tp_status st = TP_OK;
    double deadline = 0.0, next_probe = 0.0, probe_every = 1e-3, next_hook = 0.0, next_live = 0.0, gone_at = 0.0;
    unsigned spins = 0;
    int left, *idx = im->idx, peer, kept = 0, gone = -1;
    char gone_why[192] = "";
    MPI_Request *reqs = im->reqs;
    MPI_Status *stats = im->stats;
    for (int i = 0; i < im->npend; i++) reqs[i] = im->pend[i].req;
    left = left_of(im, reqs, label);
    while (left > 0) {
        int outcount = 0, rc = MPI_Testsome(im->npend, reqs, &outcount, idx, stats);
        if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) {
            for (int i = 0; i < im->npend; i++) im->pend[i].req = reqs[i];
            st = fail(im, mpi_error(rc, what), 1);
            goto out;
        }
        for (int k = 0; k < outcount && outcount != MPI_UNDEFINED; k++) {
            pending *pd = &im->pend[idx[k]];
            int got = 0;
            if (rc == MPI_ERR_IN_STATUS && stats[k].MPI_ERROR != MPI_SUCCESS) {
                for (int i = 0; i < im->npend; i++) im->pend[i].req = reqs[i];
                st = fail(im, mpi_error(stats[k].MPI_ERROR, what), 1);
                goto out;
            }
            if (pd->recv && (MPI_Get_count(&stats[k], MPI_BYTE, &got) != MPI_SUCCESS || (size_t)got != pd->bytes)) {
                for (int i = 0; i < im->npend; i++) im->pend[i].req = reqs[i];
                st = resolve_mismatch(im, pd->peer); /* the same tag, another size: a hash collision's mismatch */
                goto out;
            }
        }
        if (outcount > 0 && (left = left_of(im, reqs, label)) == 0) break;
        if ((++spins & 63) == 0) {
            double now = tp_now();
            for (int i = 0; i < im->npend; i++) im->pend[i].req = reqs[i];
            if ((st = check_notices(im)) != TP_OK) goto out;
            if (tp_wait_check(&next_hook, what) != TP_OK) { /* the peers learn who stopped, this rank why */
                tp_error(TP_ERR_INTERRUPTED, "%s: rank %d of the group (global rank %d) was interrupted by a signal "
                         "(Ctrl-C, or a signal handler that raised)", what, im->r, im->granks[im->r]);
                st = fail(im, TP_ERR_INTERRUPTED, 1);
                goto out;
            }
            if (deadline == 0.0) {
                deadline = now + im->timeout_s;
                next_probe = now + probe_every;
                next_live = now + LIVENESS_S;
            }
            if (im->store && now > next_live) { /* a wait that lasts: has a member left the store? */
                next_live = now + LIVENESS_S;
                if (gone < 0 && tp_store_lost(im->store, im->granks, im->p, &im->lost_seen, &gone, gone_why,
                                              sizeof gone_why) != TP_OK)
                    next_live = deadline + 1.0; /* rank 0's store is gone and it is no member: no verdict */
                if (gone >= 0 && gone_at == 0.0) {
                    gone_at = now; /* one more period for what it sent before leaving to arrive */
                } else if (gone >= 0) {
                    atomic_store(&g_world_failed, 1); /* MPI_Finalize would wait for the gone rank */
                    tp_error(TP_ERR_COMM, "%s: rank %d of the group (global rank %d) %s while this rank waited for "
                             "it", what, gone, im->granks[gone], gone_why);
                    st = fail(im, TP_ERR_COMM, 1);
                    goto out;
                }
            }
            if (now > next_probe) { /* a wait that lasts: is a peer in another collective? */
                if ((st = foreign_message(im, &peer)) != TP_OK) {
                    st = fail(im, st, 1);
                    goto out;
                }
                if (peer >= 0) {
                    st = resolve_mismatch(im, peer);
                    goto out;
                }
                /* a receive the probe found matched is complete now */
                for (int i = 0; i < im->npend; i++) reqs[i] = im->pend[i].req;
                left = left_of(im, reqs, label);
                if (probe_every < 0.02) probe_every *= 2;
                next_probe = now + probe_every;
            }
            if (now > deadline) {
                char who[256];
                int n;
                lagging(im, who, sizeof who, &n);
                tp_error(TP_ERR_TIMEOUT, "%s: timed out after %g s waiting for rank%s %s of the group of %d", what,
                         im->timeout_s, n > 1 ? "s" : "", who, im->p);
                st = fail(im, TP_ERR_TIMEOUT, 1);
                goto out;
            }
        }
        if (spins > 1000) sched_yield(); /* more ranks than cores: let the peer run */
    }
    for (int i = 0; i < im->npend; i++)
        if ((im->pend[i].req = reqs[i]) != MPI_REQUEST_NULL) im->pend[kept++] = im->pend[i];
    im->npend = kept;
out:
    return st;
}

/* Waits until every pending request completes (wait_label's bounds and checks). */
static tp_status wait_all(mpi_impl *im, const char *what)
{
    return wait_label(im, -1, what);
}

/* ---------------------------------------------------------------- collectives */

/* Starts a collective: refuses on a failed group, takes in notices, sets the fingerprint and its tag. */
static tp_status begin(tp_group *g, int kind, uint64_t bytes, tp_dtype dt, int op, int root, uint64_t extra)
{
    mpi_impl *im = g->impl;
    tp_status st;
    pthread_mutex_lock(&im->busy);
    im->fp = (tp_fingerprint){im->seq, bytes, extra, kind, (int32_t)dt, op, root};
    im->tag = fp_tag(&im->fp, im->tag_mask);
    im->npend = 0;
    im->label = 0;
    /* a peer's notice is taken in by the first wait that lasts (wait_all polls the inbox) */
    st = tp_broken_check(&im->broken);
    if (st == TP_OK && atomic_load(&im->abort_requested)) st = check_notices(im);
    if (st != TP_OK) pthread_mutex_unlock(&im->busy);
    return st;
}

static tp_status end(tp_group *g, tp_status st, double t0)
{
    mpi_impl *im = g->impl;
    if (st == TP_OK) {
        im->seq++;
        tp_coll_trace(im->log_level, "mpi", im->fp.kind, im->seq - 1, im->fp.bytes, im->p, t0);
    } else if (!im->broken.broken) {
        fail(im, st, 1); /* the collective is half done: the peers must not wait for it */
    }
    pthread_mutex_unlock(&im->busy);
    return st;
}

static tp_status scratch(mpi_impl *im, size_t bytes)
{
    char *p;
    if (bytes <= im->scratch_cap) return TP_OK;
    if ((p = realloc(im->scratch, bytes)) == NULL)
        return tp_error(TP_ERR_NOMEM, "mpi: out of memory for %zu bytes of scratch", bytes);
    im->scratch = p;
    im->scratch_cap = bytes;
    return TP_OK;
}

/* [lo, hi) elements of block k when n elements are dealt out to p ranks in whole cache lines. */
static void block(size_t n, size_t es, int p, int k, size_t *lo, size_t *hi)
{
    size_t unit = CL / es, units = (n + unit - 1) / unit;
    *lo = units * (size_t)k / (size_t)p * unit;
    *hi = units * (size_t)(k + 1) / (size_t)p * unit;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

/* The large all-reduce's pipeline: the buffer in segments of `per` elements; segment i's reduce-scatter
 * receives land in scratch slot i % AR_WINDOW; its receives carry label 2 (i % AR_WINDOW), its sends that
 * + 1 (both waited for before the reduction), the all-gathers AR_LABELS. Segment i + AR_WINDOW's reduce-scatter is posted once segment i is reduced
 * and its all-gather posted, so that reducing one segment overlaps the transfers of the next ones. Every
 * rank posts the same requests in the same order (the schedule does not depend on which request completes
 * first): messages of one collective share a tag, and match in the order they are posted and sent. */
#define AR_WINDOW 2
#define AR_LABELS (2 * AR_WINDOW)

typedef struct {
    mpi_impl *im;
    char *buf;
    size_t count, per, es, blk_cap;
} ar_pipe;

/* Posts segment i's reduce-scatter: this rank's block from every peer, every peer's block to it. */
static tp_status ar_scatter(const ar_pipe *pp, size_t i)
{
    tp_status st = TP_OK;
    mpi_impl *im = pp->im;
    const size_t es = pp->es, n = pp->count - i * pp->per < pp->per ? pp->count - i * pp->per : pp->per;
    char *base = pp->buf + i * pp->per * es, *slot = im->scratch + i % AR_WINDOW * (size_t)im->p * pp->blk_cap;
    size_t lo, hi;
    block(n, es, im->p, im->r, &lo, &hi);
    for (int k = 1; k < im->p; k++) {
        int from = (im->r + k) % im->p, to = (im->r - k + im->p) % im->p;
        size_t tlo, thi;
        block(n, es, im->p, to, &tlo, &thi);
        im->label = (int)(i % AR_WINDOW * 2);
        TP_CHECK(post_recv(im, slot + (size_t)from * pp->blk_cap, (hi - lo) * es, from));
        im->label = (int)(i % AR_WINDOW * 2 + 1);
        TP_CHECK(post_send(im, base + tlo * es, (thi - tlo) * es, to));
    }
    /* the reduction may write over in[0] or in[1] only: ranks from 2 on reduce a copy of their block */
    if (im->r >= 2) memcpy(slot + (size_t)im->r * pp->blk_cap, base + lo * es, (hi - lo) * es);
out:
    return st;
}

static tp_status mpi_all_reduce(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op)
{
    tp_status st = TP_OK;
    mpi_impl *im = g->impl;
    const size_t es = tp_dtype_size(dt), bytes = count * es;
    const double t0 = tp_coll_t0(im->log_level);
    char *in[256], **inp = in;
    TP_CHECK(tp_reduce_check_dtype("mpi", dt, "all_reduce"));
    if (im->p > 256 && (inp = malloc((size_t)im->p * sizeof *inp)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "mpi: out of memory");
        goto out;
    }
    st = begin(g, TP_COLL_ALL_REDUCE, bytes, dt, (int)op, -1, 0);
    if (st == TP_OK && bytes * (size_t)(im->p - 1) <= im->oneshot && /* what one rank sends, one-shot */
        !(im->eager && bytes >= im->eager && bytes / (size_t)im->p < im->eager)) { /* rendezvous, but eager blocks */
        /* one round: every buffer to every rank, each reduces all of them in rank order */
        if ((st = scratch(im, (size_t)im->p * bytes)) != TP_OK) goto done;
        for (int k = 1; k < im->p && st == TP_OK; k++) {
            int from = (im->r + k) % im->p, to = (im->r - k + im->p) % im->p;
            if ((st = post_recv(im, im->scratch + (size_t)from * bytes, bytes, from)) == TP_OK)
                st = post_send(im, buf, bytes, to);
        }
        /* the reduction may write over in[0] or in[1] only: ranks 0 and 1 reduce in place */
        if (st == TP_OK && im->r >= 2) memcpy(im->scratch + (size_t)im->r * bytes, buf, bytes);
        if (st == TP_OK) st = wait_all(im, "all_reduce");
        for (int j = 0; j < im->p; j++) inp[j] = j == im->r && j < 2 ? (char *)buf : im->scratch + (size_t)j * bytes;
        if (st == TP_OK && count) tp_reduce_ranks(dt, buf, inp, im->p, count, (int)op);
    } else if (st == TP_OK) {
        /* segments of reduce-scatter + all-gather with every peer at once, pipelined */
        const size_t per = im->chunk / es < count ? im->chunk / es : count;
        const size_t nseg = (count + per - 1) / per;
        const size_t blk_cap = (per / (size_t)im->p + CL) * es + CL;
        ar_pipe pp = {im, buf, count, per, es, blk_cap};
        /* scratch: a block per rank in each slot, about min(size, AR_WINDOW x chunk) */
        if ((st = scratch(im, (nseg < AR_WINDOW ? nseg : AR_WINDOW) * (size_t)im->p * blk_cap)) != TP_OK) goto done;
        for (size_t i = 0; i < nseg && i < AR_WINDOW && st == TP_OK; i++) st = ar_scatter(&pp, i);
        for (size_t i = 0; i < nseg && st == TP_OK; i++) {
            size_t n = count - i * per < per ? count - i * per : per, lo, hi;
            char *base = (char *)buf + i * per * es, *slot = im->scratch + i % AR_WINDOW * (size_t)im->p * blk_cap;
            /* the segment's receives, then its sends: the all-gather lands where the sends read, and
             * reducing while the peers still read this rank's buffer (MPI's single-copy transfers) made
             * some launches 25 % slower at 1 MB on 2 ranks */
            if ((st = wait_label(im, (int)(i % AR_WINDOW * 2), "all_reduce")) != TP_OK ||
                (st = wait_label(im, (int)(i % AR_WINDOW * 2 + 1), "all_reduce")) != TP_OK)
                break;
            block(n, es, im->p, im->r, &lo, &hi);
            for (int j = 0; j < im->p; j++)
                inp[j] = j == im->r && j < 2 ? base + lo * es : slot + (size_t)j * blk_cap;
            if (hi > lo) tp_reduce_ranks(dt, base + lo * es, inp, im->p, hi - lo, (int)op);
            im->label = AR_LABELS; /* the all-gathers: waited for at the end */
            for (int k = 1; k < im->p && st == TP_OK; k++) {
                int from = (im->r + k) % im->p, to = (im->r - k + im->p) % im->p;
                size_t flo, fhi;
                block(n, es, im->p, from, &flo, &fhi);
                if ((st = post_recv(im, base + flo * es, (fhi - flo) * es, from)) == TP_OK)
                    st = post_send(im, base + lo * es, (hi - lo) * es, to);
            }
            if (st == TP_OK && i + AR_WINDOW < nseg) st = ar_scatter(&pp, i + AR_WINDOW);
        }
        if (st == TP_OK) st = wait_all(im, "all_reduce");
        im->label = 0;
    } else {
        goto out; /* begin refused: nothing to end */
    }
done:
    st = end(g, st, t0);
out:
    if (inp != in) free(inp);
    return st;
}

static tp_status mpi_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt)
{
    tp_status st = TP_OK;
    mpi_impl *im = g->impl;
    const size_t es = tp_dtype_size(dt);
    const double t0 = tp_coll_t0(im->log_level);
    size_t total = 0, mine = 0;
    for (int j = 0; j < im->p; j++) {
        if (j == im->r) mine = total;
        total += counts[j];
    }
    TP_CHECK(begin(g, TP_COLL_ALL_GATHER, total * es, dt, 0, -1, tp_hash_counts(counts, im->p)));
    for (int k = 1; k < im->p && st == TP_OK; k++) {
        int from = (im->r + k) % im->p, to = (im->r - k + im->p) % im->p;
        size_t displ = 0;
        for (int j = 0; j < from; j++) displ += counts[j];
        if ((st = post_recv(im, (char *)recv + displ * es, counts[from] * es, from)) == TP_OK)
            st = post_send(im, send, counts[im->r] * es, to);
    }
    if (st == TP_OK && counts[im->r] && (const char *)recv + mine * es != (const char *)send)
        memmove((char *)recv + mine * es, send, counts[im->r] * es);
    if (st == TP_OK) st = wait_all(im, "all_gather");
    st = end(g, st, t0);
out:
    return st;
}

static tp_status mpi_reduce_scatter(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt,
                                    tp_reduce_op op)
{
    tp_status st = TP_OK;
    mpi_impl *im = g->impl;
    const size_t es = tp_dtype_size(dt);
    const double t0 = tp_coll_t0(im->log_level);
    const size_t per = im->chunk / (size_t)im->p / es + 1; /* elements of each block per round */
    char *in[256], **inp = in;
    TP_CHECK(tp_reduce_check_dtype("mpi", dt, "reduce_scatter"));
    if (im->p > 256 && (inp = malloc((size_t)im->p * sizeof *inp)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "mpi: out of memory");
        goto out;
    }
    TP_CHECK(begin(g, TP_COLL_REDUCE_SCATTER, count * es * (size_t)im->p, dt, (int)op, -1, 0));
    if ((st = scratch(im, (size_t)im->p * per * es)) != TP_OK) goto done;
    for (size_t off = 0, first = 1; (first || off < count) && st == TP_OK; off += per, first = 0) {
        size_t n = count - off < per ? count - off : per;
        for (int k = 1; k < im->p && st == TP_OK; k++) {
            int from = (im->r + k) % im->p, to = (im->r - k + im->p) % im->p;
            if ((st = post_recv(im, im->scratch + (size_t)from * per * es, n * es, from)) == TP_OK)
                st = post_send(im, (const char *)send + ((size_t)to * count + off) * es, n * es, to);
        }
        if (st != TP_OK) break;
        memcpy(im->scratch + (size_t)im->r * per * es, (const char *)send + ((size_t)im->r * count + off) * es, n * es);
        if ((st = wait_all(im, "reduce_scatter")) != TP_OK) break;
        for (int j = 0; j < im->p; j++) inp[j] = im->scratch + (size_t)j * per * es;
        tp_reduce_ranks(dt, (char *)recv + off * es, inp, im->p, n, (int)op);
    }
done:
    st = end(g, st, t0);
out:
    if (inp != in) free(inp);
    return st;
}

/* Dissemination: round k tells rank r + 2^k and hears from rank r - 2^k, each round after the one before,
 * so that when it returns every rank has heard (through others) from every rank: a rank whose tp_fingerprint
 * differs is seen by its successor, which stops, and everyone after waits until the notice comes. */
static tp_status dissemination(mpi_impl *im, const char *what)
{
    tp_status st = TP_OK;
    char dummy = 0;
    for (int k = 1; k < im->p && st == TP_OK; k <<= 1)
        if ((st = post_recv(im, &dummy, 0, (im->r - k + im->p) % im->p)) == TP_OK &&
            (st = post_send(im, &dummy, 0, (im->r + k) % im->p)) == TP_OK)
            st = wait_all(im, what);
    return st;
}

static tp_status mpi_broadcast(tp_group *g, void *buf, size_t count, tp_dtype dt, int root)
{
    tp_status st = TP_OK;
    mpi_impl *im = g->impl;
    const size_t bytes = count * tp_dtype_size(dt);
    const double t0 = tp_coll_t0(im->log_level);
    int vr = (im->r - root + im->p) % im->p, mask = 1;
    TP_CHECK(begin(g, TP_COLL_BROADCAST, bytes, dt, 0, root, 0));
    /* the root sends and receives nothing: the ranks first agree on the call (a root mismatch otherwise goes
     * unseen), then a binomial tree over ranks relative to the root: from the parent, to the children */
    st = dissemination(im, "broadcast");
    for (; mask < im->p && st == TP_OK; mask <<= 1) {
        if (vr & mask) {
            st = post_recv(im, buf, bytes, (vr - mask + root) % im->p);
            if (st == TP_OK) st = wait_all(im, "broadcast");
            break;
        }
    }
    for (mask >>= 1; mask > 0 && st == TP_OK; mask >>= 1)
        if (vr + mask < im->p) st = post_send(im, buf, bytes, (vr + mask + root) % im->p);
    if (st == TP_OK) st = wait_all(im, "broadcast");
    st = end(g, st, t0);
out:
    return st;
}

static tp_status mpi_barrier(tp_group *g)
{
    tp_status st = TP_OK;
    mpi_impl *im = g->impl;
    const double t0 = tp_coll_t0(im->log_level);
    TP_CHECK(begin(g, TP_COLL_BARRIER, 0, TP_FLOAT32, 0, -1, 0));
    st = end(g, dissemination(im, "barrier"), t0);
out:
    return st;
}

/* Safe from any thread: marks the group failed. When no thread runs one of its calls, the peers are told
 * at once; otherwise the thread waiting in it notices within one poll and tells them. */
static tp_status mpi_abort(tp_group *g)
{
    mpi_impl *im = g->impl;
    if (im == NULL) return TP_OK;
    atomic_store(&im->abort_requested, 1);
    if ((g_thread_level >= MPI_THREAD_MULTIPLE) && pthread_mutex_trylock(&im->busy) == 0) {
        if (!im->broken.broken) check_notices(im);
        pthread_mutex_unlock(&im->busy);
    }
    tp_clear_error();
    return TP_OK;
}

static void impl_free(mpi_impl *im)
{
    int fin = 0;
    if (im == NULL) return;
    if (MPI_Finalized(&fin) == MPI_SUCCESS && !fin) {
        drop_pending(im);
        if (im->ctl_req != MPI_REQUEST_NULL) {
            MPI_Cancel(&im->ctl_req);
            MPI_Request_free(&im->ctl_req);
        }
        if (im->ctl != MPI_COMM_NULL) MPI_Comm_free(&im->ctl);
        if (im->comm != MPI_COMM_NULL) MPI_Comm_free(&im->comm);
    }
    pthread_mutex_destroy(&im->busy);
    free(im->scratch);
    free(im->pend);
    free(im->reqs);
    free(im->idx);
    free(im->stats);
    free(im->peer_fp);
    free(im->have_fp);
    free(im);
}

static void mpi_destroy(tp_group *g)
{
    impl_free(g->impl);
    g->impl = NULL;
}

/* ---------------------------------------------------------------- creation */

static tp_status impl_new(tp_group *g, mpi_impl **out)
{
    tp_status st = TP_OK;
    mpi_impl *im = calloc(1, sizeof *im);
    if (im == NULL) return tp_error(TP_ERR_NOMEM, "mpi: out of memory");
    im->comm = im->ctl = MPI_COMM_NULL;
    im->ctl_req = MPI_REQUEST_NULL;
    pthread_mutex_init(&im->busy, NULL);
    im->p = g->size;
    im->r = g->rank;
    im->granks = g->global_ranks;
    im->store = g->store;
    im->timeout_s = g->timeout_s;
    im->log_level = tp_log_level();
    if ((im->peer_fp = calloc((size_t)g->size, sizeof *im->peer_fp)) == NULL ||
        (im->have_fp = calloc((size_t)g->size, 1)) == NULL) {
        st = tp_error(TP_ERR_NOMEM, "mpi: out of memory");
        goto out;
    }
    *out = im;
    im = NULL;
out:
    impl_free(im);
    return st;
}

#define N_PARAMS 3 /* the algorithm choices: one-shot KiB, chunk KiB, eager bytes */

/* The rest of a group whose data communicator is set: the notice communicator, the tag range, and the
 * algorithm choices (params: rank 0's, the same on every rank). */
static tp_status finish_create(tp_group *g, mpi_impl *im, const long params[N_PARAMS])
{
    tp_status st = TP_OK;
    int *ub = NULL, flag = 0;
    MPI_CHECK(MPI_Comm_set_errhandler(im->comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    MPI_CHECK(MPI_Comm_dup(im->comm, &im->ctl), "MPI_Comm_dup");
    MPI_CHECK(MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag), "MPI_Comm_get_attr(MPI_TAG_UB)");
    im->tag_mask = 32767; /* the least MPI_TAG_UB the standard allows */
    while (flag && ub && (long)im->tag_mask * 2 + 1 <= (long)*ub && im->tag_mask < (1 << 30) - 1)
        im->tag_mask = im->tag_mask * 2 + 1;
    im->oneshot = (size_t)params[0] * 1024;
    im->chunk = (size_t)params[1] * 1024;
    im->eager = (size_t)params[2]; /* 0: no eager rule */
    post_inbox(im);
    if (im->ctl_req == MPI_REQUEST_NULL) {
        st = tp_error(TP_ERR_COMM, "mpi: cannot post the notice receive");
        goto out;
    }
    tp_log(TP_LOG_INFO, "mpi: group %s rank %d of %d (global rank %d): one-shot <= %zu KB, eager < %zu B, rounds of %zu KB, "
           "tags < %d", g->prefix, g->rank, g->size, g->world_rank, im->oneshot / 1024, im->eager, im->chunk / 1024,
           im->tag_mask + 1);
out:
    return st;
}

/* Every member checks in through the store before a blocking MPI communicator call, so that the call
 * only starts once all its ranks are there (a rank that never comes is a bounded store timeout). */
static tp_status members_ready(tp_group *g, const char *what, long params[N_PARAMS])
{
    tp_status st = TP_OK;
    char key[160];
    size_t len = 0;
    snprintf(key, sizeof key, "%smpi/params", g->prefix);
    if (g->rank == 0) {
        TP_CHECK(tp_knob_int(TP_KNOB_MPI_ONESHOT_KB, &params[0]));
        TP_CHECK(tp_knob_int(TP_KNOB_MPI_CHUNK_KB, &params[1]));
        TP_CHECK(tp_knob_int(TP_KNOB_MPI_EAGER_BYTES, &params[2]));
        TP_CHECK(tp_store_set(g->store, key, params, N_PARAMS * sizeof *params));
    } else {
        TP_CHECK(tp_store_get(g->store, key, params, N_PARAMS * sizeof *params, &len));
        TP_REQUIRE(len == N_PARAMS * sizeof *params, "mpi: bad parameters in the store");
    }
    snprintf(key, sizeof key, "%smpi/%s", g->prefix, what);
    TP_CHECK(tp_store_arrive(g->store, key, g->rank));
    TP_CHECK(tp_store_wait_all(g->store, key, g->size, g->global_ranks, "to set up the mpi group"));
out:
    return st;
}

static tp_status mpi_create(tp_group *g)
{
    tp_status st = TP_OK;
    mpi_impl *im = NULL;
    MPI_Group world = MPI_GROUP_NULL, members = MPI_GROUP_NULL;
    long params[N_PARAMS] = {0, 0, 0};
    TP_CHECK(mpi_init());
    TP_REQUIRE(g->store != NULL, "mpi: a group of %d without a store", g->size);
    TP_CHECK(impl_new(g, &im));
    TP_CHECK(members_ready(g, "create", params));
    if (g->size == g->world_size) {
        MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &im->comm), "MPI_Comm_dup");
    } else {
        /* collective over the members only (the generic split of a world of another backend) */
        MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world), "MPI_Comm_group");
        MPI_CHECK(MPI_Group_incl(world, g->size, g->global_ranks, &members), "MPI_Group_incl");
        MPI_CHECK(MPI_Comm_create_group(MPI_COMM_WORLD, members, 0, &im->comm), "MPI_Comm_create_group");
    }
    TP_CHECK(finish_create(g, im, params));
    g->impl = im;
    im = NULL;
out:
    if (members != MPI_GROUP_NULL) MPI_Group_free(&members);
    if (world != MPI_GROUP_NULL) MPI_Group_free(&world);
    impl_free(im);
    if (st != TP_OK) st = tp_error_context(st, "mpi backend setup (rank %d of %d)", g->rank, g->size);
    return st;
}

/* Subgroups of an mpi group: MPI_Comm_split of its communicator, collective over the parent. */
static tp_status mpi_split(tp_group *parent, tp_group *child)
{
    tp_status st = TP_OK;
    mpi_impl *pim = parent->impl, *im = NULL;
    MPI_Comm comm = MPI_COMM_NULL;
    char key[160];
    int member = child->rank >= 0;
    long params[N_PARAMS];
    TP_REQUIRE(parent->backend == &tp_mpi_backend && pim != NULL, "mpi split: the parent group is not an mpi group");
    TP_CHECK(tp_broken_check(&pim->broken));
    snprintf(key, sizeof key, "%smpi/split", child->prefix);
    TP_CHECK(tp_store_arrive(parent->store, key, parent->rank));
    TP_CHECK(tp_store_wait_all(parent->store, key, parent->size, parent->global_ranks, "to split the mpi group"));
    pthread_mutex_lock(&pim->busy);
    st = MPI_Comm_split(pim->comm, member ? 0 : MPI_UNDEFINED, member ? child->rank : 0, &comm) == MPI_SUCCESS
             ? TP_OK
             : tp_error(TP_ERR_COMM, "mpi: MPI_Comm_split failed");
    pthread_mutex_unlock(&pim->busy);
    if (st != TP_OK || !member) goto out;
    TP_CHECK(impl_new(child, &im));
    im->comm = comm;
    comm = MPI_COMM_NULL;
    params[0] = (long)(pim->oneshot / 1024);
    params[1] = (long)(pim->chunk / 1024);
    params[2] = (long)pim->eager;
    TP_CHECK(finish_create(child, im, params));
    child->impl = im;
    im = NULL;
out:
    if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
    impl_free(im);
    return st;
}

const tp_backend tp_mpi_backend = {
    .name = "mpi",
    .devices = 1u << TP_DEVICE_CPU,
    .one_host = 0,
    .launcher_world = 1,
    .groups_of_one = 0,
    .boot_bcast = mpi_boot_bcast,
    .create = mpi_create,
    .split = mpi_split,
    .all_reduce = mpi_all_reduce,
    .all_gatherv = mpi_all_gatherv,
    .reduce_scatter = mpi_reduce_scatter,
    .broadcast = mpi_broadcast,
    .barrier = mpi_barrier,
    .abort = mpi_abort,
    .destroy = mpi_destroy,
    .staging = NULL,
    .all_reduce_staged = NULL,
    .all_reduce_bias = NULL, /* group.c: all-reduce, then the bias */
};
