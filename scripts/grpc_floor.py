"""What Python's gRPC server costs by itself on this machine: a constant-answer ``PredictionService``
(grpc.aio on uvloop, one process) under the same h2load load as the service (a script, not a test).

    python scripts/grpc_floor.py [--duration 10]

Its requests/s is the ceiling for gRPC through one Python worker, before any parsing, batching or model.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from contract import SERVABLE_NAME  # noqa: E402
from harness.launcher import free_port  # noqa: E402
from scripts.benchmark_serving import grpc_frame, h2load  # noqa: E402


def serve(port: int) -> None:
    import grpc
    import uvloop
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    class Constant(prediction_service_pb2_grpc.PredictionServiceServicer):
        async def Predict(self, request, context):  # noqa: N802 (the gRPC method's name)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = SERVABLE_NAME
            return response

    async def main() -> None:
        server = grpc.aio.server()
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Constant(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    server.start()
    try:
        time.sleep(8)  # TensorFlow's protobuf modules take a few seconds to import
        with tempfile.TemporaryDirectory() as tmp:
            body = Path(tmp) / "one.grpc"
            body.write_bytes(grpc_frame(np.zeros((1, 28, 28), np.uint8)))
            row = h2load(
                f"http://127.0.0.1:{port}/tensorflow.serving.PredictionService/Predict",
                body,
                headers=["content-type: application/grpc", "te: trailers"],
                h1=False,
                workdir=Path(tmp),
                duration=args.duration,
            )
        print(
            f"constant-answer grpc.aio server, 1 process, 64 connections: {row['rps']:,.0f} req/s, "
            f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, h2load CPU {row['generator_cpu']:.2f} cores"
        )
    finally:
        server.terminate()
        server.join(timeout=10)


if __name__ == "__main__":
    main()
