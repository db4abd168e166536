"""Errors the CLI reports as one line (kept free of heavy imports so the CLI starts fast)."""


class ExportError(RuntimeError):
    """The exported SavedModel cannot be trusted or placed; the message says why."""
