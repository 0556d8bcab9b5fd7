/* Client sockets with deadlines (comm/net.h): every connect, send and receive of a store client ends by
 * its deadline, so a stopped server or a silent program on the port is an error, never a hang. */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net.h"

int tp_net_wait(int fd, short events, double deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        double left = deadline - tp_now();
        int n;
        if (left <= 0) return TP_IO_TIMEOUT;
        n = poll(&p, 1, (int)(left * 1000) + 1);
        if (n < 0 && errno != EINTR) return TP_IO_ERR;
        if (n > 0) return TP_IO_OK;
    }
}

int tp_net_io(int fd, void *buf, size_t n, double deadline, int sending)
{
    char *p = buf;
    while (n > 0) {
        ssize_t k = sending ? send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT) : recv(fd, p, n, MSG_DONTWAIT);
        if (k < 0) {
            int rc;
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return TP_IO_ERR;
            if ((rc = tp_net_wait(fd, sending ? POLLOUT : POLLIN, deadline)) != TP_IO_OK) return rc;
            continue;
        }
        if (k == 0 && !sending) return TP_IO_EOF;
        p += k;
        n -= (size_t)k;
    }
    return TP_IO_OK;
}

/* A connected socket, or -1 (refused, unreachable, or the deadline passed). */
static int connect_once(const struct addrinfo *ai, double deadline)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol), one = 1, err = 0;
    socklen_t len = sizeof err;
    if (fd < 0) return -1;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS || tp_net_wait(fd, POLLOUT, deadline) != TP_IO_OK ||
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
            close(fd);
            return -1;
        }
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

tp_status tp_net_dial(const char *what, const char *addr, int port, double timeout_s, double deadline,
                      tp_net_greet greet, void *ctx, const char *hint, int *fd)
{
    tp_status st = TP_OK;
    struct addrinfo hints, *res = NULL;
    char portstr[16], why[768] = "";
    int rc;
    double pause = 0.001;
    *fd = -1;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof portstr, "%d", port);
    if ((rc = getaddrinfo(addr, portstr, &hints, &res)) != 0) {
        st = tp_error(TP_ERR_VALUE, "cannot resolve '%s' (MASTER_ADDR) to reach %s: %s", addr, what, gai_strerror(rc));
        goto out;
    }
    for (;;) {
        for (const struct addrinfo *a = res; a != NULL && *fd < 0; a = a->ai_next) {
            int c = connect_once(a, deadline), hs = TP_DIAL_OK;
            if (c < 0) continue;
            if (greet) hs = greet(ctx, c, deadline, &st, why, sizeof why);
            if (hs == TP_DIAL_OK) {
                *fd = c;
                break;
            }
            close(c);
            if (hs == TP_DIAL_FAIL) goto out;
        }
        if (*fd >= 0) break;
        if (tp_now() > deadline) {
            st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s connecting to %s at %s:%d (%s)", timeout_s, what, addr,
                          port, why[0] ? why : hint);
            goto out;
        }
        tp_sleep(pause);
        if (pause < 0.05) pause *= 2;
    }
out:
    if (res) freeaddrinfo(res);
    return st;
}
