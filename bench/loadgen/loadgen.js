// chatd benchmark load generator: many clients in one Node.js process, so
// the server, not the load generator, is what saturates.
//
//   node loadgen.js '{"mode": "fanout", ...}'   -> prints one JSON line
//
// Modes: fanout (receivers on WebSocket, Socket.IO, or with "sse": chatd's
// Server-Sent Events), latency, idle (WebSocket or Socket.IO), longpoll
// (chatd's HTTP API).  All clients share this process's clock, so latencies are
// send-to-receive on one clock.

"use strict";
const WebSocket = require("ws");
const http = require("http");

const cfg = JSON.parse(process.argv[2]);
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms

function connect(url) {
  if (cfg.protocol === "socketio") {
    const {io} = require("socket.io-client");
    const u = new URL(url);
    const socket = io(`http://${u.host}`, {transports: ["websocket"], reconnection: false, forceNew: true});
    return new Promise((resolve, reject) => {
      const client = {
        onmessage: null,
        send: (text) => socket.emit("message", text),
        close: () => socket.close(),
      };
      socket.on("message", (data) => client.onmessage && client.onmessage(typeof data === "string" ? data : JSON.stringify(data)));
      socket.on("connect", () => resolve(client));
      socket.on("connect_error", reject);
    });
  }
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {perMessageDeflate: false});
    const client = {onmessage: null, send: (text) => ws.send(text), close: () => ws.close()};
    ws.on("message", (data) => client.onmessage && client.onmessage(data));
    ws.on("open", () => resolve(client));
    ws.on("error", reject);
  });
}

// A receive-only WebSocket client on a bare TCP socket: after the
// handshake, each chunk of bytes is handed over as it arrives, without frame
// parsing or events per frame, so that a thousand of them cost the load
// generator little (server frames are unmasked text, and messages in the
// latency test are far enough apart to arrive one per chunk).
function connectRaw(url) {
  const net = require("net");
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const sock = net.connect(Number(u.port), u.hostname);
    sock.setNoDelay(true);
    const client = {onmessage: null, send: () => { throw new Error("receive-only"); }, close: () => sock.destroy()};
    let upgraded = false;
    let head = "";
    sock.on("connect", () => {
      sock.write(`GET ${u.pathname} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\n` +
                 "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" +
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    });
    sock.on("data", (data) => {
      if (!upgraded) {
        head += data.toString("latin1");
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) return;
        if (!head.startsWith("HTTP/1.1 101")) { reject(new Error(head)); return; }
        upgraded = true;
        resolve(client);
        const rest = head.slice(end + 4);
        if (rest && client.onmessage) client.onmessage(rest);
        return;
      }
      if (client.onmessage) client.onmessage(data);
    });
    sock.on("error", reject);
  });
}

// A receive-only Server-Sent Events client on a bare TCP socket (chatd's
// GET /api/rooms/<room>/events for the WebSocket URL's room): each chunk
// is handed over as the number of events in it (one "id: " line each),
// without parsing the rest, as the raw WebSocket client does.
function connectSSE(url) {
  // An event stream the way a browser's EventSource reads it: the server
  // ends a stream after 4 MiB or 55 s (chatd.sse), and the receiver
  // connects again at once with Last-Event-ID, resuming after the last
  // event it had.
  const net = require("net");
  const u = new URL(url);
  const room = u.pathname.split("/").pop();
  return new Promise((resolve, reject) => {
    let closed = false;
    let lastId = null;
    let sock = null;
    const client = {
      onmessage: null,
      send: () => { throw new Error("receive-only"); },
      close: () => { closed = true; if (sock) sock.destroy(); },
    };
    const open = () => {
      let started = false;
      let head = "";
      let tail = "";  // an "id: " split across two reads is counted once
      let recent = "";  // enough of the last read for an id line split across two
      const count = (text) => {
        const joined = tail + text;
        const n = (joined.match(/\nid: /g) || []).length;
        tail = joined.slice(-4);
        const seen = recent + text;
        const at = seen.lastIndexOf("\nid: ");
        const eol = at < 0 ? -1 : seen.indexOf("\n", at + 5);
        if (eol > 0) lastId = seen.slice(at + 5, eol).trim();
        if (seen.includes("\r\n0\r\n\r\n")) sock.destroy();  // the stream's last chunk: it ended
        recent = seen.slice(-64);
        if (n && client.onmessage) client.onmessage(n);
      };
      sock = net.connect(Number(u.port), u.hostname);
      sock.setNoDelay(true);
      sock.on("connect", () => {
        const resume = lastId === null ? "" : `Last-Event-ID: ${lastId}\r\n`;
        sock.write(`GET /api/rooms/${room}/events HTTP/1.1\r\nHost: ${u.host}\r\n${resume}\r\n`);
      });
      sock.on("data", (data) => {
        if (!started) {
          head += data.toString("latin1");
          const end = head.indexOf("\r\n\r\n");
          if (end < 0) return;
          if (!head.startsWith("HTTP/1.1 200")) { reject(new Error(head)); return; }
          started = true;
          resolve(client);
          count(head.slice(end + 2));
          return;
        }
        count(data.toString("latin1"));
      });
      sock.on("close", () => { if (!closed && started) open(); });  // (destroy() closes too)
      sock.on("error", (err) => { if (!started) reject(err); });
    };
    open();
  });
}

// The servers to spread clients over, round-robin: cfg.urls (several chatd
// nodes sharing one store) or cfg.url.  Senders talk to the first.
const urls = cfg.urls || [cfg.url];

async function connectMany(count) {
  const clients = [];
  const open = cfg.sse ? connectSSE : cfg.raw ? connectRaw : connect;
  for (let start = 0; start < count; start += 100) {
    const batch = [];
    for (let i = start; i < Math.min(count, start + 100); i++) batch.push(open(urls[i % urls.length]));
    clients.push(...(await Promise.all(batch)));
  }
  return clients;
}

function message(body) {
  return JSON.stringify({type: "message", nick: "bench", body});
}

// Call send(i) for i = 0.. at `rate` a second for `duration` seconds, on
// schedule (a late call does not push the later ones back).
async function paced(rate, duration, send) {
  const total = Math.round(rate * duration);
  const interval = 1000 / rate;
  const started = now();
  for (let i = 0; i < total; i++) {
    const wait = started + i * interval - now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    send(i);
  }
  return total;
}

// Wait until done() holds, or `ms` pass.
async function until(done, ms) {
  const deadline = now() + ms;
  while (!done() && now() < deadline) await new Promise((r) => setTimeout(r, 5));
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function finish(result) {
  const cpu = process.cpuUsage();
  result.loadgen_cpu_s = (cpu.user + cpu.system) / 1e6;
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
}

async function fanout() {
  // One sender with a bounded window of messages in flight (sent, not yet
  // echoed back to it), R receivers that only count, each on its own, so
  // that one receiver's loss is not hidden by another's duplicate.
  const receivers = await connectMany(cfg.receivers);
  const sender = await connect(urls[0]);
  let delivered = 0;
  const counts = receivers.map(() => 0);
  // (An SSE receiver is told how many events a chunk held.)
  const many = (n) => (typeof n === "number" ? n : 1);
  receivers.forEach((r, i) => { r.onmessage = (n) => { delivered += many(n); counts[i] += many(n); }; });
  let sent = 0, echoed = 0, stop = false;
  const started = now();
  const send = () => { sender.send(message(`f${sent}`)); sent += 1; };
  sender.onmessage = () => {
    echoed += 1;
    if (!stop) send();
  };
  for (let i = 0; i < cfg.window; i++) send();
  await new Promise((r) => setTimeout(r, cfg.duration * 1000));
  stop = true;
  const expected = () => sent * receivers.length;
  await until(() => delivered >= expected(), 10000);
  const seconds = (now() - started) / 1000;
  const short = counts.reduce((sum, n) => sum + Math.max(0, sent - n), 0);
  const extra = counts.reduce((sum, n) => sum + Math.max(0, n - sent), 0);
  finish({delivered, sent, seconds, deliveries_per_s: delivered / seconds,
          undelivered: short, duplicates: extra, nodes: urls.length});
}

async function latency() {
  // R receivers; one sender at a fixed rate; each receiver notes when
  // each message arrives.
  const receivers = await connectMany(cfg.receivers);
  const sender = await connect(urls[0]);
  sender.onmessage = () => {};
  const sentAt = [];
  const latencies = [];
  let received = 0;
  for (const r of receivers) {
    r.onmessage = (data) => {
      const t = now();
      // A chunk may hold more than one message.
      for (const m of data.toString().matchAll(/"L(\d+)"/g)) {
        latencies.push(t - sentAt[Number(m[1])]);
        received += 1;
      }
    };
  }
  const total = await paced(cfg.rate, cfg.duration, (i) => {
    sentAt[i] = now();
    sender.send(message(`L${i}`));
  });
  await until(() => received >= total * receivers.length, 5000);
  latencies.sort((a, b) => a - b);
  finish({sent: total, received, undelivered: total * receivers.length - received,
          p50_ms: percentile(latencies, 50), p99_ms: percentile(latencies, 99),
          max_ms: latencies.length ? latencies[latencies.length - 1] : null});
}

async function idle() {
  // Open N connections, say so, and hold them until told to stop.
  const clients = await connectMany(cfg.connections);
  for (const c of clients) c.onmessage = () => {};
  process.stdout.write(JSON.stringify({ready: clients.length}) + "\n");
  process.stdin.once("data", () => finish({connections: clients.length}));
}

function request(method, path, body) {
  const u = new URL(cfg.base);
  return new Promise((resolve, reject) => {
    const req = http.request({host: u.hostname, port: u.port, method, path, agent,
                              headers: body ? {"Content-Type": "application/json"} : {}}, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({status: res.statusCode, body: Buffer.concat(chunks).toString()}));
    });
    req.on("error", reject);
    if (body) req.write(body);
    req.end();
  });
}
const agent = new http.Agent({keepAlive: true, maxSockets: Infinity});

// A long-poll client on a bare keep-alive TCP socket: it writes each GET
// itself and reads answers framed by Content-Length or chunked, so that a
// thousand of them cost the load generator far less than node's http
// client (which saturated this process at 1000 pollers).
function rawPoller(path, onBody) {
  const net = require("net");
  const u = new URL(cfg.base);
  const sock = net.connect(Number(u.port), u.hostname);
  sock.setNoDelay(true);
  let buffer = Buffer.alloc(0);
  const poller = {
    get: (target) => sock.write(`GET ${target} HTTP/1.1\r\nHost: ${u.host}\r\n\r\n`),
    close: () => sock.destroy(),
  };
  sock.on("data", (data) => {
    buffer = buffer.length ? Buffer.concat([buffer, data]) : data;
    for (;;) {
      const end = buffer.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = buffer.toString("latin1", 0, end);
      const status = Number(head.slice(9, 12));
      const length = /\r\ncontent-length: *(\d+)/i.exec(head);
      let body, used;
      if (length) {
        used = end + 4 + Number(length[1]);
        if (buffer.length < used) return;
        body = buffer.toString("utf8", end + 4, used);
      } else if (/\r\ntransfer-encoding: *chunked/i.test(head)) {
        const parts = [];
        let at = end + 4;
        for (;;) {
          const line = buffer.indexOf("\r\n", at);
          if (line < 0) return;
          const size = parseInt(buffer.toString("latin1", at, line), 16);
          if (buffer.length < line + 2 + size + 2) return;
          if (size === 0) { used = line + 4; break; }
          parts.push(buffer.subarray(line + 2, line + 2 + size));
          at = line + 2 + size + 2;
        }
        body = Buffer.concat(parts).toString("utf8");
      } else {
        throw new Error(`unframed answer: ${head}`);
      }
      buffer = buffer.subarray(used);
      onBody(status, body);
    }
  });
  sock.on("error", (err) => { throw err; });
  return new Promise((resolve) => sock.on("connect", () => resolve(poller)));
}

async function longpoll() {
  // N clients each long-polling ?after=cursor; a sender POSTs at a fixed
  // rate; latencies are POST-sent to poll-answer-received.
  const sentAt = [];
  const latencies = [];
  let received = 0, stop = false;
  const total = Math.round(cfg.rate * cfg.duration);
  const info = JSON.parse((await request("GET", `/api/rooms/${cfg.room}`)).body);
  const target = (cursor) => `/api/rooms/${cfg.room}/messages?after=${cursor}&timeout=30&limit=1000`;
  async function poller() {
    let cursor = info.last_seq;
    const client = await rawPoller(target(cursor), (status, body) => {
      const t = now();
      if (status === 200) {
        const batch = JSON.parse(body);
        for (const m of batch.messages) {
          const match = /^P(\d+)$/.exec(m.body);
          if (match) { latencies.push(t - sentAt[Number(match[1])]); received += 1; }
          cursor = m.seq;
        }
      }
      if (stop) client.close(); else client.get(target(cursor));
    });
    client.get(target(cursor));
  }
  const pollers = [];
  for (let i = 0; i < cfg.clients; i++) pollers.push(poller());
  await new Promise((r) => setTimeout(r, 1000)); // let every poller be waiting
  const started = now();
  await paced(cfg.rate, cfg.duration, (i) => {
    sentAt[i] = now();
    request("POST", `/api/rooms/${cfg.room}/messages`, JSON.stringify({body: `P${i}`}));
  });
  await until(() => received >= total * cfg.clients, 5000);
  const seconds = (now() - started) / 1000;
  latencies.sort((a, b) => a - b);
  finish({sent: total, received, deliveries_per_s: received / seconds,
          undelivered: total * cfg.clients - received,
          p50_ms: percentile(latencies, 50), p99_ms: percentile(latencies, 99),
          max_ms: latencies.length ? latencies[latencies.length - 1] : null});
}

async function getcost() {
  // The cost of one GET ?after= (answered at once) in a room.
  const times = [];
  for (let i = 0; i < cfg.requests; i++) {
    const t = now();
    const res = await request("GET", `/api/rooms/${cfg.room}/messages?after=${cfg.after}&limit=10`);
    if (res.status !== 200) throw new Error(res.body);
    times.push(now() - t);
  }
  times.sort((a, b) => a - b);
  finish({requests: cfg.requests, p50_ms: percentile(times, 50), p99_ms: percentile(times, 99)});
}

({fanout, latency, idle, longpoll, getcost})[cfg.mode]().catch((err) => {
  process.stderr.write(String(err && err.stack || err) + "\n");
  process.exit(1);
});
