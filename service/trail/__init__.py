"""The audit trail: an append-only, hash-chained log of everything that happened to requests, jobs,
versions, samples and reports. Each event's hash covers the previous event's hash, so editing, inserting or
deleting a row anywhere breaks the chain from there on; on Postgres a trigger refuses UPDATE and DELETE."""
