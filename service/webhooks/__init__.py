"""Webhooks: a client's endpoints, the events of its tenant's deletion requests (settled, due soon), and the
outbox of deliveries that the workers send, signed as Standard Webhooks specifies (``worker/webhooks.py``)."""
