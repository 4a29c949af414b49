"""
Turn python -m bench's JSON lines into docs/benchmarks.md and its chart.

    python -m bench.report [--results bench/results.jsonl] [--session ID] [--multinode]

Uses the newest session in the file unless --session is given.  Each cell
shows the median of its runs with the min-max range.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
SERVERS = ["chatd-sqlite", "chatd", "autobahn", "websockets", "tornado", "socketio"]
CHATDS = ["chatd-sqlite", "chatd"]
NAMES = {
    "chatd-sqlite": "chatd (default SQLite store)",
    "chatd": "chatd (--store memory:)",
    "autobahn": "Autobahn (prepared broadcast)",
    "websockets": "websockets (broadcast)",
    "tornado": "Tornado WebSocketHandler",
    "socketio": "python-socketio (aiohttp)",
    "chatd-sqlite-backlog50": "chatd (default SQLite store, backlog=50)",
    "floor": "floor: bare Twisted, one send() per recipient",
}
#: The latency cell's servers: the peers, then the floor.
LATENCY_SERVERS = SERVERS + ["floor"]
#: Fan-out targets (issue 15): at least this many times raw Autobahn.
FANOUT_TARGETS = {"chatd-sqlite": 1.5, "chatd": 2.0}
#: The storm cell's servers, in the order of its table.
STORM_SERVERS = ["chatd-sqlite", "chatd-sqlite-backlog50", "chatd", "autobahn", "websockets", "tornado"]


def load(path: Path, session: Optional[str]) -> List[Dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if session is None:
        session = rows[-1]["session"]
    return [r for r in rows if r.get("session") == session]


def cell(rows: List[Dict[str, Any]], key: str) -> Optional[Tuple[float, float, float, int]]:
    return summary([r[key] for r in rows if r.get(key) is not None])


def summary(values: List[float]) -> Optional[Tuple[float, float, float, int]]:
    """
    Median, min, max and count of a cell's values (None for none).
    """
    if not values:
        return None
    return statistics.median(values), min(values), max(values), len(values)


def fmt(c: Optional[Tuple[float, float, float, int]], digits: int = 0, scale: float = 1.0) -> str:
    if c is None:
        return "n/a"
    med, lo, hi, _ = (v * scale if i < 3 else v for i, v in enumerate(c))
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def group(rows: List[Dict[str, Any]], bench: str, **match: Any) -> List[Dict[str, Any]]:
    return [r for r in rows if r["bench"] == bench and all(r.get(k) == v for k, v in match.items())]


def ratio(a: Optional[Tuple], b: Optional[Tuple]) -> str:
    if not a or not b or not b[0]:
        return "n/a"
    return f"{a[0] / b[0]:.2f}x"


def loadgens(rows: List[Dict[str, Any]]) -> str:
    return ", ".join(sorted({r.get("loadgen", "node") for r in rows}))


def per_cycle(rows: List[Dict[str, Any]]) -> Optional[Tuple[float, float, float, int]]:
    return summary([r["server_cpu_s"] * 1e6 / r["received"] for r in rows if r.get("received")])


def share(c: Optional[Tuple], per_second: int) -> str:
    return "n/a" if not c else f"{c[0] * per_second / 1e6:.0%}"


def us_per(c: Optional[Tuple], count: int) -> str:
    return "n/a" if not c else f"{c[0] * 1e6 / count:.0f}"


BUS_NAMES = {"postgresql": "PostgreSQL (LISTEN/NOTIFY)", "redis": "Redis (pub/sub)"}


def buses(rows: List[Dict[str, Any]]) -> List[str]:
    """
    The buses of a session's multinode rows, known ones first.
    """
    found = {r["bus"] for r in rows if r["bench"] == "multinode"}
    return [b for b in BUS_NAMES if b in found] + sorted(found - set(BUS_NAMES))


def paired(
    a: List[Dict[str, Any]], b: List[Dict[str, Any]], key: str, op: Any
) -> Optional[Tuple[float, float, float, int]]:
    """
    C{op(a_run[key], b_run[key])} for each run both groups have (the two
    ran one after the other, so a run's pair shares the machine's mood),
    summarised as a cell.
    """
    by_run = {r["run"]: r[key] for r in b if r.get(key) is not None}
    return summary([op(r[key], by_run[r["run"]]) for r in a if r.get(key) is not None and r["run"] in by_run])


def signed(c: Optional[Tuple[float, float, float, int]], digits: int = 1) -> str:
    """
    A cell of differences, which may be negative: C{+0.8 (-0.2 to +1.9)}.
    """
    if c is None:
        return "n/a"
    med, lo, hi, _ = c
    return f"{med:+,.{digits}f} ({lo:+,.{digits}f} to {hi:+,.{digits}f})"


def nonnegative(c: Optional[Tuple]) -> Optional[Tuple]:
    # The C client reports -1 for "no such receivers" (one node has no
    # remote ones).
    return None if c is None or c[0] < 0 else c


def added_latency(rows: List[Dict[str, Any]], bus: str, key: str) -> Optional[Tuple]:
    """
    Three nodes' latency minus one node's, run by run.
    """
    one = group(rows, "multinode", test="latency", bus=bus, nodes=1)
    three = group(rows, "multinode", test="latency", bus=bus, nodes=3)
    return paired(three, one, key, lambda x, y: x - y)


def undelivered_total(rows: List[Dict[str, Any]], bus: str) -> int:
    """
    Every multinode run's messages not delivered, doubled or out of order
    (each counted per receiver), on C{bus}.
    """
    return sum(
        r.get("undelivered", 0) + r.get("duplicates", 0) + r.get("out_of_order", 0)
        for r in group(rows, "multinode", bus=bus)
    )


def notify_share(rows: List[Dict[str, Any]]) -> Optional[Tuple]:
    on = [r for r in rows if r["bench"] == "notify" and r["notify"] == "on"]
    off = [r for r in rows if r["bench"] == "notify" and r["notify"] == "off"]
    return paired(on, off, "commits_per_s", lambda x, y: 100.0 * x / y)


def _multinode_groups(
    rows: List[Dict[str, Any]], cells: List[Dict[str, Any]]
) -> Iterator[Tuple[str, int, int, List[Dict[str, Any]]]]:
    """
    C{(bus, nodes, receivers, runs)} for each table row of one multi-node
    test (C{cells}: its results), by bus, one node before three.
    """
    test = cells[0]["test"]
    for bus in buses(rows):
        for nodes in (1, 3):
            for receivers in sorted({r["receivers"] for r in cells}):
                g = group(rows, "multinode", test=test, bus=bus, nodes=nodes, receivers=receivers)
                if g:
                    yield bus, nodes, receivers, g


def multinode_section(rows: List[Dict[str, Any]]) -> List[str]:
    """
    The section on several chatd nodes sharing one PostgreSQL store
    (the multinode and notify cells), or nothing when the session has
    neither.
    """
    mn = [r for r in rows if r["bench"] == "multinode"]
    nt = [r for r in rows if r["bench"] == "notify"]
    if not mn and not nt:
        return []
    out = [
        "",
        "## Several nodes on one PostgreSQL",
        "",
        "One and three `twistd chatd` nodes on one PostgreSQL store (a fresh schema each time), "
        "hearing each other's commits through the bus (`--bus postgresql`: NOTIFY from the append "
        "transaction; `--bus redis://`: pub/sub after the commit); receivers are spread over the "
        "nodes round-robin and the one sender talks to the first node. Every node is pinned to "
        "CPU 0, the load generator to CPU 1, and PostgreSQL and Redis run where the kernel puts "
        "them, so on this 2-core machine three nodes cannot be faster than one: what the cells "
        "show is the server CPU per delivery summed over the nodes, and the latency the bus adds "
        "(three nodes minus one, paired run by run). Not delivered, duplicates and out of order "
        "count (receiver, message) pairs: every receiver must see every message once, in order.",
    ]
    fan = [r for r in mn if r["test"] == "fanout"]
    if fan:
        out += [
            "",
            "Fan-out: the sender keeps 100 messages in flight on the first node.",
            "",
            "| bus | nodes | R | deliveries/s | server µs/delivery | server CPU s (all nodes) | "
            "not delivered | load-gen CPU s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for bus, nodes, receivers, g in _multinode_groups(rows, fan):
            out.append(
                f"| {BUS_NAMES.get(bus, bus)} | {nodes} | {receivers} | {fmt(cell(g, 'deliveries_per_s'))} | "
                f"{fmt(cell(g, 'server_us_per_delivery'), 2)} | {fmt(cell(g, 'server_cpu_s'), 2)} | "
                f"{fmt(cell(g, 'undelivered'))} | {fmt(cell(g, 'loadgen_cpu_s'), 2)} |"
            )
    lat = [r for r in mn if r["test"] == "latency"]
    if lat:
        out += [
            "",
            "Latency: one sender at 20 messages/s for 10 s; send to receive on the load "
            "generator's clock (bare-socket receivers, in C). Other nodes' p50 and p99 are those "
            "of the receivers not on the sender's node, whose every message crossed the bus.",
            "",
            "| bus | nodes | R | p50 ms | p99 ms | max ms | other nodes' p50 ms | other nodes' p99 ms | "
            "not delivered | duplicates | out of order | server µs/delivery |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for bus, nodes, receivers, g in _multinode_groups(rows, lat):
            out.append(
                f"| {BUS_NAMES.get(bus, bus)} | {nodes} | {receivers} | {fmt(cell(g, 'p50_ms'), 1)} | "
                f"{fmt(cell(g, 'p99_ms'), 1)} | {fmt(cell(g, 'max_ms'), 1)} | "
                f"{fmt(nonnegative(cell(g, 'remote_p50_ms')), 1)} | "
                f"{fmt(nonnegative(cell(g, 'remote_p99_ms')), 1)} | {fmt(cell(g, 'undelivered'))} | "
                f"{fmt(cell(g, 'duplicates'))} | {fmt(cell(g, 'out_of_order'))} | "
                f"{fmt(cell(g, 'server_us_per_delivery'), 1)} |"
            )
        out += [
            "",
            "What the bus adds (three nodes minus one node, run by run):",
            "",
            "| bus | p50 ms | p99 ms |",
            "| --- | --- | --- |",
        ]
        for bus in buses(rows):
            out.append(
                f"| {BUS_NAMES.get(bus, bus)} | {signed(added_latency(rows, bus, 'p50_ms'))} | "
                f"{signed(added_latency(rows, bus, 'p99_ms'))} |"
            )
    if nt:
        g = nt[0]
        out += [
            "",
            f"Commits with and without NOTIFY (`python -m bench.notify`): {g['writers']} writers, each "
            "a `PostgresStore` of its own as a node's, each appending to a room of its own with "
            f"{g['window']} append(s) in flight (so one message per commit), for "
            f"{g['seconds']:.0f} s; with NOTIFY, each store announces its commits from the append "
            "transaction as `--bus postgresql` does, and one LISTEN connection hears them (not "
            "announced: committed messages it did not hear of).",
            "",
            "| NOTIFY | writers | commits/s | writer CPU s | not announced |",
            "| --- | --- | --- | --- | --- |",
        ]
        for mode in ("off", "on"):
            m = [r for r in nt if r["notify"] == mode]
            if m:
                out.append(
                    f"| {mode} | {m[0]['writers']} | {fmt(cell(m, 'commits_per_s'))} | "
                    f"{fmt(cell(m, 'writer_cpu_s'), 2)} | {fmt(cell(m, 'unannounced')) if mode == 'on' else '-'} |"
                )
        out += ["", f"With NOTIFY the store commits {fmt(notify_share(rows))}% of its rate without it (run by run)."]
    return out


def storm_groups(rows: List[Dict[str, Any]]) -> List[Tuple[str, int, List[Dict[str, Any]]]]:
    """
    The storm cells of a session: (server, clients, rows) in table order.
    """
    storms = [r for r in rows if r["bench"] == "storm"]
    names = [s for s in STORM_SERVERS if any(r["server"] == s for r in storms)]
    names += sorted({r["server"] for r in storms} - set(names))
    out = []
    for clients in sorted({r["clients"] for r in storms}):
        for name in names:
            g = group(rows, "storm", server=name, clients=clients)
            if g:
                out.append((name, clients, g))
    return out


def storm_section(rows: List[Dict[str, Any]]) -> List[str]:
    """
    The reconnect-storm section, or nothing when the session has no storm
    cells.
    """
    cells = storm_groups(rows)
    if not cells:
        return []
    behind = {r["owed"] for r in rows if r["bench"] == "storm" and r.get("resume")}
    out = [
        "",
        "## Reconnect storm",
        "",
        "N WebSocket clients connect at once, as after a restart or a node's death, with K "
        "handshakes in flight (a new one starts as each is answered), on bare non-blocking sockets "
        "(in C, `rawclients storm`). On chatd each resumes with `?after=` "
        f"{', '.join(map(str, sorted(behind))) or 'a few'} messages behind and must receive exactly "
        "those, once and in order (missed and doubled count (client, message) pairs); the peers "
        "keep no history, so theirs is the same storm without resume (done at the 101). Caught up "
        "is from the first connect to the last client done; connects/s is handshakes answered "
        "over the time to the last; server ms/connect is the server's CPU over the storm (taken "
        "before the clients close) per client. Listen overflows and drops are the kernel's "
        "(`/proc/net/netstat` TcpExt, during the storm): each dropped SYN costs its client a "
        "second or more before it tries again (client p99). chatd listens with a queue of 1024 "
        "unless the endpoint names one; `backlog=50` is Twisted's own default.",
        "",
        "| server | clients | in flight | resume | caught up s | connects/s | server ms/connect | "
        "server CPU s | listen overflows | listen drops | client p99 ms | missed | doubled | "
        "load-gen CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, clients, g in cells:
        inflight = ", ".join(str(k) for k in sorted({r["inflight"] for r in g}))
        resume = "yes" if all(r.get("resume") for r in g) else "no"
        out.append(
            f"| {NAMES.get(name, name)} | {clients:,} | {inflight} | {resume} | {fmt(cell(g, 'storm_s'), 2)} | "
            f"{fmt(cell(g, 'connects_per_s'))} | {fmt(cell(g, 'server_ms_per_connect'), 2)} | "
            f"{fmt(cell(g, 'server_cpu_s'), 2)} | {fmt(cell(g, 'listen_overflows'))} | "
            f"{fmt(cell(g, 'listen_drops'))} | {fmt(cell(g, 'p99_ms'), 0)} | {fmt(cell(g, 'missed'))} | "
            f"{fmt(cell(g, 'doubled'))} | {fmt(cell(g, 'loadgen_cpu_s'), 2)} |"
        )
    return out


def storm_targets(rows: List[Dict[str, Any]]) -> List[str]:
    """
    The reconnect storm's targets (issue 15), as rows of the Targets table.
    """
    out = []
    for name, clients, g in storm_groups(rows):
        if name not in CHATDS:
            continue
        peers = {p: group(rows, "storm", server=p, clients=clients) for p in ("websockets", "autobahn")}
        wrong = sum(r.get("missed", 0) + r.get("doubled", 0) + r.get("out_of_order", 0)
                    + r.get("unfinished", 0) for r in g)
        out += [
            f"| {NAMES[name]}: storm of {clients:,}, connects/s >= websockets' | "
            f"{ratio(cell(g, 'connects_per_s'), cell(peers['websockets'], 'connects_per_s'))} "
            f"({fmt(cell(g, 'connects_per_s'))} against {fmt(cell(peers['websockets'], 'connects_per_s'))}) |",
            f"| {NAMES[name]}: storm of {clients:,}, server CPU per connect <= Autobahn's | "
            f"{ratio(cell(g, 'server_ms_per_connect'), cell(peers['autobahn'], 'server_ms_per_connect'))} "
            f"({fmt(cell(g, 'server_ms_per_connect'), 2)} ms against "
            f"{fmt(cell(peers['autobahn'], 'server_ms_per_connect'), 2)} ms) |",
            f"| {NAMES[name]}: storm of {clients:,} caught up in < 10 s, nothing missed or doubled | "
            f"{fmt(cell(g, 'storm_s'), 2)} s, missed, doubled, out of order or unfinished {wrong:,} (every run) |",
        ]
    return out


def multinode_targets(rows: List[Dict[str, Any]]) -> List[str]:
    """
    The targets of the multinode and notify cells, as rows of the Targets table.
    """
    out = []
    for bus in buses(rows):
        receivers = sorted({r["receivers"] for r in group(rows, "multinode", test="latency", bus=bus)})
        out.append(
            f"| {BUS_NAMES.get(bus, bus)} bus: three nodes add < 5 ms to p50 at "
            f"{', '.join(map(str, receivers))} receivers, nothing undelivered | "
            f"p50 {signed(added_latency(rows, bus, 'p50_ms'))} ms (p99 {signed(added_latency(rows, bus, 'p99_ms'))} ms), "
            f"not delivered, doubled or out of order {undelivered_total(rows, bus):,} (every run) |"
        )
    if any(r["bench"] == "notify" for r in rows):
        out.append(f"| PostgreSQL with NOTIFY commits >= 80% of its rate without | {fmt(notify_share(rows))}% |")
    return out


def chart(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    for i, receivers in enumerate((100, 1000)):
        values = []
        for server in SERVERS:
            c = cell(group(rows, "fanout", server=server, receivers=receivers), "deliveries_per_s")
            values.append(c[0] / 1000 if c else 0)
        xs = [x + (i - 0.5) * width for x in range(len(SERVERS))]
        left.bar(xs, values, width, label=f"{receivers} receivers")
    left.set_xticks(range(len(SERVERS)), SERVERS, rotation=20)
    left.set_ylabel("thousand deliveries / s (median)")
    left.set_title("Fan-out: one sender, one room")
    left.legend()
    p99 = []
    for server in SERVERS:
        c = cell(group(rows, "latency", server=server), "p99_ms")
        p99.append(c[0] if c else 0)
    right.bar(SERVERS, p99, color="tab:orange")
    right.set_yscale("log")
    right.set_ylabel("p99 send-to-receive, ms (log)")
    right.set_title("Latency: 1000 receivers, 20 msg/s")
    right.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(rows: List[Dict[str, Any]]) -> str:
    session = rows[0]["session"]
    runs = max(r["run"] for r in rows)
    out = [
        "# Benchmarks",
        "",
        f"One run of `python -m bench` (session `{session}`, {runs} runs per cell, "
        f"{rows[0]['cpus']} CPUs: every server pinned to CPU 0, the load generator "
        "to CPU 1). The load generator is Node.js (`bench/loadgen/loadgen.js`, the "
        "npm `ws` package) for fan-out and idle connections, and clients on bare "
        "sockets in C (`bench/loadgen/rawclients.c`) for latency and long-poll, "
        "where node's own cost per message received would be most of what is "
        "measured. Cells are the median with the min-max range over the runs. "
        "Regenerate with `python -m bench && python -m bench.report`.",
        "",
        "chatd runs as `twistd -n chatd --rate-limit off` on its default SQLite "
        "store, as the README runs it, and beside that with `--store memory:`. "
        "Every peer does the same job: parse the JSON message, give it a seq, and "
        "broadcast the JSON to everyone in the room, sender included.",
        "",
        "![Fan-out and latency](benchmarks.png)",
        "",
        "## Fan-out",
        "",
        "One sender keeps 100 messages in flight (it sends another each time its "
        "own comes back); R receivers count. Server CPU per delivery is the "
        "server's CPU time over the deliveries.",
        "",
        "| server | R | deliveries/s | server µs/delivery | server CPU s | load-gen CPU s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for receivers in (100, 1000):
        for server in SERVERS:
            g = group(rows, "fanout", server=server, receivers=receivers)
            if not g:
                continue
            out.append(
                f"| {NAMES[server]} | {receivers} | {fmt(cell(g, 'deliveries_per_s'))} | "
                f"{fmt(cell(g, 'server_us_per_delivery'), 2)} | {fmt(cell(g, 'server_cpu_s'), 2)} | "
                f"{fmt(cell(g, 'loadgen_cpu_s'), 2)} |"
            )
    if any(r["bench"] == "sse" for r in rows):
        out += [
            "",
            "## Fan-out over Server-Sent Events",
            "",
            "The same cell with chatd's SSE receivers (bare sockets reading "
            "`/api/rooms/<room>/events`, counting its `id:` lines, and connecting "
            "again with `Last-Event-ID` when chatd ends a stream at 4 MiB or 55 s, as "
            "a browser's EventSource does) beside its "
            "WebSocket receivers, from the same run; the sender is the same "
            "WebSocket client.",
            "",
            "| server | R | SSE deliveries/s | WebSocket deliveries/s | SSE / WebSocket | SSE server µs/delivery | not delivered or doubled |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for receivers in (100, 1000):
            for server in SERVERS:
                g = group(rows, "sse", server=server, receivers=receivers)
                if not g:
                    continue
                sse_cell = cell(g, "deliveries_per_s")
                ws_cell = cell(group(rows, "fanout", server=server, receivers=receivers), "deliveries_per_s")
                lost = sum(r["undelivered"] + r["duplicates"] for r in g)
                out.append(
                    f"| {NAMES[server]} | {receivers} | {fmt(sse_cell)} | {fmt(ws_cell)} | "
                    f"{ratio(sse_cell, ws_cell)} | {fmt(cell(g, 'server_us_per_delivery'), 2)} | {lost:,} |"
                )
    out += [
        "",
        "## Latency",
        "",
        "1000 receivers; one sender at 20 messages/s for 10 s; send to receive on "
        "the load generator's clock. The receivers are bare sockets (in C) that "
        "only look for the message in what arrives; Socket.IO's use its node client. "
        "The floor (`bench/peers/floor_peer.py`) is Autobahn for the handshakes and a "
        "message handler that frames each message once and writes it with one "
        "`send()` per recipient, at once: what any server on one process must spend. "
        "Server µs/delivery is the server's CPU (the 1000 handshakes included) over "
        "the frames received.",
        "",
        "| server | p50 ms | p99 ms | max ms | not delivered | server µs/delivery | server CPU s | load-gen CPU s | load generator |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for server in LATENCY_SERVERS:
        g = group(rows, "latency", server=server)
        if g:
            out.append(
                f"| {NAMES[server]} | {fmt(cell(g, 'p50_ms'), 1)} | {fmt(cell(g, 'p99_ms'), 1)} | "
                f"{fmt(cell(g, 'max_ms'), 1)} | {fmt(cell(g, 'undelivered'))} | "
                f"{fmt(cell(g, 'server_us_per_delivery'), 1)} | "
                f"{fmt(cell(g, 'server_cpu_s'), 2)} | {fmt(cell(g, 'loadgen_cpu_s'), 2)} | {loadgens(g)} |"
            )
    out += [
        "",
        "## Idle connections",
        "",
        "Server RSS growth while holding idle WebSocket connections (opened by node's "
        "`ws`, 1 s after the last handshake), and the server's CPU per connection "
        "opened (its handshake, and for chatd its subscription and presence).",
        "",
        "| server | connections | KiB per connection | server ms/connect |",
        "| --- | --- | --- | --- |",
    ]
    for server in SERVERS:
        g = group(rows, "idle", server=server)
        if g:
            out.append(
                f"| {NAMES[server]} | {g[0]['connections']} | {fmt(cell(g, 'kib_per_connection'), 2)} | "
                f"{fmt(cell(g, 'server_ms_per_connect'), 2)} |"
            )
    out += [
        "",
        "## Long-poll (chatd)",
        "",
        "N clients, each on its own kept-alive connection, long-polling `?after=`; "
        "one sender POSTs 20 messages/s for 10 s. Server µs per cycle is the "
        "server's CPU time over the answers (each answer is one request and one "
        "response).",
        "",
        "| server | clients | deliveries/s | p50 ms | p99 ms | max ms | not delivered | server µs/cycle | load-gen CPU s | load generator |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for clients in (100, 1000):
        for server in CHATDS:
            g = group(rows, "longpoll", clients=clients, server=server)
            if not g:
                continue
            out.append(
                f"| {NAMES[server]} | {clients} | {fmt(cell(g, 'deliveries_per_s'))} | {fmt(cell(g, 'p50_ms'), 1)} | "
                f"{fmt(cell(g, 'p99_ms'), 1)} | {fmt(cell(g, 'max_ms'), 1)} | {fmt(cell(g, 'undelivered'))} | "
                f"{fmt(per_cycle(g), 1)} | {fmt(cell(g, 'loadgen_cpu_s'), 2)} | {loadgens(g)} |"
            )
    out += [
        "",
        "The cost of one `GET ?after=` (the newest 10 messages) by room size:",
        "",
        "| messages in the room | p50 ms | p99 ms |",
        "| --- | --- | --- |",
    ]
    for messages in (10, 100_000):
        g = group(rows, "getcost", messages=messages)
        if g:
            out.append(f"| {messages:,} | {fmt(cell(g, 'p50_ms'), 3)} | {fmt(cell(g, 'p99_ms'), 3)} |")
    out += [
        "",
        "## Store",
        "",
        "Messages committed per second by one process (`python -m bench.store`: "
        "20,000 posts through the chat core, 2,000 in flight, group commit).",
        "",
        "| store | messages/s |",
        "| --- | --- |",
    ]
    for store in ("sqlite", "postgresql"):
        g = [r for r in rows if r["bench"] == "store" and r["store"] == store]
        if g:
            out.append(f"| {store} | {fmt(cell(g, 'messages_per_s'))} |")

    def med(bench: str, key: str, **match: Any) -> Optional[Tuple]:
        return cell(group(rows, bench, **match), key)

    out += multinode_section(rows)
    out += storm_section(rows)
    out += [
        "",
        "## Targets",
        "",
        "| target | measured |",
        "| --- | --- |",
    ]
    for server in CHATDS:
        for receivers in (100, 1000):
            c = med("fanout", "deliveries_per_s", server=server, receivers=receivers)
            if c is None:
                continue
            out.append(
                f"| {NAMES[server]}: fan-out R={receivers} >= {FANOUT_TARGETS[server]}x Autobahn | "
                f"{ratio(c, med('fanout', 'deliveries_per_s', server='autobahn', receivers=receivers))} Autobahn, "
                f"{ratio(c, med('fanout', 'deliveries_per_s', server='websockets', receivers=receivers))} websockets |"
            )
    for server in CHATDS:
        c = med("latency", "p99_ms", server=server)
        if c is None:
            continue
        w = med("latency", "p99_ms", server="websockets")
        floor = med("latency", "p99_ms", server="floor")
        und = med("latency", "undelivered", server=server)
        out.append(
            f"| {NAMES[server]}: latency p99 <= 0.5x websockets', nothing undelivered | "
            f"{ratio(c, w)} ({fmt(c, 1)} ms against {fmt(w, 1)} ms), undelivered {fmt(und)}; "
            f"the floor's p99 is {fmt(floor, 1)} ms ({ratio(floor, w)} websockets'), chatd's {ratio(c, floor)} the floor's |"
        )
    for server in CHATDS:
        c = med("idle", "kib_per_connection", server=server)
        a = med("idle", "kib_per_connection", server="autobahn")
        if c is not None:
            out.append(
                f"| {NAMES[server]}: idle WebSocket <= raw Autobahn's per connection | "
                f"{fmt(c, 2)} KiB against {fmt(a, 2)} KiB ({ratio(c, a)}) |"
            )
    for server in CHATDS:
        for clients, bound in ((100, 20), (1000, 150)):
            c = med("longpoll", "p99_ms", clients=clients, server=server)
            if c is None:
                continue
            und = med("longpoll", "undelivered", clients=clients, server=server)
            out.append(
                f"| {NAMES[server]}: long-poll, {clients} waiters, p99 < {bound} ms, nothing undelivered | "
                f"p99 {fmt(c, 1)} ms, undelivered {fmt(und)} |"
            )
    small, big = med("getcost", "p50_ms", messages=10), med("getcost", "p50_ms", messages=100_000)
    out.append(f"| GET in a 100,000-message room within 10% of a 10-message room | {ratio(big, small)} |")
    c = cell([r for r in rows if r["bench"] == "store" and r["store"] == "sqlite"], "messages_per_s")
    out.append(f"| SQLite >= 20k messages/s committed | {fmt(c)} |")
    out += multinode_targets(rows)
    out += storm_targets(rows)
    lp = group(rows, "longpoll", clients=1000, server="chatd")
    out += [
        "",
        "## Reading these numbers",
        "",
        "- Fan-out: the load generator's CPU time (table) stays under the run's "
        "length for chatd and Autobahn while the server's reaches it, so the "
        "server is what saturates (for chatd the load generator comes within "
        "about a third of its own limit). For websockets and python-socketio the "
        "load generator's CPU time reaches the run's length too, so their "
        "figures are lower bounds.",
        "- chatd frames each message once (`prepareMessage`) and queues the same "
        "bytes on every open connection's writer (`chatd._send.FrameWriter`, which "
        "its `sendData` override uses for every other frame), which joins a "
        "connection's frames of one reactor iteration into one `transport.write`: "
        "Twisted's write costs more than the rest of a delivery. Autobahn's own "
        "`sendData` writes each frame on its own and formats debug-log arguments "
        "on every call. This VM's speed moves "
        "from run to run (the ranges): compare the servers within a run.",
        "- Latency: the floor is one `send()` per recipient: on loopback the kernel "
        "does the receiving side's TCP work inside that call, so the last of 1000 "
        "recipients waits for 999 sends, whatever the server does around them. "
        "Its p99 is "
        f"{fmt(med('latency', 'p99_ms', server='floor'), 1)} ms "
        f"({us_per(med('latency', 'server_cpu_s', server='floor'), 200_000)} µs of server CPU per delivery); "
        "a p99 of half websockets' would be below it.",
        "- chatd sends a connection's first frame of each reactor "
        "iteration at once (`chatd._send`, the one seam that writes past "
        "Twisted's buffer, pinned by `tests/test_send.py`; Twisted otherwise "
        "queues every write until the next iteration). What remains is about "
        f"{us_per(med('latency', 'server_cpu_s', server='chatd'), 200_000)} µs of "
        "server CPU per recipient (server CPU s, which includes the 1000 "
        "handshakes, over 200,000 deliveries) against the floor's "
        f"{us_per(med('latency', 'server_cpu_s', server='floor'), 200_000)}: in py-spy "
        "the send() itself is half of chatd's CPU in this cell, and the rest is "
        "its Python per recipient (the subscription's offer, the connection's "
        "checks, the writer). On the SQLite store every message also waits for "
        "its group commit before anyone gets it: the difference between the two "
        "stores' p99 "
        f"({fmt(med('latency', 'p99_ms', server='chatd-sqlite'), 1)} and "
        f"{fmt(med('latency', 'p99_ms', server='chatd'), 1)} ms). Autobahn spends "
        f"{us_per(med('latency', 'server_cpu_s', server='autobahn'), 200_000)} µs.",
        "- Long-poll: every message answers each waiting request and receives "
        "as many new ones. Every HTTP byte is parsed by twisted.web's "
        "`HTTPChannel`; the long-poll route skips only Klein's routing "
        "(`tests/test_longpoll.py` compares the two ways answer for answer). "
        "1000 pollers at 20 messages/s are 20,000 cycles a second; at this "
        f"run's {fmt(per_cycle(lp), 1)} µs of server CPU per cycle that is "
        f"{share(per_cycle(lp), 20_000)} of the server's one core. Past one core, "
        "clients fall behind by a message or two and get them in one answer, so "
        "the cycles a second (and the CPU per delivery) drop and the tail, not the "
        "delivery, grows: p99 at 1000 pollers is set by the time one core takes "
        "to answer a round of 1000 requests. twisted.web's own request and "
        "answer (a `Request`, its headers, the parse of three lines) is about "
        "two thirds of a cycle: it is the floor of this path on one process.",
    ]
    if storm_groups(rows):
        out += [
            "- Reconnect storm: where a chatd connect's CPU goes (py-spy, a 10,000-client "
            "storm): twisted.web parsing the upgrade request, the one HTTP parser (about "
            "a sixth); Autobahn's `WebSocketResource`, which hands Autobahn the request "
            "serialised again, and Autobahn parsing it again and doing its handshake "
            "(about a third: most of what raw Autobahn spends per connect by itself); "
            "chatd's own work, the room's backlog, the subscription, presence and the two "
            "log lines of each connection (about a fifth); accepting the socket and the "
            "garbage collector the rest. Before issue 15 Autobahn also formatted its 29 "
            "protocol options for a debug line on every connection (a fifth of the CPU; "
            "`chatd.ws.configured` keeps them on the class), Klein routed every upgrade "
            "(a sixth; the root hands the ones it can accept at once to Autobahn, "
            "`tests/test_longpoll.py` compares both ways byte for byte), and Python's "
            "collector thresholds ran 1,391 collections in 1.38 s (`chatd.service.GC_THRESHOLDS`). "
            "What is left is two parses of one request and chatd's work per client: on "
            "one process a storm is served faster only by a handshake that takes "
            "twisted.web's parsed request, which Autobahn does not offer; past that, by "
            "more processes (several nodes behind a balancer, docs/deploy.md).",
        ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default=str(HERE / "results.jsonl"))
    parser.add_argument("--keep", action="store_true", help="also copy the results to docs/benchmarks/")
    parser.add_argument("--session")
    parser.add_argument(
        "--multinode", action="store_true",
        help="print only the multi-node section and its targets (e.g. of a partial run) and write nothing",
    )
    args = parser.parse_args()
    rows = load(Path(args.results), args.session)
    if args.multinode:
        targets = ["", "| target | measured |", "| --- | --- |", *multinode_targets(rows)]
        print("\n".join(multinode_section(rows) + targets).strip())
        return
    DOCS.mkdir(exist_ok=True)
    chart(rows, DOCS / "benchmarks.png")
    (DOCS / "benchmarks.md").write_text(report(rows))
    if args.keep:
        (DOCS / "benchmarks").mkdir(exist_ok=True)
        with open(DOCS / "benchmarks" / "results.jsonl", "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"wrote {DOCS / 'benchmarks.md'} and {DOCS / 'benchmarks.png'}")


if __name__ == "__main__":
    main()
