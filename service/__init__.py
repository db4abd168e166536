"""Digits prediction service (BentoML). Start it with ``bentoml serve service:Digits``.

``Digits`` is imported on first use, so importing a light module such as :mod:`service.client` does
not load BentoML and TensorFlow.
"""

from typing import Any

__all__ = ["Digits"]


def __getattr__(name: str) -> Any:
    if name == "Digits":
        from service.service import Digits

        return Digits
    raise AttributeError(f"module 'service' has no attribute {name!r}")
