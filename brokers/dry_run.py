"""``DryRunBroker``: wraps whichever broker was chosen; reads pass through, writes are never sent.

This is the only place a dry run differs from a real run (``agent.py`` wraps the broker once). The order
intent is still journalled by the executor, with status ``dry_run``.
"""

from __future__ import annotations

from datetime import datetime

from brokers.base import Account, Broker, Clock, Order, OrderPreview, OrderRequest, OrderStatus, Position
from config.errors import OrderRejected


class DryRunBroker:
    """A ``Broker`` that answers reads from ``inner`` and turns every order into a ``dry_run`` record."""

    def __init__(self, inner: Broker, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock
        self._orders: dict[str, Order] = {}

    def account(self) -> Account:
        return self._inner.account()

    def positions(self) -> list[Position]:
        return self._inner.positions()

    def open_orders(self) -> list[Order]:
        return self._inner.open_orders()

    def preview_order(self, request: OrderRequest) -> OrderPreview:
        return self._inner.preview_order(request)

    def place_order(self, request: OrderRequest) -> Order:
        now: datetime = self._clock()
        order = Order(
            broker_order_id=f"dry-{request.client_order_id}",
            client_order_id=request.client_order_id,
            symbol=request.symbol,
            side=request.side,
            quantity=request.quantity,
            order_type=request.order_type,
            limit_price=request.limit_price,
            aux_price=request.aux_price,
            status=OrderStatus.DRY_RUN,
            created_at=now,
            updated_at=now,
            message="dry run: not sent to the broker",
        )
        self._orders[request.client_order_id] = order
        return order

    def cancel_order(self, broker_order_id: str) -> Order:
        """A cancel is a write too: it is described, never sent."""
        known = [o for o in self._orders.values() if o.broker_order_id == broker_order_id]
        known += [o for o in self._inner.open_orders() if o.broker_order_id == broker_order_id]
        if not known:
            raise OrderRejected(f"Could not cancel order {broker_order_id}: no such open order. Nothing was sent.")
        return known[0].model_copy(update={"message": "dry run: cancel not sent to the broker"})

    def find_order(self, client_order_id: str) -> Order | None:
        return self._orders.get(client_order_id) or self._inner.find_order(client_order_id)

    def close(self) -> None:
        self._inner.close()
