# -*- test-case-name: tests.test_bus -*-
"""
The in-process bus: hints go straight to the listeners of this process.

With one chatd process it is all a bus needs to be (its only listener is
the process's own core, which has already delivered what it committed).
Several cores in one process (tests, or an application embedding chatd)
may share one to act as nodes of one service.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from chatd.interfaces import IBus, IBusListener, IBusSubscription
from chatd.model import Message

__all__ = ["Listeners", "LocalBus", "Subscription"]

_log = Logger(namespace="chatd.bus")


@implementer(IBusSubscription)
class Subscription:
    """
    A listener's place among a bus's L{Listeners}.
    """

    __slots__ = ("_listeners", "listener")

    def __init__(self, listeners: "Listeners", listener: IBusListener) -> None:
        self._listeners = listeners
        self.listener = listener

    def stop(self) -> None:
        self._listeners.remove(self)


class Listeners:
    """
    A bus's listeners, each told on its own: one that raises is logged
    and costs the others nothing (what every bus shares).
    """

    def __init__(self) -> None:
        self._subscriptions: List[Subscription] = []

    def add(self, listener: IBusListener) -> Subscription:
        subscription = Subscription(self, listener)
        self._subscriptions.append(subscription)
        return subscription

    def remove(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def hint(self, room: str, last_seq: int, messages: Sequence[Message]) -> None:
        for subscription in list(self._subscriptions):
            try:
                subscription.listener.hint(room, last_seq, messages)
            except Exception:
                _log.failure("A bus listener failed on a hint for {room}", room=room)

    def signal(self, room: str, signal: Dict[str, Any]) -> None:
        for subscription in list(self._subscriptions):
            try:
                subscription.listener.signal(room, signal)
            except Exception:
                _log.failure("A bus listener failed on a signal for {room}", room=room)

    def catch_up(self, only: Optional[Subscription] = None) -> None:
        """
        Tell every listener (or C{only} that one) to catch up.
        """
        for subscription in [only] if only is not None else list(self._subscriptions):
            try:
                subscription.listener.catch_up()
            except Exception:
                _log.failure("A bus listener failed to catch up")


@implementer(IBus)
class LocalBus:
    """
    Publishes to this process's listeners, synchronously and in order.
    """

    description = "local"

    def __init__(self) -> None:
        self._listeners = Listeners()

    def publish(self, room: str, last_seq: int, messages: Sequence[Message]) -> None:
        self._listeners.hint(room, last_seq, messages)

    def subscribe(self, listener: IBusListener) -> IBusSubscription:
        subscription = self._listeners.add(listener)
        self._listeners.catch_up(subscription)
        return subscription

    def signal(self, room: str, signal: Dict[str, Any]) -> None:
        self._listeners.signal(room, signal)
