"""Erasure reports: one signed, canonical JSON document per settled deletion request.

The content is fixed by the request's settled state (request, job metrics, versions); the API issues and
signs it on first download and stores it, so later downloads serve the same bytes and a key rotation never
re-signs an issued report. Only the API holds the signing key: the GPU workers never do.
"""
