# -*- test-case-name: tests.test_limits -*-
"""
Abuse limits, with no I/O: token buckets for posting and room creation,
and counters for concurrent connections.  Time comes only from the clock
they are given.
"""

from __future__ import annotations

from typing import Dict, Hashable, Optional

from twisted.internet.interfaces import IReactorTime

__all__ = ["Limits", "RateLimiter", "parse_rate", "DEFAULT_RATE"]

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


class Limits:
    """
    Every limit chatd enforces, with its defaults.

    @ivar posting: per-IP and per-connection posting buckets, or C{None}
        when rate limiting is off.
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
        self.connections = 0
        self.connections_by_ip: Dict[str, int] = {}
