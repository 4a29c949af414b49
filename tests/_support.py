"""
Helpers shared by chatd's tests: an in-memory web app for StubTreq, a real
chatd on a loopback port, and a WebSocket test client that waits on
Deferreds instead of sleeping.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import treq
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource

from chatd._paths import find_data_dir
from chatd.core import ChatCore
from chatd.interfaces import IMessageStore
from chatd.limits import Limits
from chatd.service import ChatService
from chatd.store.memory import MemoryStore
from chatd.tap import Options, makeService
from chatd.web import ChatWeb, make_environment
from chatd.ws import ChatWebSocketFactory


def make_web(
    history: int = 500,
    rooms: Sequence[str] = (),
    limits: Optional[Callable[[Clock], Limits]] = None,
    store: Optional[IMessageStore] = None,
    websocket: bool = False,
) -> Tuple[ChatCore, ChatWeb, Clock]:
    """
    A chat core on a fake clock with its web adapter, for StubTreq (or a
    site on the same clock), with the limits C{limits(clock)} makes; with
    C{websocket}, its C{/ws/} upgrades go to chatd's WebSocket factory (on
    the same clock) as they do in chatd.
    """
    clock = Clock()
    clock.advance(1_700_000_000)
    core = ChatCore(
        store if store is not None else MemoryStore(history),
        clock,
        history,
        limits=None if limits is None else limits(clock),
    )
    core.start(rooms)
    templates = find_data_dir("templates")
    static = find_data_dir("static")
    assert templates is not None and static is not None
    upgrades: Any = WebSocketResource(quiet_factory(core, clock)) if websocket else Resource()
    web = ChatWeb(core, make_environment(templates), static, upgrades)
    return core, web, clock


def quiet_factory(core: ChatCore, clock: Clock) -> ChatWebSocketFactory:
    """
    chatd's WebSocket factory on C{clock}, without the timers Autobahn
    runs on the global reactor (auto-ping, handshake timeouts), in
    batches that outlive a cancel.
    """
    factory = ChatWebSocketFactory(core, clock=clock, auto_ping=0)
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    return factory


def _unlimited(args: Sequence[str]) -> Tuple[str, ...]:
    """
    Tests post faster than a person: no posting limit unless a test sets one.
    """
    if any(arg.startswith("--rate-limit") for arg in args):
        return tuple(args)
    return ("--rate-limit", "off", *args)


async def start_chatd(test: TestCase, *args: str) -> Tuple[ChatService, str]:
    """
    Start chatd on a free loopback port, as twistd would build it.

    @return: the service and its base URL, e.g. C{http://127.0.0.1:4321}.
    """
    options = Options()
    args = _unlimited(args)
    if not any(arg.startswith(("--store", "-s")) for arg in args):
        # The default store (SQLite), in a folder of this test's own.
        data_dir = test.mktemp()
        os.makedirs(data_dir)
        args = ("--data-dir", data_dir, *args)
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", *args])
    service = makeService(options, reactor)
    assert isinstance(service, ChatService)
    service.startService()
    test.addCleanup(service.stopService)
    await service.ready
    port = service.ports[0].getHost().port
    return service, f"http://127.0.0.1:{port}"


async def make_certificate(test: TestCase) -> Tuple[str, str]:
    """
    A self-signed certificate for localhost and 127.0.0.1, made with
    openssl in a folder of the test's own.

    @return: the paths of its key and certificate.
    """
    folder = os.path.abspath(test.mktemp())
    os.makedirs(folder)
    key, cert = os.path.join(folder, "key.pem"), os.path.join(folder, "cert.pem")
    out, err, code = await getProcessOutputAndValue(
        "openssl",
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
        env=os.environ,
    )
    assert code == 0, err
    return key, cert


def rss_kib(pid: int) -> int:
    """
    The resident memory of process C{pid}, in KiB.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class HTTP:
    """
    treq with a connection pool that is closed when the test ends.
    """

    def __init__(self, test: TestCase, base: str) -> None:
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        test.addCleanup(self.pool.closeCachedConnections)

    async def request(self, method: str, path: str, **kwargs: Any) -> Tuple[int, Any, bytes]:
        response = await treq.request(method, self.base + path, pool=self.pool, **kwargs)
        body = await response.content()
        return response.code, response.headers, body

    async def get_json(self, path: str) -> Tuple[int, Any]:
        code, _, body = await self.request("GET", path)
        return code, json.loads(body)

    async def post_json(self, path: str, payload: Any) -> Tuple[int, Any]:
        code, _, body = await self.request(
            "POST",
            path,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": ["application/json"]},
        )
        return code, json.loads(body)


class _ClientProtocol(WebSocketClientProtocol):
    factory: "_ClientFactory"

    def onOpen(self) -> None:
        self.factory.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.client._received(json.loads(payload.decode("utf-8")))

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.factory.client._closed_with(code, reason)


class _ClientFactory(WebSocketClientFactory):
    protocol = _ClientProtocol
    client: "WSClient"


class WSClient:
    """
    A WebSocket test client that records every frame and lets a test wait
    for the frame it expects.
    """

    def __init__(self) -> None:
        self.frames: List[Dict[str, Any]] = []
        self.protocol: Optional[_ClientProtocol] = None
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        self._waiting: List[Tuple[Callable[[], bool], Deferred]] = []
        self._pings = 0

    @classmethod
    async def connect(
        cls,
        test: TestCase,
        base: str,
        path: str,
        source: Optional[str] = None,
        origin: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> "WSClient":
        """
        Connect (from loopback address C{source}, sending C{origin} and
        C{headers}) and wait for the opening handshake to finish.
        """
        client = await cls.start(test, base, path, source, origin, headers)
        if await client.opened is None:
            raise ConnectionError(f"{path} refused: {client.close_reason}")
        return client

    @classmethod
    async def start(
        cls,
        test: TestCase,
        base: str,
        path: str,
        source: Optional[str] = None,
        origin: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> "WSClient":
        """
        Connect without waiting for the handshake (to test refusals).
        """
        client = cls()
        host, port = base.split("//")[1].split(":")
        factory = _ClientFactory(f"ws://{host}:{port}{path}", origin=origin, headers=headers)
        factory.client = client
        bind = (source, 0) if source else None
        endpoint = TCP4ClientEndpoint(reactor, host, int(port), bindAddress=bind)
        await endpoint.connect(factory)
        test.addCleanup(client.close)
        return client

    # -- events --------------------------------------------------------------

    def _opened(self, protocol: _ClientProtocol) -> None:
        self.protocol = protocol
        self.opened.callback(self)

    def _received(self, frame: Dict[str, Any]) -> None:
        self.frames.append(frame)
        self._check()

    def _closed_with(self, code: Optional[int], reason: Optional[str]) -> None:
        self.close_code, self.close_reason = code, reason
        self.protocol = None
        if not self.opened.called:
            self.opened.callback(None)
        self.closed.callback(code)
        self._check()

    def _check(self) -> None:
        still = []
        for predicate, d in self._waiting:
            if predicate():
                d.callback(self)
            elif self.closed.called:
                d.errback(ConnectionError(f"closed ({self.close_code}) while waiting"))
            else:
                still.append((predicate, d))
        self._waiting = still

    # -- API -----------------------------------------------------------------

    @property
    def messages(self) -> List[Dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "message"]

    @property
    def seqs(self) -> List[int]:
        return [f["seq"] for f in self.messages]

    def wait_for(self, predicate: Callable[[], bool]) -> Deferred:
        """
        A Deferred that fires once C{predicate()} holds.
        """
        if predicate():
            return succeed(self)
        d: Deferred = Deferred()
        self._waiting.append((predicate, d))
        return d

    def wait_for_seq(self, seq: int) -> Deferred:
        return self.wait_for(lambda: bool(self.messages) and self.messages[-1]["seq"] >= seq)

    def wait_for_frames(self, count: int) -> Deferred:
        return self.wait_for(lambda: len(self.frames) >= count)

    def send_json(self, payload: Any) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(json.dumps(payload).encode("utf-8"))

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(payload, isBinary=binary)

    async def sync(self) -> None:
        """
        A barrier: once the pong for this ping arrives, the server has
        handled every frame sent before it.
        """
        self._pings += 1
        ping_id = self._pings
        self.send_json({"type": "ping", "id": ping_id})
        await self.wait_for(
            lambda: any(f["type"] == "pong" and f.get("id") == ping_id for f in self.frames)
        )

    def close(self) -> Deferred:
        """
        Close (if open) and wait until the connection is gone.
        """
        if self.protocol is not None:
            self.protocol.sendClose(1000)
        return self.closed if not self.closed.called else succeed(self.close_code)


class ChatdProcess(ProcessProtocol):
    """
    chatd run the way users run it, C{twistd -n chatd ...}, in a child
    process on a free loopback port.
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.exit_code: Optional[int] = None
        self.signal: Optional[int] = None

    @classmethod
    async def start(
        cls, test: TestCase, *args: str, port: int = 0, prefix: Sequence[str] = ()
    ) -> "ChatdProcess":
        """
        Start chatd and wait until it listens (on C{port}, or a free one),
        run by the command C{prefix} if given (e.g. C{prlimit ...}).
        """
        process = cls.spawn(test, "--port", f"tcp:{port}:interface=127.0.0.1", *args, prefix=prefix)
        await process.listening
        return process

    @classmethod
    def spawn(
        cls,
        test: TestCase,
        *args: str,
        env: Optional[Dict[str, str]] = None,
        path: Optional[str] = None,
        pidfile: str = "",
        prefix: Sequence[str] = (),
    ) -> "ChatdProcess":
        """
        Start C{twistd -n chatd ARGS} without waiting for anything (with
        C{env} added to the environment, in folder C{path}, with twistd's
        pid file at C{pidfile}: none by default).
        """
        process = cls()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = [*prefix, twistd, "-n", f"--pidfile={pidfile}", "chatd", *_unlimited(args)]
        reactor.spawnProcess(process, argv[0], argv, env={**os.environ, **(env or {})}, path=path)
        test.addCleanup(process.kill)
        return process

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.listening.called:
            # Text logs, or JSON ones (--log-format json).
            found = re.search(
                rb'chatd listening on 127\.0\.0\.1:(\d+)|"address": "127\.0\.0\.1:(\d+)"', self.output
            )
            if found:
                self.port = int(found.group(1) or found.group(2))
                self.listening.callback(self)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        if not self.listening.called:
            self.listening.errback(
                RuntimeError("chatd exited before listening:\n" + self.output.decode("utf-8", "replace"))
            )
        self.ended.callback(self.exit_code)

    def stop(self, signal: str = "TERM") -> Deferred:
        """
        Send a signal and wait for the process to end.
        """
        if not self.ended.called:
            self.transport.signalProcess(signal)
        return self.ended

    def kill(self) -> Deferred:
        if self.ended.called:
            return succeed(None)
        return self.stop("KILL")
