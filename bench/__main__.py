"""
chatd's benchmark: chatd and its peers side by side, driven by one load
generator (Node.js, bench/loadgen), in one run.

    python -m bench [--runs 3] [--only fanout,sse,latency,idle,longpoll,getcost,store,storm]
                    [--servers chatd-sqlite,chatd,autobahn,websockets,tornado,socketio]
                    [--out bench/results.jsonl]
    python -m bench --only multinode,notify
    python -m bench --only storm [--storm-clients N] [--storm-inflight K]
                    [--servers chatd-sqlite,chatd-sqlite-backlog50,chatd,autobahn,websockets]

storm is a reconnect storm (bench/loadgen/rawclients.c's storm mode): N
WebSocket clients (10,000 when the descriptor limit allows, else 5,000)
open at once, K handshakes in flight, each resuming with ?after= three
messages behind (chatd; the peers keep no history, so theirs is the same
storm of handshakes without resume), until every client has exactly its
missed messages.  chatd-sqlite-backlog50 is chatd-sqlite listening with
backlog=50 (Twisted's default, chatd's before it asked for 1024).

The latency cell also runs the floor (bench/peers/floor_peer.py): a
bare Twisted server that writes each message's frame to every recipient
with one send() each and does nothing else.

multinode runs one and three chatd nodes on one PostgreSQL schema (a fresh
one each time, dropped afterwards), hearing each other through each bus
(postgresql, redis), with receivers spread over the nodes and one sender
on the first; notify is the commit rate of PostgreSQL with and without
chatd's NOTIFY (python -m bench.notify).  Both need PostgreSQL
($CHATD_BENCH_POSTGRES, default postgresql://postgres@127.0.0.1:5432/test),
and multinode Redis too ($CHATD_BENCH_REDIS, default
redis://127.0.0.1:6379/0).  They are not in the default --only: the
comparison cells above run on one node.

chatd-sqlite is chatd as the README runs it (the default SQLite store),
chatd the same with --store memory:.  Every server runs pinned to CPU 0
and the load generator to CPU 1 (when the machine has two); each cell
runs --runs times.  Results are JSON lines;
python -m bench.report turns them into docs/benchmarks.md and its chart.
Needs: node and npm (the loadgen installs ws and socket.io-client), a C
compiler for the latency and long-poll clients (bench/loadgen/rawclients.c),
and
pip install '.[bench]' for the peers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen"
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).with_name("twistd"))
TICKS = os.sysconf("SC_CLK_TCK")
POSTGRES = os.environ.get("CHATD_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CHATD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
#: The buses of the multinode cells, by the name the results use.
BUSES = {"postgresql": "postgresql", "redis": REDIS}
CPUS = os.cpu_count() or 1
#: The latency cell's floor (bench/peers/floor_peer.py): a bare Twisted
#: server that writes each message's frame with one send() per recipient.
FLOOR = "floor"


def pin(cpu: int) -> List[str]:
    if CPUS >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Server:
    """
    One server process, started and waited for.
    """

    def __init__(self, name: str, extra: Optional[List[str]] = None) -> None:
        self.name = name
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="chatd-bench-")
        if name.startswith("chatd"):
            store = ["--store", "memory:"] if name == "chatd" else ["--data-dir", self.folder]
            # chatd-sqlite-backlog50: Twisted's own default listen queue.
            queue = ":backlog=50" if name.endswith("-backlog50") else ""
            argv = [TWISTD, "-n", "--pidfile=", "chatd", "--port",
                    f"tcp:{self.port}:interface=127.0.0.1{queue}", *store, "--rate-limit", "off",
                    "--room", "bench", "--max-connections", "1000000",
                    "--max-connections-per-ip", "1000000", *(extra or [])]
            ready = re.compile(rb"chatd listening on 127\.0\.0\.1:(\d+)")
            self.path = "/ws/bench"
        else:
            argv = [PYTHON, str(HERE / "peers" / f"{name}_peer.py"), str(self.port)]
            ready = re.compile(rb"READY (\d+)")
            self.path = "/ws/bench"
        self.process = subprocess.Popen(
            pin(0) + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.folder
        )
        output = b""
        deadline = time.monotonic() + 30
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited: {output.decode(errors='replace')}")
            output += line
            if ready.search(line):
                break
        else:
            raise RuntimeError(f"{name} did not start: {output.decode(errors='replace')}")
        # Keep draining its output so it never blocks on a full pipe.
        self._drain = subprocess.Popen(["cat"], stdin=self.process.stdout, stdout=subprocess.DEVNULL)
        self.url = f"ws://127.0.0.1:{self.port}{self.path}"
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._drain.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def node(config: Dict[str, Any]) -> List[str]:
    """
    The command line of node's load generator (bench/loadgen/loadgen.js).
    """
    return ["node", str(LOADGEN / "loadgen.js"), json.dumps(config)]


def measured(server: Union[Server, Sequence[Server]], argv: List[str], timeout: float = 300) -> Dict[str, Any]:
    """
    Run a load generator (pinned to CPU 1) against C{server} (or several
    nodes): its JSON result, with the server's CPU time over the run (the
    sum over the nodes, and each node's in C{node_cpu_s}).
    """
    servers = [server] if isinstance(server, Server) else list(server)
    before = [cpu_seconds(s.process.pid) for s in servers]
    out = subprocess.run(pin(1) + argv, capture_output=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed: {out.stderr.decode(errors='replace')[-2000:]}")
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    spent = [round(cpu_seconds(s.process.pid) - b, 3) for s, b in zip(servers, before, strict=True)]
    result["server_cpu_s"] = round(sum(spent), 3)
    if len(servers) > 1:
        result["node_cpu_s"] = spent
    return result


def us_per_delivery(result: Dict[str, Any], count: str) -> float:
    """
    The server's CPU in microseconds per delivery: over C{result[count]}
    (the deliveries or frames the load generator counted).
    """
    return round(result["server_cpu_s"] * 1e6 / max(result.get(count, 0), 1), 2)


def protocol(name: str) -> str:
    return "socketio" if name == "socketio" else "ws"


def fanout(name: str, receivers: int) -> Dict[str, Any]:
    server = Server(name)
    try:
        r = measured(server, node({"mode": "fanout", "url": server.url, "receivers": receivers,
                                   "window": 100, "duration": 5, "protocol": protocol(name)}))
    finally:
        server.stop()
    r["server_us_per_delivery"] = us_per_delivery(r, "delivered")
    return {"bench": "fanout", "server": name, "receivers": receivers, **r}


def sse_fanout(name: str, receivers: int) -> Dict[str, Any]:
    """
    The fan-out cell with chatd's Server-Sent Events receivers (bare
    sockets reading /api/rooms/<room>/events); the sender is the same
    WebSocket client.
    """
    server = Server(name)
    try:
        r = measured(server, node({"mode": "fanout", "url": server.url, "receivers": receivers,
                                   "window": 100, "duration": 5, "protocol": "ws", "sse": True}))
    finally:
        server.stop()
    r["server_us_per_delivery"] = us_per_delivery(r, "delivered")
    return {"bench": "sse", "server": name, "receivers": receivers, **r}


def latency(name: str, receivers: int) -> Dict[str, Any]:
    server = Server(name)
    client = raw_clients() if protocol(name) == "ws" else None
    try:
        if client is not None:
            # Receivers on bare sockets, in C: node's cost per frame
            # received (~20 us) would otherwise be what this test sees.
            r = measured(server, [client, "latency", "127.0.0.1", str(server.port), server.path,
                                  str(receivers), "20", "10"])
        else:
            # Socket.IO needs its client (and so does any server without a
            # C compiler about): node, with bare-socket WebSocket receivers.
            r = measured(server, node({"mode": "latency", "url": server.url, "receivers": receivers,
                                       "rate": 20, "duration": 10, "protocol": protocol(name),
                                       "raw": protocol(name) == "ws"}))
            r["loadgen"] = "node"
    finally:
        server.stop()
    r["server_us_per_delivery"] = us_per_delivery(r, "received")
    return {"bench": "latency", "server": name, "receivers": receivers, **r}


def idle(name: str, connections: int) -> Dict[str, Any]:
    server = Server(name)
    try:
        time.sleep(0.5)  # let start-up allocations settle before the baseline
        base = rss_kib(server.process.pid)
        cpu = cpu_seconds(server.process.pid)
        gen = subprocess.Popen(
            pin(1) + node({"mode": "idle", "url": server.url, "connections": connections,
                           "protocol": protocol(name)}),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert gen.stdout is not None and gen.stdin is not None
        ready = json.loads(gen.stdout.readline())
        time.sleep(1.0)  # every handshake handled
        held = rss_kib(server.process.pid)
        spent = cpu_seconds(server.process.pid) - cpu
        gen.stdin.write(b"done\n")
        gen.stdin.flush()
        gen.wait(30)
    finally:
        server.stop()
    return {"bench": "idle", "server": name, "connections": ready["ready"],
            "rss_base_kib": base, "rss_held_kib": held,
            "kib_per_connection": round((held - base) / max(ready["ready"], 1), 2),
            "server_cpu_s": round(spent, 3),
            "server_ms_per_connect": round(spent * 1e3 / max(ready["ready"], 1), 3)}


def raw_clients() -> Optional[str]:
    """
    The C load generator (bench/loadgen/rawclients.c) for the latency and
    long-poll tests, built once into bench/loadgen/build; None without a C
    compiler (then node's clients run, which set the latency themselves
    at a thousand connections).
    """
    source = LOADGEN / "rawclients.c"
    binary = LOADGEN / "build" / "rawclients"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return str(binary)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("bench: no C compiler; the latency and long-poll clients run in node", file=sys.stderr)
        return None
    binary.parent.mkdir(exist_ok=True)
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return str(binary)


def longpoll(name: str, clients: int) -> Dict[str, Any]:
    server = Server(name)
    client = raw_clients()
    try:
        if client is None:
            r = measured(server, node({"mode": "longpoll", "base": server.base, "room": "bench",
                                       "clients": clients, "rate": 20, "duration": 10}))
            r["loadgen"] = "node"
        else:
            r = measured(server, [client, "longpoll", "127.0.0.1", str(server.port), "bench",
                                  str(clients), "20", "10"])
    finally:
        server.stop()
    return {"bench": "longpoll", "server": name, "clients": clients, **r}


def listen_drops() -> Dict[str, int]:
    """
    The kernel's ListenOverflows and ListenDrops (TcpExt, /proc/net/netstat):
    connection attempts dropped because a listen queue was full.
    """
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names[0] == "TcpExt:":
            counters = dict(zip(names[1:], map(int, values[1:]), strict=True))
            return {k: counters.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}
    return {"ListenOverflows": 0, "ListenDrops": 0}


#: Messages posted before a storm, and how many of them each client missed.
STORM_POSTED = 5
STORM_BEHIND = 3


def post(server: Server, body: str) -> None:
    from urllib.request import Request, urlopen

    data = json.dumps({"nick": "bench", "body": body}).encode()
    request = Request(f"{server.base}/api/rooms/bench/messages", data=data,
                      headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=10) as answer:
        answer.read()


def last_seq(server: Server) -> int:
    from urllib.request import urlopen

    with urlopen(f"{server.base}/api/rooms/bench", timeout=10) as answer:
        return int(json.loads(answer.read())["last_seq"])


def storm(name: str, clients: int, inflight: int) -> Dict[str, Any]:
    """
    A reconnect storm: C{clients} WebSocket clients at once, C{inflight}
    handshakes in flight, each resuming C{STORM_BEHIND} messages behind
    (chatd) or only opening (the peers keep no history).  The server's
    CPU is taken when every client has its messages, before the clients
    close (bench/loadgen/rawclients.c waits for its stdin to close).
    """
    client = raw_clients()
    if client is None:
        raise RuntimeError("the storm cell needs a C compiler (bench/loadgen/rawclients.c)")
    server = Server(name)
    try:
        resume = name.startswith("chatd")
        after, last = -1, 0
        if resume:
            for i in range(STORM_POSTED):
                post(server, f"S{i}")
            last = last_seq(server)
            after = last - STORM_BEHIND
        drops = listen_drops()
        cpu = cpu_seconds(server.process.pid)
        gen = subprocess.Popen(
            pin(1) + [client, "storm", "127.0.0.1", str(server.port), server.path, str(clients),
                      str(inflight), str(after), str(last)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert gen.stdout is not None and gen.stdin is not None
        line = gen.stdout.readline()
        spent = round(cpu_seconds(server.process.pid) - cpu, 3)
        dropped = {k: v - drops[k] for k, v in listen_drops().items()}
        gen.stdin.close()
        if gen.wait(60) != 0 or not line:
            raise RuntimeError(f"rawclients storm failed against {name} (exit {gen.returncode})")
    finally:
        server.stop()
    r = json.loads(line)
    r["server_cpu_s"] = spent
    r["server_ms_per_connect"] = round(spent * 1e3 / max(r["opened"], 1), 3)
    r["listen_overflows"] = dropped["ListenOverflows"]
    r["listen_drops"] = dropped["ListenDrops"]
    return {"bench": "storm", "server": name, "resume": resume, **r}


def storm_clients() -> int:
    """
    10,000 storm clients if this process's open-file limit (which the
    server and the load generator inherit) holds them with room to
    spare, else 5,000.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 10_000 if soft == resource.RLIM_INFINITY or soft >= 10_000 + 1024 else 5_000


class Cluster:
    """
    C{nodes} chatd nodes on one fresh PostgreSQL schema, hearing each
    other through C{bus}, each pinned to CPU 0; the schema is dropped when
    they stop.
    """

    def __init__(self, nodes: int, bus: str) -> None:
        self.schema = f"chatd_bench_{uuid.uuid4().hex[:8]}"
        store = f"{POSTGRES}?schema={self.schema}"
        self.servers: List[Server] = []
        try:
            # One at a time: the first creates the schema and the room.
            for _ in range(nodes):
                server = Server("chatd-pg", ["--store", store, "--bus", BUSES[bus]])
                self.servers.append(server)
                wait_for_bus(server)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        import psycopg

        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


def wait_for_bus(server: Server, seconds: float = 30) -> None:
    """
    Wait until C{server}'s /readyz says its bus is connected (it listens
    only after the store has loaded, so "listening" is not enough).
    """
    from urllib.request import urlopen

    deadline = time.monotonic() + seconds
    detail = ""
    while time.monotonic() < deadline:
        with urlopen(f"{server.base}/readyz", timeout=5) as answer:
            detail = json.loads(answer.read()).get("bus", "")
        if detail.endswith(": connected"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.base}: the bus did not connect ({detail!r})")


def multinode_fanout(bus: str, nodes: int, receivers: int) -> Dict[str, Any]:
    """
    Fan-out over C{nodes} nodes: receivers round-robin over them, the
    sender (100 in flight) on the first.
    """
    cluster = Cluster(nodes, bus)
    try:
        r = measured(cluster.servers, node({"mode": "fanout", "urls": [s.url for s in cluster.servers],
                                            "receivers": receivers, "window": 100, "duration": 5,
                                            "protocol": "ws"}))
    finally:
        cluster.stop()
    r["server_us_per_delivery"] = us_per_delivery(r, "delivered")
    return {"bench": "multinode", "test": "fanout", "bus": bus, "nodes": nodes, "receivers": receivers, **r}


def multinode_latency(bus: str, nodes: int, receivers: int) -> Dict[str, Any]:
    """
    Latency over C{nodes} nodes: receivers round-robin over them, one
    sender at 20 messages/s for 10 s on the first.
    """
    cluster = Cluster(nodes, bus)
    client = raw_clients()
    try:
        if client is not None:
            r = measured(cluster.servers, [client, "latency", "127.0.0.1",
                                           ",".join(str(s.port) for s in cluster.servers),
                                           cluster.servers[0].path, str(receivers), "20", "10"])
        else:
            r = measured(cluster.servers, node({"mode": "latency", "urls": [s.url for s in cluster.servers],
                                                "receivers": receivers, "rate": 20, "duration": 10,
                                                "protocol": "ws", "raw": True}))
            r["loadgen"] = "node"
    finally:
        cluster.stop()
    r["server_us_per_delivery"] = us_per_delivery(r, "received")
    return {"bench": "multinode", "test": "latency", "bus": bus, "nodes": nodes, "receivers": receivers, **r}


def notify() -> List[Dict[str, Any]]:
    """
    python -m bench.notify, pinned to CPU 0 (its writers play the nodes),
    its listener to CPU 1.
    """
    out = subprocess.run(
        pin(0) + [PYTHON, "-m", "bench.notify", "--postgres", POSTGRES, "--modes", "off,on",
                  *(["--listener-cpu", "1"] if pin(1) else [])],
        capture_output=True, check=True, cwd=HERE.parent,
    )
    return [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]


def getcost(messages: int) -> Dict[str, Any]:
    """
    GET ?after= (the newest 10) in a room holding `messages` messages, on
    the SQLite store filled beforehand.
    """
    folder = tempfile.mkdtemp(prefix="chatd-getcost-")
    fill = subprocess.run(
        [PYTHON, "-m", "bench.fill", os.path.join(folder, "chatd.sqlite3"), "bench", str(messages)],
        capture_output=True, check=True, cwd=HERE.parent,
    )
    last = int(fill.stdout.decode().split()[-1])
    server = Server("chatd-sqlite", ["--data-dir", folder])
    try:
        r = measured(server, node({"mode": "getcost", "base": server.base, "room": "bench",
                                   "after": last - 10, "requests": 2000}))
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {"bench": "getcost", "server": "chatd", "messages": messages, **r}


def store() -> List[Dict[str, Any]]:
    out = subprocess.run(
        [PYTHON, "-m", "bench.store", "--messages", "20000", "--stores", "sqlite,postgresql"],
        capture_output=True, check=True, cwd=HERE.parent,
    )
    return [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="fanout,sse,latency,idle,longpoll,getcost,store,storm")
    parser.add_argument("--servers", default="chatd-sqlite,chatd,autobahn,websockets,tornado,socketio")
    parser.add_argument("--out", default=str(HERE / "results.jsonl"))
    parser.add_argument("--idle-connections", type=int, default=5000)
    parser.add_argument("--buses", default=",".join(BUSES), help="for multinode")
    parser.add_argument("--multinode-receivers", type=int, default=100)
    parser.add_argument("--storm-clients", type=int, default=None,
                        help="for storm (default: 10,000 if the open-file limit allows, else 5,000)")
    parser.add_argument("--storm-inflight", type=int, default=256, help="for storm: handshakes in flight")
    args = parser.parse_args(argv)
    # Thousands of sockets on each side: raise the open-file limit as far
    # as this process may (children inherit it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not (LOADGEN / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=LOADGEN, check=True)
    only = args.only.split(",")
    servers = args.servers.split(",")
    session = uuid.uuid4().hex[:8]
    with open(args.out, "a") as out:
        def emit(row: Dict[str, Any], run: int) -> None:
            row.update(session=session, run=run, cpus=CPUS)
            line = json.dumps(row)
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()

        for run in range(1, args.runs + 1):
            if "fanout" in only:
                for receivers in (100, 1000):
                    for name in servers:
                        emit(fanout(name, receivers), run)
            if "sse" in only:
                for receivers in (100, 1000):
                    for name in servers:
                        if name.startswith("chatd"):
                            emit(sse_fanout(name, receivers), run)
            if "latency" in only:
                # And the floor: one send() per recipient, nothing else.
                for name in servers + [FLOOR]:
                    emit(latency(name, 1000), run)
            if "idle" in only:
                for name in servers:
                    emit(idle(name, args.idle_connections), run)
            if "longpoll" in only:
                for clients in (100, 1000):
                    for name in servers:
                        if name.startswith("chatd"):
                            emit(longpoll(name, clients), run)
            if "getcost" in only:
                for messages in (10, 100_000):
                    emit(getcost(messages), run)
            if "store" in only:
                for row in store():
                    emit(row, run)
            if "multinode" in only:
                # One node and three side by side, for each bus, so that
                # the difference is the bus's and not the machine's mood.
                for bus in args.buses.split(","):
                    for test in (multinode_fanout, multinode_latency):
                        for nodes in (1, 3):
                            emit(test(bus, nodes, args.multinode_receivers), run)
            if "notify" in only:
                for row in notify():
                    emit(row, run)
            if "storm" in only:
                clients = args.storm_clients or storm_clients()
                # chatd beside itself on Twisted's default listen queue.
                storm_servers = list(servers)
                if "chatd-sqlite" in servers and "chatd-sqlite-backlog50" not in servers:
                    storm_servers.insert(servers.index("chatd-sqlite") + 1, "chatd-sqlite-backlog50")
                for name in storm_servers:
                    if protocol(name) == "ws":  # raw WebSocket clients
                        emit(storm(name, clients, args.storm_inflight), run)


if __name__ == "__main__":
    main(sys.argv[1:])
