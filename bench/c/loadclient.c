/*
 * loadclient.c: the benchmark's closed-loop echo load client, in C so that it
 * is never the bottleneck (one thread, one epoll loop, nothing allocated per
 * request).
 *
 * usage: loadclient HOST PORT CONNS SIZE DURATION_S [WARMUP_S [COUNT]]
 *
 * Every connection sends SIZE bytes, reads SIZE bytes back and sends again.
 * After WARMUP_S (default 0.5) it prints "measuring" on stdout, counts the
 * requests that complete in the next DURATION_S seconds, then prints one JSON
 * line (same keys as `iomux bench --json`) and exits. Latency percentiles are
 * nearest-rank, like iomux/loadgen.py.
 *
 * With COUNT > 0 it runs a fixed number of requests instead, for counting
 * what the server does per request (system calls, instructions): after the
 * warm-up it lets every request in flight finish, prints "ready", and waits
 * for a line on stdin (the runner attaches its counters meanwhile); then it
 * issues exactly COUNT requests, prints the JSON once all are answered, and
 * keeps its connections open until stdin closes, so that the server's
 * counted window holds those COUNT echoes and nothing else (no connect, no
 * close). DURATION_S then only bounds the whole run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    size_t sent, got;
    double started;
    int writing;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_now(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, size_t n, double pct) {
    if (n == 0) return 0.0;
    size_t rank = (size_t)ceil(pct / 100.0 * (double)n);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

static char *payload;
static size_t size;

/* Returns -1 when the connection failed. */
static int send_more(int ep, struct conn *c) {
    while (c->sent < size) {
        ssize_t n = send(c->fd, payload + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            break;
        }
        c->sent += (size_t)n;
    }
    int want = c->sent < size;
    if (want != c->writing) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->writing = want;
    }
    return 0;
}

/* Run until `deadline` (or, with `issue_limit` >= 0, until that many requests were
 * issued and all answered). Returns completed requests, or -1 on a failed connection. */
static long pump(int ep, struct conn *conns, int nconns, char *rbuf, size_t rcap,
                 double deadline, long issue_limit, long *issued, double *lat, long lat_cap) {
    struct epoll_event events[256];
    long done = 0, in_flight = 0;
    for (int i = 0; i < nconns; i++)
        if (conns[i].sent > 0 || conns[i].got > 0 || conns[i].writing) in_flight++;
    for (int i = 0; i < nconns && (issue_limit < 0 || *issued < issue_limit); i++) {
        if (conns[i].sent > 0) continue; /* already in flight */
        conns[i].started = now();
        if (send_more(ep, &conns[i]) < 0) return -1;
        (*issued)++;
        in_flight++;
    }
    while (in_flight > 0) {
        double t = now();
        if (t >= deadline) return -1;
        int n = epoll_wait(ep, events, 256, (int)((deadline - t) * 1000.0) + 1);
        if (n < 0 && errno != EINTR) return -1;
        for (int k = 0; k < n; k++) {
            struct conn *c = events[k].data.ptr;
            if ((events[k].events & (EPOLLOUT | EPOLLERR)) && c->sent < size && send_more(ep, c) < 0) return -1;
            if (!(events[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            size_t want = size - c->got;
            ssize_t r = recv(c->fd, rbuf, want < rcap ? want : rcap, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) return -1;
            c->got += (size_t)r;
            if (c->got < size) continue;
            double finished = now();
            if (lat && done < lat_cap) lat[done] = finished - c->started;
            done++;
            in_flight--;
            c->got = c->sent = 0;
            if (issue_limit >= 0 && *issued >= issue_limit) continue;
            c->started = finished;
            if (send_more(ep, c) < 0) return -1;
            (*issued)++;
            in_flight++;
        }
    }
    return done;
}

/* COUNT mode (see the top of the file). */
static int run_count(int ep, struct conn *conns, int nconns, char *rbuf, size_t rcap,
                     double warmup, double limit_s, long count) {
    double t0 = now();
    long issued = 0;
    /* Warm-up: keep every connection busy for `warmup` seconds, issuing in rounds. */
    while (now() - t0 < warmup) {
        long burst = issued + nconns;
        if (pump(ep, conns, nconns, rbuf, rcap, t0 + limit_s, burst, &issued, NULL, 0) < 0) goto failed;
    }
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    double *lat = malloc((size_t)count * sizeof *lat);
    double cpu0 = cpu_now(), start = now();
    issued = 0;
    long done = pump(ep, conns, nconns, rbuf, rcap, t0 + limit_s, count, &issued, lat, count);
    if (done < 0) goto failed;
    double elapsed = now() - start, cpu = cpu_now() - cpu0;
    qsort(lat, (size_t)done, sizeof *lat, cmp_double);
    double sum = 0.0;
    for (long i = 0; i < done; i++) sum += lat[i];
    printf("{\"conns\": %d, \"size\": %zu, \"duration_s\": %g, \"procs\": 1, \"requests\": %ld, "
           "\"errors\": 0, \"requests_per_s\": %.6f, \"mb_per_s\": %.6f, \"client_cpu_s\": %.4f, "
           "\"latency_us\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"max\": %.3f, \"mean\": %.3f}}\n",
           nconns, size, elapsed, done, done / elapsed, done / elapsed * (double)size / 1e6, cpu,
           percentile(lat, (size_t)done, 50) * 1e6, percentile(lat, (size_t)done, 90) * 1e6,
           percentile(lat, (size_t)done, 99) * 1e6, done ? lat[done - 1] * 1e6 : 0.0,
           done ? sum / (double)done * 1e6 : 0.0);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
    } /* hold the connections until the runner has read its counters */
    return 0;
failed:
    fprintf(stderr, "loadclient: a connection failed or the run passed %g s\n", limit_s);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s HOST PORT CONNS SIZE DURATION_S [WARMUP_S [COUNT]]\n", argv[0]);
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nconns = atoi(argv[3]);
    size = (size_t)atol(argv[4]);
    double duration = atof(argv[5]), warmup = argc > 6 ? atof(argv[6]) : 0.5;
    long count = argc > 7 ? atol(argv[7]) : 0;
    if (port <= 0 || nconns <= 0 || size == 0 || duration <= 0) {
        fprintf(stderr, "loadclient: bad arguments\n");
        return 2;
    }
    payload = malloc(size);
    char *rbuf = malloc(size < 262144 ? size : 262144);
    size_t rcap = size < 262144 ? size : 262144;
    memset(payload, 0x5a, size);
    size_t lat_cap = 1 << 20, lat_n = 0;
    double *lat = malloc(lat_cap * sizeof *lat);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { fprintf(stderr, "loadclient: bad host %s\n", host); return 2; }

    int ep = epoll_create1(0), one = 1;
    for (int i = 0; i < nconns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            fprintf(stderr, "loadclient: cannot connect to %s:%d: %s\n", host, port, strerror(errno));
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) { perror("fcntl"); return 1; }
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }

    if (count > 0) return run_count(ep, conns, nconns, rbuf, rcap, warmup, duration, count);
    int live = nconns, errors = 0, measuring = 0;
    double t0 = now(), start = t0 + warmup, end = start + duration, cpu0 = 0.0;
    for (int i = 0; i < nconns; i++) {
        conns[i].started = t0;
        if (send_more(ep, &conns[i]) < 0) { close(conns[i].fd); conns[i].fd = -1; live--; errors++; }
    }
    struct epoll_event events[256];
    while (live > 0) {
        double t = now();
        if (!measuring && t >= start) {
            measuring = 1;
            cpu0 = cpu_now();
            printf("measuring\n");
            fflush(stdout);
        }
        if (t >= end) break;
        double until = measuring ? end : start;
        int timeout = (int)((until - t) * 1000.0) + 1;
        int n = epoll_wait(ep, events, 256, timeout);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int k = 0; k < n; k++) {
            struct conn *c = events[k].data.ptr;
            if (c->fd < 0) continue;
            if ((events[k].events & (EPOLLOUT | EPOLLERR)) && c->sent < size && send_more(ep, c) < 0) goto failed;
            if (!(events[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            size_t want = size - c->got;
            ssize_t r = recv(c->fd, rbuf, want < rcap ? want : rcap, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) goto failed;
            c->got += (size_t)r;
            if (c->got < size) continue;
            double done = now();
            if (done >= end) continue; /* straddles the end of the window: not counted */
            if (done >= start) {
                if (lat_n == lat_cap) {
                    lat_cap *= 2;
                    lat = realloc(lat, lat_cap * sizeof *lat);
                    if (!lat) { perror("realloc"); return 1; }
                }
                lat[lat_n++] = done - c->started;
            }
            c->got = c->sent = 0;
            c->started = done;
            if (send_more(ep, c) < 0) goto failed;
            continue;
        failed:
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            live--;
            errors++;
        }
    }
    if (!measuring) { cpu0 = cpu_now(); printf("measuring\n"); }
    double cpu = cpu_now() - cpu0;
    qsort(lat, lat_n, sizeof *lat, cmp_double);
    double sum = 0.0;
    for (size_t i = 0; i < lat_n; i++) sum += lat[i];
    double rps = (double)lat_n / duration;
    printf("{\"conns\": %d, \"size\": %zu, \"duration_s\": %g, \"procs\": 1, \"requests\": %zu, "
           "\"errors\": %d, \"requests_per_s\": %.6f, \"mb_per_s\": %.6f, \"client_cpu_s\": %.4f, "
           "\"latency_us\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"max\": %.3f, \"mean\": %.3f}}\n",
           nconns, size, duration, lat_n, errors, rps, rps * (double)size / 1e6, cpu,
           percentile(lat, lat_n, 50) * 1e6, percentile(lat, lat_n, 90) * 1e6,
           percentile(lat, lat_n, 99) * 1e6, lat_n ? lat[lat_n - 1] * 1e6 : 0.0,
           lat_n ? sum / (double)lat_n * 1e6 : 0.0);
    fflush(stdout);
    return lat_n ? 0 : 1;
}
