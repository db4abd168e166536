"""TensorFlow Serving's and the Open Inference Protocol's gRPC APIs for the ``mnist`` model, on the same
serving core as the HTTP routes.

``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``) and
``tensorflow.serving.ModelService`` (``GetModelStatus``), with the stock stubs from
``tensorflow_serving.apis``; ``inference.GRPCInferenceService`` (KServe V2, as tritonclient calls it);
the standard health service and server reflection. A request whose
bytes are not the method's protobuf answers INVALID_ARGUMENT, as TensorFlow Serving does (gRPC's own
handlers would answer UNKNOWN and log a traceback per request). The server runs
on the worker's event loop; with several workers each binds ``GRPC_PORT`` with ``SO_REUSEPORT`` (gRPC's
default on Linux), so the kernel spreads connections over the workers. ``Classify``, ``Regress``
and ``MultiInference`` answer INVALID_ARGUMENT, as TF Serving does for a model with a predict signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from service import open_inference, tfserving, tfserving_grpc
from service.core import ServingCore
from service.errors import ClientErrorLog, ServiceError
from service.metrics import GrpcMethodMetrics
from service.protos import open_inference_pb2 as v2
from service.rollout import CANARY_KEY

logger = logging.getLogger("digits.grpc")
client_errors = ClientErrorLog(logger)
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
V2_DESCRIPTOR = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
V2_SERVICE = V2_DESCRIPTOR.full_name
Reply = TypeVar("Reply")


async def _answer(context: grpc.aio.ServicerContext, method: str, work: Callable[[], Awaitable[Reply]]) -> Reply:
    try:
        return await work()
    except ServiceError as error:
        if error.grpc_code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            client_errors.warning("gRPC %s answered %s: %s", method, error.grpc_code.name, error)
        await context.abort(error.grpc_code, str(error))
        raise  # abort raises; this line is never reached


@contextlib.contextmanager
def _canary_key(context: grpc.aio.ServicerContext) -> Iterator[None]:
    """The ``x-canary-key`` metadata, for a sticky canary choice (:mod:`service.rollout`)."""
    key = next((value for name, value in context.invocation_metadata() or () if name == "x-canary-key"), None)
    token = CANARY_KEY.set(key if isinstance(key, str) else None) if key else None
    try:
        yield
    finally:
        if token is not None:
            CANARY_KEY.reset(token)


@dataclass(frozen=True)
class Undecodable:
    """What a request deserializes to when its bytes are not the expected protobuf."""

    message_type: str
    reason: str


def _tolerant_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc) or "cannot parse")

    return deserialize


def _checked(
    method: str, handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], observe: GrpcMethodMetrics
) -> Callable:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            if isinstance(request, Undecodable):
                message = f"the request is not a valid {request.message_type} protobuf ({request.reason})"
                client_errors.warning("gRPC %s answered INVALID_ARGUMENT: %s", method, message)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            try:
                answer = handler(request, context)  # the base servicer's unimplemented methods are plain functions
                return await answer if inspect.isawaitable(answer) else answer
            except NotImplementedError:  # Classify, Regress, MultiInference: answered as TF Serving does, no crash logged
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(tfserving.wrong_method(method)))
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except BaseException as exc:
            code = grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
            raise
        finally:
            observe(code, time.perf_counter() - started)

    return call


def service_handler(service: ServiceDescriptor, servicer: Any) -> grpc.GenericRpcHandler:
    """The servicer's unary methods for ``service``, as the generated ``add_*_to_server`` would register
    them, but with requests that do not parse answered INVALID_ARGUMENT."""
    handlers = {}
    for method in service.methods:
        observe = GrpcMethodMetrics(service.full_name, method.name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _checked(method.name, getattr(servicer, method.name), observe),
            request_deserializer=_tolerant_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServingCore, max_images: int) -> None:
        self.core = core
        self.max_images = max_images

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        async def work() -> predict_pb2.PredictResponse:
            version = tfserving_grpc.requested_version(request.model_spec, self.core.model().info)
            self.core.model(version)
            pixels = tfserving_grpc.pixels_from_predict_request(request, self.max_images)
            with _canary_key(context):
                prediction = await self.core.predict(pixels, "grpc", version)
            return tfserving_grpc.predict_response(prediction, request)

        return await _answer(context, "Predict", work)

    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        async def work() -> get_model_metadata_pb2.GetModelMetadataResponse:
            served = self.core.model(tfserving_grpc.requested_version(request.model_spec, self.core.model().info))
            return tfserving_grpc.metadata_response(request, served.info.version, served.signature_defs)

        return await _answer(context, "GetModelMetadata", work)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        async def work() -> get_model_status_pb2.GetModelStatusResponse:
            served = self.core.model(tfserving_grpc.requested_version(request.model_spec, self.core.model().info))
            return tfserving_grpc.status_response(served.info.version)

        return await _answer(context, "GetModelStatus", work)


class InferenceService:
    """The Open Inference Protocol's ``inference.GRPCInferenceService`` (KServe V2, Triton's clients)."""

    def __init__(self, core: ServingCore, max_images: int) -> None:
        self.core = core
        self.max_images = max_images

    async def ServerLive(self, request: v2.ServerLiveRequest, context: grpc.aio.ServicerContext) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context: grpc.aio.ServicerContext) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.core.runtime.ready)

    async def ModelReady(self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext) -> v2.ModelReadyResponse:
        async def work() -> v2.ModelReadyResponse:
            open_inference.check_model(request.name)
            if not self.core.runtime.ready:
                return v2.ModelReadyResponse(ready=False)
            self.core.model(request.version or None)
            return v2.ModelReadyResponse(ready=True)

        return await _answer(context, "ModelReady", work)

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(**open_inference.server_metadata())

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelMetadataResponse:
        async def work() -> v2.ModelMetadataResponse:
            open_inference.check_model(request.name)
            return open_inference.grpc_model_metadata(self.core.model(request.version or None).info.version)

        return await _answer(context, "ModelMetadata", work)

    async def ModelInfer(self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext) -> v2.ModelInferResponse:
        async def work() -> v2.ModelInferResponse:
            open_inference.check_model(request.model_name)
            version = request.model_version or None
            self.core.model(version)
            parsed = open_inference.parse_grpc_infer(request, self.max_images)
            with _canary_key(context):
                prediction = await self.core.predict(parsed.pixels, "v2_grpc", version)
            return open_inference.grpc_infer_response(prediction, parsed)

        return await _answer(context, "ModelInfer", work)


class GrpcFront:
    """The gRPC server of one worker: start it on the worker's event loop, stop it on shutdown."""

    def __init__(self, core: ServingCore, port: int, max_images: int, max_message_bytes: int) -> None:
        self.core = core
        self.port = port
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ]
        )
        self.server.add_generic_rpc_handlers(
            (
                service_handler(
                    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"], PredictionService(core, max_images)
                ),
                service_handler(model_service_pb2.DESCRIPTOR.services_by_name["ModelService"], ModelService(core)),
                service_handler(V2_DESCRIPTOR, InferenceService(core, max_images)),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (PREDICTION_SERVICE, MODEL_SERVICE, V2_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    async def start(self, host: str = "[::]") -> None:
        bound = self.server.add_insecure_port(f"{host}:{self.port}")
        if bound != self.port:
            raise RuntimeError(f"cannot listen for gRPC on port {self.port} (in use by another program?)")
        await self.server.start()
        await self.set_serving(self.core.runtime.ready)
        logger.info("gRPC (TensorFlow Serving API, Open Inference Protocol V2) listening on port %d", self.port)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE, V2_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)
