# -*- test-case-name: tests.test_tap -*-
"""
C{twistd chatd}: command-line options, and the one place that picks
implementations and wires store, core, web and WebSocket together.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, List, Optional

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.web.server import Site
from zope.interface import implementer

from chatd._paths import find_data_dir
from chatd._version import __version__
from chatd.core import ChatCore, ChatError, validate_room_name
from chatd.interfaces import IMessageStore
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
        ["templates", None, None, "Folder of HTML templates (default: the installed ones)."],
        ["static", None, None, "Folder of static files (default: the installed ones)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["rooms"] = []

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
    ) -> None:
        super().__init__()
        self.core = core
        self.store = store
        self._rooms = rooms
        self._reactor = reactor
        self._exit_on_failure = exit_on_failure
        self.ready: Optional[Deferred] = None
        self.ports: List[IListeningPort] = []

    def listening(self, port: IListeningPort) -> None:
        """
        Record and log a port chatd listens on.
        """
        self.ports.append(port)
        self.log.info("chatd listening on {address}", address=port.getHost())

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

    def stopService(self) -> Deferred:
        d = super().stopService()
        d.addCallback(lambda _: self.store.close())
        return d


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
    core = ChatCore(store, reactor, history)
    factory = ChatWebSocketFactory(core)
    web = ChatWeb(
        core,
        make_environment(options["templates"]),
        options["static"],
        WebSocketResource(factory),
    )
    site = Site(web.resource())
    service = ChatService(core, options["rooms"], store, reactor, exit_on_failure=under_twistd)
    if options["retain-days"]:
        retention = _Retention(core, reactor, options["retain-days"])
        timer = TimerService(RETENTION_INTERVAL, retention.run)
        timer.clock = reactor
        timer.setServiceParent(service)
    endpoint = _ReportingEndpoint(
        serverFromString(reactor, options["port"]), service.listening
    )
    listener = StreamServerEndpointService(endpoint, site)
    listener.setServiceParent(service)
    return service
