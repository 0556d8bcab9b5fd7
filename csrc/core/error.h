/* Errors, logging and the clock (core/error.c): what every function of the core uses to fail, say and wait.
 * Internal. */
#ifndef TP_CORE_ERROR_H
#define TP_CORE_ERROR_H

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

/* Logging to stderr prefixed with the world rank (never printf on stdout): WARN (on unless TPLINEAR_DEBUG=OFF)
 * for what a user must see although no call fails yet (a hung peer, a refused join); INFO and TRACE at
 * TPLINEAR_DEBUG=INFO|TRACE. */
enum { TP_LOG_OFF = 0, TP_LOG_WARN = 1, TP_LOG_INFO = 2, TP_LOG_TRACE = 3 };
int tp_log_level(void);
void tp_log(int level, const char *fmt, ...) TP_PRINTF(2, 3);
/* The world rank the log prefix names, once a world knows it (before: the environment's RANK or
 * OMPI_COMM_WORLD_RANK, else 0). */
void tp_log_set_rank(int rank);

/* In a wait loop: TP_ERR_INTERRUPTED (message "<what>: interrupted by a signal ...") when the interrupt hook
 * (tp_set_interrupt_hook) asks to stop, else TP_OK. Calls the hook when tp_now() has passed *next (start
 * it at 0) and sets *next 50 ms on, so a loop may call this on every turn. */
tp_status tp_wait_check(double *next, const char *what);

/* Monotonic clock in seconds; a sleep of s seconds (resumed when a signal interrupts it). */
double tp_now(void);
void tp_sleep(double s);

#endif
