/* SHA-256, HMAC-SHA-256, constant-time comparison and the kernel's random bytes (core/secret.c). Internal. */
#ifndef TP_CORE_SECRET_H
#define TP_CORE_SECRET_H

#include "tplinear.h"

#define TP_SHA256_BYTES 32
typedef struct {
    uint32_t h[8];
    uint64_t bytes;
    unsigned char buf[64];
    size_t used;
} tp_sha256;
void tp_sha256_init(tp_sha256 *c);
void tp_sha256_update(tp_sha256 *c, const void *data, size_t n);
void tp_sha256_final(tp_sha256 *c, unsigned char out[TP_SHA256_BYTES]);
typedef struct {
    tp_sha256 inner, outer;
} tp_hmac;
void tp_hmac_init(tp_hmac *m, const void *key, size_t klen);
void tp_hmac_update(tp_hmac *m, const void *data, size_t n);
void tp_hmac_final(tp_hmac *m, unsigned char out[TP_SHA256_BYTES]);
/* 1 when the n bytes are equal; the time taken does not depend on where they differ. */
int tp_secret_equal(const void *a, const void *b, size_t n);
/* n bytes from the kernel's random generator (getrandom). */
tp_status tp_random_bytes(void *buf, size_t n);
/* n bytes as 2n lowercase hex digits and a NUL. */
void tp_hex(const unsigned char *bytes, size_t n, char *out);

#endif
