"""The AMQP side: topology, the broker connection and declarations, deliveries, acknowledgements
and result publishing. Every use of aiormq/aio-pika internals is in ``fastpath/``, nowhere else.
"""
