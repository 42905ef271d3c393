"""Choreography: services that react to Accord's transactions as events, through the
relay (``accord relay``) and NATS JetStream, instead of being called by an orchestrator.

- :mod:`.shop`: a checkout is one 2PC at the bank (debit the customer, credit the
  shop), idempotency key ``order-<id>``, the order (id, item) in the debit's payload.
- :mod:`.shipping` (a process): a durable JetStream consumer on ``accord.*.2pc.>``. It
  remembers each order from its transaction's ``preparing`` event and ships it on the
  ``committed`` one; an item containing ``fragile`` cannot be shipped, and it publishes
  ``shop.shipment.failed`` (``shop.shipment.shipped`` otherwise).
- :mod:`.refund` (a process): a durable consumer on ``shop.shipment.failed``; it gives
  the money back with a 2PC of its own (debit the shop, credit the customer, key
  ``refund-<order>``), which the relay publishes in turn (shipping ignores it: it is
  not an order).

Each service acknowledges a message only after acting on it, and acts idempotently
(shipping keeps its shipments in SQLite, a refund's 2PC has an idempotency key), so a
crash and a redelivery change nothing.

Run (with a coordinator, the bank, nats-server -js and the relay running)::

    python -m accord.client.examples.choreography.shipping --nats URL --db shipping.db
    python -m accord.client.examples.choreography.refund --nats URL --coordinator ADDR
    python -m accord.client.examples.choreography.shop ADDR ORDER_ID ITEM AMOUNT
"""
