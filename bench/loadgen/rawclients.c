/*
 * chatd's load generator for the tests where node's event loop, not the
 * server, would set the latency: clients on bare sockets, in C.
 *
 *   rawclients longpoll HOST PORT ROOM CLIENTS RATE DURATION
 *       N clients each long-polling GET /api/rooms/ROOM/messages?after=CURSOR
 *       on its own keep-alive socket, and a sender POSTing "P<i>" at RATE a
 *       second; latency is from a POST being written to an answer holding it
 *       being read.  (node spent ~40 us per answer-and-ask-again: with a
 *       thousand pollers it saturated its core.)  With RAWCLIENTS_PRESENCE=1
 *       in the environment each poller also asks for the room's presence
 *       (&presence=VERSION, the last answer's, and a client id of its own).
 *
 *   rawclients latency HOST PORT[,PORT...] PATH RECEIVERS RATE DURATION
 *       R WebSocket receivers and one sender of "L<i>" messages at RATE a
 *       second (chatd's message frames; the peers broadcast them as they
 *       are); latency is from a frame being written to its copy being read
 *       by each receiver.  (node spent ~20 us per frame received.)  With
 *       several ports (chatd nodes sharing a store), receivers are spread
 *       over them round-robin and the sender talks to the first; each
 *       receiver must see every message once, in order: "undelivered",
 *       "duplicates" and "out_of_order" count (receiver, message) pairs,
 *       and "remote_p50_ms"/"remote_p99_ms" are the receivers' on other
 *       ports than the sender's.
 *
 *   rawclients storm HOST PORT PATH CLIENTS INFLIGHT AFTER LAST
 *       A reconnect storm: CLIENTS WebSocket clients open PATH?after=AFTER
 *       (and &presence=1 with RAWCLIENTS_PRESENCE=1, as chatd's pages ask)
 *       (AFTER < 0: PATH as it is, no resume) on non-blocking sockets, all
 *       at once with INFLIGHT handshakes in flight (a new one starts as
 *       each is answered); each must then receive the messages AFTER+1 ..
 *       LAST, each once and in order ("missed", "doubled", "out_of_order"
 *       count (client, message) pairs).  Without resume a client is done at
 *       its 101.  "storm_s" is from the first connect() to the last client
 *       done, "open_s" to the last 101; p50/p99/max_ms are each client's
 *       connect() to done.  A connection refused or reset is dialled again
 *       ("retries").  Gives up after 120 s ("unfinished").  Holds its
 *       connections after printing, until its stdin closes.
 *
 * Prints one JSON line with the fields of loadgen.js: sent, received,
 * [deliveries_per_s,] undelivered, p50_ms, p99_ms, max_ms, loadgen_cpu_s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

typedef struct {
    int fd;
    long cursor;
    char *buf;
    size_t len, cap;
    char seen[64]; /* the presence version of the last answer (RAWCLIENTS_PRESENCE) */
} conn_t;

static const char *host, *room;
static int port;
static int with_presence;

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) die("address");
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void write_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            die("write");
        }
        data += n;
        len -= (size_t)n;
    }
}

static void ask(conn_t *c) {
    char req[512], extra[128] = "";
    if (with_presence)
        snprintf(extra, sizeof extra, "&presence=%s&client=c%d", c->seen[0] ? c->seen : "1", c->fd);
    int n = snprintf(req, sizeof req,
                     "GET /api/rooms/%s/messages?after=%ld&timeout=30&limit=1000%s HTTP/1.1\r\n"
                     "Host: %s:%d\r\n\r\n",
                     room, c->cursor, extra, host, port);
    write_all(c->fd, req, (size_t)n);
}

/* Case-insensitive search for a header's value in a response head. */
static const char *header(const char *head, size_t len, const char *name) {
    size_t k = strlen(name);
    for (size_t i = 0; i + k < len; i++)
        if (head[i] == '\n' && strncasecmp(head + i + 1, name, k) == 0) return head + i + 1 + k;
    return NULL;
}

/*
 * One complete answer at the start of c->buf: its body in *body (chunks
 * joined in place), or 0 while more bytes are needed.  Returns how many
 * bytes of the buffer it used.
 */
static size_t take_answer(conn_t *c, int *status, char **body, size_t *body_len) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - c->buf) + 4;
    *status = atoi(c->buf + 9);
    const char *cl = header(c->buf, head, "content-length:");
    if (cl) {
        size_t n = strtoul(cl, NULL, 10);
        if (c->len < head + n) return 0;
        *body = c->buf + head;
        *body_len = n;
        return head + n;
    }
    if (!header(c->buf, head, "transfer-encoding: chunked")) {
        fprintf(stderr, "unframed answer\n");
        exit(1);
    }
    size_t at = head;
    for (;;) {
        char *line = memmem(c->buf + at, c->len - at, "\r\n", 2);
        if (!line) return 0;
        size_t size = strtoul(c->buf + at, NULL, 16);
        size_t data = (size_t)(line - c->buf) + 2;
        if (c->len < data + size + 2) return 0;
        if (size == 0) break;
        at = data + size + 2;
    }
    /* The whole answer is here: join its chunks in place. */
    size_t pos = head, w = head, used = 0;
    for (;;) {
        char *line = memmem(c->buf + pos, c->len - pos, "\r\n", 2);
        size_t size = strtoul(c->buf + pos, NULL, 16);
        size_t data = (size_t)(line - c->buf) + 2;
        if (size == 0) {
            used = data + 2;
            break;
        }
        memmove(c->buf + w, c->buf + data, size);
        w += size;
        pos = data + size + 2;
    }
    *body = c->buf + head;
    *body_len = w - head;
    return used;
}

static double *latencies;
static size_t n_latencies, cap_latencies;
static double *sent_at;
static long received, n_sent;

static void record(double t, long i) {
    if (i < 0 || i >= n_sent) return;
    if (n_latencies == cap_latencies) {
        cap_latencies = cap_latencies ? cap_latencies * 2 : 1 << 16;
        latencies = realloc(latencies, cap_latencies * sizeof *latencies);
    }
    latencies[n_latencies++] = t - sent_at[i];
    received++;
}

/* Each "<mark><i>" (mark: "L or "P) in a chunk of bytes, as loadgen.js's
 * /"L(\d+)"/ does. */
static void record_marks(double t, const char *p, size_t len, const char *mark) {
    const char *end = p + len;
    size_t k = strlen(mark);
    while ((p = memmem(p, (size_t)(end - p), mark, k))) {
        p += k;
        char *stop;
        long i = strtol(p, &stop, 10);
        if (stop > p && stop < end && *stop == '"') record(t, i);
        p = stop > p ? stop : p;
    }
}

static void got(double t, const char *body, size_t len, conn_t *c) {
    /* Messages are {"type":"message",...,"seq":N,...,"body":"P<i>",...}. */
    record_marks(t, body, len, "\"body\":\"P");
    const char *p = body, *end = body + len;
    while ((p = memmem(p, (size_t)(end - p), "\"seq\":", 6))) {
        p += 6;
        long seq = strtol(p, NULL, 10);
        if (seq > c->cursor) c->cursor = seq;
    }
    const char *v = memmem(body, len, "\"version\":\"", 11);
    if (v) {
        v += 11;
        size_t k = 0;
        while (v + k < end && v[k] != '"' && k + 1 < sizeof c->seen) k++;
        memcpy(c->seen, v, k);
        c->seen[k] = 0;
    }
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double p) {
    if (!n_latencies) return -1;
    size_t i = (size_t)(p / 100.0 * (double)n_latencies);
    if (i >= n_latencies) i = n_latencies - 1;
    return latencies[i];
}

/*
 * The sender's schedule, shared by both tests: send(i) for each message i
 * due by now (RATE a second from `started`, on schedule however late a call
 * was), then say how long to wait for what arrives, or -1 once every
 * message is sent and either `expected` deliveries are in or 5 s passed.
 */
static int sender_fd;
static long next_message;
static double give_up;

static int pace(double started, double rate, long total, long expected, void (*send)(long)) {
    double t = now_ms();
    while (next_message < total && t >= started + (double)next_message * 1000.0 / rate) {
        sent_at[next_message] = now_ms();
        send(next_message);
        next_message++;
    }
    if (next_message >= total) {
        if (!give_up) give_up = now_ms() + 5000;
        if (received >= expected || now_ms() > give_up) return -1;
        return 50;
    }
    double wait = started + (double)next_message * 1000.0 / rate - now_ms();
    return wait > 0 ? (int)wait + 1 : 0;
}

static void post_message(long i) {
    char post[256], msg[64];
    int m = snprintf(msg, sizeof msg, "{\"body\":\"P%ld\"}", i);
    int k = snprintf(post, sizeof post,
                     "POST /api/rooms/%s/messages HTTP/1.1\r\nHost: %s:%d\r\n"
                     "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                     room, host, port, m, msg);
    write_all(sender_fd, post, (size_t)k);
}

static void send_frame(long i) {
    /* A masked text frame; a zero mask leaves the payload as it is. */
    char frame[256];
    int m = snprintf(frame + 6, sizeof frame - 6,
                     "{\"type\":\"message\",\"nick\":\"bench\",\"body\":\"L%ld\"}", i);
    frame[0] = (char)0x81;
    frame[1] = (char)(0x80 | m);
    memset(frame + 2, 0, 4);
    write_all(sender_fd, frame, (size_t)m + 6);
}

static int longpoll_main(char **argv) {
    with_presence = getenv("RAWCLIENTS_PRESENCE") != NULL;
    host = argv[1];
    port = atoi(argv[2]);
    room = argv[3];
    int clients = atoi(argv[4]);
    double rate = atof(argv[5]), duration = atof(argv[6]);
    long total = (long)(rate * duration + 0.5);
    n_sent = total;
    sent_at = calloc((size_t)total + 1, sizeof *sent_at);

    /* The room's last seq, where every poller starts. */
    conn_t info = {.fd = dial(), .cap = 1 << 16};
    info.buf = malloc(info.cap);
    char req[512];
    int n = snprintf(req, sizeof req, "GET /api/rooms/%s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", room, host, port);
    write_all(info.fd, req, (size_t)n);
    int status;
    char *body;
    size_t body_len;
    for (;;) {
        ssize_t r = read(info.fd, info.buf + info.len, info.cap - info.len);
        if (r <= 0) die("read room");
        info.len += (size_t)r;
        if (take_answer(&info, &status, &body, &body_len)) break;
    }
    const char *ls = memmem(body, body_len, "\"last_seq\":", 11);
    long start = ls ? strtol(ls + 11, NULL, 10) : 0;
    close(info.fd);

    int ep = epoll_create1(0);
    conn_t *conns = calloc((size_t)clients, sizeof *conns);
    for (int i = 0; i < clients; i++) {
        conns[i].fd = dial();
        conns[i].cursor = start;
        conns[i].cap = 1 << 14;
        conns[i].buf = malloc(conns[i].cap);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev) < 0) die("epoll_ctl");
        ask(&conns[i]);
    }
    /* The sender: its own keep-alive socket; answers are read and dropped. */
    int sender = dial();
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = (uint32_t)clients};
    epoll_ctl(ep, EPOLL_CTL_ADD, sender, &sev);

    struct epoll_event events[256];
    double settle = now_ms() + 1000; /* let every poller be waiting */
    while (now_ms() < settle) epoll_wait(ep, events, 256, 100);

    double started = now_ms();
    char scratch[1 << 16];
    sender_fd = sender;
    int wait;
    while ((wait = pace(started, rate, total, total * clients, post_message)) >= 0) {
        int ready = epoll_wait(ep, events, 256, wait);
        for (int e = 0; e < ready; e++) {
            uint32_t i = events[e].data.u32;
            if (i == (uint32_t)clients) {
                if (read(sender, scratch, sizeof scratch) <= 0) die("sender closed");
                continue;
            }
            conn_t *c = &conns[i];
            if (c->cap - c->len < 4096) {
                c->cap *= 2;
                c->buf = realloc(c->buf, c->cap);
            }
            ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
            if (r <= 0) {
                fprintf(stderr, "poller %u: connection closed\n", i);
                return 1;
            }
            c->len += (size_t)r;
            double at = now_ms();
            size_t used;
            while ((used = take_answer(c, &status, &body, &body_len))) {
                if (status == 200) got(at, body, body_len, c);
                memmove(c->buf, c->buf + used, c->len - used);
                c->len -= used;
                ask(c);
            }
        }
    }
    double seconds = (now_ms() - started) / 1000.0;
    qsort(latencies, n_latencies, sizeof *latencies, cmp);
    printf("{\"sent\": %ld, \"received\": %ld, \"deliveries_per_s\": %.1f, \"undelivered\": %ld, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, \"loadgen_cpu_s\": %.3f, "
           "\"loadgen\": \"c\"}\n",
           total, received, (double)received / seconds, total * clients - received, pct(50), pct(99),
           n_latencies ? latencies[n_latencies - 1] : -1.0, cpu_seconds());
    return 0;
}

/* A WebSocket client on a bare socket: the opening handshake, done. */
static int ws_open(const char *path) {
    int fd = dial();
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
                     path, host, port);
    write_all(fd, req, (size_t)n);
    char head[4096];
    size_t len = 0;
    while (!memmem(head, len, "\r\n\r\n", 4)) {
        /* Read the head a byte at a time: nothing after it may be lost. */
        if (len == sizeof head || read(fd, head + len, 1) != 1) die("handshake");
        len++;
    }
    if (len < 12 || memcmp(head, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "handshake refused: %.*s\n", (int)len, head);
        exit(1);
    }
    return fd;
}

/* Per receiver: which messages it has seen, and the last one, so that a
 * message missed, doubled or overtaken is counted, not netted out. */
static unsigned char *seen;
static long *last_seen;
static long duplicates, out_of_order;
static double *remote;
static size_t n_remote;

static void record_receiver(double t, const char *p, size_t len, int receiver, int is_remote) {
    const char *end = p + len;
    while ((p = memmem(p, (size_t)(end - p), "\"L", 2))) {
        p += 2;
        char *stop;
        long i = strtol(p, &stop, 10);
        if (stop > p && stop < end && *stop == '"' && i >= 0 && i < n_sent) {
            unsigned char *mark = &seen[(size_t)receiver * (size_t)n_sent + (size_t)i];
            if (*mark) {
                duplicates++;
            } else {
                *mark = 1;
                if (i < last_seen[receiver]) out_of_order++;
                last_seen[receiver] = i;
                if (is_remote) remote[n_remote++] = t - sent_at[i];
                record(t, i);
            }
        }
        p = stop > p ? stop : p;
    }
}

static double pct_of(double *values, size_t n, double p) {
    if (!n) return -1;
    size_t i = (size_t)(p / 100.0 * (double)n);
    return values[i >= n ? n - 1 : i];
}

static int latency_main(char **argv) {
    host = argv[1];
    int ports[64], n_ports = 0;
    for (char *spec = argv[2], *next; spec && *spec && n_ports < 64; spec = next) {
        ports[n_ports++] = (int)strtol(spec, &next, 10);
        if (*next == ',') next++;
    }
    const char *path = argv[3];
    int receivers = atoi(argv[4]);
    double rate = atof(argv[5]), duration = atof(argv[6]);
    long total = (long)(rate * duration + 0.5);
    n_sent = total;
    sent_at = calloc((size_t)total + 1, sizeof *sent_at);
    seen = calloc((size_t)receivers * (size_t)total + 1, 1);
    last_seen = calloc((size_t)receivers, sizeof *last_seen);
    remote = calloc((size_t)receivers * (size_t)total + 1, sizeof *remote);

    int ep = epoll_create1(0);
    int *fds = calloc((size_t)receivers, sizeof *fds);
    for (int i = 0; i < receivers; i++) {
        port = ports[i % n_ports];
        fds[i] = ws_open(path);
        last_seen[i] = -1;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) die("epoll_ctl");
    }
    port = ports[0];
    int sender = ws_open(path);
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = (uint32_t)receivers};
    epoll_ctl(ep, EPOLL_CTL_ADD, sender, &sev);

    struct epoll_event events[256];
    char chunk[1 << 16];
    double started = now_ms();
    sender_fd = sender;
    int wait;
    while ((wait = pace(started, rate, total, total * receivers, send_frame)) >= 0) {
        int ready = epoll_wait(ep, events, 256, wait);
        for (int e = 0; e < ready; e++) {
            uint32_t i = events[e].data.u32;
            int fd = i == (uint32_t)receivers ? sender : fds[i];
            ssize_t r = read(fd, chunk, sizeof chunk);
            if (r <= 0) {
                fprintf(stderr, "connection %u closed\n", i);
                return 1;
            }
            /* The sender's own copies are not counted, as in loadgen.js. */
            if (i != (uint32_t)receivers)
                record_receiver(now_ms(), chunk, (size_t)r, (int)i, (int)i % n_ports != 0);
        }
    }
    qsort(latencies, n_latencies, sizeof *latencies, cmp);
    qsort(remote, n_remote, sizeof *remote, cmp);
    printf("{\"sent\": %ld, \"received\": %ld, \"undelivered\": %ld, \"duplicates\": %ld, "
           "\"out_of_order\": %ld, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, "
           "\"remote_p50_ms\": %.3f, \"remote_p99_ms\": %.3f, \"nodes\": %d, "
           "\"loadgen_cpu_s\": %.3f, \"loadgen\": \"c\"}\n",
           total, received, total * receivers - received, duplicates, out_of_order, pct(50), pct(99),
           n_latencies ? latencies[n_latencies - 1] : -1.0, pct_of(remote, n_remote, 50),
           pct_of(remote, n_remote, 99), n_ports, cpu_seconds());
    return 0;
}

/* ---- storm ---------------------------------------------------------- */

enum { S_IDLE, S_CONNECTING, S_HEAD, S_OPEN, S_DONE };

typedef struct {
    int fd, state;
    long next_seq, max_seq, got;
    double started;
    unsigned char *seen;
    char *buf;
    size_t len, cap, sent;
} storm_t;

static struct sockaddr_in storm_addr;
static char storm_req[512];
static size_t storm_req_len;
static long storm_after, storm_last;
static long missed, doubled, storm_ooo, retries;

static void storm_dial(int ep, storm_t *c, uint32_t i) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->len = c->sent = 0;
    c->state = S_CONNECTING;
    if (connect(fd, (struct sockaddr *)&storm_addr, sizeof storm_addr) < 0 && errno != EINPROGRESS)
        die("connect");
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

/* Message frames in c->buf (a server's frames are not masked): count each
 * "seq" the client was owed.  Returns -1 on a close frame. */
static int storm_frames(storm_t *c) {
    size_t at = 0;
    while (c->len - at >= 2) {
        unsigned char *h = (unsigned char *)c->buf + at;
        int op = h[0] & 0x0f;
        size_t n = h[1] & 0x7f, head = 2;
        if (n == 126) {
            if (c->len - at < 4) break;
            n = (size_t)h[2] << 8 | h[3];
            head = 4;
        } else if (n == 127) {
            if (c->len - at < 10) break;
            n = 0;
            for (int k = 2; k < 10; k++) n = n << 8 | h[k];
            head = 10;
        }
        if (c->len - at < head + n) break;
        const char *p = (const char *)h + head;
        if (op == 8) return -1;
        const char *seq = op == 1 ? memmem(p, n, "\"seq\":", 6) : NULL;
        if (seq && memmem(p, n, "\"type\":\"message\"", 16)) {
            long s = strtol(seq + 6, NULL, 10);
            if (s > storm_after && s <= storm_last) {
                unsigned char *mark = &c->seen[s - storm_after - 1];
                if (*mark) {
                    doubled++;
                } else {
                    *mark = 1;
                    c->got++;
                    if (s < c->max_seq) storm_ooo++;
                }
                if (s > c->max_seq) c->max_seq = s;
            }
        }
        at += head + n;
    }
    memmove(c->buf, c->buf + at, c->len - at);
    c->len -= at;
    return 0;
}

static int storm_main(char **argv) {
    host = argv[1];
    port = atoi(argv[2]);
    const char *path = argv[3];
    int clients = atoi(argv[4]), inflight = atoi(argv[5]);
    storm_after = atol(argv[6]);
    storm_last = atol(argv[7]);
    long owed = storm_after >= 0 && storm_last > storm_after ? storm_last - storm_after : 0;
    storm_addr.sin_family = AF_INET;
    storm_addr.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &storm_addr.sin_addr) != 1) die("address");
    char query[64] = "";
    const char *presence = getenv("RAWCLIENTS_PRESENCE") ? "presence=1" : "";
    if (storm_after >= 0)
        snprintf(query, sizeof query, "?after=%ld%s%s", storm_after, *presence ? "&" : "", presence);
    else if (*presence)
        snprintf(query, sizeof query, "?%s", presence);
    storm_req_len = (size_t)snprintf(
        storm_req, sizeof storm_req,
        "GET %s%s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        path, query, host, port);

    storm_t *cs = calloc((size_t)clients, sizeof *cs);
    unsigned char *seen = calloc((size_t)clients * (size_t)(owed + 1), 1);
    double *took = calloc((size_t)clients, sizeof *took);
    int ep = epoll_create1(0);
    int started = 0, in_flight = 0, done = 0, opened = 0;
    double t0 = now_ms(), opened_at = t0, done_at = t0;
    struct epoll_event events[512];
    char scratch[1 << 16];
    while (done < clients && now_ms() - t0 < 120000) {
        while (started < clients && in_flight < inflight) {
            storm_t *c = &cs[started];
            c->seen = seen + (size_t)started * (size_t)(owed + 1);
            c->max_seq = storm_after;
            c->started = now_ms();
            storm_dial(ep, c, (uint32_t)started);
            started++;
            in_flight++;
        }
        int ready = epoll_wait(ep, events, 512, 100);
        for (int e = 0; e < ready; e++) {
            uint32_t i = events[e].data.u32;
            storm_t *c = &cs[i];
            if (c->state == S_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err == EINPROGRESS || (!err && !(events[e].events & EPOLLOUT))) continue;
                if (err) goto redial;
                c->state = S_HEAD;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                ssize_t w = write(c->fd, storm_req, storm_req_len);
                if (w != (ssize_t)storm_req_len) goto redial; /* a fresh socket takes 300 bytes */
                continue;
            }
            if (c->state == S_DONE) {
                /* Anything after its messages: doubles are counted; a close is not expected. */
                ssize_t r = read(c->fd, scratch, sizeof scratch);
                if (r <= 0) {
                    fprintf(stderr, "client %u: closed after it was done\n", i);
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    continue;
                }
                if (owed && c->cap - c->len >= (size_t)r) {
                    memcpy(c->buf + c->len, scratch, (size_t)r);
                    c->len += (size_t)r;
                    storm_frames(c);
                }
                continue;
            }
            if (!c->buf) {
                c->cap = 8192;
                c->buf = malloc(c->cap);
            }
            if (c->cap - c->len < 2048) {
                c->cap *= 2;
                c->buf = realloc(c->buf, c->cap);
            }
            ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) {
                if (c->state == S_HEAD) goto redial;
                fprintf(stderr, "client %u: closed before its messages\n", i);
                return 1;
            }
            c->len += (size_t)r;
            if (c->state == S_HEAD) {
                char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
                if (!end) continue;
                if (c->len < 12 || memcmp(c->buf, "HTTP/1.1 101", 12) != 0) {
                    fprintf(stderr, "handshake refused: %.*s\n", (int)(end - c->buf), c->buf);
                    return 1;
                }
                size_t head = (size_t)(end - c->buf) + 4;
                memmove(c->buf, c->buf + head, c->len - head);
                c->len -= head;
                c->state = S_OPEN;
                in_flight--;
                opened++;
                opened_at = now_ms();
            }
            if (storm_frames(c) < 0) {
                fprintf(stderr, "client %u: close frame\n", i);
                return 1;
            }
            if (c->got >= owed) {
                c->state = S_DONE;
                done_at = now_ms();
                took[done] = done_at - c->started;
                done++;
            }
            continue;
        redial:
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            retries++;
            storm_dial(ep, c, i);
        }
    }
    for (int i = 0; i < clients; i++) missed += owed - cs[i].got;
    qsort(took, (size_t)done, sizeof *took, cmp);
    printf("{\"clients\": %d, \"inflight\": %d, \"owed\": %ld, \"done\": %d, \"unfinished\": %d, "
           "\"missed\": %ld, \"doubled\": %ld, \"out_of_order\": %ld, \"retries\": %ld, "
           "\"opened\": %d, \"storm_s\": %.3f, \"open_s\": %.3f, \"connects_per_s\": %.1f, "
           "\"p50_ms\": %.1f, \"p99_ms\": %.1f, \"max_ms\": %.1f, \"loadgen_cpu_s\": %.3f, \"loadgen\": \"c\"}\n",
           clients, inflight, owed, done, clients - done, missed, doubled, storm_ooo, retries,
           opened, (done_at - t0) / 1000.0, (opened_at - t0) / 1000.0,
           opened ? (double)opened * 1000.0 / (opened_at - t0) : 0.0, pct_of(took, (size_t)done, 50),
           pct_of(took, (size_t)done, 99), done ? took[done - 1] : -1.0, cpu_seconds());
    /* Hold every connection until stdin closes, so that whoever measures
     * the server's CPU can do it before the clients go. */
    fflush(stdout);
    while (read(0, scratch, sizeof scratch) > 0) {
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 8 && strcmp(argv[1], "longpoll") == 0) return longpoll_main(argv + 1);
    if (argc == 8 && strcmp(argv[1], "latency") == 0) return latency_main(argv + 1);
    if (argc == 9 && strcmp(argv[1], "storm") == 0) return storm_main(argv + 1);
    fprintf(stderr,
            "usage: rawclients longpoll HOST PORT ROOM CLIENTS RATE DURATION\n"
            "       rawclients latency HOST PORT[,PORT...] PATH RECEIVERS RATE DURATION\n"
            "       rawclients storm HOST PORT PATH CLIENTS INFLIGHT AFTER LAST\n");
    return 2;
}
