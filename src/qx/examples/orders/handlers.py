"""In-process handlers of the orders context's domain events."""

from __future__ import annotations

from collections import Counter
from typing import Any

from qx.core import InProcessDispatcher
from qx.examples.orders.domain import OrderPlaced, OrderShipped

__all__ = ["build_dispatcher"]


def build_dispatcher(seen: Counter[str] | None = None) -> InProcessDispatcher:
    """Return a dispatcher with the orders handlers; ``seen`` counts handled events by name."""
    dispatcher = InProcessDispatcher()
    counts = seen if seen is not None else Counter()

    @dispatcher.handler(OrderPlaced)
    async def on_order_placed(event: OrderPlaced, uow: Any) -> None:
        counts["OrderPlaced"] += 1

    @dispatcher.handler(OrderShipped)
    async def on_order_shipped(event: OrderShipped, uow: Any) -> None:
        counts["OrderShipped"] += 1

    return dispatcher
