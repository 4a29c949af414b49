# -*- test-case-name: tests.test_bus -*-
"""
The PostgreSQL bus: C{NOTIFY} from the store's own append transaction,
C{LISTEN} on one dedicated connection read on the reactor.

Announcing from inside the transaction that stores the messages means an
announcement is sent if and only if its commit happens, and PostgreSQL
delivers notifications in commit order, which is seq order (the room rows
are locked until commit).  So this bus's L{publish} does nothing: the
store has published by the time the core hears of its commit
(L{chatd.store._sql.SQLStore.notify_commits}, wired in L{chatd.tap}).

The listening connection is psycopg 3's, in autocommit mode, made in a
thread (connecting blocks) and then read on the reactor: the reactor
watches its socket (L{IReactorFDSet.addReader}) and, whenever it is
readable, psycopg's own C{notifies(timeout=0)} hands over what arrived
without waiting.  It must be a direct connection (C{--bus-dsn}): a
pooler in transaction mode hands LISTEN's session to someone else.

Heartbeats go out through the store's own connections
(L{chatd.store.postgres.PostgresStore.announce}), so that a listening
connection that hears nothing while the database works is caught; each
also reads C{pg_notification_queue_usage()} for the metrics (a full queue
makes every announcing commit fail).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Deque, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd.bus._remote import RemoteBus
from chatd.model import Message

__all__ = ["PostgresBus", "MAX_PAYLOAD"]

#: PostgreSQL refuses payloads of 8000 bytes or more; hints stay well under.
MAX_PAYLOAD = 7000
#: Signals waiting to be sent past which more are dropped (a slow database
#: must not grow this node's memory; a lost typing signal expires anyway).
MAX_QUEUED_SIGNALS = 100


@implementer(IReadDescriptor)
class _Reader:
    """
    The listening connection's socket, as the reactor watches it.

    The reactor watches a duplicate of libpq's descriptor: libpq closes
    its own as soon as it finds the connection broken, inside the read,
    and a reactor must never be left watching a closed (and perhaps
    reused) descriptor number.  The duplicate is closed only after the
    reactor has stopped watching it.
    """

    def __init__(self, bus: "PostgresBus", conn: Any) -> None:
        self._bus = bus
        self.conn = conn
        self._fileno = os.dup(conn.fileno())

    def close(self) -> None:
        """
        After the reactor no longer watches it: close the duplicate and
        the connection.
        """
        fileno, self._fileno = self._fileno, -1
        if fileno >= 0:
            os.close(fileno)
        try:
            self.conn.close()
        except Exception:
            pass

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "chatd-bus"

    def doRead(self) -> Optional[Failure]:
        """
        The socket is readable: take what arrived into libpq's buffer
        (without waiting: the reactor said there is something) and hand
        over the notifications in it.  libpq's own calls, through
        psycopg's documented C{pgconn}: C{Connection.notifies()}'s
        meaning of a zero timeout differs between psycopg versions.
        """
        import psycopg

        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as e:
            self._bus._lost(str(e).strip() or e.__class__.__name__)
            return None
        channel = self._bus.channel.encode("utf-8")
        while (notify := pgconn.notifies()) is not None:
            if notify.relname == channel:
                self._bus._heard(notify.extra)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._bus._lost(reason.getErrorMessage())


#: Seconds a connection attempt to listen on may take (unless the DSN
#: says otherwise): the thread making it must come back.
CONNECT_TIMEOUT = 5


def _with_timeout(conninfo: str) -> str:
    """
    C{conninfo} with libpq's C{connect_timeout}, if it has none.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        if "connect_timeout" in conninfo_to_dict(conninfo):
            return conninfo
    except Exception:
        # Not parseable: let connecting say what is wrong with it.
        return conninfo
    return make_conninfo(conninfo, connect_timeout=CONNECT_TIMEOUT)


def _describe(conninfo: str) -> str:
    """
    Host, port and database of a libpq connection string (no password).
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return "the database"
    host = params.get("host") or "localhost"
    port = params.get("port") or 5432
    return f"postgresql://{host}:{port}/{params.get('dbname', '')}"


class PostgresBus(RemoteBus):
    """
    Hints as PostgreSQL notifications on C{channel}.

    @param store: the L{chatd.store.postgres.PostgresStore} whose commits
        this bus hears (announced on its C{notify_channel}).
    @param conninfo: libpq connection string of a direct connection to
        the store's database, to listen on.
    """

    description = "postgresql"

    def __init__(self, reactor: Any, node: str, store: Any, conninfo: str, **kwargs: Any) -> None:
        super().__init__(reactor, node, MAX_PAYLOAD, **kwargs)
        self._reactor = reactor
        self._store = store
        self._conninfo = _with_timeout(conninfo)
        self.channel = store.notify_channel
        self.target = _describe(conninfo)
        self._reader: Optional[_Reader] = None
        #: Signals waiting for the one before them to be sent.
        self._signals: Deque[bytes] = deque()
        self._signalling = False

    def publish(self, room: str, last_seq: int, messages: Sequence[Message]) -> None:
        """
        Nothing to do: the store's transaction announced the commit.
        """

    def _connect(self) -> Deferred:
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._open)
        d.addCallback(self._listening)
        return d

    def _open(self) -> Any:
        """
        In a thread: connect and LISTEN.
        """
        import psycopg
        from psycopg import sql

        conn = psycopg.Connection.connect(
            self._conninfo, autocommit=True, application_name=f"chatd-bus {self.node}"
        )
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _listening(self, conn: Any) -> None:
        if not self.running:
            conn.close()
            return
        self._reader = reader = _Reader(self, conn)
        self._reactor.addReader(reader)
        # (What arrived while LISTEN ran, psycopg has taken already; the
        # catch-up that follows the connect reads it from the store.)

    def _send(self, payload: bytes) -> None:
        d = self._store.announce(payload)

        def usage(fraction: float) -> None:
            if self._observer is not None:
                self._observer.bus_queue_usage(fraction)

        def failed(failure: Failure) -> None:
            # The missing heartbeat will tell.
            self.log.warn("A heartbeat on the postgresql bus failed: {error}", error=failure.getErrorMessage())

        d.addCallbacks(usage, failed)

    def _send_signal(self, payload: bytes) -> None:
        """
        Signals go out one after the other, in the order sent (the
        store's connections could otherwise overtake each other: a stop
        heard before its start), at most L{MAX_QUEUED_SIGNALS} waiting.
        """
        if len(self._signals) >= MAX_QUEUED_SIGNALS:
            return
        self._signals.append(payload)
        if not self._signalling:
            self._next_signal()

    def _next_signal(self) -> None:
        if not self._signals or not self.running:
            self._signals.clear()
            self._signalling = False
            return
        self._signalling = True
        d = self._store.announce(self._signals.popleft())

        def failed(failure: Failure) -> None:
            self.log.warn("A signal on the postgresql bus failed: {error}", error=failure.getErrorMessage())

        d.addCallbacks(lambda _: None, failed)
        d.addCallback(lambda _: self._next_signal())

    def _disconnect(self) -> Deferred:
        reader, self._reader = self._reader, None
        if reader is not None:
            self._reactor.removeReader(reader)
            reader.close()
        return succeed(None)
