/*
 * noop_responder: the fastest possible milter-protocol responder, the
 * "limit of the machine" row of the benchmark table.
 *
 * It does not parse anything it does not have to. It frames packets (4-byte
 * big-endian length + command byte), skips their payload without copying it,
 * and answers each command from a fixed table:
 *
 *   O        -> OPTNEG reply: version 6, actions ADDHDRS, protocol flags 0
 *               (every stage) or, with --eom-only, NO_* for every stage the
 *               MTA offered to skip (W2)
 *   D, A     -> nothing (macros and abort get no reply)
 *   Q        -> close the connection
 *   K        -> nothing (next C follows on the same connection)
 *   E        -> 'h' "X-Bench" "1" and 'c', in one write
 *   anything else (C H M R T L N B U) -> 'c'
 *
 * Everything owed for one read() is sent in one write(), with TCP_NODELAY
 * (on TCP; a UNIX socket has no Nagle to turn off).
 * One thread, one level-triggered epoll loop; the per-connection state is a
 * few dozen bytes, so the idle-connection RSS is the kernel's and not ours.
 *
 * usage: noop_responder [--host 127.0.0.1] --port PORT [--eom-only]
 *        noop_responder --unix PATH [--eom-only]
 *
 * --unix listens on a UNIX-domain socket (Postfix unix:, Sendmail local:)
 * instead of TCP. A stale socket file at PATH is removed first (anything else
 * there is an error), and PATH is removed again on exit.
 *
 * Exits on SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define NO_STAGES 0x37Fu /* NOCONNECT..NOEOH, NOUNKNOWN, NODATA */
#define ADDHDRS 0x1u
#define RBUF (256 * 1024)
#define OBUF 4096

struct conn {
    int fd;
    uint8_t hdr[5];   /* length (4) + command (1) of the packet being read */
    uint8_t hlen;     /* bytes of hdr collected */
    uint8_t cmd;
    uint8_t opt[12];  /* first 12 payload bytes of 'O' (the offer) */
    uint32_t left;    /* payload bytes of the current packet still to skip */
    uint32_t optlen;
    char *pend;       /* unsent output (rare: only if the socket buffer is full) */
    size_t pendlen;
};

static volatile sig_atomic_t stop;
static int eom_only;
static int epfd;

static void on_signal(int sig) { (void)sig; stop = 1; }

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get_u32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void conn_close(struct conn *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pend);
    free(c);
}

/* Append the reply owed for the packet just completed. Returns -1 to close. */
static int reply(struct conn *c, uint8_t *out, size_t *olen) {
    static const uint8_t cont[5] = {0, 0, 0, 1, 'c'};
    static const uint8_t eom[] = {
        0, 0, 0, 11, 'h', 'X', '-', 'B', 'e', 'n', 'c', 'h', 0, '1', 0,
        0, 0, 0, 1, 'c'};
    uint8_t *o = out + *olen;
    switch (c->cmd) {
    case 'O': {
        uint32_t offered = c->optlen >= 12 ? get_u32(c->opt + 8) : 0;
        /* An offer of 0 means the v1 set (libmilter's rule). */
        if (offered == 0) offered = 0x3F;
        uint32_t pflags = eom_only ? (NO_STAGES & offered) : 0;
        put_u32(o, 13);
        o[4] = 'O';
        put_u32(o + 5, 6);
        put_u32(o + 9, ADDHDRS);
        put_u32(o + 13, pflags);
        *olen += 17;
        return 0;
    }
    case 'D': case 'A': case 'K':
        return 0;
    case 'Q':
        return -1;
    case 'E':
        memcpy(o, eom, sizeof eom);
        *olen += sizeof eom;
        return 0;
    default:
        memcpy(o, cont, sizeof cont);
        *olen += sizeof cont;
        return 0;
    }
}

static int flush(struct conn *c, const uint8_t *buf, size_t len) {
    while (len > 0) {
        /* Keep order: once something is pending, queue behind it. */
        ssize_t n = c->pendlen ? (errno = EAGAIN, -1) : write(c->fd, buf, len);
        if (n > 0) { buf += n; len -= n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            char *p = realloc(c->pend, c->pendlen + len);
            if (!p) return -1;
            memcpy(p + c->pendlen, buf, len);
            c->pend = p;
            c->pendlen += len;
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
            return 0;
        }
        return -1;
    }
    return 0;
}

static void on_writable(struct conn *c) {
    while (c->pendlen > 0) {
        ssize_t n = write(c->fd, c->pend, c->pendlen);
        if (n > 0) {
            memmove(c->pend, c->pend + n, c->pendlen - n);
            c->pendlen -= n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        conn_close(c);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void on_readable(struct conn *c, uint8_t *rbuf) {
    uint8_t out[OBUF];
    for (;;) {
        ssize_t n = read(c->fd, rbuf, RBUF);
        if (n == 0) { conn_close(c); return; }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            conn_close(c);
            return;
        }
        size_t olen = 0;
        const uint8_t *p = rbuf, *end = rbuf + n;
        while (p < end) {
            if (c->hlen < 5) {
                c->hdr[c->hlen++] = *p++;
                if (c->hlen < 5) continue;
                uint32_t len = get_u32(c->hdr);
                if (len == 0) { conn_close(c); return; }
                c->cmd = c->hdr[4];
                c->left = len - 1;
                c->optlen = 0;
            }
            size_t take = (size_t)(end - p) < c->left ? (size_t)(end - p) : c->left;
            if (c->cmd == 'O') {
                for (size_t i = 0; i < take && c->optlen < 12; i++)
                    c->opt[c->optlen++] = p[i];
            }
            p += take;
            c->left -= take;
            if (c->left > 0) break;
            c->hlen = 0;
            if (reply(c, out, &olen) < 0) {
                if (olen) flush(c, out, olen);
                conn_close(c);
                return;
            }
            if (olen > OBUF - 64) {
                if (flush(c, out, olen) < 0) { conn_close(c); return; }
                olen = 0;
            }
        }
        if (olen && flush(c, out, olen) < 0) { conn_close(c); return; }
        if (n < RBUF) return; /* drained (level-triggered: epoll tells us again) */
    }
}

#define USAGE "usage: %s [--host H] --port P [--eom-only]\n       %s --unix PATH [--eom-only]\n"

/* A listening UNIX-domain socket at path; a stale socket file there is removed. */
static int listen_unix(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        fprintf(stderr, "socket path too long (max %zu bytes): %s\n", sizeof a.sun_path - 1, path);
        return -1;
    }
    strcpy(a.sun_path, path);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            fprintf(stderr, "%s exists and is not a socket; not removing it\n", path);
            return -1;
        }
        unlink(path);
    }
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) {
        perror("unix socket bind/listen");
        return -1;
    }
    return lfd;
}

static int listen_tcp(const char *host, int port) {
    int v6 = strchr(host, ':') != NULL;
    int lfd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        inet_pton(AF_INET6, host, &a->sin6_addr);
        sl = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
            fprintf(stderr, "bad host %s\n", host);
            return -1;
        }
        sl = sizeof *a;
    }
    if (bind(lfd, (struct sockaddr *)&ss, sl) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return -1;
    }
    return lfd;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    const char *unix_path = NULL;
    int port = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--host") && i + 1 < argc) host = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--unix") && i + 1 < argc) unix_path = argv[++i];
        else if (!strcmp(argv[i], "--eom-only")) eom_only = 1;
        else {
            fprintf(stderr, USAGE, argv[0], argv[0]);
            return 2;
        }
    }
    if ((port < 0) == (unix_path == NULL)) {
        fprintf(stderr, USAGE, argv[0], argv[0]);
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = unix_path ? listen_unix(unix_path) : listen_tcp(host, port);
    if (lfd < 0) return 1;
    int one = 1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);

    uint8_t *rbuf = malloc(RBUF);
    struct epoll_event evs[256];
    while (!stop) {
        int n = epoll_wait(epfd, evs, 256, 500);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    if (!unix_path) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    if (!nc) { close(fd); continue; }
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                on_writable(c);
                continue; /* c may be freed; reads resume once drained */
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c, rbuf);
        }
    }
    if (unix_path) unlink(unix_path);
    return 0;
}
