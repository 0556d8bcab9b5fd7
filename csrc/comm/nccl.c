/* The NCCL backend: GPU collectives on the current stream.
 *
 * - Communicators are non-blocking (ncclConfig_t.blocking = 0): every NCCL call may return
 *   ncclInProgress, and we poll ncclCommGetAsyncError until it settles, bounded by the group's
 *   timeout. A collective then waits for its completion the same way (an event polled together with
 *   ncclCommGetAsyncError), so a dead or stuck peer becomes TP_ERR_TIMEOUT / TP_ERR_COMM after
 *   ncclCommAbort instead of a hang. TPLINEAR_NCCL_ASYNC=1, and a group of one (no peer to lose), skip
 *   that wait: the collective returns once enqueued; the next collective only checks, without waiting,
 *   that the earlier ones have not failed or been pending past the timeout (poll_pending), and the
 *   bounded wait happens at the group's barrier or destroy. Host buffers are waited for (the caller
 *   reads them on return).
 * - The world's ncclUniqueId comes from group rank 0 through the rendezvous store; subgroups split the
 *   parent communicator (nccl_split) or, without one, make a fresh id the same way.
 * - The GPU of a communicator is LOCAL_RANK modulo the visible device count. Buffers on that GPU are
 *   used in place; host buffers (NumPy bookkeeping, e.g. the layers' construction checks) are staged
 *   through a temporary device buffer, a copy each way; a buffer on another GPU is an error. */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nccl.h>

#include "../device/cuda.h"
#include "backend.h"

typedef struct {
    ncclComm_t comm;
    int device;
    int aborted;
    int abort_requested; /* set by tp_group_abort from any thread; acted on by the thread using the comm */
    int async;          /* TPLINEAR_NCCL_ASYNC=1 */
    cudaEvent_t done;   /* recorded after each collective */
    cudaStream_t done_on; /* the stream it was recorded on */
    int pending;        /* done is recorded and not yet waited for */
    double pending_since;
    void *scratch;      /* 1 int32 on the device, for barriers */
} nccl_impl;

extern const tp_backend tp_nccl_backend;

static nccl_impl *impl_of(tp_group *g) { return (nccl_impl *)g->impl; }

static tp_status nccl_fail(tp_group *g, tp_status s, ncclResult_t r, const char *what)
{
    nccl_impl *im = impl_of(g);
    const char *detail = im && im->comm ? ncclGetLastError(im->comm) : "";
    tp_status st = tp_error(s, "nccl %s (group rank %d of %d): %s%s%s", what, g->rank, g->size,
                            ncclGetErrorString(r), detail && detail[0] ? ": " : "", detail ? detail : "");
    if (im && im->comm && !im->aborted) {
        ncclCommAbort(im->comm);
        im->aborted = 1;
        tp_log(TP_LOG_INFO, "nccl: communicator of group %s aborted after %s failed", g->prefix, what);
    }
    return st;
}

static void pause_briefly(unsigned *spins)
{
    if (++*spins < 200) {
        sched_yield();
    } else {
        struct timespec ts = {0, 50 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Waits until the communicator's state leaves ncclInProgress (r: what the call returned). */
static tp_status settle(tp_group *g, ncclResult_t r, const char *what)
{
    nccl_impl *im = impl_of(g);
    double deadline = tp_now() + g->timeout_s;
    unsigned spins = 0;
    while (r == ncclInProgress) {
        if (__atomic_load_n(&im->abort_requested, __ATOMIC_ACQUIRE)) return nccl_fail(g, TP_ERR_COMM, r, what);
        if (tp_now() > deadline) {
            nccl_fail(g, TP_ERR_TIMEOUT, r, what);
            return tp_error_context(TP_ERR_TIMEOUT, "timed out after %.0f s (a peer never joined or is stuck)",
                                    g->timeout_s);
        }
        pause_briefly(&spins);
        if (ncclCommGetAsyncError(im->comm, &r) != ncclSuccess) break;
    }
    if (r != ncclSuccess) return nccl_fail(g, TP_ERR_COMM, r, what);
    return TP_OK;
}

/* Waits for the last recorded collective to finish on the device, polling for asynchronous NCCL
 * errors (a peer that died) and bounded by the timeout; aborts the communicator on either. */
static tp_status wait_pending(tp_group *g, const char *what)
{
    tp_status st = TP_OK;
    nccl_impl *im = impl_of(g);
    unsigned spins = 0;
    double watch_after = (double)tp_knob_value(TP_KNOB_WATCHDOG_S);
    if (!im->pending) return TP_OK;
    for (;;) {
        ncclResult_t r = ncclSuccess;
        cudaError_t e = cudaEventQuery(im->done);
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) {
            (void)cudaGetLastError();
            im->pending = 0;
            TP_CU(e, "cudaEventQuery (nccl)");
        }
        if (ncclCommGetAsyncError(im->comm, &r) != ncclSuccess || (r != ncclSuccess && r != ncclInProgress)) {
            im->pending = 0;
            st = nccl_fail(g, TP_ERR_COMM, r, what);
            tp_error_context(st, "a peer failed during %s", what);
            goto out;
        }
        if (__atomic_load_n(&im->abort_requested, __ATOMIC_ACQUIRE)) {
            im->pending = 0;
            nccl_fail(g, TP_ERR_COMM, ncclInProgress, what);
            st = tp_error(TP_ERR_COMM, "nccl %s: the group was aborted (tp_group_abort) while waiting", what);
            goto out;
        }
        if (watch_after > 0 && tp_now() - im->pending_since > watch_after) { /* the watchdog: once per wait */
            tp_log(TP_LOG_WARN, "nccl %s: group rank %d of %d (global rank %d) has waited %.0f s for it to complete "
                   "(NCCL does not say which peer is missing: one is slow, stuck, or called another collective); "
                   "the wait ends at the timeout of %.0f s", what, g->rank, g->size, g->world_rank, watch_after,
                   g->timeout_s);
            watch_after = 0;
        }
        if (tp_now() - im->pending_since > g->timeout_s) {
            im->pending = 0;
            nccl_fail(g, TP_ERR_TIMEOUT, ncclInProgress, what);
            st = tp_error(TP_ERR_TIMEOUT,
                          "nccl %s did not complete within %.0f s (group rank %d of %d): a peer is dead or "
                          "stuck; the communicator was aborted",
                          what, g->timeout_s, g->rank, g->size);
            goto out;
        }
        pause_briefly(&spins);
    }
    im->pending = 0;
out:
    return st;
}

/* The non-blocking form of wait_pending, for collectives that do not wait for each other (a group of one,
 * TPLINEAR_NCCL_ASYNC=1): the device orders the next collective after the last (the current stream waits
 * for the event when the last ran on another stream), so the host only checks that it has not failed, been
 * aborted or been pending past the timeout (then wait_pending reports it). */
static tp_status poll_pending(tp_group *g, const char *what)
{
    tp_status st = TP_OK;
    nccl_impl *im = impl_of(g);
    ncclResult_t r = ncclSuccess;
    cudaError_t e;
    if (!im->pending) return TP_OK;
    e = cudaEventQuery(im->done);
    if (e == cudaSuccess) {
        im->pending = 0;
        return TP_OK;
    }
    if (e != cudaErrorNotReady || ncclCommGetAsyncError(im->comm, &r) != ncclSuccess ||
        (r != ncclSuccess && r != ncclInProgress) || __atomic_load_n(&im->abort_requested, __ATOMIC_ACQUIRE) ||
        tp_now() - im->pending_since > g->timeout_s)
        return wait_pending(g, what);
    if (im->done_on != tp_cuda_stream())
        TP_CU(cudaStreamWaitEvent(tp_cuda_stream(), im->done, 0), "cudaStreamWaitEvent (nccl)");
out:
    return st;
}

/* Before a collective: the communicator is usable, its device current (*prev: the caller's, which the
 * collective gives back with tp_cuda_restore_device), and the last collective has not failed; a collective
 * that waits for each one (groups of more than one, by default) has waited for it already. */
static tp_status check_usable(tp_group *g, const char *what, int *prev)
{
    tp_status st = TP_OK;
    nccl_impl *im = impl_of(g);
    *prev = -1;
    if (!im->aborted && __atomic_load_n(&im->abort_requested, __ATOMIC_ACQUIRE)) {
        im->aborted = 1;
        ncclCommAbort(im->comm);
    }
    if (im->aborted)
        return tp_error(TP_ERR_COMM, "nccl %s: the group's communicator was aborted after an earlier failure", what);
    TP_CHECK(tp_cuda_use_device(im->device, prev));
    TP_CHECK(poll_pending(g, what));
out:
    return st;
}

/* A buffer for NCCL: device memory of this rank's GPU is used in place; host memory (NumPy bookkeeping
 * such as the layers' construction checks) is staged through a temporary device buffer, copied in when
 * copy_in. *tmp is that buffer (NULL when none was needed). */
typedef struct {
    void *host;  /* the caller's host buffer, or NULL */
    void *dev;   /* what NCCL sees */
    size_t bytes;
} staged;

static tp_status stage_in(tp_group *g, const void *p, size_t bytes, int copy_in, staged *sb, const char *what)
{
    tp_status st = TP_OK;
    nccl_impl *im = impl_of(g);
    int dev;
    sb->host = NULL;
    sb->dev = (void *)p;
    sb->bytes = bytes;
    if (bytes == 0 || p == NULL) goto out;
    TP_CHECK(tp_cuda_pointer_device(p, &dev));
    if (dev == im->device) goto out;
    TP_REQUIRE(dev < 0, "nccl %s: a buffer is on cuda:%d but this rank's GPU is cuda:%d", what, dev, im->device);
    TP_CU(cudaMallocAsync(&sb->dev, bytes, tp_cuda_stream()), "cudaMallocAsync (nccl staging)");
    sb->host = (void *)p;
    if (copy_in)
        TP_CU(cudaMemcpyAsync(sb->dev, p, bytes, cudaMemcpyHostToDevice, tp_cuda_stream()), "cudaMemcpyAsync (nccl staging)");
    tp_log(TP_LOG_TRACE, "nccl %s: staging %zu bytes of host memory", what, bytes);
out:
    return st;
}

/* Copies a staged result back (copy_out) and frees the staging buffer; keeps an earlier failure. */
static tp_status stage_out(tp_status st, staged *sb, int copy_out)
{
    if (sb->host == NULL) return st;
    if (st == TP_OK && copy_out) {
        cudaError_t e = cudaMemcpyAsync(sb->host, sb->dev, sb->bytes, cudaMemcpyDeviceToHost, tp_cuda_stream());
        if (e == cudaSuccess) e = cudaStreamSynchronize(tp_cuda_stream());
        if (e != cudaSuccess) st = tp_error(TP_ERR_CUDA, "nccl staging copy: %s", cudaGetErrorString(e));
    }
    (void)cudaFreeAsync(sb->dev, tp_cuda_stream());
    (void)cudaGetLastError();
    sb->host = NULL;
    return st;
}

/* After a collective was enqueued: record its completion and wait (unless async). */
static tp_status finish(tp_group *g, ncclResult_t r, const char *what, int force_wait)
{
    tp_status st = TP_OK;
    nccl_impl *im = impl_of(g);
    TP_CHECK(settle(g, r, what));
    TP_CU(cudaEventRecord(im->done, tp_cuda_stream()), "cudaEventRecord (nccl)");
    im->done_on = tp_cuda_stream();
    if (!im->pending) im->pending_since = tp_now(); /* the oldest collective not yet seen complete */
    im->pending = 1;
    /* a group of one has no peer to lose: its collectives stay asynchronous */
    if ((!im->async && g->size > 1) || force_wait) TP_CHECK(wait_pending(g, what));
out:
    return st;
}

static tp_status nccl_type(tp_dtype dt, ncclDataType_t *t)
{
    switch (dt) {
    case TP_FLOAT32: *t = ncclFloat32; return TP_OK;
    case TP_FLOAT64: *t = ncclFloat64; return TP_OK;
    case TP_FLOAT16: *t = ncclFloat16; return TP_OK;
    case TP_BFLOAT16: *t = ncclBfloat16; return TP_OK;
    case TP_INT32: *t = ncclInt32; return TP_OK;
    case TP_INT64: *t = ncclInt64; return TP_OK;
    }
    return tp_error(TP_ERR_TYPE, "nccl: unsupported dtype %d", (int)dt);
}

static ncclRedOp_t nccl_op(tp_reduce_op op)
{
    switch (op) {
    case TP_AVG: return ncclAvg;
    case TP_MAX: return ncclMax;
    case TP_MIN: return ncclMin;
    default: return ncclSum;
    }
}

/* ---------------------------------------------------------------- the backend table */

static tp_status b_all_reduce(tp_group *g, void *buf, size_t count, tp_dtype dt, tp_reduce_op op)
{
    tp_status st = TP_OK;
    ncclDataType_t t = ncclFloat32;
    staged sb = {NULL, NULL, 0};
    int prev = -1;
    TP_CHECK(nccl_type(dt, &t));
    TP_CHECK(check_usable(g, "all_reduce", &prev));
    if (count == 0) goto out;
    TP_CHECK(stage_in(g, buf, count * tp_dtype_size(dt), 1, &sb, "all_reduce"));
    TP_CHECK(finish(g, ncclAllReduce(sb.dev, sb.dev, count, t, nccl_op(op), impl_of(g)->comm, tp_cuda_stream()),
                    "all_reduce", sb.host != NULL));
out:
    st = stage_out(st, &sb, 1);
    tp_cuda_restore_device(prev);
    return st;
}

static tp_status b_all_gatherv(tp_group *g, const void *send, void *recv, const size_t *counts, tp_dtype dt)
{
    tp_status st = TP_OK;
    ncclDataType_t t = ncclFloat32;
    nccl_impl *im = impl_of(g);
    size_t item = tp_dtype_size(dt), off = 0, total = 0;
    int even = 1;
    ncclResult_t r = ncclSuccess;
    staged ss = {NULL, NULL, 0}, sr = {NULL, NULL, 0};
    int prev = -1;
    TP_CHECK(nccl_type(dt, &t));
    for (int i = 0; i < g->size; i++) {
        total += counts[i];
        if (counts[i] != counts[0]) even = 0;
    }
    TP_CHECK(check_usable(g, "all_gather", &prev));
    if (total == 0) goto out;
    TP_CHECK(stage_in(g, send, counts[g->rank] * item, 1, &ss, "all_gather"));
    TP_CHECK(stage_in(g, recv, total * item, 0, &sr, "all_gather"));
    if (even) {
        r = ncclAllGather(ss.dev, sr.dev, counts[0], t, im->comm, tp_cuda_stream());
    } else {
        /* all-gather-v: one broadcast per rank, fused into one NCCL group */
        r = ncclGroupStart();
        for (int i = 0; i < g->size && (r == ncclSuccess || r == ncclInProgress); i++) {
            if (counts[i])
                r = ncclBroadcast(i == g->rank ? ss.dev : NULL, (char *)sr.dev + off * item, counts[i], t, i, im->comm,
                                  tp_cuda_stream());
            off += counts[i];
        }
        {
            ncclResult_t e = ncclGroupEnd();
            if (r == ncclSuccess || r == ncclInProgress) r = e;
        }
    }
    TP_CHECK(finish(g, r, "all_gather", ss.host != NULL || sr.host != NULL));
out:
    st = stage_out(st, &ss, 0);
    st = stage_out(st, &sr, 1);
    tp_cuda_restore_device(prev);
    return st;
}

static tp_status b_reduce_scatter(tp_group *g, const void *send, void *recv, size_t count, tp_dtype dt,
                                  tp_reduce_op op)
{
    tp_status st = TP_OK;
    ncclDataType_t t = ncclFloat32;
    size_t item = tp_dtype_size(dt);
    staged ss = {NULL, NULL, 0}, sr = {NULL, NULL, 0};
    int prev = -1;
    TP_CHECK(nccl_type(dt, &t));
    TP_CHECK(check_usable(g, "reduce_scatter", &prev));
    if (count == 0) goto out;
    TP_CHECK(stage_in(g, send, count * item * (size_t)g->size, 1, &ss, "reduce_scatter"));
    TP_CHECK(stage_in(g, recv, count * item, 0, &sr, "reduce_scatter"));
    TP_CHECK(finish(g, ncclReduceScatter(ss.dev, sr.dev, count, t, nccl_op(op), impl_of(g)->comm, tp_cuda_stream()),
                    "reduce_scatter", ss.host != NULL || sr.host != NULL));
out:
    st = stage_out(st, &ss, 0);
    st = stage_out(st, &sr, 1);
    tp_cuda_restore_device(prev);
    return st;
}

static tp_status b_broadcast(tp_group *g, void *buf, size_t count, tp_dtype dt, int root)
{
    tp_status st = TP_OK;
    ncclDataType_t t = ncclFloat32;
    staged sb = {NULL, NULL, 0};
    int prev = -1;
    TP_CHECK(nccl_type(dt, &t));
    TP_CHECK(check_usable(g, "broadcast", &prev));
    if (count == 0) goto out;
    TP_CHECK(stage_in(g, buf, count * tp_dtype_size(dt), g->rank == root, &sb, "broadcast"));
    TP_CHECK(finish(g, ncclBroadcast(sb.dev, sb.dev, count, t, root, impl_of(g)->comm, tp_cuda_stream()), "broadcast",
                    sb.host != NULL));
out:
    st = stage_out(st, &sb, 1);
    tp_cuda_restore_device(prev);
    return st;
}

static tp_status b_barrier(tp_group *g)
{
    tp_status st = TP_OK;
    nccl_impl *im = impl_of(g);
    int prev = -1;
    TP_CHECK(check_usable(g, "barrier", &prev));
    TP_CHECK(finish(g, ncclAllReduce(im->scratch, im->scratch, 1, ncclInt32, ncclSum, im->comm, tp_cuda_stream()),
                    "barrier", 1));
out:
    tp_cuda_restore_device(prev);
    return st;
}

/* Safe from any thread: only flags the request. The thread that uses the communicator (polling in
 * settle / wait_pending, or at its next collective or destroy) calls ncclCommAbort, so no thread can
 * touch a communicator after it is freed. Every wait polls, so a blocked collective wakes at once. */
static tp_status b_abort(tp_group *g)
{
    nccl_impl *im = impl_of(g);
    if (im) __atomic_store_n(&im->abort_requested, 1, __ATOMIC_RELEASE);
    return TP_OK;
}

/* Frees the event and scratch on the communicator's device, and gives the caller's device back. */
static void impl_free(nccl_impl *im)
{
    int prev = -1;
    if (im == NULL) return;
    if (tp_cuda_use_device(im->device, &prev) == TP_OK) {
        if (im->done) cudaEventDestroy(im->done);
        if (im->scratch) cudaFree(im->scratch);
    }
    (void)cudaGetLastError();
    tp_cuda_restore_device(prev);
    free(im);
}

/* Finalises on the communicator's device (NCCL's calls and the flush run there) and gives the caller's device
 * back: destroying a group on cuda:1 leaves torch's current cuda:0 current. */
static void b_destroy(tp_group *g)
{
    nccl_impl *im = impl_of(g);
    int prev = -1;
    if (im == NULL) return;
    (void)tp_cuda_use_device(im->device, &prev); /* failing, it is freed below all the same */
    if (im->comm && !im->aborted && __atomic_load_n(&im->abort_requested, __ATOMIC_ACQUIRE)) {
        im->aborted = 1;
        ncclCommAbort(im->comm);
    }
    if (im->comm && !im->aborted) {
        /* flush outstanding work, bounded by the timeout; abort if a peer never finishes */
        ncclResult_t r = ncclSuccess;
        if (wait_pending(g, "destroy") != TP_OK || im->aborted) goto freed;
        r = ncclCommFinalize(im->comm);
        if (settle(g, r, "finalize") != TP_OK || im->aborted) goto freed;
        ncclCommDestroy(im->comm);
    }
freed:
    tp_cuda_restore_device(prev);
    impl_free(im);
    g->impl = NULL;
}

/* ---------------------------------------------------------------- construction */

/* The per-communicator state on device, which the caller has made current. */
static tp_status impl_new(tp_group *g, int device, nccl_impl **out)
{
    tp_status st = TP_OK;
    long async = 0;
    nccl_impl *im = calloc(1, sizeof *im);
    if (im == NULL) return tp_error(TP_ERR_NOMEM, "nccl: out of memory");
    im->device = device;
    TP_CHECK(tp_knob_int(TP_KNOB_NCCL_ASYNC, &async));
    im->async = async == 1;
    TP_CU(cudaEventCreateWithFlags(&im->done, cudaEventDisableTiming), "cudaEventCreate");
    TP_CU(cudaMalloc(&im->scratch, sizeof(int32_t)), "cudaMalloc");
    TP_CU(cudaMemset(im->scratch, 0, sizeof(int32_t)), "cudaMemset");
    (void)g;
    *out = im;
    im = NULL;
out:
    impl_free(im);
    return st;
}

static void config_init(ncclConfig_t *cfg, tp_group *g)
{
    ncclConfig_t c = NCCL_CONFIG_INITIALIZER;
    c.blocking = 0;
    c.commName = g->prefix;
    *cfg = c;
}

static tp_status nccl_create(tp_group *g)
{
    tp_status st = TP_OK;
    ncclUniqueId id;
    nccl_impl *im = NULL;
    ncclConfig_t cfg;
    char key[96];
    int n = tp_cuda_device_count(), device, prev = -1;
    size_t len = 0;
    TP_REQUIRE(g != NULL && g->rank >= 0, "nccl: this rank is not a member of the group");
    if (n == 0) {
        st = tp_error(TP_ERR_UNSUPPORTED, "the nccl backend needs a CUDA GPU, and none is visible to this process");
        goto out;
    }
    device = (g->local_rank > 0 ? g->local_rank : 0) % n;
    /* NCCL makes the communicator on the current device: this rank's, the caller's given back at out */
    TP_CHECK(tp_cuda_use_device(device, &prev));
    TP_CHECK(impl_new(g, device, &im));
    snprintf(key, sizeof key, "%snccl_id", g->prefix);
    if (g->size > 1) {
        if (g->rank == 0) {
            ncclResult_t r = ncclGetUniqueId(&id);
            if (r != ncclSuccess) {
                st = tp_error(TP_ERR_COMM, "ncclGetUniqueId: %s", ncclGetErrorString(r));
                goto out;
            }
            TP_CHECK(tp_store_set(g->store, key, &id, sizeof id));
        } else {
            TP_CHECK(tp_store_get(g->store, key, &id, sizeof id, &len));
            TP_REQUIRE(len == sizeof id, "nccl: the unique id in the store has %zu bytes, expected %zu", len, sizeof id);
        }
    } else {
        ncclResult_t r = ncclGetUniqueId(&id);
        if (r != ncclSuccess) {
            st = tp_error(TP_ERR_COMM, "ncclGetUniqueId: %s", ncclGetErrorString(r));
            goto out;
        }
    }
    config_init(&cfg, g);
    g->impl = im;
    st = settle(g, ncclCommInitRankConfig(&im->comm, g->size, id, g->rank, &cfg), "init");
    if (st != TP_OK) goto out;
    tp_log(TP_LOG_INFO, "nccl: group %s rank %d of %d on cuda:%d (%s)", g->prefix, g->rank, g->size, device,
           im->async ? "asynchronous waits" : "waits for each collective");
    im = NULL;
out:
    if (im) {
        if (im->comm && !im->aborted) ncclCommAbort(im->comm);
        impl_free(im);
        if (g) g->impl = NULL;
    }
    tp_cuda_restore_device(prev);
    return st;
}

static tp_status nccl_split(tp_group *parent, tp_group *child)
{
    tp_status st = TP_OK;
    nccl_impl *pim = impl_of(parent), *im = NULL;
    ncclConfig_t cfg;
    ncclComm_t comm = NULL;
    ncclResult_t r;
    int member = child != NULL && child->rank >= 0, prev = -1;
    TP_REQUIRE(parent && parent->backend == &tp_nccl_backend, "nccl split: the parent group is not an nccl group");
    TP_CHECK(check_usable(parent, "split", &prev));
    if (member) TP_CHECK(impl_new(child, pim->device, &im));
    config_init(&cfg, member ? child : parent);
    r = ncclCommSplit(pim->comm, member ? 0 : NCCL_SPLIT_NOCOLOR, member ? child->rank : 0, &comm, &cfg);
    if (!member || (r != ncclSuccess && r != ncclInProgress)) {
        /* a non-member gets no communicator: wait for the parent to finish its part */
        TP_CHECK(settle(parent, r, "split"));
        goto out;
    }
    /* the new communicator finishes initialising in the background: poll it */
    im->comm = comm;
    child->impl = im;
    if (r == ncclSuccess && ncclCommGetAsyncError(comm, &r) != ncclSuccess) r = ncclInternalError;
    st = settle(child, r, "split");
    if (st != TP_OK) {
        child->impl = NULL;
        goto out;
    }
    tp_log(TP_LOG_INFO, "nccl: group %s split from %s, rank %d of %d", child->prefix, parent->prefix, child->rank,
           child->size);
    im = NULL;
out:
    if (im) {
        if (im->comm && !im->aborted) ncclCommAbort(im->comm);
        impl_free(im);
    }
    tp_cuda_restore_device(prev);
    return st;
}

const tp_backend tp_nccl_backend = {
    .name = "nccl",
    .devices = 1u << TP_DEVICE_CUDA, /* host buffers are staged through the GPU (stage_in) */
    .one_host = 0,
    .groups_of_one = 1, /* a GPU world of one still runs its collectives on the device */
    .create = nccl_create,
    .split = nccl_split,
    .all_reduce = b_all_reduce,
    .all_gatherv = b_all_gatherv,
    .reduce_scatter = b_reduce_scatter,
    .broadcast = b_broadcast,
    .barrier = b_barrier,
    .abort = b_abort,
    .destroy = b_destroy,
    .staging = NULL,
    .all_reduce_staged = NULL,
    .all_reduce_bias = NULL, /* group.c: all-reduce, then the bias */
};
