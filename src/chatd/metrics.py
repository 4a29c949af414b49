# -*- test-case-name: tests.test_hardening -*-
"""
Prometheus metrics, through the prometheus_client library.

The core reports commits and fan-outs to an observer (L{Metrics}); the
adapters count connections, posts and rejections.  Each chatd service has
its own registry, so tests and embedded servers never share counters.
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """
    chatd's metrics and their registry.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "chatd_connections", "Open connections.", ["transport"], registry=r
        )
        self.posted = Counter(
            "chatd_messages_posted", "Messages stored, by the transport they came in on.",
            ["transport"], registry=r,
        )
        self.delivered = Counter(
            "chatd_messages_delivered", "Messages handed to clients, by transport.",
            ["transport"], registry=r,
        )
        self.rejected = Counter(
            "chatd_rejected", "Requests and frames refused, by reason.", ["reason"], registry=r
        )
        self.waiters = Gauge("chatd_longpoll_waiters", "Long-poll requests waiting.", registry=r)
        self.delivery_latency = Histogram(
            "chatd_delivery_latency_seconds",
            "From a message arriving to its delivery to the room's clients.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.commit_latency = Histogram(
            "chatd_store_commit_seconds",
            "From a message arriving to the store's commit of it.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.gap_filled = Counter(
            "chatd_gap_filled_messages",
            "Messages read from the store to fill a gap in a room's seqs (messages "
            "committed elsewhere or reported out of order).",
            registry=r,
        )
        self.gap_fills = Counter(
            "chatd_gap_fills", "Reads from the store that filled a gap in a room's seqs.", registry=r
        )
        self.lag = Histogram(
            "chatd_delivery_lag_seconds",
            "For messages committed by another node (or seen late): from the message's "
            "time to its delivery here (so it includes clock differences between nodes).",
            buckets=_LATENCY_BUCKETS + (5.0, 10.0), registry=r,
        )
        self.behind = Gauge(
            "chatd_messages_behind",
            "Messages the store holds that this node has not delivered yet, over all rooms.",
            registry=r,
        )
        self.bus_states = Enum(
            "chatd_bus_state",
            "The bus to the other nodes: connected, connecting, disconnected (reading the "
            "store every poll interval meanwhile), or stopped.",
            states=["stopped", "connecting", "connected", "disconnected"],
            registry=r,
        )
        self.bus_connects = Counter(
            "chatd_bus_connects", "Times the bus connected (the first time included).", registry=r
        )
        self.bus_heard = Counter(
            "chatd_bus_heartbeats_heard",
            "This node's own heartbeats heard back through the bus.",
            registry=r,
        )
        self.notify_queue = Gauge(
            "chatd_bus_notify_queue_usage",
            "PostgreSQL's NOTIFY queue, as the fraction in use (pg_notification_queue_usage; "
            "a full queue makes every announcing commit fail).",
            registry=r,
        )
        self.events = Counter(
            "chatd_room_events",
            "Events this node committed to rooms' logs, by kind (message, member, edit, "
            "delete, moderation, room) and, for moderation, action (kick, ban, ...).",
            ["kind", "action"], registry=r,
        )
        self.read_markers = Counter(
            "chatd_read_markers_written", "Read markers written to the store.", registry=r
        )
        self._event_children: dict = {}
        for kind in ("message", "member", "edit", "delete", "room"):
            self.events.labels(kind, "")
        for action in ("kick", "ban", "unban", "mute", "unmute"):
            self.events.labels("moderation", action)
        self.typing_signals = Counter(
            "chatd_typing_signals",
            "Typing signals, by what became of them: started, stopped, expired (6 s after "
            "the last start), dropped (too soon after the last start, or too many typing), "
            "remote (from another node).",
            ["event"], registry=r,
        )
        self.presence_frames = Counter(
            "chatd_presence_frames",
            "Presence and typing frames sent to WebSocket and SSE clients, by kind.",
            ["kind"], registry=r,
        )
        for event in ("started", "stopped", "expired", "dropped", "remote"):
            self.typing_signals.labels(event)
        for kind in ("presence", "typing"):
            self.presence_frames.labels(kind)
        for transport in ("websocket", "longpoll", "sse"):
            self.connections.labels(transport)
            self.posted.labels(transport)
            self.delivered.labels(transport)
        # The children every connection and every delivery counts in,
        # looked up once (labels() takes the metric's lock).
        self.websocket_connections = self.connections.labels("websocket")
        self.websocket_posted = self.posted.labels("websocket")
        self._delivered_websocket = self.delivered.labels("websocket")
        self._delivered_longpoll = self.delivered.labels("longpoll")

    def watch_waiters(self, count: Callable[[], int]) -> None:
        """
        Read the number of waiting long-polls from C{count} at each scrape.
        """
        self.waiters.set_function(count)

    # The core's observer interface.

    def committed(self, seconds: float) -> None:
        self.commit_latency.observe(seconds)

    def event(self, kind: str, action: str = "") -> None:
        # Every post comes here: the labelled child is looked up once.
        child = self._event_children.get((kind, action))
        if child is None:
            child = self._event_children[(kind, action)] = self.events.labels(kind, action)
        child.inc()

    def markers_written(self, count: int) -> None:
        self.read_markers.inc(count)

    def delivered_to(self, subscribers: int, waiters: int, seconds: Optional[float]) -> None:
        if subscribers:
            self._delivered_websocket.inc(subscribers)
        if waiters:
            self._delivered_longpoll.inc(waiters)
        if seconds is not None:
            # Only for this node's own posts: a message from another node
            # arrived at this one at a time this node does not know.
            self.delivery_latency.observe(seconds)

    def filled(self, room: str, messages: int) -> None:
        self.gap_fills.inc()
        self.gap_filled.inc(messages)

    def arrived_late(self, seconds: float) -> None:
        self.lag.observe(seconds)

    def watch_behind(self, count: Callable[[], int]) -> None:
        """
        Read how far behind the store this node is from C{count}.
        """
        self.behind.set_function(count)

    # Presence's observer interface (L{chatd.presence}).

    def typing_signal(self, event: str) -> None:
        self.typing_signals.labels(event).inc()

    def presence_frame(self, kind: str, count: int) -> None:
        if count:
            self.presence_frames.labels(kind).inc(count)

    # The bus's observer interface.

    def bus_state(self, state: str) -> None:
        self.bus_states.state(state)
        if state == "connected":
            self.bus_connects.inc()

    def bus_heartbeat(self) -> None:
        self.bus_heard.inc()

    def bus_queue_usage(self, fraction: float) -> None:
        self.notify_queue.set(fraction)

    def render(self) -> bytes:
        """
        The Prometheus text exposition of every metric.
        """
        return generate_latest(self.registry)


