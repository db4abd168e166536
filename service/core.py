"""The one path into the model for every protocol: readiness, version pinning, then the batcher.

HTTP JSON, image uploads, TensorFlow Serving REST and gRPC all call :meth:`ServingCore.predict`, so
their requests can share a model call. Knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import numpy as np

from service.batching import Batcher, BatchObserver
from service.errors import NotFound, Unavailable
from service.runtime import LoadedModel, ModelRuntime, Prediction


class ServingCore:
    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_batch_images: int,
        max_wait_s: float,
        max_queue_images: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self.runtime = runtime
        self.batcher = Batcher(
            runtime.predict,
            max_batch_images=max_batch_images,
            max_wait_s=max_wait_s,
            max_queue_images=max_queue_images,
            observer=observer,
        )

    def model(self, version: str | None = None) -> LoadedModel:
        """The model being served; raises :class:`Unavailable` before one is loaded and
        :class:`NotFound` when ``version`` is given and is not the one being served."""
        if not self.runtime.ready:
            raise Unavailable("no model is loaded yet; retry shortly")
        model = self.runtime.current
        if version is not None and version != model.info.version:
            raise NotFound(f"version {version} is not served; this server serves version {model.info.version}")
        return model

    async def predict(self, pixels: np.ndarray, route: str, version: str | None = None) -> Prediction:
        """Predictions for uint8 ``[N, 28, 28]`` pixels, all from one model version."""
        self.model(version)
        prediction = await self.batcher.predict(pixels, route)
        if version is not None and prediction.model.version != version:  # a reload landed while it queued
            raise NotFound(f"version {version} is no longer served; this server serves version {prediction.model.version}")
        return prediction

    def close(self) -> None:
        self.batcher.close()
