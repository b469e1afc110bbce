"""The compliance console: server-rendered pages for people, mounted by the API at ``/console``."""
