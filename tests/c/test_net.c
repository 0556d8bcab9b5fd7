/* The store client's dialing (comm/net.c): TPLINEAR_SOCKET_IFNAME's parser (NCCL_SOCKET_IFNAME's
 * convention), a list of addresses dialed at once keeping the one that answers, errors that name every
 * address tried with its errno text, and the interrupt hook stopping a dial. Internal headers. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../csrc/comm/net.h"
#include "check.h"

static void ifname_parser(void)
{
    /* default (unset or empty): all but loopback and docker's bridges */
    EXPECT(tp_net_ifname_match(NULL, "eth0") && tp_net_ifname_match("", "ib0"));
    EXPECT(!tp_net_ifname_match(NULL, "lo") && !tp_net_ifname_match(NULL, "docker0"));
    /* prefixes, comma-separated */
    EXPECT(tp_net_ifname_match("eth", "eth0") && tp_net_ifname_match("ib,eth", "eth1"));
    EXPECT(!tp_net_ifname_match("eth", "et") && !tp_net_ifname_match("ib,eth", "enp3s0"));
    EXPECT(tp_net_ifname_match("lo", "lo") && tp_net_ifname_match("docker", "docker0"));
    /* '^' excludes */
    EXPECT(!tp_net_ifname_match("^docker,lo", "docker0") && !tp_net_ifname_match("^docker,lo", "lo"));
    EXPECT(tp_net_ifname_match("^docker,lo", "eth0") && tp_net_ifname_match("^eth1", "eth0"));
    /* '=' exact names (after '^' too) */
    EXPECT(tp_net_ifname_match("=eth0", "eth0") && !tp_net_ifname_match("=eth0", "eth01"));
    EXPECT(!tp_net_ifname_match("=eth", "eth0") && tp_net_ifname_match("=ib0,eth0", "eth0"));
    EXPECT(!tp_net_ifname_match("^=eth0", "eth0") && tp_net_ifname_match("^=eth0", "eth01"));
    /* empty items are ignored */
    EXPECT(tp_net_ifname_match(",eth,", "eth0") && !tp_net_ifname_match(",", "eth0"));
}

/* A listening socket on addr (port 0: the kernel's pick), its port in *port; -1 on failure. */
static int listen_on(const char *addr, int *port)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    inet_pton(AF_INET, addr, &sa.sin_addr);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 4) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    *port = ntohs(sa.sin_port);
    return fd;
}

static int always(void *ctx)
{
    (*(int *)ctx)++;
    return 1;
}

static void dial_lists(void)
{
    int port = 0, fd = -1, lfd = listen_on("127.0.0.2", &port), calls = 0;
    const char *msg;
    double t;
    EXPECT(lfd >= 0);
    if (lfd < 0) return;
    /* the first address refuses (nothing on 127.0.0.1 at that port), the second answers: kept */
    EXPECT_OK(tp_net_dial("the test server", "127.0.0.1,127.0.0.2", port, 5.0, tp_now() + 5.0, NULL, NULL,
                          "hint", 0, &fd));
    EXPECT(fd >= 0);
    if (fd >= 0) close(fd);
    close(lfd);
    /* nobody answers: the error names each address with its errno text, then the hint */
    EXPECT_STATUS(tp_net_dial("the test server", "127.0.0.1,127.0.0.2", port, 0.3, tp_now() + 0.3, NULL, NULL,
                              "is it running?", 0, &fd), TP_ERR_TIMEOUT);
    msg = tp_last_error();
    EXPECT(strstr(msg, "connecting to the test server") != NULL && strstr(msg, "is it running?") != NULL);
    EXPECT(strstr(msg, "127.0.0.1:") != NULL && strstr(msg, "127.0.0.2:") != NULL);
    EXPECT(strstr(msg, "Connection refused") != NULL);
    EXPECT(fd == -1);
    EXPECT_STATUS(tp_net_dial("the test server", "no-such-host.invalid", port, 0.3, tp_now() + 0.3, NULL, NULL,
                              "hint", 0, &fd), TP_ERR_VALUE);
    EXPECT(strstr(tp_last_error(), "no-such-host.invalid") != NULL);
    /* a server known to listen (it announced its port) that now refuses everywhere has gone: at once */
    t = tp_now();
    EXPECT_STATUS(tp_net_dial("the test server", "127.0.0.1,127.0.0.2", port, 30.0, tp_now() + 30.0, NULL, NULL,
                              "hint", 1, &fd), TP_ERR_COMM);
    EXPECT(tp_now() - t < 1.0 && strstr(tp_last_error(), "every address now refuses connections") != NULL);
    /* the interrupt hook stops a dial that would wait 30 s */
    tp_set_interrupt_hook(always, &calls);
    t = tp_now();
    EXPECT_STATUS(tp_net_dial("the test server", "127.0.0.1", port, 30.0, tp_now() + 30.0, NULL, NULL, "hint", 0,
                              &fd), TP_ERR_INTERRUPTED);
    EXPECT(tp_now() - t < 1.0 && calls >= 1 && strstr(tp_last_error(), "interrupted by a signal") != NULL);
    tp_set_interrupt_hook(NULL, NULL);
}

int main(void)
{
    ifname_parser();
    dial_lists();
    TEST_MAIN_END();
}
