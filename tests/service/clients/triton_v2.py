"""Run in the clients' environment (tests/service/clients/requirements.txt): drive a running service with
Triton's stock V2 clients, over HTTP and gRPC, and print what they saw as JSON for the test to check.

    python triton_v2.py HTTP_HOST:PORT GRPC_HOST:PORT IMAGES.npy VERSION
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException


def refusal(call) -> dict:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return {"status": "no error"}


def drive(module, url: str, images: np.ndarray, version: str) -> dict:
    client = module.InferenceServerClient(url)
    metadata = client.get_model_metadata("mnist")
    server = client.get_server_metadata()
    if module is triton_grpc:  # protobuf messages; the HTTP client answers dicts
        metadata = {"name": metadata.name, "versions": list(metadata.versions), "inputs": [i.name for i in metadata.inputs]}
        server = {"name": server.name, "extensions": list(server.extensions)}
    else:
        metadata = {"name": metadata["name"], "versions": metadata["versions"], "inputs": [i["name"] for i in metadata["inputs"]]}
        server = {"name": server["name"], "extensions": server["extensions"]}

    def infer(batch: np.ndarray, datatype: str = "UINT8", binary: bool = True, model_version: str = "", outputs=None):
        tensor = module.InferInput("pixels", list(batch.shape), datatype)
        if module is triton_http:
            tensor.set_data_from_numpy(batch, binary_data=binary)
            requested = [module.InferRequestedOutput(name, binary_data=binary) for name in outputs or ("probabilities", "digit")]
        else:
            tensor.set_data_from_numpy(batch)
            requested = [module.InferRequestedOutput(name) for name in outputs or ("probabilities", "digit")]
        return client.infer("mnist", [tensor], model_version=model_version, outputs=requested, request_id="req-42")

    binary = infer(images, model_version=version)
    answers = {
        "binary": {"digit": binary.as_numpy("digit").tolist(), "probabilities": binary.as_numpy("probabilities").tolist()},
        "float_input": infer(images.astype(np.float32), "FP32").as_numpy("digit").tolist(),
        "digit_only": infer(images, outputs=("digit",)).as_numpy("probabilities") is None,
        "request_id": binary.get_response()["id"] if module is triton_http else binary.get_response().id,
    }
    if module is triton_http:
        answers["json"] = infer(images, binary=False).as_numpy("digit").tolist()
    too_bright = np.full((1, 28, 28), 300, np.int32)
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("mnist"),
        "model_ready_served_version": client.is_model_ready("mnist", version),
        "server": server,
        "metadata": metadata,
        **answers,
        "errors": {
            "pixel_out_of_range": refusal(lambda: infer(too_bright, "INT32")),
            "unknown_model": refusal(lambda: client.infer("resnet", [module.InferInput("pixels", [1, 28, 28], "UINT8")])),
            "unserved_version": refusal(lambda: infer(images, model_version="999")),
            "wrong_shape": refusal(lambda: infer(np.zeros((1, 28, 27), np.uint8))),
        },
    }


def main() -> None:
    http_url, grpc_url, images_path, version = sys.argv[1:5]
    images = np.load(images_path)
    print(
        json.dumps({"http": drive(triton_http, http_url, images, version), "grpc": drive(triton_grpc, grpc_url, images, version)})
    )


if __name__ == "__main__":
    main()
