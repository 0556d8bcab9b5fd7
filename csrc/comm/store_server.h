/* The rendezvous store's wire protocol, which both halves speak, and its server (comm/store_server.c), which
 * the client half (comm/store.c) starts on rank 0. Internal; comm/store.c says what the protocol is. */
#ifndef TP_COMM_STORE_SERVER_H
#define TP_COMM_STORE_SERVER_H

#include <string.h>

#include "store.h"

enum { CMD_SET = 1, CMD_GET = 2, CMD_ADD = 3, CMD_BEAT = 4 };
/* "lost/<rank>": why a joined rank's connection ended (its value) */
enum { LOST_CLOSED = 1, LOST_SILENT = 2 };
enum { RS_MISSING = 0, RS_OK = 1, RS_NOMEM = 2, RS_FULL = 3 };
enum { H_OK = 0, H_RETRY = 1, H_SIZE = 2, H_RANK = 3, H_TOKEN = 4, H_DUP = 5 };
#define MAX_KEY 256
#define MAX_VAL (1u << 20)
#define REQ_HDR 9
#define MAX_PENDING 64
#define MAX_STORED ((size_t)64 << 20)
#define STORE_HANDSHAKE_S 10.0
#define STORE_MAGIC 0x5453504cu /* "LPST" */
#define STORE_VERSION 3u /* 3: CMD_BEAT, silent ranks dropped */
#define STORE_BEAT_S 0.25 /* how often a client beats */
#define STORE_SILENCE_MIN_S (4 * STORE_BEAT_S)
#define NONCE 16
#define HELLO_BYTES (4 + 4 + 4 + 4 + 8 + NONCE)
#define CHALLENGE_BYTES (4 + 4 + 4 + 8 + 4 + NONCE + TP_SHA256_BYTES)

static inline void store_put_u32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint32_t store_get_u32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* HMAC(token, label | hello | snonce): the proofs of both sides. */
static inline void store_proof_hs(const char *token, const char *label, const unsigned char *hello,
                                  const unsigned char *snonce, unsigned char out[TP_SHA256_BYTES])
{
    tp_hmac m;
    tp_hmac_init(&m, token, strlen(token));
    tp_hmac_update(&m, label, strlen(label) + 1);
    tp_hmac_update(&m, hello, HELLO_BYTES);
    tp_hmac_update(&m, snonce, NONCE);
    tp_hmac_final(&m, out);
}

typedef struct tp_store_server tp_store_server;
/* Rank 0's server at cfg's bind address (else its address) and port (0: one the kernel picks; *port gets
 * it), on a thread of its own, for a world of cfg->world_size ranks proving token. A joined rank whose
 * connection carries nothing for silence_s (0: never) is dropped as silent (lost/<rank> = LOST_SILENT). */
tp_status tp_store_server_start(const tp_store_config *cfg, const char *token, double silence_s,
                                tp_store_server **out, int *port);
/* Stops accepting, lingers (bounded) until the clients have left, frees. NULL is fine. */
void tp_store_server_free(tp_store_server *s);
/* The world failed to form: linger at most a second (NULL is fine). */
void tp_store_server_hurry(tp_store_server *s);
/* "; the store refused N connection(s) (last <why>)" into buf, "" when none was (or s is NULL). */
void tp_store_server_refusals(tp_store_server *s, char *buf, size_t cap);

#endif
