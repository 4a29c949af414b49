# -*- test-case-name: tests.test_tap -*-
"""
C{twistd chatd}: command-line options, and the one place that picks
implementations and wires store, core, web and WebSocket together.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from pathlib import Path
from typing import Any, List, Optional
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger, jsonFileLogObserver
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from chatd._http import HeaderDeadlineFactory
from chatd._paths import find_data_dir
from chatd._version import __version__
from chatd.core import MAX_BODY, ChatCore, ChatError, validate_room_name
from chatd.interfaces import IMessageStore
from chatd.limits import DEFAULT_RATE, Limits, parse_rate
from chatd.metrics import CONTENT_TYPE, Metrics
from chatd.store.postgres import redact
from chatd.web import ChatWeb, make_environment
from chatd.ws import ChatWebSocketFactory

__all__ = ["Options", "makeService", "ChatService"]

MAX_HISTORY = 100_000


def _port(value: str) -> str:
    """
    A bare number means C{tcp:N}; anything else is an endpoint description.
    """
    value = value.strip()
    return f"tcp:{value}" if value.isdigit() else value


class Options(usage.Options):
    """
    Options for C{twistd chatd}.
    """

    synopsis = "[--port ENDPOINT] [--room NAME]... [--history N]"
    longdesc = (
        "chatd serves chat rooms over WebSocket (/ws/ROOM), JSON/JSONP "
        "long-poll and POST (/api/...), and HTML pages (/), all on one port."
    )

    optParameters = [
        [
            "port",
            "p",
            "tcp:8080",
            "Where to listen: a Twisted endpoint description such as "
            "tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem or "
            "unix:/run/chatd.sock. A bare number N means tcp:N.",
            _port,
        ],
        [
            "history",
            None,
            500,
            f"How many of each room's newest messages to keep in memory (1-{MAX_HISTORY}).",
            int,
        ],
        [
            "store",
            "s",
            None,
            "Where messages are kept: sqlite:PATH, "
            "postgresql://user[:password]@host[:port]/dbname[?schema=NAME], or memory: "
            "(nothing kept across restarts). Default: sqlite:DATA_DIR/chatd.sqlite3.",
        ],
        ["data-dir", "d", ".", "Folder for the default SQLite store."],
        [
            "retain-days",
            None,
            0,
            "Delete messages older than this many days, in the background "
            "(0: keep everything).",
            int,
        ],
        [
            "rate-limit",
            None,
            DEFAULT_RATE,
            "Posting limit per client IP and per WebSocket: BURST/PER_SECOND "
            "(a token bucket), or off.",
        ],
        ["max-message", None, MAX_BODY, "Longest message body, in characters.", int],
        ["max-connections", None, 10_000, "WebSockets and waiting long-polls, in all.", int],
        [
            "max-connections-per-ip",
            None,
            100,
            "WebSockets and waiting long-polls from one IP address.",
            int,
        ],
        ["max-rooms", None, 1_000, "Rooms in all.", int],
        ["rooms-per-hour", None, 20, "Rooms one IP address may create per hour (0: no limit).", int],
        [
            "metrics-port",
            None,
            None,
            "Serve /metrics on this endpoint only (e.g. tcp:9100:interface=127.0.0.1) "
            "instead of on --port.",
        ],
        ["log-format", None, "text", "Log as text (twistd's own) or json (one object a line)."],
        [
            "access-log",
            None,
            "off",
            "on: log every HTTP request, a line each (long-polls then take "
            "twisted.web's full path, which costs more); off: no access log.",
        ],
        ["templates", None, None, "Folder of HTML templates (default: the installed ones)."],
        ["static", None, None, "Folder of static files (default: the installed ones)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["rooms"] = []
        self["allow-origins"] = []

    def opt_allow_origin(self, origin: str) -> None:
        """
        Also accept WebSocket connections from pages of this origin, e.g.
        https://chat.example.org (repeatable).
        """
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise usage.UsageError(
                f"--allow-origin {origin!r}: give scheme://host[:port], e.g. https://chat.example.org"
            )
        self["allow-origins"].append(origin.rstrip("/"))

    def opt_room(self, name: str) -> None:
        """
        Create room NAME at start-up if missing (repeatable; "lobby" always exists).
        """
        try:
            validate_room_name(name)
        except ChatError as e:
            raise usage.UsageError(f"--room {name!r}: {e.detail}") from None
        if name not in self["rooms"]:
            self["rooms"].append(name)

    opt_r = opt_room

    def opt_version(self) -> None:
        """
        Print chatd's version and exit.
        """
        print(f"chatd {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        """
        Check the endpoint and find the template and static folders.
        """
        self["store"] = self._check_store(self["store"])
        try:
            self["rate-limit"] = parse_rate(self["rate-limit"])
        except ValueError as e:
            raise usage.UsageError(f"--rate-limit {e}") from None
        for name, low in [
            ("max-message", 1),
            ("max-connections", 1),
            ("max-connections-per-ip", 1),
            ("max-rooms", 1),
            ("rooms-per-hour", 0),
        ]:
            if self[name] < low:
                raise usage.UsageError(f"--{name} {self[name]}: give a number of at least {low}.")
        if self["access-log"] not in ("on", "off"):
            raise usage.UsageError(f"--access-log {self['access-log']!r}: use on or off.")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format {self['log-format']!r}: use text or json.")
        if self["metrics-port"] is not None:
            self["metrics-port"] = _port(self["metrics-port"])
            try:
                serverFromString(None, self["metrics-port"])
            except Exception as e:
                raise usage.UsageError(
                    f"--metrics-port {self['metrics-port']!r} is not a valid endpoint ({e})."
                ) from None
        if self["retain-days"] < 0:
            raise usage.UsageError(
                f"--retain-days {self['retain-days']}: give 0 (keep everything) or more days."
            )
        if not 1 <= self["history"] <= MAX_HISTORY:
            raise usage.UsageError(
                f"--history {self['history']}: give a number from 1 to {MAX_HISTORY}."
            )
        try:
            # The endpoint is only built here, not listened on, so no
            # reactor is needed to check its description.
            serverFromString(None, self["port"])
        except Exception as e:
            raise usage.UsageError(
                f"--port {self['port']!r} is not a valid endpoint description "
                f"({e}). Examples: 8080, tcp:8080:interface=127.0.0.1, "
                "unix:/tmp/chatd.sock."
            ) from None
        for name in ("templates", "static"):
            if self[name] is None:
                found = find_data_dir(name)
                if found is None:
                    raise usage.UsageError(
                        f"Cannot find chatd's {name} folder; reinstall chatd "
                        f"or pass --{name} PATH."
                    )
                self[name] = found
            else:
                path = Path(self[name])
                if not path.is_dir():
                    raise usage.UsageError(f"--{name} {self[name]!r} is not a folder.")
                self[name] = path

    def _check_store(self, url: Optional[str]) -> str:
        if url is None:
            data_dir = Path(self["data-dir"])
            if not data_dir.is_dir():
                raise usage.UsageError(f"--data-dir {self['data-dir']!r} is not a folder.")
            return f"sqlite:{data_dir / 'chatd.sqlite3'}"
        scheme = url.split(":", 1)[0].lower()
        if scheme not in _STORES or ":" not in url:
            raise usage.UsageError(
                f"--store {redact(url)!r}: use sqlite:PATH, "
                "postgresql://user@host:port/dbname or memory:."
            )
        if scheme == "sqlite":
            path = Path(url.split(":", 1)[1])
            if not path.name:
                raise usage.UsageError("--store sqlite:PATH needs a file name.")
            if not path.parent.is_dir():
                raise usage.UsageError(
                    f"--store {url!r}: the folder {str(path.parent)!r} does not exist."
                )
        return url


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """
    An endpoint that tells its owner where it ended up listening (the
    real port number of C{tcp:0}, say).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, on_listen: Any) -> None:
        self._endpoint = endpoint
        self._on_listen = on_listen

    def listen(self, factory: Any) -> Deferred:
        return self._endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self._on_listen(port)
        return port


# Stores by URL scheme, imported only when chosen so that a driver (psycopg)
# loads only if that store is used.
_STORES = {
    "memory": "chatd.store.memory.MemoryStore",
    "sqlite": "chatd.store.sqlite.SQLiteStore",
    "postgresql": "chatd.store.postgres.PostgresStore",
    "postgres": "chatd.store.postgres.PostgresStore",
}


def make_store(url: str, history: int, reactor: Any) -> IMessageStore:
    """
    Build the store a C{--store} URL names.
    """
    scheme, rest = url.split(":", 1)
    factory = namedAny(_STORES[scheme.lower()])
    if scheme == "memory":
        return factory(retain=history)
    if scheme == "sqlite":
        return factory(rest, reactor=reactor)
    return factory(url, reactor=reactor)


def _freeze_startup_objects() -> None:
    """
    Leave what start-up made (modules, classes, templates, the rooms'
    history: most of the process's objects) out of every later garbage
    collection.  Waiting long-polls and their callbacks live long enough to
    reach the oldest generation, so full collections come often under load;
    without this each one walked every module object as well.
    """
    gc.collect()
    gc.freeze()


class ChatService(MultiService):
    """
    chatd's root service: loads the core's rooms from the store, then
    starts its children (the listener).

    @ivar ready: a Deferred that fires once the core is loaded and the
        listener started.
    @ivar ports: the listening ports, once listening.
    """

    log = Logger()

    def __init__(
        self,
        core: ChatCore,
        rooms: List[str],
        store: IMessageStore,
        reactor: Any,
        exit_on_failure: bool = False,
        web: Optional[ChatWeb] = None,
        websockets: Optional[ChatWebSocketFactory] = None,
        json_logs: bool = False,
    ) -> None:
        super().__init__()
        self.core = core
        self.store = store
        self.web = web
        self.websockets = websockets
        self._rooms = rooms
        self._reactor = reactor
        self._exit_on_failure = exit_on_failure
        self._json_logs = json_logs
        self.ready: Optional[Deferred] = None
        self.ports: List[IListeningPort] = []
        #: Set once stopService is called: who waits for it to finish.
        self._stopping: Optional[List[Deferred]] = None
        self._stopped = False

    def listening(self, port: IListeningPort) -> None:
        """
        Record and log a port chatd listens on.
        """
        self.ports.append(port)
        host: Any = port.getHost()
        if hasattr(host, "port"):
            address = f"{host.host}:{host.port}"
        else:
            address = str(getattr(host, "name", host))
        self.log.info("chatd listening on {address}", address=address)

    def privilegedStartService(self) -> None:
        # Children (the listener) start only in startService, once the
        # store is open and the rooms are loaded: StreamServerEndpointService
        # would otherwise listen here, before twistd even runs the reactor,
        # and serve requests against a half-loaded core.
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)

        async def start() -> None:
            await self.store.open()
            await self.core.start(self._rooms)
            for service in self:
                service.startService()
            if self._exit_on_failure:
                self._install_sigterm()
                _freeze_startup_objects()

        def failed(failure: Failure) -> Failure:
            self.log.critical("chatd could not start: {error}", error=failure.getErrorMessage())
            if self._exit_on_failure:
                self._exit()
            return failure

        self.ready = Deferred.fromCoroutine(start()).addErrback(failed)

    def _exit(self) -> None:
        """
        Under twistd: stop, and exit with status 1 so that a supervisor
        sees the failure (twistd itself would exit 0).
        """

        def exit_1() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        self._reactor.addSystemEventTrigger("after", "shutdown", exit_1)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    def setServiceParent(self, parent: Any) -> None:
        """
        Under twistd the parent is the application; twistd starts logging
        after this, with the application's log observer if it has one.
        """
        if self._json_logs and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, jsonFileLogObserver(sys.stdout, recordSeparator=""))
        super().setServiceParent(parent)

    def _install_sigterm(self) -> None:
        """
        twistd ends itself with SIGTERM after a SIGTERM-initiated shutdown
        (exit status 143); a clean shutdown should say 0.  This handler
        stops the reactor the same way, without recording the signal.
        """
        reactor = self._reactor

        def on_sigterm(signum: int, frame: Any) -> None:
            self.log.info("Received SIGTERM, shutting down.")
            reactor.callFromThread(reactor.stop)

        signal.signal(signal.SIGTERM, on_sigterm)

    def stopService(self) -> Deferred:
        """
        Shut down in order: stop accepting, answer waiting long-polls,
        close WebSockets with 1001, let the store commit what it was
        given, all within SHUTDOWN_TIMEOUT seconds.
        """
        if self._stopped:
            return succeed(None)
        if self._stopping is not None:
            # Stopping already: wait for that.
            done: Deferred = Deferred()
            self._stopping.append(done)
            return done
        self._stopping = []
        if self.web is not None:
            self.web.shutting_down = True

        async def stop() -> None:
            Service.stopService(self)
            # Children that never started (the store failed to open) have
            # nothing to stop.
            await DeferredList(
                [maybeDeferred(s.stopService) for s in reversed(list(self)) if s.running],
                consumeErrors=True,
            )
            released = self.core.release_waiters()
            if self.websockets is not None:
                closing = len(self.websockets.connections)
                await self.websockets.shutdown(SHUTDOWN_TIMEOUT / 2, self._reactor)
                self.log.info(
                    "Shut down: answered {polls} long-polls, closed {sockets} WebSockets",
                    polls=released,
                    sockets=closing,
                )
            closing_store = self.store.close()
            closing_store.addTimeout(SHUTDOWN_TIMEOUT / 2, self._reactor)
            await closing_store

        def stopped(result: object) -> object:
            waiting, self._stopping = self._stopping or [], None
            self._stopped = True
            for d in waiting:
                d.callback(None)
            return result

        return Deferred.fromCoroutine(stop()).addBoth(stopped)


class _Retention:
    """
    The background job that deletes messages older than the retention
    period.  It logs its own failures so one bad run does not stop it.
    """

    log = Logger()

    def __init__(self, core: ChatCore, clock: Any, days: int) -> None:
        self._core = core
        self._clock = clock
        self._days = days

    def run(self) -> Deferred:
        cutoff_ms = int((self._clock.seconds() - self._days * 86400) * 1000)
        d = self._core.prune(cutoff_ms)

        def done(count: int) -> None:
            if count:
                self.log.info("Retention deleted {count} messages", count=count)

        def failed(failure: Failure) -> None:
            self.log.failure("Retention run failed", failure)

        return d.addCallbacks(done, failed)


#: How often retention runs.
RETENTION_INTERVAL = 3600.0
#: Idle HTTP connections are closed after this many seconds (more than the
#: longest long-poll).
IDLE_TIMEOUT = 75
#: A new connection must send its request head within this many seconds.
HEADER_TIMEOUT = 10.0
#: The longest a shutdown waits for WebSockets to close and writes to finish.
SHUTDOWN_TIMEOUT = 10.0


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build chatd from parsed options.

    Under twistd (no C{reactor} given) a start-up failure, such as a store
    that cannot be opened, ends the process with status 1 after one log
    line saying why.
    """
    under_twistd = reactor is None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    history = options["history"]
    store = make_store(options["store"], history, reactor)
    limits = Limits(
        reactor,
        rate=options["rate-limit"],
        max_connections=options["max-connections"],
        max_connections_per_ip=options["max-connections-per-ip"],
        max_rooms=options["max-rooms"],
        rooms_per_ip_per_hour=options["rooms-per-hour"],
    )
    core = ChatCore(store, reactor, history, limits=limits, max_body=options["max-message"])
    metrics = Metrics()
    core.observer = metrics
    metrics.watch_waiters(core.waiting)
    factory = ChatWebSocketFactory(core, metrics=metrics, clock=reactor)
    web = ChatWeb(
        core,
        make_environment(options["templates"]),
        options["static"],
        WebSocketResource(factory),
        metrics=metrics,
        allow_origins=options["allow-origins"],
        serve_metrics=options["metrics-port"] is None,
    )
    # Idle connections are closed after IDLE_TIMEOUT (longer than any
    # long-poll), and a new one must send its request head promptly.
    site = web.site(IDLE_TIMEOUT, access_log=options["access-log"] == "on")
    front = HeaderDeadlineFactory(site, reactor, HEADER_TIMEOUT)
    service = ChatService(
        core,
        options["rooms"],
        store,
        reactor,
        exit_on_failure=under_twistd,
        web=web,
        websockets=factory,
        json_logs=options["log-format"] == "json",
    )
    if options["retain-days"]:
        retention = _Retention(core, reactor, options["retain-days"])
        timer = TimerService(RETENTION_INTERVAL, retention.run)
        timer.clock = reactor
        timer.setServiceParent(service)
    endpoint = _ReportingEndpoint(
        serverFromString(reactor, options["port"]), service.listening
    )
    listener = StreamServerEndpointService(endpoint, front)
    listener.setServiceParent(service)
    if options["metrics-port"] is not None:
        metrics_site = Site(_MetricsPage(metrics))
        metrics_endpoint = _ReportingEndpoint(
            serverFromString(reactor, options["metrics-port"]), service.listening
        )
        StreamServerEndpointService(metrics_endpoint, metrics_site).setServiceParent(service)
    return service


class _MetricsPage(Resource):
    """
    /metrics alone, for --metrics-port.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"Not found; see /metrics\n"
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return self._metrics.render()
