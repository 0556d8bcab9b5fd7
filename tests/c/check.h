/* A tiny assertion layer for the C tests: failures print to stderr and the test exits non-zero. */
#ifndef TP_TEST_CHECK_H
#define TP_TEST_CHECK_H

#include <math.h>
#include <stdio.h>

#include "tplinear.h"

static int tp_test_failures = 0;

#define EXPECT(cond)                                                                   \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);        \
            tp_test_failures++;                                                        \
        }                                                                              \
    } while (0)

#define EXPECT_OK(expr)                                                                \
    do {                                                                               \
        tp_status s_ = (expr);                                                         \
        if (s_ != TP_OK) {                                                             \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #expr,   \
                    tp_status_name(s_), tp_last_error());                              \
            tp_test_failures++;                                                        \
        }                                                                              \
    } while (0)

#define EXPECT_STATUS(expr, want)                                                      \
    do {                                                                               \
        tp_status s_ = (expr);                                                         \
        if (s_ != (want)) {                                                            \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s (%s)\n", __FILE__,     \
                    __LINE__, #expr, tp_status_name(s_), tp_status_name(want),         \
                    tp_last_error());                                                  \
            tp_test_failures++;                                                        \
        } else if (tp_last_error()[0] == '\0') {                                       \
            fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__, __LINE__, #expr); \
            tp_test_failures++;                                                        \
        }                                                                              \
    } while (0)

#define TEST_MAIN_END()                                                                \
    do {                                                                               \
        if (tp_test_failures) fprintf(stderr, "%d check(s) failed\n", tp_test_failures); \
        return tp_test_failures ? 1 : 0;                                               \
    } while (0)

#endif
