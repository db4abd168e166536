"""Digits prediction service (BentoML). Start it with ``bentoml serve service:Digits``."""

from service.service import Digits

__all__ = ["Digits"]
