# -*- test-case-name: tests.test_bus -*-
"""
The in-process bus: hints go straight to the listeners of this process.

With one chatd process it is all a bus needs to be (its only listener is
the process's own core, which has already delivered what it committed).
Several cores in one process (tests, or an application embedding chatd)
may share one to act as nodes of one service.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from chatd.interfaces import IBus, IBusListener, IBusSubscription
from chatd.model import Message

__all__ = ["LocalBus", "Subscription"]


@implementer(IBusSubscription)
class Subscription:
    """
    A listener's place on a bus (any bus with a C{_remove}).
    """

    __slots__ = ("_bus", "listener")

    def __init__(self, bus: Any, listener: IBusListener) -> None:
        self._bus = bus
        self.listener = listener

    def stop(self) -> None:
        self._bus._remove(self)


@implementer(IBus)
class LocalBus:
    """
    Publishes to this process's listeners, synchronously and in order.
    """

    log = Logger()
    description = "local"

    def __init__(self) -> None:
        self._subscriptions: List[Subscription] = []

    def publish(self, room: str, last_seq: int, messages: Sequence[Message]) -> None:
        for subscription in list(self._subscriptions):
            try:
                subscription.listener.hint(room, last_seq, messages)
            except Exception:
                # One listener's failure is its own.
                self.log.failure("A bus listener failed on a hint for {room}", room=room)

    def subscribe(self, listener: IBusListener) -> IBusSubscription:
        subscription = Subscription(self, listener)
        self._subscriptions.append(subscription)
        try:
            listener.catch_up()
        except Exception:
            self.log.failure("A bus listener failed to catch up")
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
