/* Worlds of forked ranks for the C tests: a free port, shm world init, fork + reap with a deadline. */
#ifndef TP_TEST_WORLD_H
#define TP_TEST_WORLD_H

#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

static inline int free_port(void)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    int port = 0, fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 && getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

static inline tp_status world_init(int rank, int size, int port, double timeout, tp_group **g)
{
    tp_init_options o;
    tp_init_options_default(&o);
    o.rank = rank;
    o.world_size = size;
    o.local_rank = rank;
    o.local_world_size = size;
    o.master_addr = "127.0.0.1";
    o.master_port = port;
    o.timeout_s = timeout;
    o.backend = "shm";
    return tp_group_init_world(&o, g);
}

/* Forks size ranks running fn; returns the number of ranks that failed. expect_killed: that rank must
 * die of SIGKILL. */
static inline int run_world(int size, int (*fn)(int, int, int), int expect_killed)
{
    pid_t pids[8];
    int port = free_port(), bad = 0, left = size;
    struct timespec nap = {0, 2000000};
    time_t deadline = time(NULL) + 120;
    if (port == 0) return 1;
    for (int r = 0; r < size; r++) {
        pids[r] = fork();
        if (pids[r] < 0) return 1;
        if (pids[r] == 0) exit(fn(r, size, port) ? 1 : 0);
    }
    while (left > 0) { /* reap promptly (a dead rank must not linger as a zombie) */
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            int r = 0;
            while (r < size && pids[r] != pid) r++;
            left--;
            if (r == expect_killed ? !(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
                                   : !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
                fprintf(stderr, "world of %d: rank %d failed (status 0x%x)\n", size, r, status);
                bad++;
            }
            continue;
        }
        if (time(NULL) > deadline) {
            fprintf(stderr, "world of %d: timed out, killing\n", size);
            for (int r = 0; r < size; r++) kill(pids[r], SIGKILL);
            deadline = time(NULL) + 1000;
            bad++;
        }
        nanosleep(&nap, NULL);
    }
    return bad;
}

#endif
