"""``predict`` as a typed BentoML API: what ``/schema.json``, the OpenAPI page and BentoML's own clients
(``bentoml.SyncHTTPClient``/``AsyncHTTPClient``) see.

The declaration only describes ``POST /predict``: :class:`service.hot_path.HotRoutes` answers the route
before BentoML's router (the body is the API's root input, so a BentoML client's request is the same
JSON), and the method itself, if ever reached, goes through the serving core like every route. The
input and output models declare JSON and use orjson.

(``BATCHER=bentoml``, ``/predict`` through BentoML's adaptive batcher, was removed on 2026-12-02: it was
slower than the runtime batcher in every measurement (docs/performance.md) and took about 150 lines of
workarounds; scripts/reference_server.py is now what the service is compared with.)
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
import orjson
from pydantic import PlainValidator, WithJsonSchema

from service.hot_path import answers
from service.inputs import pixels_from_json


def predict_api(max_images: int) -> Any:
    """The ``predict`` method of the service class, as a BentoML API on ``/predict``, through the serving core."""
    pixel_batch = Annotated[
        Any,
        PlainValidator(lambda value: pixels_from_json(value, max_images, "request body")),
        WithJsonSchema(
            {
                "description": "One image (28 rows of 28 integers 0-255), a list of such images, "
                'or {"b64": base64 of N*784 raw uint8 pixels}',
                "example": [[0] * 28] * 28,
            }
        ),
    ]

    def signature(images: pixel_batch, /) -> list[dict[str, Any]]:  # type: ignore[valid-type]
        """The shape of ``predict`` without ``self``, for BentoML to build its input and output models from."""
        raise NotImplementedError

    async def predict(self: Any, images: pixel_batch, /) -> list[dict[str, Any]]:  # type: ignore[valid-type]
        """Digits for one image (28 rows of 28 integers 0-255) or a list of images: per image the digit,
        its 10 probabilities and the model version."""
        return answers(await self.core.predict(images, "http_json"))

    class PredictInput(bentoml.IODescriptor.from_input(signature)):  # type: ignore[misc]
        media_type = "application/json"

        @classmethod
        def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> PredictInput:
            return cls.model_validate(orjson.loads(json_data), **kwargs)

    class PredictOutput(bentoml.IODescriptor.from_output(signature)):  # type: ignore[misc]
        media_type = "application/json"

        def model_dump_json(self, **kwargs: Any) -> str:
            return orjson.dumps(self.root).decode()

    return bentoml.api(input_spec=PredictInput, output_spec=PredictOutput, name="predict")(predict)
