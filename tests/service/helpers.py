"""Helpers for the service tests: expected answers straight from the SavedModel, and metric readings."""

from __future__ import annotations

import re

import numpy as np
import requests
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from harness.launcher import RunningService

ADMIN_TOKEN = "test-admin-token"


def served_version(service: RunningService) -> str:
    return requests.get(f"{service.url}/model", timeout=10).json()["version"]


def saved_model_probabilities(trained_registry, version: str, images: np.ndarray) -> np.ndarray:
    path = trained_registry.workdir / "exports" / "mnist" / version
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    return serve(pixels=tf.constant(images))["probabilities"].numpy()


def metric_samples(service: RunningService) -> list:
    """Every sample on ``/metrics``, parsed by prometheus_client: ``.name``, ``.labels``, ``.value``."""
    text = requests.get(f"{service.url}/metrics", timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def histogram(service: RunningService, name: str) -> dict[str, float]:
    """One histogram from ``/metrics``: ``{"count": …, "le=1.0": …, …}`` (summed over label sets)."""
    text = requests.get(f"{service.url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for match in re.finditer(rf"^{name}_(count|bucket)(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        kind, labels, value = match.groups()
        key = "count" if kind == "count" else "le=" + re.search(r'le="([^"]+)"', labels).group(1)
        values[key] = values.get(key, 0.0) + float(value)
    return values


def batch_histogram(service: RunningService) -> tuple[float, float]:
    """(model calls, model calls with exactly one image) from the batch-size histogram."""
    images = histogram(service, "digits_model_batch_images")
    return images.get("count", 0.0), images.get("le=1.0", 0.0)


def predict_request(
    pixels: np.ndarray | None = None,
    *,
    tensor: tf.Tensor | None = None,
    name: str = "mnist",
    version: int | None = None,
    signature: str = "",
    input_name: str = "pixels",
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(pixels) if tensor is None else tensor)
    return request
