/* Secrets for the world's closed club: SHA-256 and HMAC-SHA-256 (FIPS 180-4, RFC 2104; the C tests check
 * the RFC 4231 vectors), random bytes from the kernel, and a comparison whose time does not depend on
 * where two proofs differ. Used by the rendezvous store's handshake and the shm segment's proof. */
#include <errno.h>
#include <string.h>
#include <sys/random.h>

#include "error.h"
#include "secret.h"

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void block(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, k;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

void tp_sha256_init(tp_sha256 *c)
{
    static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, H0, sizeof H0);
    c->bytes = 0;
    c->used = 0;
}

void tp_sha256_update(tp_sha256 *c, const void *data, size_t n)
{
    const unsigned char *p = data;
    c->bytes += n;
    while (n > 0) {
        size_t k = 64 - c->used < n ? 64 - c->used : n;
        memcpy(c->buf + c->used, p, k);
        c->used += k;
        p += k;
        n -= k;
        if (c->used == 64) {
            block(c->h, c->buf);
            c->used = 0;
        }
    }
}

void tp_sha256_final(tp_sha256 *c, unsigned char out[TP_SHA256_BYTES])
{
    unsigned char pad[72] = {0x80};
    uint64_t bits = c->bytes * 8;
    size_t padlen = (c->used < 56 ? 56 : 120) - c->used;
    for (int i = 0; i < 8; i++) pad[padlen + (size_t)i] = (unsigned char)(bits >> (56 - 8 * i));
    tp_sha256_update(c, pad, padlen + 8);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(c->h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(c->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(c->h[i] >> 8);
        out[4 * i + 3] = (unsigned char)c->h[i];
    }
    memset(c, 0, sizeof *c);
}

/* The key as HMAC pads it: hashed when longer than a block. */
static void hmac_pad(tp_hmac *m, const void *key, size_t klen, unsigned char pad)
{
    unsigned char k[64] = {0}, x[64];
    if (klen > 64) {
        tp_sha256 c;
        tp_sha256_init(&c);
        tp_sha256_update(&c, key, klen);
        tp_sha256_final(&c, k);
    } else if (klen > 0) {
        memcpy(k, key, klen);
    }
    for (int i = 0; i < 64; i++) x[i] = k[i] ^ pad;
    tp_sha256_update(pad == 0x36 ? &m->inner : &m->outer, x, 64);
    memset(k, 0, sizeof k);
    memset(x, 0, sizeof x);
}

void tp_hmac_init(tp_hmac *m, const void *key, size_t klen)
{
    tp_sha256_init(&m->inner);
    tp_sha256_init(&m->outer);
    hmac_pad(m, key, klen, 0x36);
    hmac_pad(m, key, klen, 0x5c);
}

void tp_hmac_update(tp_hmac *m, const void *data, size_t n) { tp_sha256_update(&m->inner, data, n); }

void tp_hmac_final(tp_hmac *m, unsigned char out[TP_SHA256_BYTES])
{
    unsigned char ih[TP_SHA256_BYTES];
    tp_sha256_final(&m->inner, ih);
    tp_sha256_update(&m->outer, ih, sizeof ih);
    tp_sha256_final(&m->outer, out);
    memset(ih, 0, sizeof ih);
}

int tp_secret_equal(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    unsigned char d = 0;
    for (size_t i = 0; i < n; i++) d |= (unsigned char)(x[i] ^ y[i]);
    return d == 0;
}

tp_status tp_random_bytes(void *buf, size_t n)
{
    char *p = buf;
    while (n > 0) {
        ssize_t k = getrandom(p, n, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return tp_error_errno(TP_ERR_SYSTEM, "getrandom");
        }
        p += k;
        n -= (size_t)k;
    }
    return TP_OK;
}

void tp_hex(const unsigned char *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}
