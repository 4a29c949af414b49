# -*- test-case-name: tests.test_tap -*-
"""
C{twistd chatd}: command-line options, and the one place that picks
implementations and wires store, core, web and WebSocket together.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any, Optional, cast

from autobahn.twisted.resource import WebSocketResource
from twisted.application.internet import TimerService
from twisted.application.service import IService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.reflect import namedAny
from twisted.web.resource import Resource
from twisted.web.server import Site

from chatd._paths import find_data_dir
from chatd._send import direct_writes_available
from chatd._version import __version__
from chatd.accounts import SIGNUP_MODES, Accounts
from chatd.auth import (
    AUTH_MODES,
    CACHE_TTL,
    SESSION_TTL,
    Authenticator,
    Keys,
    Passwords,
    Sessions,
    SessionWatch,
    TokenVerifier,
)
from chatd.core import EDIT_WINDOW, ChatCore
from chatd.interfaces import IBus, IMessageStore
from chatd.limits import DEFAULT_RATE, Connections, Limits, RateLimiter, parse_rate
from chatd.metrics import CONTENT_TYPE, Metrics
from chatd.model import MAX_BODY, ChatError, validate_room_name
from chatd.service import ChatService, Listener, Presence, Retention
from chatd.store import StoreError, redact
from chatd.web import ChatWeb, canonical_origin, make_environment
from chatd.ws import ChatWebSocketFactory

__all__ = ["Options", "makeService", "make_bus", "make_store"]

MAX_HISTORY = 100_000
#: The longest --drain, in seconds.
MAX_DRAIN = 600.0


#: The listen queue chatd asks for unless the endpoint names one (Twisted's
#: default is 50): a crowd reconnecting at once (after a restart, or a
#: node's death) overflows a short queue, and each connection the kernel
#: drops costs its client a second or more before it tries again.  The
#: kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024

#: Endpoint types (also inside C{haproxy:}) that take a C{backlog}.
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def _port(value: str) -> str:
    """
    A bare number means C{tcp:N}; anything else is an endpoint description.
    A listening endpoint that takes a C{backlog} and names none gets
    L{LISTEN_BACKLOG}.
    """
    value = value.strip()
    if value.isdigit():
        value = f"tcp:{value}"
    return with_backlog(value)


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """
    C{description} with C{:backlog=BACKLOG} added, if its type takes one
    and it gives none.
    """
    parts = [part.lower() for part in description.split(":")]
    kind = parts[1] if parts[0] == "haproxy" and len(parts) > 1 else parts[0]
    if kind not in _BACKLOG_TYPES or any(part.startswith("backlog=") for part in parts):
        return description
    return f"{description}:backlog={backlog}"


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
            "unix:/run/chatd.sock. A bare number N means tcp:N. Unless it says "
            f"backlog=N, the listen queue is {LISTEN_BACKLOG} (Twisted's default: 50).",
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
        [
            "max-connections",
            None,
            10_000,
            "Open connections (HTTP and WebSocket), in all; lowered to fit the "
            "process's descriptor limit.",
            int,
        ],
        [
            "max-connections-per-ip",
            None,
            100,
            "Open connections (HTTP and WebSocket) from one IP address.",
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
        [
            "bus",
            None,
            None,
            "How nodes sharing a store hear of each other's messages: local (one "
            "node; the default with SQLite or memory), postgresql (NOTIFY/LISTEN; "
            "the default with a PostgreSQL store) or redis://host:port/db.",
        ],
        [
            "bus-dsn",
            None,
            None,
            "For --bus postgresql: a direct connection (libpq URL or key=value "
            "string) to LISTEN on, when the store's goes through a pooler in "
            "transaction mode. Default: the store's.",
        ],
        [
            "presence-lease",
            None,
            15.0,
            "With several nodes: how long a node's count of its clients stays "
            "valid unless renewed (it renews every third of that), so a node that "
            "dies unannounced drops out of every member count within it.",
            float,
        ],
        [
            "drain",
            None,
            0.0,
            "On SIGTERM, first answer /readyz with 503 and keep serving this "
            "many seconds, so a load balancer's health checks move new clients "
            "away; then stop (0: stop at once).",
            float,
        ],
        [
            "auth",
            None,
            "open",
            "Who may connect: open (anyone; people with no identity are guests, "
            "and rooms let them in unless made otherwise), token (every client "
            "carries a token your application signs: see --auth-secret-file) or "
            "accounts (sign-up and sign-in pages, sessions in a cookie).",
        ],
        [
            "auth-audience",
            None,
            None,
            "If given, every token's aud must name it.",
        ],
        ["auth-issuer", None, None, "If given, every token's iss must be it."],
        [
            "signup",
            None,
            "open",
            "With --auth accounts, who may sign up: open (anyone), invite "
            "(holders of an invitation: chatd-admin invite create) or closed "
            "(accounts are made with chatd-admin user add).",
        ],
        [
            "edit-window",
            None,
            EDIT_WINDOW,
            "How long after sending a message its author may edit it, in seconds "
            "(0: for ever). Rooms whose owners turned edits off allow none.",
            float,
        ],
        [
            "session-days",
            None,
            SESSION_TTL / 86400,
            "How long a sign-in lasts, in days.",
            float,
        ],
        [
            "api-rate",
            None,
            "100/10",
            "Requests per API key: BURST/PER_SECOND (a token bucket).",
        ],
        ["templates", None, None, "Folder of HTML templates (default: the installed ones)."],
        ["static", None, None, "Folder of static files (default: the installed ones)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        # The opt_ methods' docstrings are --help's text: one line each,
        # or textwrap keeps their indentation as runs of spaces.
        self.docs = {name: " ".join(doc.split()) if doc else doc for name, doc in self.docs.items()}
        self["rooms"] = []
        self["allow-origins"] = []
        self["public-urls"] = []
        self["auth-secrets"] = []
        self["auth-public-keys"] = []

    def opt_auth_secret_file(self, path: str) -> None:
        """
        A file holding the HS256 secret (at least 32 bytes) your
        application signs tokens with (repeatable: during a rotation, a
        token signed with any of them is good).
        """
        self["auth-secrets"].append(_read_key_file("auth-secret-file", path))

    def opt_auth_public_key_file(self, path: str) -> None:
        """
        A PEM file of the RSA (RS256) or EC P-256 (ES256) public key your
        application's tokens are signed for (repeatable, for rotations).
        """
        self["auth-public-keys"].append(_read_key_file("auth-public-key-file", path))

    def opt_allow_origin(self, origin: str) -> None:
        """
        Also accept WebSockets and POSTs from pages of this origin, e.g.
        https://tutorial.example.org (repeatable).
        """
        self["allow-origins"].append(_origin("allow-origin", origin))

    def opt_public_url(self, url: str) -> None:
        """
        A URL clients reach chatd by (repeatable), e.g.
        https://chat.example.org: requests for any other host are refused
        with 421, except /healthz, /readyz and /metrics, and browsers'
        pages must come from these origins or --allow-origin ones (this
        stops DNS rebinding).
        """
        self["public-urls"].append(_origin("public-url", url))

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
        self["bus"] = self._check_bus(self["bus"])
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
        self._check_auth()
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
        if not 0 <= self["drain"] <= MAX_DRAIN:
            raise usage.UsageError(
                f"--drain {self['drain']}: give 0 (stop at once) to {MAX_DRAIN:g} seconds."
            )
        if self["presence-lease"] < MIN_PRESENCE_LEASE:
            raise usage.UsageError(
                f"--presence-lease {self['presence-lease']:g}: give at least "
                f"{MIN_PRESENCE_LEASE:g} seconds."
            )
        if self["retain-days"] < 0:
            raise usage.UsageError(
                f"--retain-days {self['retain-days']}: give 0 (keep everything) or more days."
            )
        if not 1 <= self["history"] <= MAX_HISTORY:
            raise usage.UsageError(
                f"--history {self['history']}: give a number from 1 to {MAX_HISTORY}."
            )
        # The default too (Options does not pass defaults to coercers).
        self["port"] = with_backlog(self["port"])
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

    def _check_auth(self) -> None:
        if self["auth"] not in AUTH_MODES:
            raise usage.UsageError(f"--auth {self['auth']!r}: use open, token or accounts.")
        if self["signup"] not in SIGNUP_MODES:
            raise usage.UsageError(f"--signup {self['signup']!r}: use open, invite or closed.")
        if self["auth"] == "token" and not (self["auth-secrets"] or self["auth-public-keys"]):
            raise usage.UsageError(
                "--auth token needs --auth-secret-file or --auth-public-key-file "
                "(what your application signs its tokens with)."
            )
        try:
            self["tokens"] = (
                TokenVerifier(
                    self["auth-secrets"],
                    self["auth-public-keys"],
                    audience=self["auth-audience"],
                    issuer=self["auth-issuer"],
                )
                if self["auth-secrets"] or self["auth-public-keys"]
                else None
            )
        except ValueError as e:
            raise usage.UsageError(f"--auth-secret-file/--auth-public-key-file: {e}.") from None
        if not 0 <= self["edit-window"] <= 366 * 86400:
            raise usage.UsageError(f"--edit-window {self['edit-window']:g}: give 0 to 31622400 seconds.")
        if not 0 < self["session-days"] <= 366:
            raise usage.UsageError(f"--session-days {self['session-days']:g}: give 1 to 366 days.")
        try:
            rate = parse_rate(self["api-rate"])
        except ValueError as e:
            raise usage.UsageError(f"--api-rate {e}") from None
        if rate is None:
            raise usage.UsageError("--api-rate: give BURST/PER_SECOND.")
        self["api-rate"] = rate

    def _check_bus(self, bus: Optional[str]) -> str:
        postgres = self["store"].split(":", 1)[0].lower() in ("postgresql", "postgres")
        if bus is None:
            return "postgresql" if postgres else "local"
        if bus in ("local", "postgresql"):
            if bus == "postgresql" and not postgres:
                raise usage.UsageError(
                    "--bus postgresql needs a PostgreSQL store (--store postgresql://...)."
                )
            return bus
        if bus.startswith("redis:"):
            if importlib.util.find_spec("txredisapi") is None:
                raise usage.UsageError(
                    "--bus redis://... needs txredisapi: pip install 'chatd[redis]'."
                )
            from chatd.bus.redis import parse_url

            try:
                parse_url(bus)
            except ValueError as e:
                raise usage.UsageError(f"--bus {bus!r}: {e}.") from None
            if self["store"] == "memory:":
                raise usage.UsageError(
                    "--bus redis://... needs a store the nodes share (sqlite: or postgresql:)."
                )
            return bus
        raise usage.UsageError(f"--bus {bus!r}: use local, postgresql or redis://host:port/db.")

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


def _read_key_file(option: str, path: str) -> bytes:
    """
    A secret or key file's bytes, without surrounding whitespace (read
    now, while twistd may still be root).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024).strip()
    except OSError as e:
        raise usage.UsageError(f"--{option} {path!r}: {e.strerror}.") from None
    if not data:
        raise usage.UsageError(f"--{option} {path!r} is empty.")
    return data


def _origin(option: str, value: str) -> str:
    """
    C{value} as given to C{--option}, if it is an http or https origin.

    @raise usage.UsageError: if it is not.
    """
    if canonical_origin(value) is None:
        raise usage.UsageError(
            f"--{option} {value!r}: give scheme://host[:port] (http or https), "
            "e.g. https://chat.example.org"
        )
    return value.rstrip("/")


# Stores by URL scheme, and buses by name, imported only when chosen so that
# a driver (psycopg) loads only if it is used.
_STORES = {
    "memory": "chatd.store.memory.MemoryStore",
    "sqlite": "chatd.store.sqlite.SQLiteStore",
    "postgresql": "chatd.store.postgres.PostgresStore",
    "postgres": "chatd.store.postgres.PostgresStore",
}

_BUSES = {
    "local": "chatd.bus.local.LocalBus",
    "postgresql": "chatd.bus.postgres.PostgresBus",
    "redis": "chatd.bus.redis.RedisBus",
}

#: The shortest --presence-lease (renewing it costs a write each third).
MIN_PRESENCE_LEASE = 1.5


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


#: How often retention runs.
RETENTION_INTERVAL = 3600.0
#: Idle HTTP connections are closed after this many seconds (more than the
#: longest long-poll).
IDLE_TIMEOUT = 75
#: A request (head and body) must be complete this many seconds after its
#: first byte.
REQUEST_TIMEOUT = 10.0


def make_bus(
    name: str,
    store: Any = None,
    reactor: Any = None,
    node: str = "",
    observer: Any = None,
    dsn: Optional[str] = None,
    **timing: float,
) -> IBus:
    """
    Build the bus C{name} names (C{local}, C{postgresql} or a
    C{redis://} URL) for C{store}; the PostgreSQL bus makes the store
    announce its commits.

    @param timing: heartbeat and reconnection timing for a bus between
        processes (L{chatd.bus._remote.RemoteBus}'s keyword arguments).
    """
    kind = "redis" if name.startswith("redis:") else name
    factory = namedAny(_BUSES[kind])
    if kind == "local":
        if observer is not None:
            observer.bus_state("connected")
        return cast(IBus, factory())
    if kind == "redis":
        # Named after the deployment (known once the store is open): a
        # Redis server may serve several deployments, in any databases.
        return cast(
            IBus,
            factory(
                reactor, node, name, lambda: f"chatd:{store.deployment}", observer=observer, **timing
            ),
        )
    bus = factory(reactor, node, store, dsn or store.conninfo, observer=observer, **timing)
    store.notify_commits(bus.encode)
    return cast(IBus, bus)


def node_name() -> str:
    """
    A name for this process among the nodes: host, pid and a random part
    (pids repeat across restarts and containers).
    """
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build chatd from parsed options: the one place that picks the store
    and bus and wires them, the core, the web and WebSocket adapters and
    the listeners together.

    Under twistd (no C{reactor} given) a start-up failure, such as a store
    that cannot be opened or a port that is taken, ends the process with
    status 1 after one line saying why.
    """
    under_twistd = reactor is None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    history = options["history"]
    try:
        store = make_store(options["store"], history, reactor)
    except StoreError as e:
        if not under_twistd:
            raise
        # twistd has not started logging yet: one line on stderr.
        print(f"chatd could not start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    limits = Limits(
        reactor,
        rate=options["rate-limit"],
        max_connections=options["max-connections"],
        max_connections_per_ip=options["max-connections-per-ip"],
        max_rooms=options["max-rooms"],
        rooms_per_ip_per_hour=options["rooms-per-hour"],
    )
    metrics = Metrics()
    node = node_name()
    bus = make_bus(options["bus"], store, reactor, node, metrics, options["bus-dsn"])
    core = ChatCore(
        store,
        reactor,
        history,
        limits=limits,
        max_body=options["max-message"],
        bus=bus,
        observer=metrics,
        guests=options["auth"] == "open",
        edit_window=options["edit-window"] or None,
        node=node,
    )
    passwords = Passwords(reactor)
    accounts = None
    sessions = None
    watch = None
    if options["auth"] == "accounts":
        watch = SessionWatch(store, reactor)
        # The deployment's secret signs the cookies: read from the store
        # once it is open.
        sessions = Sessions(
            store, reactor, lambda: cast(Any, store).secret, options["session-days"] * 86400
        )
        accounts = Accounts(store, reactor, passwords, sessions, options["signup"])
    auth = Authenticator(options["auth"], Keys(store, reactor), options["tokens"], sessions)
    metrics.watch_behind(lambda: core.behind)
    if not direct_writes_available():
        Logger().warn(
            "This Twisted's TCP transports are not laid out as chatd's direct "
            "writes expect (chatd._send): WebSocket frames take the transport's "
            "own, slower path."
        )
    connections = Connections(limits)
    factory = ChatWebSocketFactory(
        core, metrics=metrics, clock=reactor, connections=connections, auth=auth, sessions=watch
    )
    burst, per_second = options["api-rate"]
    web = ChatWeb(
        core,
        make_environment(options["templates"]),
        options["static"],
        WebSocketResource(factory),
        metrics=metrics,
        allow_origins=options["allow-origins"],
        serve_metrics=options["metrics-port"] is None,
        ready=False,
        public_urls=options["public-urls"],
        bus=bus,
        auth=auth,
        accounts=accounts,
        key_limiter=RateLimiter(reactor, burst, per_second),
        sessions=watch,
        clock=reactor,
    )
    # Idle connections are closed after IDLE_TIMEOUT (longer than any
    # long-poll), and every request must come within REQUEST_TIMEOUT.
    site = web.site(
        IDLE_TIMEOUT,
        REQUEST_TIMEOUT,
        connections=connections,
        access_log=options["access-log"] == "on",
        reactor=reactor,
        proxied=options["port"].startswith("haproxy:"),
    )
    service = ChatService(
        core,
        options["rooms"],
        store,
        reactor,
        web=web,
        websockets=factory,
        exit_on_failure=under_twistd,
        json_logs=options["log-format"] == "json",
        limits=limits,
        drain=options["drain"],
    )
    if IService.providedBy(bus):
        # A bus to other nodes: it connects once the core has loaded, and
        # this node's presence is shared with them.
        cast(IService, bus).setServiceParent(service)
        lease = options["presence-lease"]
        Presence(core, node, lease / 3, lease, reactor).setServiceParent(service)
    _Stopping(passwords.stop).setServiceParent(service)
    if watch is not None:
        # Sessions ended on other nodes (or by chatd-admin) end here too.
        recheck = TimerService(CACHE_TTL, watch.recheck)
        recheck.clock = reactor
        recheck.setServiceParent(service)
    if not IService.providedBy(bus) and not options["store"].startswith("memory:"):
        # One node on a store others may write to (chatd-admin, or a node
        # on another bus): catch up with it every little while.
        catch_up = TimerService(CATCH_UP_INTERVAL, core.catch_up)
        catch_up.clock = reactor
        catch_up.setServiceParent(service)
    listener = Listener(options["port"], serverFromString(reactor, options["port"]), site)
    listener.setServiceParent(service)
    listener.listened().addCallback(_listening, web)
    if options["metrics-port"] is not None:
        Listener(
            options["metrics-port"],
            serverFromString(reactor, options["metrics-port"]),
            Site(_MetricsPage(metrics)),
        ).setServiceParent(service)
    if options["retain-days"]:
        retention = Retention(core, reactor, options["retain-days"])
        timer = TimerService(RETENTION_INTERVAL, retention.run)
        timer.clock = reactor
        timer.setServiceParent(service)
    return service


#: How often a node with no bus between processes checks the store for
#: commits it did not make.
CATCH_UP_INTERVAL = 5.0


class _Stopping(Service):
    """
    Calls C{stop} when the service stops (a thread pool's, say).
    """

    def __init__(self, stop: Any) -> None:
        self._stop = stop

    def stopService(self) -> None:
        super().stopService()
        self._stop()


def _listening(listener: Listener, web: ChatWeb) -> None:
    """
    Tell the web adapter where its site listens, once it does (it warns
    if DNS rebinding can reach it).
    """
    if listener.port is not None:
        web.listening(listener.port.getHost())


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
