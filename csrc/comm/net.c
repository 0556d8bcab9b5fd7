/* Client sockets with deadlines (comm/net.h): every connect, send and receive of a store client ends by
 * its deadline, so a stopped server or a silent program on the port is an error, never a hang; every wait
 * asks the interrupt hook at least every 100 ms, and time in which this process did not run (it was
 * stopped, with its whole job) does not count against the peer. And the host's own addresses, as TPLINEAR_SOCKET_IFNAME
 * admits them. */
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <net/if.h>
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
    double next_hook = 0.0, due = 0.0;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        double now = tp_now(), left;
        int n;
        if (due > 0.0 && now - due > 0.5) deadline += now - due; /* this process did not run (stopped): not theirs */
        if ((left = deadline - now) <= 0) return TP_IO_TIMEOUT;
        due = now + (left < 0.1 ? left : 0.1);
        n = poll(&p, 1, (int)((left < 0.1 ? left : 0.1) * 1000) + 1);
        if (n < 0 && errno != EINTR) return TP_IO_ERR;
        if (n > 0) return TP_IO_OK;
        if (tp_wait_check(&next_hook, "store") != TP_OK) return TP_IO_INTR;
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

/* ---------------------------------------------------------------- interfaces */

int tp_net_ifname_match(const char *spec, const char *name)
{
    int exclude = 0, exact = 0;
    if (spec == NULL || spec[0] == '\0') /* NCCL's default: neither loopback nor docker's bridges */
        return strncmp(name, "lo", 2) != 0 && strncmp(name, "docker", 6) != 0;
    if (*spec == '^') {
        exclude = 1;
        spec++;
    }
    if (*spec == '=') {
        exact = 1;
        spec++;
    }
    for (const char *p = spec; *p;) {
        size_t len = strcspn(p, ",");
        if (len > 0 && (exact ? strlen(name) == len : strlen(name) >= len) && strncmp(name, p, len) == 0)
            return !exclude;
        p += len;
        if (*p == ',') p++;
    }
    return exclude;
}

/* Whether a is one of the comma-separated items of list. */
static int in_list(const char *list, const char *a)
{
    size_t n = strlen(a);
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        if (len == n && strncmp(p, a, n) == 0) return 1;
        p += len;
        if (*p == ',') p++;
    }
    return 0;
}

tp_status tp_net_own_addresses(const char *spec, char *out, size_t cap, char *seen, size_t seen_cap)
{
    tp_status st = TP_OK;
    struct ifaddrs *ifs = NULL;
    size_t used = 0, seen_used = 0;
    out[0] = '\0';
    if (seen_cap) seen[0] = '\0';
    if (getifaddrs(&ifs) < 0) {
        st = tp_error_errno(TP_ERR_SYSTEM, "init: cannot list this host's network interfaces (getifaddrs)");
        goto out;
    }
    for (struct ifaddrs *i = ifs; i != NULL; i = i->ifa_next) {
        char a[INET_ADDRSTRLEN];
        int n;
        if (i->ifa_addr == NULL || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP) ||
            inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, a, sizeof a) == NULL)
            continue;
        if (seen_used < seen_cap && (n = snprintf(seen + seen_used, seen_cap - seen_used, "%s%s %s",
                                                  seen_used ? ", " : "", i->ifa_name, a)) > 0)
            seen_used += (size_t)n;
        if (!tp_net_ifname_match(spec, i->ifa_name) || in_list(out, a)) continue;
        /* loopback reaches no other host: only when named ("lo"), never through a default or a '^' list */
        if ((i->ifa_flags & IFF_LOOPBACK) && (spec == NULL || spec[0] == '\0' || spec[0] == '^')) continue;
        if (used + strlen(a) + 2 > cap) break;
        used += (size_t)snprintf(out + used, cap - used, "%s%s", used ? "," : "", a);
    }
out:
    if (ifs) freeifaddrs(ifs);
    return st;
}

/* ---------------------------------------------------------------- dialing */

#define MAX_CANDIDATES 16

typedef struct {
    struct sockaddr_storage sa;
    socklen_t len;
    int family, fd;
    char name[INET6_ADDRSTRLEN + 8];
    char why[200];    /* the last reason it did not connect */
    char answer[200]; /* the last refusal the server itself gave (its words outlast a later errno) */
} candidate;

/* Every address of the comma-separated list addr (names resolve to each of their addresses) into c. */
static tp_status resolve_all(const char *addr, int port, candidate *c, int *n)
{
    tp_status st = TP_OK;
    char one[256], portstr[16], why[512] = "";
    *n = 0;
    snprintf(portstr, sizeof portstr, "%d", port);
    for (const char *p = addr; *p && *n < MAX_CANDIDATES;) {
        size_t len = strcspn(p, ",");
        struct addrinfo hints, *res = NULL;
        int rc;
        snprintf(one, sizeof one, "%.*s", (int)(len < sizeof one ? len : sizeof one - 1), p);
        p += len;
        if (*p == ',') p++;
        if (one[0] == '\0') continue;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        if ((rc = getaddrinfo(one, portstr, &hints, &res)) != 0) {
            snprintf(why, sizeof why, "cannot resolve '%s': %s", one, gai_strerror(rc));
            continue;
        }
        for (const struct addrinfo *a = res; a != NULL && *n < MAX_CANDIDATES; a = a->ai_next) {
            candidate *k = &c[*n];
            char host[INET6_ADDRSTRLEN] = "?";
            memset(k, 0, sizeof *k);
            memcpy(&k->sa, a->ai_addr, a->ai_addrlen);
            k->len = a->ai_addrlen;
            k->family = a->ai_family;
            k->fd = -1;
            getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof host, NULL, 0, NI_NUMERICHOST);
            snprintf(k->name, sizeof k->name, a->ai_family == AF_INET6 ? "[%s]:%d" : "%s:%d", host, port);
            (*n)++;
        }
        freeaddrinfo(res);
    }
    if (*n == 0)
        st = tp_error(TP_ERR_VALUE, "cannot resolve '%s' (MASTER_ADDR, or the addresses rank 0 announced): %s", addr,
                      why);
    return st;
}

/* "a:p (why), b:p (why)" into buf. */
static void tried(const candidate *c, int n, char *buf, size_t cap)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && used + 1 < cap; i++) {
        const char *why = c[i].why[0] ? c[i].why : "no answer";
        int k = c[i].answer[0] && strcmp(c[i].answer, why) != 0
                    ? snprintf(buf + used, cap - used, "%s%s (%s; then: %s)", i ? ", " : "", c[i].name, c[i].answer,
                               why)
                    : snprintf(buf + used, cap - used, "%s%s (%s)", i ? ", " : "", c[i].name, why);
        if (k < 0) break;
        used += (size_t)k;
    }
}

/* Starts a non-blocking connect to every candidate; one that fails at once keeps its errno text. */
static void start_all(candidate *c, int n)
{
    for (int i = 0; i < n; i++) {
        c[i].fd = socket(c[i].family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (c[i].fd < 0 || (connect(c[i].fd, (struct sockaddr *)&c[i].sa, c[i].len) < 0 && errno != EINPROGRESS)) {
            snprintf(c[i].why, sizeof c[i].why, "%s", strerror(errno));
            if (c[i].fd >= 0) close(c[i].fd);
            c[i].fd = -1;
        }
    }
}

static void close_all(candidate *c, int n, int keep)
{
    for (int i = 0; i < n; i++)
        if (i != keep && c[i].fd >= 0) {
            close(c[i].fd);
            c[i].fd = -1;
        }
}

/* One round: connects to every candidate at once and greets each as its connection completes, until one
 * passes (its index; *fd set) or all failed (-1; each candidate's why says how). TP_DIAL_FAIL from greet
 * with other candidates still connecting is only that candidate's failure (another host's store on an
 * address every host has, such as docker0's), kept in *fail_st / fail_why for when no other one passes. */
static int dial_round(candidate *c, int n, double deadline, tp_net_greet greet, void *ctx, tp_status *st,
                      tp_status *fail_st, char *fail_why, size_t fail_cap)
{
    struct pollfd p[MAX_CANDIDATES];
    int idx[MAX_CANDIDATES], won = -1;
    double next_hook = 0.0;
    start_all(c, n);
    for (;;) {
        int np = 0, rc;
        double left = deadline - tp_now();
        for (int i = 0; i < n; i++)
            if (c[i].fd >= 0) {
                p[np] = (struct pollfd){.fd = c[i].fd, .events = POLLOUT};
                idx[np++] = i;
            }
        if (np == 0) break;
        if (left <= 0) { /* still connecting: no answer this round (an earlier round's reason stays) */
            for (int k = 0; k < np; k++)
                if (c[idx[k]].why[0] == '\0') snprintf(c[idx[k]].why, sizeof c[idx[k]].why, "no answer");
            break;
        }
        rc = poll(p, (nfds_t)np, (int)((left < 0.1 ? left : 0.1) * 1000) + 1);
        if (rc < 0 && errno != EINTR) {
            *st = tp_error_errno(TP_ERR_SYSTEM, "poll");
            break;
        }
        if ((*st = tp_wait_check(&next_hook, "connecting to the store")) != TP_OK) break;
        for (int k = 0; k < np && rc > 0 && won < 0; k++) {
            candidate *x = &c[idx[k]];
            int err = 0, one = 1, hs = TP_DIAL_OK;
            socklen_t len = sizeof err;
            if (!p[k].revents) continue;
            if (getsockopt(x->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
            if (err != 0) {
                snprintf(x->why, sizeof x->why, "%s", strerror(err));
                close(x->fd);
                x->fd = -1;
                continue;
            }
            setsockopt(x->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (greet) hs = greet(ctx, x->fd, deadline, st, x->why, sizeof x->why);
            if (hs == TP_DIAL_OK) {
                won = idx[k];
                break;
            }
            close(x->fd);
            x->fd = -1;
            if (hs == TP_DIAL_RETRY) snprintf(x->answer, sizeof x->answer, "%s", x->why);
            if (hs == TP_DIAL_FAIL) {
                if (*st == TP_ERR_INTERRUPTED || n == 1) goto out;
                *fail_st = *st;
                snprintf(fail_why, fail_cap, "%s", tp_last_error());
                snprintf(x->why, sizeof x->why, "%s", tp_last_error());
                *st = TP_OK;
            }
        }
        if (won >= 0) break;
    }
out:
    close_all(c, n, won);
    return won;
}

/* Every candidate's connection was refused this round (nothing listens at any address). */
static int all_refused(const candidate *c, int n)
{
    const char *refused = strerror(ECONNREFUSED);
    for (int i = 0; i < n; i++)
        if (strcmp(c[i].why, refused) != 0) return 0;
    return n > 0;
}

tp_status tp_net_dial(const char *what, const char *addr, int port, double timeout_s, double deadline,
                      tp_net_greet greet, void *ctx, const char *hint, int listening, int *fd)
{
    tp_status st = TP_OK, fail_st = TP_OK;
    candidate c[MAX_CANDIDATES];
    char list[1536], fail_why[1024] = "";
    int n = 0, won;
    double pause = 0.001, next_hook = 0.0;
    *fd = -1;
    TP_CHECK(resolve_all(addr, port, c, &n));
    for (;;) {
        won = dial_round(c, n, deadline, greet, ctx, &st, &fail_st, fail_why, sizeof fail_why);
        if (st != TP_OK) goto out;
        if (won >= 0) {
            *fd = c[won].fd;
            if (n > 1) tp_log(TP_LOG_INFO, "connected to %s at %s (of %s)", what, c[won].name, addr);
            goto out;
        }
        if (tp_now() > deadline) break;
        if (listening && all_refused(c, n)) { /* it listened (it said so): it has gone, no use waiting */
            tried(c, n, list, sizeof list);
            st = tp_error(TP_ERR_COMM, "%s announced where it listens, but every address now refuses connections: "
                          "tried %s (it has exited or died)", what, list);
            goto out;
        }
        tp_sleep(pause);
        if (pause < 0.05) pause *= 2;
        TP_CHECK(tp_wait_check(&next_hook, "connecting to the store"));
    }
    if (fail_st != TP_OK) { /* a server answered and refused: that, rather than the others' silence */
        st = tp_error(fail_st, "%s", fail_why);
        goto out;
    }
    tried(c, n, list, sizeof list);
    st = tp_error(TP_ERR_TIMEOUT, "timed out after %g s connecting to %s; tried %s (%s)", timeout_s, what, list, hint);
out:
    return st;
}
