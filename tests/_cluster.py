"""
A test cluster: N C{twistd -n chatd} nodes on one PostgreSQL schema,
behind a real HAProxy run with the configuration C{docs/deploy.md} shows.

    cluster = await Cluster.start(self, nodes=3, args=["--bus", "postgresql"])
    cluster.haproxy_base        # the balancer: http://127.0.0.1:PORT
    cluster.nodes[0].base       # node 0 alone, through HAProxy too
    await cluster.nodes[0].kill()          # kill -9
    await cluster.wait_for_state(0, "DOWN")

Nodes listen on Twisted's C{haproxy:} endpoint, so every connection to
them must start with a PROXY header: C{node.base} is not the node's own
port but a frontend of HAProxy's that sends to that node only (with
C{send-proxy-v2}, like the balanced one), so tests can talk to one node
"directly" and still give it real client addresses.

How the docs' text becomes the test's configuration (the placeholders; the
docs show production-like addresses, the tests listen on loopback only):

  - the HAProxy block (after C{<!-- deploy-test: haproxy -->}): C{*:80}
    becomes C{127.0.0.1:FRONTEND}; the line C{server node1 10.0.0.11:8081}
    is the template of every node's line (C{node1} becomes C{nodeI},
    C{10.0.0.11:8081} the node's loopback address), and the other
    C{server nodeN} lines go.  A C{global} section of the test's own (a
    stats socket in the test's folder) comes first, and one C{listen
    directI} frontend per node is added after;
  - the node command (after C{<!-- deploy-test: node -->}): its arguments
    after C{chatd} are used, with C{haproxy:tcp:8081:interface=10.0.0.11}
    replaced by C{haproxy:tcp:0:interface=127.0.0.1}, the C{--store} URL
    by the test schema's, and C{--public-url https://chat.example.org} by
    one C{--public-url} for the balancer's URL and one for each node's.

Everything is cleaned up when the test ends: nodes killed, HAProxy
stopped, the schema dropped.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import shlex
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests._support import ChatdProcess
from tests.test_store import postgres_url

DEPLOY_MD = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
HAPROXY = "/usr/sbin/haproxy"

#: How long the harness waits for HAProxy to see a state, in seconds.
STATE_TIMEOUT = 30.0
#: How often it asks HAProxy meanwhile.
POLL_INTERVAL = 0.1


def doc_block(name: str, path: Path = DEPLOY_MD) -> List[str]:
    """
    The fenced blocks that follow C{<!-- deploy-test: NAME -->} markers in
    C{path}, in order, each as its text.
    """
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"<!-- deploy-test: {name} -->":
            assert lines[i + 1].startswith("```"), f"{path.name}:{i + 2}: a fenced block must follow"
            end = i + 2
            while not lines[end].startswith("```"):
                end += 1
            found.append("\n".join(lines[i + 2 : end]) + "\n")
    assert found, f"{path.name} has no deploy-test: {name} block"
    return found


#: Ports L{free_port} chooses from: below Linux's default ephemeral range
#: (32768-60999), so no listener bound to port 0 (every node here) and no
#: outgoing connection can take one between the choice and HAProxy's bind.
#: A port the kernel handed out in that gap once failed CI with
#: "cannot bind socket (Address already in use)".
CHOSEN_PORTS = range(20000, 32768)
_chosen: set = set()


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port free on C{host} now, outside the kernel's ephemeral range
    and not chosen before by this process (HAProxy needs its ports in its
    configuration; it cannot report one the kernel chose).
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.choice(CHOSEN_PORTS)
        if port in _chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _chosen.add(port)
        return port
    raise AssertionError(f"no free port in {CHOSEN_PORTS}")


def haproxy_config(frontend: int, nodes: Sequence[int]) -> str:
    """
    The docs' HAProxy block for a frontend on C{frontend} and nodes on
    C{nodes} (loopback ports), with the placeholders replaced (module
    docstring).
    """
    [text] = doc_block("haproxy")
    assert "bind *:80\n" in text, "the HAProxy block must bind *:80 (the placeholder)"
    template = re.search(r"^( *)server node1 10\.0\.0\.11:8081(.*)$", text, re.M)
    assert template is not None, "the HAProxy block must have a 'server node1 10.0.0.11:8081' line"
    indent, rest = template.groups()
    servers = "\n".join(
        f"{indent}server node{i + 1} 127.0.0.1:{port}{rest}" for i, port in enumerate(nodes)
    )
    # The nodes' lines where the template was; the docs' other nodes go.
    text = text.replace(template.group(0), servers, 1)
    text = re.sub(r"^ *server node\d+ 10\..*\n", "", text, flags=re.M)
    return text.replace("bind *:80\n", f"bind 127.0.0.1:{frontend}\n")


def global_section(stats_socket: str) -> str:
    """
    The test's own C{global} section, in place of Debian's: logs to
    standard output (Debian's go to C{/dev/log}), and the stats socket in
    the test's folder.
    """
    return (
        "global\n"
        "    log stdout format raw local0\n"
        f"    stats socket {stats_socket} mode 600 level admin\n"
    )


def node_args(store: str, public_urls: Sequence[str]) -> List[str]:
    """
    The docs' node command's arguments (after C{chatd}), with the
    placeholders replaced (module docstring).
    """
    [text] = doc_block("node")
    argv = shlex.split(text.replace("\\\n", " "))
    args = argv[argv.index("chatd") + 1 :]
    out: List[str] = []
    i = 0
    while i < len(args):
        arg, value = args[i], args[i + 1] if i + 1 < len(args) else None
        if arg == "--port":
            assert value == "haproxy:tcp:8081:interface=10.0.0.11", value
            out += [arg, "haproxy:tcp:0:interface=127.0.0.1"]
        elif arg == "--store":
            out += [arg, store]
        elif arg == "--public-url":
            for url in public_urls:
                out += [arg, url]
        elif value is not None and not value.startswith("--"):
            out += [arg, value]
        else:
            out.append(arg)
            i += 1
            continue
        i += 2
    return out


def option_value(args: Sequence[str], name: str) -> Optional[str]:
    """
    The value given to option C{name} in C{args}, if any.
    """
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            return args[i + 1]
    return None


class _HAProxyProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))

    def stop(self) -> Deferred:
        if not self.ended.called:
            self.transport.signalProcess("KILL")
        return self.ended


class _Reply(Protocol):
    """
    Sends one command to HAProxy's stats socket and collects the answer
    (HAProxy closes the connection after it).
    """

    def __init__(self, command: bytes) -> None:
        self._command = command
        self._data = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._command + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self._data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self._data.decode("utf-8", "replace"))


@dataclass
class Node:
    """
    One chatd node of a L{Cluster}.

    @ivar process: its twistd process.
    @ivar port: the port it listens on (PROXY protocol only).
    @ivar base: its own frontend on HAProxy (to this node only).
    @ivar name: its server name in HAProxy's backend C{chatd}.
    """

    process: ChatdProcess
    port: int
    base: str
    name: str

    @property
    def output(self) -> bytes:
        return self.process.output

    def kill(self) -> Deferred:
        """
        C{kill -9}, and wait for the process to end.
        """
        return self.process.kill()

    def stop(self, signal: str = "TERM") -> Deferred:
        """
        Send C{signal} (SIGTERM by default) and wait for the process to end.
        """
        return self.process.stop(signal)

    def signal(self, signal: str = "TERM") -> None:
        """
        Send C{signal} without waiting for anything.
        """
        if not self.process.ended.called:
            self.process.transport.signalProcess(signal)


class Cluster:
    """
    N chatd nodes on one PostgreSQL schema behind HAProxy; see the module
    docstring.

    @ivar nodes: the nodes, in order (HAProxy's C{node1} is C{nodes[0]}).
    @ivar haproxy_base: the balancer's URL.
    @ivar store: the nodes' C{--store} URL.
    @ivar config: the HAProxy configuration in use (the docs' block).
    """

    def __init__(self, test: TestCase, folder: Path) -> None:
        self._test = test
        self.folder = folder
        self.nodes: List[Node] = []
        self.haproxy_base = ""
        self.store = ""
        self.config = ""
        # A short path: a UNIX socket's must fit in 108 bytes, and the
        # test's folder may be longer.
        short = tempfile.mkdtemp(prefix="chatd-haproxy-")
        test.addCleanup(shutil.rmtree, short, True)
        self.stats_socket = os.path.join(short, "admin.sock")
        self._haproxy: Optional[_HAProxyProcess] = None

    @classmethod
    async def start(
        cls, test: TestCase, nodes: int = 2, args: Sequence[str] = (), store: Optional[str] = None
    ) -> "Cluster":
        """
        Start C{nodes} nodes (the docs' command plus C{args}) on a fresh
        PostgreSQL schema (or C{store}), then HAProxy, and wait until
        HAProxy's health checks have found every node up.
        """
        folder = Path(test.mktemp()).resolve()
        folder.mkdir(parents=True)
        cluster = cls(test, folder)
        cluster.store = store or postgres_url(test)
        frontend = free_port()
        direct = [free_port() for _ in range(nodes)]
        urls = [f"http://127.0.0.1:{port}" for port in [frontend, *direct]]
        base_args = node_args(cluster.store, urls)
        started = []
        for i in range(nodes):
            started.append(cluster._start_node(i, [*base_args, *args]))
        processes = [await p.listening for p in started]
        cluster.haproxy_base = urls[0]
        cluster.nodes = [
            Node(process, process.port, urls[i + 1], f"node{i + 1}") for i, process in enumerate(processes)
        ]
        await cluster._start_haproxy(frontend, direct)
        await cluster.wait_for_state(range(nodes), "UP")
        return cluster

    def _start_node(self, i: int, args: Sequence[str]) -> ChatdProcess:
        folder = self.folder / f"node{i + 1}"
        folder.mkdir()
        return ChatdProcess.spawn(self._test, *args, path=str(folder))

    async def _start_haproxy(self, frontend: int, direct: Sequence[int]) -> None:
        ports = [node.port for node in self.nodes]
        self.config = haproxy_config(frontend, ports)
        test_global = global_section(self.stats_socket)
        directs = "".join(
            f"\nlisten direct{i + 1}\n"
            f"    bind 127.0.0.1:{port}\n"
            f"    server {node.name} 127.0.0.1:{node.port} send-proxy-v2\n"
            for i, (port, node) in enumerate(zip(direct, self.nodes, strict=True))
        )
        paths = []
        for name, text in [("global.cfg", test_global), ("deploy.cfg", self.config), ("direct.cfg", directs)]:
            path = self.folder / name
            path.write_text(text, encoding="utf-8")
            paths.append(str(path))
        haproxy = _HAProxyProcess()
        argv = [HAPROXY, "-db", *(arg for path in paths for arg in ("-f", path))]
        reactor.spawnProcess(haproxy, HAPROXY, argv, env=os.environ, path=str(self.folder))
        self._haproxy = haproxy
        self._test.addCleanup(haproxy.stop)

    @property
    def haproxy_output(self) -> str:
        return self._haproxy.output.decode("utf-8", "replace") if self._haproxy else ""

    async def command(self, command: str) -> str:
        """
        The answer of HAProxy's stats socket to C{command}.
        """
        reply = _Reply(command.encode("ascii"))
        endpoint = UNIXClientEndpoint(reactor, self.stats_socket, timeout=5)
        await endpoint.connect(Factory.forProtocol(lambda: reply))
        return str(await reply.done)

    async def states(self) -> Dict[str, Dict[str, str]]:
        """
        HAProxy's view of the backend C{chatd}'s servers: C{show stat}'s
        columns by server name (C{status} is UP, DOWN, ...).
        """
        text = await self.command("show stat")
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row for row in rows if row.get("pxname") == "chatd" and row["svname"].startswith("node")
        }

    async def wait_for_state(self, which: Union[int, Iterable[int]], status: str) -> None:
        """
        Wait until HAProxy says each node of C{which} (an index or
        several) is C{status} ("UP" also needs a passed check), asking
        every L{POLL_INTERVAL} for at most L{STATE_TIMEOUT} seconds.
        """
        indexes = [which] if isinstance(which, int) else list(which)
        names = [self.nodes[i].name for i in indexes]
        states: Dict[str, Dict[str, str]] = {}
        for _ in range(int(STATE_TIMEOUT / POLL_INTERVAL)):
            if self._haproxy is not None and self._haproxy.ended.called:
                raise AssertionError("HAProxy exited:\n" + self.haproxy_output)
            try:
                states = await self.states()
            except (ConnectError, OSError):
                states = {}  # not listening on its socket yet
            if names and all(self._is(states.get(name), status) for name in names):
                return
            await deferLater(reactor, POLL_INTERVAL, lambda: None)
        raise AssertionError(
            f"HAProxy never saw {names} {status}: "
            + repr({n: (s.get("status"), s.get("check_status")) for n, s in states.items()})
            + "\n" + self.haproxy_output
        )

    @staticmethod
    def _is(state: Optional[Dict[str, str]], status: str) -> bool:
        if state is None:
            return False
        if status == "UP":
            # Servers start UP before any check: wait for one to pass.
            return state["status"] == "UP" and state["check_status"].startswith("L7OK")
        return state["status"].startswith(status)

    def stop_haproxy(self) -> Deferred:
        return self._haproxy.stop() if self._haproxy is not None else succeed(None)
