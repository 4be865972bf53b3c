/*
 * echo_epoll.c: a minimal level-triggered epoll echo server, the benchmark's ceiling.
 *
 * usage: echo_epoll [--host H] [--port P] [--ready-file PATH]
 *
 * It speaks the same start-up protocol as `iomux serve`: the line
 * "listening on HOST:PORT backend=c-epoll pid=PID" on stderr and, with
 * --ready-file, a JSON file written atomically (temp file + rename). SIGTERM
 * and SIGINT end it with status 0.
 *
 * The loop is what a lean server does per message: one read into the
 * connection's buffer, one write back; write interest (EPOLL_CTL_MOD) only
 * while a partial write left bytes pending, and no reading meanwhile, which is
 * the simplest backpressure. Nothing is allocated per event.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 256

struct conn {
    char *buf;
    size_t off, len; /* pending bytes are buf[off:len] */
};

static volatile sig_atomic_t stop;
static struct conn *conns;
static size_t nconns;

static void on_signal(int sig) { (void)sig; stop = 1; }

static struct conn *conn_for(int fd) {
    if ((size_t)fd >= nconns) {
        size_t n = nconns ? nconns : 1024;
        while (n <= (size_t)fd) n *= 2;
        struct conn *grown = realloc(conns, n * sizeof *conns);
        if (!grown) { perror("realloc"); exit(1); }
        memset(grown + nconns, 0, (n - nconns) * sizeof *conns);
        conns = grown;
        nconns = n;
    }
    struct conn *c = &conns[fd];
    if (!c->buf && !(c->buf = malloc(BUF_SIZE))) { perror("malloc"); exit(1); }
    c->off = c->len = 0;
    return c;
}

static void close_conn(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    conns[fd].off = conns[fd].len = 0;
}

/* Write what is pending; returns -1 when the connection failed. */
static int flush_conn(int ep, int fd, struct conn *c, int interest_out) {
    while (c->off < c->len) {
        ssize_t n = write(fd, c->buf + c->off, c->len - c->off);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            if (!interest_out) {
                struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
            }
            return 0;
        }
        c->off += (size_t)n;
    }
    c->off = c->len = 0;
    if (interest_out) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    }
    return 0;
}

static void write_ready_file(const char *path, const char *host, int port) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); exit(1); }
    fprintf(f, "{\"host\": \"%s\", \"port\": %d, \"backend\": \"c-epoll\", \"pid\": %d, \"workers\": 1}\n",
            host, port, (int)getpid());
    fclose(f);
    if (rename(tmp, path) != 0) { perror("rename"); exit(1); }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *ready_file = NULL;
    int port = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ready-file") && i + 1 < argc) ready_file = argv[++i];
        else { fprintf(stderr, "usage: %s [--host H] [--port P] [--ready-file PATH]\n", argv[0]); return 2; }
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { fprintf(stderr, "echo_epoll: bad host %s\n", host); return 2; }
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 4096)) { perror("echo_epoll: bind/listen"); return 1; }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    port = ntohs(addr.sin_port);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    fprintf(stderr, "listening on %s:%d backend=c-epoll pid=%d\n", host, port, (int)getpid());
    if (ready_file) write_ready_file(ready_file, host, port);

    struct epoll_event events[MAX_EVENTS];
    while (!stop) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break; /* EAGAIN, or EMFILE: the benchmark never gets there */
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_for(cfd);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            struct conn *c = &conns[fd];
            if (c->len > c->off) { /* write interest is on: EPOLLOUT, or EPOLLERR/HUP */
                if (flush_conn(ep, fd, c, 1) < 0) close_conn(ep, fd);
                continue;
            }
            ssize_t r = read(fd, c->buf, BUF_SIZE);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { close_conn(ep, fd); continue; }
            if (r < 0) continue;
            c->off = 0;
            c->len = (size_t)r;
            if (flush_conn(ep, fd, c, 0) < 0) close_conn(ep, fd);
        }
    }
    return 0;
}
