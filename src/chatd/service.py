# -*- test-case-name: tests.test_tap,tests.test_hardening -*-
"""
chatd's services: the root service that opens the store, loads the core
and shuts everything down in order; the listeners; the retention job.

Listening happens in C{privilegedStartService}, before twistd gives up
root (C{twistd --uid ... chatd --port tcp:80}); until the store is open
and the rooms are loaded, the site answers everything but C{/healthz}
with a 503 (L{chatd.web.ChatWeb.ready}).
"""

from __future__ import annotations

import atexit
import gc
import os
import platform
import resource
import signal
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, jsonFileLogObserver
from twisted.python.failure import Failure

import twisted
from chatd._version import __version__
from chatd.core import ChatCore
from chatd.interfaces import IMessageStore
from chatd.limits import Limits
from chatd.web import ChatWeb
from chatd.ws import ChatWebSocketFactory

__all__ = ["ChatService", "Listener", "Retention", "SHUTDOWN_TIMEOUT"]

#: The longest a shutdown waits for WebSockets to close and writes to finish.
SHUTDOWN_TIMEOUT = 10.0

#: Descriptors left out of the connection cap: the store, the logs, the
#: listening sockets, and the spare and refused connections
#: (L{chatd.limits.Connections}, L{chatd._http.REFUSALS}).
RESERVED_DESCRIPTORS = 64


def raise_descriptor_limit() -> Tuple[int, int, int]:
    """
    Raise the process's soft limit of open files to its hard limit (no
    privilege needed), so that connections, not a default of 1,024, are
    what the limits in L{chatd.limits} count.

    @return: the soft limit before and after, and the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = soft if hard == resource.RLIM_INFINITY else hard
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            wanted = soft
    return soft, max(soft, wanted), hard


def describe_address(port: IListeningPort) -> str:
    """
    Where a port listens, as a person would write it.
    """
    host: Any = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


class Listener(Service):
    """
    Listens on one endpoint in C{privilegedStartService} (or in
    C{startService}, if nothing called that first), and remembers how that
    went.

    @ivar description: the endpoint as the user gave it (C{tcp:8080}).
    @ivar port: the listening port, once listening.
    @ivar failure: why listening failed, if it did.
    """

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, factory: Any) -> None:
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        self.port: Optional[IListeningPort] = None
        self.failure: Optional[Failure] = None
        self._listening: Optional[Deferred] = None
        self._waiting: List[Deferred] = []

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._listening = self._endpoint.listen(self._factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def startService(self) -> None:
        Service.startService(self)
        if self._listening is None:
            self.privilegedStartService()

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self._done()

    def _failed(self, failure: Failure) -> None:
        self.failure = failure
        self._done()

    def _done(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self)

    def listened(self) -> Deferred:
        """
        A Deferred firing with this listener once it listens or has failed.
        """
        if self.port is not None or self.failure is not None:
            return succeed(self)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Deferred:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return maybeDeferred(port.stopListening)
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        return succeed(None)


class Retention:
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


class Presence(Service):
    """
    Shares this node's client counts with the other nodes: a lease in the
    store renewed every C{interval} seconds and valid for C{ttl}, so a
    node that dies without a word drops out of every count within C{ttl}.
    A node that stops cleanly withdraws its lease at once.
    """

    log = Logger()

    def __init__(self, core: ChatCore, node: str, interval: float, ttl: float, clock: Any) -> None:
        self._core = core
        self._node = node
        self._ttl = ttl
        self._loop = LoopingCall(self._share)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(self._interval, now=True)

    def _share(self) -> Deferred:
        def failed(failure: Failure) -> None:
            self.log.failure("Sharing this node's presence failed", failure)

        return self._core.share_presence(self._node, self._ttl).addErrback(failed)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        d = self._core.withdraw_presence(self._node)
        return d.addErrback(lambda f: self.log.failure("Withdrawing this node's presence failed", f))


#: The garbage collector's thresholds once chatd serves (Python's are
#: 700, 10, 10): a young-generation collection every 10,000 allocations
#: net rather than every 700.  Each connection, request and delivery
#: allocates containers that mostly live on (a connection's objects) or
#: die by reference counting, so collections found little: in a storm of
#: 10,000 WebSocket clients reconnecting, Python's thresholds ran 1,391
#: collections that took 1.38 s, a quarter of the server's CPU; these run
#: 92 in 0.6 s.  A young collection still walks at most some 10,000
#: objects, and a middle one some 100,000 (a few milliseconds).
GC_THRESHOLDS = (10_000, 10, 10)


def _freeze_startup_objects() -> None:
    """
    Leave what start-up made (modules, classes, templates, the rooms'
    history: most of the process's objects) out of every later garbage
    collection, and collect less often from then on (L{GC_THRESHOLDS}).
    Waiting long-polls and their callbacks live long enough to reach the
    oldest generation, so full collections come often under load; without
    the freeze each one walked every module object as well.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class ChatService(MultiService):
    """
    chatd's root service.  Its listeners listen first (privileged); then
    it opens the store, loads the core's rooms, starts its other children
    (the retention job) and lets the site serve.

    @ivar ready: a Deferred that fires once chatd serves requests (or
        fails, if it cannot start).
    @ivar ports: the listening ports, once listening.
    @param drain: seconds to go on serving, not ready, before stopping
        (L{stopService}).
    """

    log = Logger()

    def __init__(
        self,
        core: ChatCore,
        rooms: Sequence[str],
        store: IMessageStore,
        reactor: Any,
        web: ChatWeb,
        websockets: ChatWebSocketFactory,
        exit_on_failure: bool = False,
        json_logs: bool = False,
        limits: Optional[Limits] = None,
        drain: float = 0.0,
    ) -> None:
        super().__init__()
        self._drain = drain
        #: Ends the drain period early, while one runs.
        self._end_drain: Optional[Callable[[], None]] = None
        self._sigterms = 0
        self.core = core
        self._limits = limits
        self.store = store
        self.web = web
        self.websockets = websockets
        self._rooms = list(rooms)
        self._reactor = reactor
        self._exit_on_failure = exit_on_failure
        self._json_logs = json_logs
        self.ready: Optional[Deferred] = None
        #: Set once stopService is called: who waits for it to finish.
        self._stopping: Optional[List[Deferred]] = None
        self._stopped = False
        self._listening = False

    @property
    def ports(self) -> List[IListeningPort]:
        return [s.port for s in self if isinstance(s, Listener) and s.port is not None]

    def _listeners(self) -> List[Listener]:
        return [s for s in self if isinstance(s, Listener)]

    def setServiceParent(self, parent: Any) -> None:
        """
        Under twistd the parent is the application; twistd starts logging
        after this, with the application's log observer if it has one.
        """
        if self._json_logs and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, jsonFileLogObserver(sys.stdout, recordSeparator=""))
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # Only the listeners start here (while twistd may still be root);
        # the store is opened in startService, after any --uid switch.
        Service.privilegedStartService(self)
        self._listening = True
        self.log.info(
            "chatd {version} starting (Python {python}, Twisted {twisted})",
            version=__version__,
            python=platform.python_version(),
            twisted=twisted.__version__,
        )
        self._fit_descriptors()
        for listener in self._listeners():
            listener.privilegedStartService()

    def _fit_descriptors(self) -> None:
        before, after, hard = raise_descriptor_limit()
        if self._limits is None:
            return
        self._limits.fit_descriptors(after - RESERVED_DESCRIPTORS)
        self.log.info(
            "Open files: soft limit {before}, now {after} (hard limit {hard}); "
            "at most {connections} connections, {per_ip} from one IP",
            before=before,
            after=after,
            hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
            connections=self._limits.max_connections,
            per_ip=self._limits.max_connections_per_ip,
        )
        if self._limits.max_connections_per_ip >= self._limits.max_connections:
            self.log.warn(
                "One IP may hold every connection: --max-connections-per-ip "
                "{per_ip} is not below the {connections} connections this process may hold",
                per_ip=self._limits.max_connections_per_ip,
                connections=self._limits.max_connections,
            )

    def startService(self) -> None:
        if not self._listening:
            self.privilegedStartService()
        Service.startService(self)

        async def start() -> None:
            for listener in self._listeners():
                await listener.listened()
                if listener.failure is not None:
                    raise _StartupError(
                        f"cannot listen on {listener.description}: "
                        f"{listener.failure.getErrorMessage()}"
                    )
            for listener in self._listeners():
                listener.startService()
            version = await self.store.open()
            self.log.info(
                "Store: {store}{schema}",
                store=self.store.description,
                schema=f" (schema v{version})" if isinstance(version, int) else "",
            )
            await self.core.start(self._rooms)
            for service in self:
                if not service.running:
                    service.startService()
            self.web.ready = True
            # Said once requests are served (until now they were 503s).
            for listener in self._listeners():
                assert listener.port is not None
                self.log.info(
                    "chatd listening on {address}",
                    address=describe_address(listener.port),
                    endpoint=listener.description,
                    rooms=len(self.core.rooms()),
                )
            if self._exit_on_failure:
                _freeze_startup_objects()

        def failed(failure: Failure) -> Failure:
            self.log.critical("chatd could not start: {error}", error=failure.getErrorMessage())
            if self._exit_on_failure:
                self._exit()
            return failure

        ready: Deferred = Deferred()

        def begin() -> None:
            # Once the reactor runs (at once if it does already): its own
            # signal handlers are in place by then, so chatd's SIGTERM
            # handler replaces them before chatd says it is listening.
            if self._exit_on_failure:
                self._install_sigterm()
            Deferred.fromCoroutine(start()).addErrback(failed).chainDeferred(ready)

        self.ready = ready
        self._reactor.callWhenRunning(begin)

    def _exit(self) -> None:
        """
        Under twistd: stop, and exit with status 1 so that a supervisor
        sees the failure (twistd itself would exit 0).  The status is set
        as the interpreter exits, after twistd has removed its pid file.
        """

        def exit_1() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        atexit.register(exit_1)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    def _install_sigterm(self) -> None:
        """
        twistd ends itself with SIGTERM after a SIGTERM-initiated shutdown
        (exit status 143); a clean shutdown should say 0.  This handler,
        installed once the reactor runs (after the reactor's own), stops
        the reactor the same way without recording the signal.

        A second SIGTERM during the drain period (L{stopService}) ends it
        at once.
        """
        reactor = self._reactor

        def on_sigterm(signum: int, frame: Any) -> None:
            self._sigterms += 1
            if self._sigterms > 1:
                self.log.info("Received SIGTERM again: ending the drain now.")
                reactor.callFromThread(self._end_drain_now)
                return
            self.log.info("Received SIGTERM, shutting down.")
            reactor.callFromThread(reactor.stop)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _end_drain_now(self) -> None:
        if self._end_drain is not None:
            self._end_drain()

    def _drain_period(self) -> Deferred:
        """
        Go on serving for the drain period, not ready: a Deferred that
        fires when it is over (or ended early, L{_install_sigterm}).
        """
        polls = self.core.release_waiters()
        streams = self.web.end_streams() if self.web is not None else 0
        self.log.info(
            "Draining for {seconds:g} s: /readyz answers 503, {polls} waiting "
            "long-polls answered, {streams} event streams ended; still serving",
            seconds=self._drain,
            polls=polls,
            streams=streams,
        )
        over: Deferred = Deferred()
        call = self._reactor.callLater(self._drain, over.callback, None)

        def end() -> None:
            if call.active():
                call.cancel()
                over.callback(None)

        self._end_drain = end
        return over

    def stopService(self) -> Deferred:
        """
        Shut down in order: drain (if a drain period was given), stop
        accepting, answer waiting long-polls, close WebSockets with 1001,
        let the store commit what it was given, all within
        SHUTDOWN_TIMEOUT seconds of the drain's end.

        The drain period is for a load balancer with active health checks
        on C{/readyz}: it answers 503 from the start of the drain, and the
        balancer takes the node out after its checks fail (HAProxy:
        C{inter} times C{fall}).  Meanwhile the node serves as before,
        except that long-polls are answered at once, those waiting and
        those still coming (with what is new, or nothing), so that their
        clients' next request goes through the balancer, to another node
        once this one is out.  New WebSockets are still accepted: the
        balancer may send clients here until its checks fail, and a
        refused handshake is a failure to its client: the chat page backs
        off before retrying, or, if WebSocket never worked for it yet,
        falls back to long-poll for good.  An accepted one works at once
        and, closed with 1001 at the drain's end, reconnects through the
        balancer with C{after=} and misses nothing.
        """
        if self._stopped:
            return succeed(None)
        if self._stopping is not None:
            # Stopping already: wait for that.
            done: Deferred = Deferred()
            self._stopping.append(done)
            return done
        self._stopping = []
        self.web.shutting_down = True

        async def stop() -> None:
            if self._drain > 0 and self.web.ready:
                await self._drain_period()
                self._end_drain = None
            Service.stopService(self)
            # Children that never started (the store failed to open) have
            # nothing to stop.
            await DeferredList(
                [maybeDeferred(s.stopService) for s in reversed(list(self)) if s.running],
                consumeErrors=True,
            )
            self.core.stop()
            released = self.core.release_waiters()
            if self.web is not None:
                self.web.end_streams()
            closing = len(self.websockets.connections)
            await self.websockets.shutdown(SHUTDOWN_TIMEOUT / 2, self._reactor)
            self.log.info(
                "Shut down: answered {polls} long-polls, closed {sockets} WebSockets",
                polls=released,
                sockets=closing,
            )
            # Read markers set in the last moments are kept.
            await self.core.flush_read_markers()
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


class _StartupError(Exception):
    """
    chatd cannot start; the message says why, in one line.
    """
