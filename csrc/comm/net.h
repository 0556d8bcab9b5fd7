/* Client sockets with deadlines: what the clients of the rendezvous store (comm/store.c) and of torchrun's
 * store (comm/torch_store.c) share. Internal. */
#ifndef TP_COMM_NET_H
#define TP_COMM_NET_H

#include <poll.h>

#include "../core/internal.h"

enum { TP_IO_OK = 0, TP_IO_ERR = -1, TP_IO_EOF = 1, TP_IO_TIMEOUT = 2 };

/* Waits until fd is ready for events or the deadline passes: TP_IO_OK, TP_IO_TIMEOUT or TP_IO_ERR (errno). */
int tp_net_wait(int fd, short events, double deadline);
/* Sends (sending != 0) or receives all n bytes by the deadline: TP_IO_OK, TP_IO_EOF (the peer closed),
 * TP_IO_TIMEOUT or TP_IO_ERR (errno). */
int tp_net_io(int fd, void *buf, size_t n, double deadline, int sending);

/* What a fresh connection must pass before it counts (store.c: the token handshake): TP_DIAL_OK;
 * TP_DIAL_RETRY with the reason in why (not the right server yet: dial again); TP_DIAL_FAIL with *st set. */
enum { TP_DIAL_OK, TP_DIAL_RETRY, TP_DIAL_FAIL };
typedef int (*tp_net_greet)(void *ctx, int fd, double deadline, tp_status *st, char *why, size_t cap);

/* A connected socket to addr:port (every address it resolves to; non-blocking, close-on-exec, TCP_NODELAY)
 * in *fd, retrying with a growing pause until the deadline while nobody listens or greet (NULL: none) says
 * retry. Errors name the server as `what` ("the store of rank 0 at 127.0.0.1:29500") and end with the last
 * reason to retry, else with hint (what to check when nobody answers). */
tp_status tp_net_dial(const char *what, const char *addr, int port, double timeout_s, double deadline,
                      tp_net_greet greet, void *ctx, const char *hint, int *fd);

#endif
