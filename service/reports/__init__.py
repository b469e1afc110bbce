"""Erasure reports: one signed, canonical JSON document per settled deletion request.

The facts are generated in the transaction that settles the request (``generation.py``, run by the worker
or the API), so they are fixed when the request is; the API signs them on first download, naming its key
inside the signed bytes (``service.py``), and serves those same bytes afterwards, so a key rotation never
re-signs an issued report. Only the API holds the signing key: the GPU workers never do.
"""
