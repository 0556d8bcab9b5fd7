/* Status codes, the thread-local error message, logging and clocks. */
#include <errno.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "env.h"

#define TP_MSG_CAP 1024

static _Thread_local char tp_msg[TP_MSG_CAP];

const char *tp_last_error(void) { return tp_msg; }

void tp_clear_error(void) { tp_msg[0] = '\0'; }

const char *tp_status_name(tp_status s)
{
    switch (s) {
    case TP_OK: return "TP_OK";
    case TP_ERR_VALUE: return "TP_ERR_VALUE";
    case TP_ERR_TYPE: return "TP_ERR_TYPE";
    case TP_ERR_NOMEM: return "TP_ERR_NOMEM";
    case TP_ERR_COMM: return "TP_ERR_COMM";
    case TP_ERR_TIMEOUT: return "TP_ERR_TIMEOUT";
    case TP_ERR_UNSUPPORTED: return "TP_ERR_UNSUPPORTED";
    case TP_ERR_SYSTEM: return "TP_ERR_SYSTEM";
    case TP_ERR_CUDA: return "TP_ERR_CUDA";
    case TP_ERR_INTERRUPTED: return "TP_ERR_INTERRUPTED";
    }
    return "TP_ERR_UNKNOWN";
}

tp_status tp_error(tp_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tp_msg, sizeof tp_msg, fmt, ap);
    va_end(ap);
    return s;
}

/* Appends ": tail" to the message, truncating at the buffer's end. */
static void append(const char *tail)
{
    size_t len = strlen(tp_msg);
    if (len + 2 < sizeof tp_msg) snprintf(tp_msg + len, sizeof tp_msg - len, ": %s", tail);
}

tp_status tp_error_errno(tp_status s, const char *fmt, ...)
{
    int err = errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tp_msg, sizeof tp_msg, fmt, ap);
    va_end(ap);
    append(strerror(err));
    return s;
}

tp_status tp_error_context(tp_status s, const char *fmt, ...)
{
    char old[TP_MSG_CAP];
    va_list ap;
    memcpy(old, tp_msg, sizeof old);
    va_start(ap, fmt);
    vsnprintf(tp_msg, sizeof tp_msg, fmt, ap);
    va_end(ap);
    append(old);
    return s;
}

static int g_log_rank = -1; /* set once a world knows this process's rank (atomic) */

void tp_log_set_rank(int rank) { __atomic_store_n(&g_log_rank, rank, __ATOMIC_RELEASE); }

void tp_log(int level, const char *fmt, ...)
{
    char line[TP_MSG_CAP];
    int n;
    va_list ap;
    int rank = __atomic_load_n(&g_log_rank, __ATOMIC_ACQUIRE);
    if (tp_log_level() < level) return;
    if (rank < 0) rank = tp_env_rank();
    n = snprintf(line, sizeof line, "[tplinear rank %d] ", rank > 0 ? rank : 0);
    if (n < 0 || (size_t)n >= sizeof line) return;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    /* one write per line so ranks do not interleave mid-line */
    n = (int)strlen(line);
    if ((size_t)n < sizeof line - 1) line[n++] = '\n';
    if (write(STDERR_FILENO, line, (size_t)n) < 0) return;
}

double tp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void tp_sleep(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* The interrupt hook: one per process (the waits of every group ask it), set by the binding. */
static struct {
    _Atomic(tp_interrupt_fn) fn;
    void *_Atomic ctx;
} g_hook;

void tp_set_interrupt_hook(tp_interrupt_fn fn, void *ctx)
{
    atomic_store(&g_hook.fn, NULL);
    atomic_store(&g_hook.ctx, ctx);
    atomic_store(&g_hook.fn, fn);
}

tp_status tp_wait_check(double *next, const char *what)
{
    tp_interrupt_fn fn = atomic_load(&g_hook.fn);
    double now;
    if (fn == NULL || (now = tp_now()) < *next) return TP_OK;
    *next = now + 0.05;
    if (!fn(atomic_load(&g_hook.ctx))) return TP_OK;
    return tp_error(TP_ERR_INTERRUPTED, "%s: interrupted by a signal while waiting (Ctrl-C, or a signal handler "
                    "that raised)", what);
}
