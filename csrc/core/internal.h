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

/* Debug logging (TPLINEAR_DEBUG=INFO|TRACE), to stderr prefixed with the rank. Not printf on stdout. */
enum { TP_LOG_OFF = 0, TP_LOG_INFO = 1, TP_LOG_TRACE = 2 };
int tp_log_level(void);
void tp_log(int level, const char *fmt, ...) TP_PRINTF(2, 3);

/* Monotonic clock in seconds. */
double tp_now(void);

/* Environment helpers: integer value of a variable, or dflt when unset/empty; -2 if unparsable. */
long tp_env_long(const char *name, long dflt);

#endif
