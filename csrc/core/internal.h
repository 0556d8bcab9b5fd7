/* Internal helpers shared by every part of the C core. Not installed. */
#ifndef TP_INTERNAL_H
#define TP_INTERNAL_H

#include "tplinear.h"

#if defined(__GNUC__)
#define TP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define TP_PRINTF(a, b)
#endif

/* Records a formatted message for tp_last_error() and returns s. */
tp_status tp_error(tp_status s, const char *fmt, ...) TP_PRINTF(2, 3);
/* Like tp_error, with ": strerror(errno)" appended (errno captured first). */
tp_status tp_error_errno(tp_status s, const char *fmt, ...) TP_PRINTF(2, 3);
/* Prefixes the current message with context, keeps the status. */
tp_status tp_error_context(tp_status s, const char *fmt, ...) TP_PRINTF(2, 3);

/* Evaluates expr (a tp_status); on failure jumps to the function's one error path. */
#define TP_CHECK(expr)             \
    do {                           \
        st = (expr);               \
        if (st != TP_OK) goto out; \
    } while (0)

/* Fails with TP_ERR_VALUE unless cond holds. */
#define TP_REQUIRE(cond, ...)                                \
    do {                                                     \
        if (!(cond)) {                                       \
            st = tp_error(TP_ERR_VALUE, __VA_ARGS__);        \
            goto out;                                        \
        }                                                    \
    } while (0)

/* Debug logging (TPLINEAR_DEBUG=INFO|TRACE), to stderr prefixed with the world rank. Not printf on stdout. */
enum { TP_LOG_OFF = 0, TP_LOG_INFO = 1, TP_LOG_TRACE = 2 };
int tp_log_level(void);
void tp_log(int level, const char *fmt, ...) TP_PRINTF(2, 3);
/* The world rank the log prefix names, once a world knows it (before: the environment's RANK or
 * OMPI_COMM_WORLD_RANK, else 0). */
void tp_log_set_rank(int rank);

/* Monotonic clock in seconds. */
double tp_now(void);

/* The tuning knobs (core/env.c declares each with its type, default and doc); read from the
 * environment once per process. */
typedef enum {
    TP_KNOB_DEBUG,
    TP_KNOB_BACKEND,
    TP_KNOB_SHM_SLOT_KB,
    TP_KNOB_SHM_ONESHOT_KB,
    TP_KNOB_SHM_CHUNK_KB,
    TP_KNOB_SHM_ALGO,
    TP_KNOB_SHM_SPIN_US,
    TP_KNOB_SHM_YIELD_US,
    TP_KNOB_SHM_CMA,
    TP_KNOB_SHM_CMA_KB,
    TP_KNOB_ALLOW_TF32,
    TP_KNOB_NCCL_ASYNC,
    TP_KNOB_COUNT
} tp_knob;
/* An int, bool or choice knob's value (a choice: its index in the declared choices, -1 unset), the
 * default when unset; TP_ERR_VALUE naming the variable and what it accepts when its value is invalid
 * (*out is then the default). */
tp_status tp_knob_int(tp_knob k, long *out);
/* The same where a call cannot fail: an invalid value gives the default (the INFO log names it). */
long tp_knob_value(tp_knob k);
/* A string knob's value, NULL when unset. */
const char *tp_knob_str(tp_knob k);
/* The environment's world rank (RANK, else OMPI_COMM_WORLD_RANK), -1 when neither is a valid one. */
int tp_env_rank(void);

#endif
