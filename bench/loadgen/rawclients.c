/*
 * chatd's load generator for the tests where node's event loop, not the
 * server, would set the latency: clients on bare sockets, in C.
 *
 *   rawclients longpoll HOST PORT ROOM CLIENTS RATE DURATION
 *       N clients each long-polling GET /api/rooms/ROOM/messages?after=CURSOR
 *       on its own keep-alive socket, and a sender POSTing "P<i>" at RATE a
 *       second; latency is from a POST being written to an answer holding it
 *       being read.  (node spent ~40 us per answer-and-ask-again: with a
 *       thousand pollers it saturated its core.)
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
 * Prints one JSON line with the fields of loadgen.js: sent, received,
 * [deliveries_per_s,] undelivered, p50_ms, p99_ms, max_ms, loadgen_cpu_s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
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
} conn_t;

static const char *host, *room;
static int port;

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
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET /api/rooms/%s/messages?after=%ld&timeout=30&limit=1000 HTTP/1.1\r\n"
                     "Host: %s:%d\r\n\r\n",
                     room, c->cursor, host, port);
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

int main(int argc, char **argv) {
    if (argc == 8 && strcmp(argv[1], "longpoll") == 0) return longpoll_main(argv + 1);
    if (argc == 8 && strcmp(argv[1], "latency") == 0) return latency_main(argv + 1);
    fprintf(stderr,
            "usage: rawclients longpoll HOST PORT ROOM CLIENTS RATE DURATION\n"
            "       rawclients latency HOST PORT[,PORT...] PATH RECEIVERS RATE DURATION\n");
    return 2;
}
