# -*- test-case-name: tests.test_hardening -*-
"""
Abuse limits, with no I/O: token buckets for posting and room creation,
and counters for concurrent connections.  Time comes only from the clock
they are given.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Optional

from twisted.internet.interfaces import IReactorTime

from chatd.model import ChatError, Peer, rate_limited, too_many_rooms

__all__ = [
    "Connections",
    "DEFAULT_RATE",
    "Limits",
    "RateLimiter",
    "Ticket",
    "parse_rate",
    "server_full",
    "unlimited_ticket",
]

#: Posting: bursts of 10, then 5 messages a second, per connection and per IP.
DEFAULT_RATE = "10/5"


def parse_rate(text: str) -> Optional[tuple]:
    """
    Parse C{BURST/PER_SECOND} (e.g. C{10/5}), or C{off} for no limit.

    @return: C{(burst, per_second)}, or C{None} for C{off}.
    @raise ValueError: with a sentence saying what is wrong.
    """
    if text.strip().lower() == "off":
        return None
    try:
        burst_text, rate_text = text.split("/")
        burst, rate = int(burst_text), float(rate_text)
    except ValueError:
        raise ValueError(f"{text!r} is not BURST/PER_SECOND (e.g. 10/5) or off") from None
    if burst < 1 or not 0 < rate < float("inf"):
        raise ValueError(f"{text!r}: BURST must be at least 1 and PER_SECOND above 0")
    return burst, rate


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """
    One token bucket per key: C{burst} tokens, refilled at C{rate} a
    second.  Buckets that have refilled completely are forgotten, so memory
    is bounded by the keys active within the last C{burst / rate} seconds.
    """

    def __init__(self, clock: IReactorTime, burst: int, rate: float) -> None:
        self._clock = clock
        self.burst = burst
        self.rate = rate
        self._buckets: Dict[Hashable, _Bucket] = {}
        self._next_sweep = 0.0

    def take(self, key: Hashable) -> float:
        """
        Take one token for C{key}.

        @return: 0 if allowed, else the seconds until a token is available.
        """
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if now >= self._next_sweep:
            self._sweep(now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def _sweep(self, now: float) -> None:
        full = self.burst / self.rate
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items() if now - bucket.stamp < full
        }
        self._next_sweep = now + max(full, 1.0)

    def __len__(self) -> int:
        return len(self._buckets)


class Ticket:
    """
    A place among the server's concurrent connections, taken by
    L{Limits.admit}; L{release} it when the connection ends (safe to call
    twice).
    """

    __slots__ = ("_limits", "_ip")

    def __init__(self, limits: Optional["Limits"], ip: str) -> None:
        self._limits = limits
        self._ip = ip

    def release(self) -> None:
        """
        Give the place back.
        """
        limits, self._limits = self._limits, None
        if limits is not None:
            limits.release(self._ip)


def server_full() -> ChatError:
    """
    C{server_full}: the server holds all the connections it may.
    """
    return ChatError("server_full", "The server has no room for more connections.", 5.0)


def unlimited_ticket(ip: str) -> Ticket:
    """
    A ticket of no limits: releasing it does nothing.
    """
    return Ticket(None, ip)


class Limits:
    """
    Every limit chatd enforces, with its defaults, and the counters they
    are checked against.  Nothing else changes the counters: connections
    are counted by L{admit} and L{release}.

    @ivar posting_by_ip: per-IP posting buckets, or C{None} when rate
        limiting is off (likewise C{posting_by_connection}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: Optional[tuple] = (10, 5.0),
        max_connections: int = 10_000,
        max_connections_per_ip: int = 100,
        max_rooms: int = 1_000,
        rooms_per_ip_per_hour: int = 20,
    ) -> None:
        self.posting_by_ip = RateLimiter(clock, *rate) if rate else None
        self.posting_by_connection = RateLimiter(clock, *rate) if rate else None
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.max_rooms = max_rooms
        self.rooms_by_ip = (
            RateLimiter(clock, rooms_per_ip_per_hour, rooms_per_ip_per_hour / 3600.0)
            if rooms_per_ip_per_hour
            else None
        )
        self._connections = 0
        self._connections_by_ip: Dict[str, int] = {}

    @property
    def connections(self) -> int:
        """
        How many connections hold a place now.
        """
        return self._connections

    def connections_from(self, ip: str) -> int:
        """
        How many connections from C{ip} hold a place now.
        """
        return self._connections_by_ip.get(ip, 0)

    def fit_descriptors(self, usable: int) -> None:
        """
        The process may hold only C{usable} connections (its descriptor
        limit, less what it keeps in reserve): lower the total cap to that.
        """
        self.max_connections = max(1, min(self.max_connections, usable))

    def admit(self, ip: str) -> Ticket:
        """
        Take a place for a connection.

        @raise ChatError: C{server_full} or C{too_many_connections}.
        """
        if self._connections >= self.max_connections:
            raise server_full()
        mine = self._connections_by_ip.get(ip, 0)
        if mine >= self.max_connections_per_ip:
            raise ChatError(
                "too_many_connections",
                f"{ip} already has {mine} connections open; close some first.",
                5.0,
            )
        self._connections += 1
        self._connections_by_ip[ip] = mine + 1
        return Ticket(self, ip)

    def release(self, ip: str) -> None:
        """
        A connection from C{ip} ended (called by its L{Ticket}).
        """
        self._connections -= 1
        left = self._connections_by_ip[ip] - 1
        if left:
            self._connections_by_ip[ip] = left
        else:
            del self._connections_by_ip[ip]

    def check_post(self, peer: Peer) -> None:
        """
        Take a posting token for C{peer}'s IP and connection.

        @raise ChatError: C{rate_limited}.
        """
        if self.posting_by_ip is None or self.posting_by_connection is None:
            return
        wait = self.posting_by_ip.take(peer.ip)
        if not wait and peer.connection is not None:
            wait = self.posting_by_connection.take(peer.connection)
        if wait:
            raise rate_limited("Too many messages", wait)

    def check_room_creation(self, peer: Peer, rooms: int) -> None:
        """
        May C{peer} create a room, with C{rooms} rooms there already?

        @raise ChatError: C{too_many_rooms} or C{rate_limited}.
        """
        if rooms >= self.max_rooms:
            raise too_many_rooms(self.max_rooms)
        if self.rooms_by_ip is not None:
            wait = self.rooms_by_ip.take(peer.ip)
            if wait:
                raise rate_limited(f"Too many rooms created from {peer.ip}", wait)


class Connections:
    """
    Every open connection's place, from its accept to its close, whichever
    protocol ends up owning it (an HTTP channel, then perhaps the WebSocket
    it was upgraded to): each place is kept under the connection's
    transport.

    Past the total cap a few connections more are let in as I{spares},
    which may only ask for health checks, so a load balancer's probe still
    gets its answer when the server is full; past those, connections are
    refused.

    @ivar spares: how many spare connections may be open at once.
    @ivar spares_per_ip: how many of them one IP may hold.
    @ivar refusing: connections now being told they are refused.
    """

    def __init__(self, limits: Optional[Limits], spares: int = 16, spares_per_ip: int = 2) -> None:
        self._limits = limits
        self.spares = spares
        self.spares_per_ip = spares_per_ip
        self._open: Dict[Any, Ticket] = {}
        #: The spare connections, with their IPs.
        self._spare: Dict[Any, str] = {}
        self._spares_by_ip: Dict[str, int] = {}
        self.refusing = 0

    def __len__(self) -> int:
        return len(self._open) + len(self._spare)

    def open(self, transport: Any, ip: str) -> bool:
        """
        Take a place for the connection on C{transport}, from C{ip}.

        @return: whether it is a spare (health checks only).
        @raise ChatError: C{server_full} or C{too_many_connections}.
        """
        if self._limits is None:
            self._open[transport] = unlimited_ticket(ip)
            return False
        try:
            self._open[transport] = self._limits.admit(ip)
            return False
        except ChatError as e:
            mine = self._spares_by_ip.get(ip, 0)
            if e.code != "server_full" or len(self._spare) >= self.spares or mine >= self.spares_per_ip:
                raise
        self._spare[transport] = ip
        self._spares_by_ip[ip] = mine + 1
        return True

    def close(self, transport: Any) -> None:
        """
        The connection on C{transport} is gone: give its place back (safe
        to call twice, or for a connection that holds none).
        """
        ticket = self._open.pop(transport, None)
        if ticket is not None:
            ticket.release()
            return
        ip = self._spare.pop(transport, None)
        if ip is not None:
            left = self._spares_by_ip[ip] - 1
            if left:
                self._spares_by_ip[ip] = left
            else:
                del self._spares_by_ip[ip]
