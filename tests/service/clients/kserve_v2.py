"""Run in the clients' environment: drive a running service with KServe's own V2 clients
(``InferenceRESTClient`` with the v2 protocol, ``InferenceGRPCClient``) and print what they saw as JSON.
A process of its own: KServe's and Triton's clients each register the ``inference`` protos.

    python kserve_v2.py http://HOST:PORT GRPC_HOST:PORT IMAGES.npy
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(images: np.ndarray) -> InferRequest:
    pixels = InferInput(name="pixels", shape=list(images.shape), datatype="UINT8")
    pixels.set_data_from_numpy(images, binary_data=False)
    return InferRequest(model_name="mnist", infer_inputs=[pixels], request_id="kserve-1")


def digits(response) -> list[int]:
    (digit,) = [output for output in response.outputs if output.name == "digit"]
    return digit.as_numpy().reshape(-1).tolist()


async def drive(http_url: str, grpc_target: str, images: np.ndarray) -> dict:
    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    seen = {
        "rest": {
            "live": await rest.is_server_live(http_url),
            "ready": await rest.is_server_ready(http_url),
            "model_ready": await rest.is_model_ready(http_url, "mnist"),
            "digits": digits(await rest.infer(http_url, request(images), model_name="mnist")),
        }
    }
    grpc_client = InferenceGRPCClient(grpc_target)
    seen["grpc"] = {
        "live": await grpc_client.is_server_live(),
        "ready": await grpc_client.is_server_ready(),
        "model_ready": await grpc_client.is_model_ready("mnist"),
        "digits": digits(await grpc_client.infer(request(images))),
    }
    await grpc_client.close()
    return seen


def main() -> None:
    http_url, grpc_target, images_path = sys.argv[1:4]
    print(json.dumps(asyncio.run(drive(http_url, grpc_target, np.load(images_path)))))


if __name__ == "__main__":
    main()
