"""The unlearning engine: pure PyTorch, no HTTP and no database.

Entry point: ``worker.engine.api.unlearn``.
"""
