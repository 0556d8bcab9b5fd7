/* What a collective call is, as the shm and mpi backends compare it across ranks: names, the description
 * in mismatch and timeout messages, equality, and the hash of uneven counts (comm/backend.h). */
#include <stdio.h>

#include "../core/dtype.h"
#include "backend.h"

const char *tp_coll_name(int kind)
{
    switch (kind) {
    case TP_COLL_ALL_REDUCE: return "all_reduce";
    case TP_COLL_ALL_GATHER: return "all_gather";
    case TP_COLL_REDUCE_SCATTER: return "reduce_scatter";
    case TP_COLL_BROADCAST: return "broadcast";
    case TP_COLL_BARRIER: return "barrier";
    }
    return "?";
}

static const char *op_name(int op)
{
    static const char *const names[] = {"sum", "avg", "max", "min"};
    return op >= 0 && op < 4 ? names[op] : "?";
}

int tp_fp_describe(const tp_fingerprint *f, char *buf, size_t cap)
{
    size_t es = tp_dtype_size((tp_dtype)f->dtype);
    unsigned long long n = es ? (unsigned long long)(f->bytes / es) : 0ull;
    const char *dt = tp_dtype_name((tp_dtype)f->dtype);
    switch (f->kind) {
    case TP_COLL_ALL_REDUCE:
    case TP_COLL_REDUCE_SCATTER:
        snprintf(buf, cap, "%s of %llu %s (%s)", tp_coll_name(f->kind), n, dt, op_name(f->op));
        return 0;
    case TP_COLL_ALL_GATHER:
        snprintf(buf, cap, "all_gather of %llu %s in all (counts hash %llx)", n, dt, (unsigned long long)f->extra);
        return 0;
    case TP_COLL_BROADCAST:
        snprintf(buf, cap, "broadcast of %llu %s from root %d", n, dt, f->root);
        return 0;
    case TP_COLL_BARRIER:
        snprintf(buf, cap, "barrier");
        return 0;
    }
    return -1;
}

int tp_fp_equal(const tp_fingerprint *a, const tp_fingerprint *b)
{
    return a->seq == b->seq && a->kind == b->kind && a->bytes == b->bytes && a->dtype == b->dtype &&
           a->op == b->op && a->root == b->root && a->extra == b->extra;
}

uint64_t tp_hash_counts(const size_t *counts, int p)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int j = 0; j < p; j++) {
        h ^= (uint64_t)counts[j];
        h *= 1099511628211ull;
    }
    return h;
}
