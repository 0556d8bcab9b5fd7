/* Client sockets with deadlines: what the clients of the rendezvous store (comm/store.c) and of torchrun's
 * store (comm/torch_store.c) share. Internal. */
#ifndef TP_COMM_NET_H
#define TP_COMM_NET_H

#include <poll.h>

#include "../core/internal.h"

enum { TP_IO_OK = 0, TP_IO_ERR = -1, TP_IO_EOF = 1, TP_IO_TIMEOUT = 2, TP_IO_INTR = 3 };

/* Waits until fd is ready for events or the deadline passes: TP_IO_OK, TP_IO_TIMEOUT, TP_IO_ERR (errno) or
 * TP_IO_INTR (the interrupt hook stopped it; the message is set, status TP_ERR_INTERRUPTED). */
int tp_net_wait(int fd, short events, double deadline);
/* Sends (sending != 0) or receives all n bytes by the deadline: TP_IO_OK, TP_IO_EOF (the peer closed),
 * TP_IO_TIMEOUT, TP_IO_ERR (errno) or TP_IO_INTR. */
int tp_net_io(int fd, void *buf, size_t n, double deadline, int sending);

/* What a fresh connection must pass before it counts (store.c: the token handshake): TP_DIAL_OK;
 * TP_DIAL_RETRY with the reason in why (not the right server yet: dial again); TP_DIAL_FAIL with *st set. */
enum { TP_DIAL_OK, TP_DIAL_RETRY, TP_DIAL_FAIL };
typedef int (*tp_net_greet)(void *ctx, int fd, double deadline, tp_status *st, char *why, size_t cap);

/* A connected socket to addr:port in *fd (non-blocking, close-on-exec, TCP_NODELAY). addr is one address or
 * name, or a comma-separated list of them (every address each resolves to is a candidate): each round
 * connects to every candidate at once and keeps the first whose connection passes greet (NULL: none);
 * rounds repeat with a growing pause until the deadline while nobody listens or greet says retry. A
 * greet's failure ends the dial unless other candidates remain (then it is reported only when none
 * passes). Errors name the server as `what` ("the store of rank 0"), then every address tried with its
 * last reason (the errno text, or greet's reason to retry), then hint (what to check). listening: the
 * server is known to listen already (it announced its port), so a round in which every address refuses
 * the connection means it has gone: TP_ERR_COMM at once instead of retrying until the deadline. */
tp_status tp_net_dial(const char *what, const char *addr, int port, double timeout_s, double deadline,
                      tp_net_greet greet, void *ctx, const char *hint, int listening, int *fd);

/* Whether interface `name` passes spec, NCCL_SOCKET_IFNAME's convention: comma-separated prefixes ("eth"
 * admits eth0, eth1), or exact names after a leading '='; a leading '^' (before any '=') excludes the
 * listed ones instead. NULL or "": every interface but loopback ("lo...") and docker's bridges
 * ("docker..."), NCCL's default. */
int tp_net_ifname_match(const char *spec, const char *name);
/* The IPv4 addresses of this host's up interfaces that spec admits (tp_net_ifname_match; a loopback
 * interface only when spec names it, not through the default or a '^' list), in
 * getifaddrs' order without repeats, comma-separated into out ("" when none); every up interface with its
 * address ("eth0 10.0.0.2, lo 127.0.0.1") into seen (for the error when none passes). */
tp_status tp_net_own_addresses(const char *spec, char *out, size_t cap, char *seen, size_t seen_cap);

#endif
