# -*- test-case-name: tests.test_tap -*-
"""
C{twistd chatd}: command-line options, and the one place that picks
implementations and wires store, core, web and WebSocket together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from chatd._paths import find_data_dir
from chatd._version import __version__
from chatd.core import ChatCore, ChatError, validate_room_name
from chatd.store.memory import MemoryStore
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


class ChatService(MultiService):
    """
    chatd's root service: loads the core's rooms from the store, then
    starts its children (the listener).

    @ivar ready: a Deferred that fires once the core is loaded and the
        listener started.
    @ivar ports: the listening ports, once listening.
    """

    log = Logger()

    def __init__(self, core: ChatCore, rooms: List[str], store: Any, reactor: Any) -> None:
        super().__init__()
        self.core = core
        self._rooms = rooms
        self._store = store
        self._reactor = reactor
        self.ready: Optional[Deferred] = None
        self.ports: List[IListeningPort] = []

    def listening(self, port: IListeningPort) -> None:
        """
        Record and log a port chatd listens on.
        """
        self.ports.append(port)
        self.log.info("chatd listening on {address}", address=port.getHost())

    def startService(self) -> None:
        Service.startService(self)
        d = self.core.start(self._rooms)

        def start_children(_: object) -> None:
            for service in self:
                service.startService()

        def failed(failure: Failure) -> None:
            self.log.critical(
                "chatd could not start: {error}", error=failure.getErrorMessage()
            )
            if IReactorCore.providedBy(self._reactor) and self._reactor.running:
                self._reactor.stop()

        d.addCallback(start_children)
        d.addErrback(failed)
        self.ready = d

    def stopService(self) -> Deferred:
        d = super().stopService()
        d.addCallback(lambda _: self._store.close())
        return d


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build chatd from parsed options.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    history = options["history"]
    store = MemoryStore(retain=history)
    core = ChatCore(store, reactor, history)
    factory = ChatWebSocketFactory(core)
    web = ChatWeb(
        core,
        make_environment(options["templates"]),
        options["static"],
        WebSocketResource(factory),
    )
    site = Site(web.resource())
    service = ChatService(core, options["rooms"], store, reactor)
    endpoint = _ReportingEndpoint(
        serverFromString(reactor, options["port"]), service.listening
    )
    listener = StreamServerEndpointService(endpoint, site)
    listener.setServiceParent(service)
    return service
