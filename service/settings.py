"""Service settings, read once from the environment (see docs/service.md, "Service configuration")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import contract


def _number(name: str, default: float, cast: type = int) -> float:
    value = os.environ.get(name)
    try:
        return cast(value) if value not in (None, "") else default
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise SystemExit(f"configuration error: {name}={value!r} is not {kind}") from None


def _bool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "default"):
        return default
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise SystemExit(f"configuration error: {name}={value!r} is not on/off (true/false, 1/0)")


def _int(name: str, default: int) -> int:
    return int(_number(name, default, int))


def _float(name: str, default: float) -> float:
    return _number(name, default, float)


MIN_ADMIN_TOKEN = 16


def _workers() -> int:
    """``SERVICE_WORKERS``, by default (or ``auto``) one per usable core: measured on 2 cores, 2 workers
    served 1.3x one worker's single-image requests (docs/performance.md)."""
    if os.environ.get("SERVICE_WORKERS", "").strip().lower() in ("", "auto"):
        from service.compute import usable_cores

        return usable_cores()
    return _int("SERVICE_WORKERS", 1)


def _challenger_uri(model_uri: str) -> str | None:
    """``models:/<name>@challenger`` beside a ``models:/<name>@<alias>`` MODEL_URI; None otherwise."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        return contract.registry_uri(model_uri.removeprefix("models:/").split("@")[0], contract.CHALLENGER)
    return None


@dataclass(frozen=True)
class Settings:
    model_uri: str
    tracking_uri: str
    reload_poll_seconds: float
    admin_token: str | None
    max_images_per_request: int
    max_body_bytes: int
    max_body_bytes_in_flight: int
    batching: bool
    batch_max_size: int
    batch_max_latency_ms: int
    workers: int
    timeout_s: int
    max_concurrency: int
    access_log: bool
    batch_max_queue_images: int
    grpc_port: int
    grpc_host: str
    grpc_max_message_bytes: int
    tracing: bool
    max_image_pixels: int
    image_decode_concurrency: int
    client_header_timeout_s: float
    client_body_timeout_s: float
    registry_timeout_s: float
    model_precision: str = "fp32"
    webhook_secret: str | None = None
    trusted_proxies: str = ""
    challenger_mode: str = "off"
    challenger_uri: str | None = None
    canary_percent: float = 10.0
    shadow_max_queue_images: int = 256
    shadow_percent: float = 100.0
    feedback: bool = False
    feedback_dir: str = "feedback"
    feedback_max_bytes: int = 256 * 1024 * 1024
    feedback_per_minute: int = 30
    warmup_batch_sizes: int = 64

    def __post_init__(self) -> None:
        if self.admin_token is not None and len(self.admin_token) < MIN_ADMIN_TOKEN:
            raise SystemExit(
                f"configuration error: ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN} characters (the failed-attempt limit "
                "is per worker, so it slows guessing; the token's length is what stops it)"
            )
        if self.model_precision not in ("fp32", "bf16", "auto"):
            raise SystemExit(f"configuration error: MODEL_PRECISION={self.model_precision!r} is not fp32, bf16 or auto")
        if self.batching and self.batch_max_size < 2:
            raise SystemExit("configuration error: BATCH_MAX_SIZE must be at least 2; set BATCHING=off to turn batching off")
        for name, value in (
            ("MAX_IMAGE_PIXELS", self.max_image_pixels),
            ("IMAGE_DECODE_CONCURRENCY", self.image_decode_concurrency),
            ("SERVICE_MAX_CONCURRENCY", self.max_concurrency),
            ("CLIENT_HEADER_TIMEOUT_S", self.client_header_timeout_s),
            ("CLIENT_BODY_TIMEOUT_S", self.client_body_timeout_s),
            ("REGISTRY_TIMEOUT_S", self.registry_timeout_s),
        ):
            if value <= 0:
                raise SystemExit(f"configuration error: {name}={value} must be positive")
        if self.challenger_mode not in ("off", "shadow", "canary"):
            raise SystemExit(f"configuration error: CHALLENGER_MODE={self.challenger_mode!r} is not off, shadow or canary")
        if self.challenger_mode != "off" and not self.challenger_uri:
            raise SystemExit(
                "configuration error: CHALLENGER_MODE needs CHALLENGER_URI when MODEL_URI is not a registry alias "
                f"({self.model_uri})"
            )
        for name, value in (("CANARY_PERCENT", self.canary_percent), ("SHADOW_PERCENT", self.shadow_percent)):
            if not 0 <= value <= 100:
                raise SystemExit(f"configuration error: {name}={value} is not a percentage (0-100)")
        if not 0 <= self.grpc_port <= 65535:
            raise SystemExit(f"configuration error: GRPC_PORT={self.grpc_port} is not a port number (0 turns gRPC off)")

    def bentoml_config(self) -> dict[str, Any]:
        """The ``@bentoml.service`` configuration these settings ask for."""
        config: dict[str, Any] = {
            "workers": self.workers,
            # max_concurrency is enforced by service.edge, after a request's body has arrived
            "traffic": {"timeout": self.timeout_s},
            "logging": {"access": {"enabled": self.access_log}},
        }
        if not self.tracing:
            # BentoML samples no traces by default, yet still builds an OpenTelemetry span for every
            # request: ~1/3 of the per-request cost under load (measured: docs/performance.md).
            config["tracing"] = {"excluded_urls": [".*"]}
        return config

    @property
    def warmup_sizes(self) -> int:
        """Batch sizes 1..N the model is called at before it takes traffic (no larger than a batch can be)."""
        return max(1, min(self.warmup_batch_sizes, max(self.batch_max_size, self.max_images_per_request)))

    def batcher_limits(self) -> dict[str, Any]:
        """The runtime batcher's limits; BATCHING=off makes every request its own model call."""
        return {
            "max_batch_images": self.batch_max_size if self.batching else 1,
            "max_wait_s": self.batch_max_latency_ms / 1000,
            "max_queue_images": self.batch_max_queue_images,
        }

    @classmethod
    def from_env(cls) -> Settings:
        batcher = os.environ.get("BATCHER", "runtime").strip().lower()
        if batcher not in ("", "runtime"):
            raise SystemExit(
                f"configuration error: BATCHER={batcher!r}: the setting was removed with BentoML's adaptive batcher "
                "(slower than the service's own, which serves every route); unset BATCHER"
            )
        max_images = _int("MAX_IMAGES_PER_REQUEST", 1024)
        model_uri = os.environ.get("MODEL_URI") or contract.registry_uri()
        return cls(
            model_uri=model_uri,
            tracking_uri=contract.tracking_uri(),
            reload_poll_seconds=_float("MODEL_POLL_SECONDS", 30.0),
            admin_token=os.environ.get("ADMIN_TOKEN") or None,
            webhook_secret=os.environ.get("WEBHOOK_SECRET") or None,
            max_images_per_request=max_images,
            max_body_bytes=_int("MAX_BODY_BYTES", 16 * 1024 * 1024),
            max_body_bytes_in_flight=_int("MAX_BODY_BYTES_IN_FLIGHT", 4 * _int("MAX_BODY_BYTES", 16 * 1024 * 1024)),
            batching=_bool("BATCHING", True),
            batch_max_size=_int("BATCH_MAX_SIZE", max_images),  # never split a request
            batch_max_latency_ms=_int("BATCH_MAX_LATENCY_MS", 1000),
            workers=_workers(),
            timeout_s=_int("SERVICE_TIMEOUT_S", 30),
            max_concurrency=_int("SERVICE_MAX_CONCURRENCY", 512),
            access_log=_bool("ACCESS_LOG", False),
            batch_max_queue_images=_int("BATCH_MAX_QUEUE_IMAGES", 8 * max_images),
            grpc_port=_int("GRPC_PORT", 8500),
            grpc_host=os.environ.get("GRPC_HOST") or "0.0.0.0",
            grpc_max_message_bytes=_int("GRPC_MAX_MESSAGE_BYTES", 4 * 1024 * 1024),
            tracing=_bool("TRACING", False),
            max_image_pixels=_int("MAX_IMAGE_PIXELS", 16 * 1024 * 1024),
            image_decode_concurrency=_int("IMAGE_DECODE_CONCURRENCY", 2),
            client_header_timeout_s=_float("CLIENT_HEADER_TIMEOUT_S", 10.0),
            client_body_timeout_s=_float("CLIENT_BODY_TIMEOUT_S", 10.0),
            registry_timeout_s=_float("REGISTRY_TIMEOUT_S", 10.0),
            model_precision=(os.environ.get("MODEL_PRECISION") or "fp32").strip().lower(),
            trusted_proxies=os.environ.get("TRUSTED_PROXIES", "").strip(),
            challenger_mode=(os.environ.get("CHALLENGER_MODE") or "off").strip().lower(),
            challenger_uri=os.environ.get("CHALLENGER_URI") or _challenger_uri(model_uri),
            canary_percent=_float("CANARY_PERCENT", 10.0),
            shadow_max_queue_images=_int("SHADOW_MAX_QUEUE_IMAGES", 256),
            shadow_percent=_float("SHADOW_PERCENT", 100.0),
            feedback=_bool("FEEDBACK", False),
            feedback_dir=os.environ.get("FEEDBACK_DIR") or "feedback",
            feedback_max_bytes=_int("FEEDBACK_MAX_BYTES", 256 * 1024 * 1024),
            feedback_per_minute=_int("FEEDBACK_PER_MINUTE", 30),
            warmup_batch_sizes=_int("WARMUP_BATCH_SIZES", 64),
        )


SETTINGS = Settings.from_env()
