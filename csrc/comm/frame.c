/* What the backends that run their own collectives on the host (shm, mpi) share around each one: the
 * group's failure record, which refuses every later call, and the TRACE line at its end. */
#include <stdio.h>

#include "backend.h"

void tp_broken_record(tp_broken *b, tp_status st)
{
    b->broken = 1;
    b->status = st == TP_ERR_INTERRUPTED ? TP_ERR_COMM : st; /* later calls fail; they were not interrupted */
    snprintf(b->msg, sizeof b->msg, "%s", tp_last_error());
}

tp_status tp_broken_check(const tp_broken *b)
{
    if (!b->broken) return TP_OK;
    return tp_error(b->status, "process group unusable after an earlier failure: %s", b->msg);
}

void tp_coll_trace(int log_level, const char *backend, int kind, uint64_t seq, uint64_t bytes, int p, double t0)
{
    if (log_level >= TP_LOG_TRACE)
        tp_log(TP_LOG_TRACE, "%s: %s #%llu of %llu bytes over %d ranks: %.1f us", backend, tp_coll_name(kind),
               (unsigned long long)seq, (unsigned long long)bytes, p, (tp_now() - t0) * 1e6);
}
