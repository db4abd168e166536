"""A minimal reference HTTP server: the service's SavedModel and batching rule, and nothing else.

    python scripts/reference_server.py --model exports/mnist/1 --port 8080 [--workers 2]

``POST /predict`` with a 28x28 JSON list of pixels (or a list of them) answers
``[{"digit": d, "probabilities": [...]}, ...]``; anything else is a bare 400/404. Raw ASGI on uvicorn
(uvloop + httptools), greedy micro-batching (one model call at a time, with every image that arrived
while the previous one ran, up to ``--max-batch``), TensorFlow with as many intra-op threads as cores
and one inter-op thread, as the service runs it. Each worker is a process with its own ``SO_REUSEPORT``
listening socket, as the service's are. No validation beyond what numpy does, no metrics, no limits,
no reload: ``scripts/benchmark_serving.py --reference`` runs it beside the service to measure what the
service's features cost.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contract import SIGNATURE  # noqa: E402


def build_app(model_path: str, max_batch: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import orjson
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(len(os.sched_getaffinity(0)))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    serve = tf.saved_model.load(model_path).signatures[SIGNATURE.name]

    def model(pixels):
        out = serve(**{SIGNATURE.input: tf.constant(pixels, dtype=tf.uint8)})
        return out[SIGNATURE.probabilities].numpy(), out[SIGNATURE.digit].numpy()

    model(np.zeros((1, 28, 28), np.uint8))
    queue: list[tuple[np.ndarray, asyncio.Future]] = []
    draining = [False]

    async def drain() -> None:
        loop = asyncio.get_running_loop()
        while queue:
            batch, images = [], 0
            while queue and (not batch or images + len(queue[0][0]) <= max_batch):
                batch.append(queue.pop(0))
                images += len(batch[-1][0])
            probabilities, digits = await loop.run_in_executor(None, model, np.concatenate([p for p, _ in batch]))
            start = 0
            for pixels, future in batch:
                stop = start + len(pixels)
                future.set_result((probabilities[start:stop], digits[start:stop]))
                start = stop
        draining[0] = False

    async def respond(send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            return await respond(send, 200, b"{}")
        if scope["path"] != "/predict" or scope["method"] != "POST":
            return await respond(send, 404, b'{"error": "not found"}')
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            pixels = np.asarray(orjson.loads(body), dtype=np.uint8)
            pixels = pixels.reshape(-1, 28, 28)
        except (ValueError, TypeError):
            return await respond(send, 400, b'{"error": "bad input"}')
        future = asyncio.get_running_loop().create_future()
        queue.append((pixels, future))
        if not draining[0]:
            draining[0] = True
            asyncio.get_running_loop().create_task(drain())
        probabilities, digits = await future
        answer = [{"digit": d, "probabilities": p} for d, p in zip(digits.tolist(), probabilities.tolist(), strict=True)]
        await respond(send, 200, orjson.dumps(answer))

    return app


def worker(model_path: str, host: str, port: int, max_batch: int) -> None:
    import uvicorn

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen(2048)
    config = uvicorn.Config(build_app(model_path, max_batch), loop="uvloop", http="httptools", log_level="warning")
    uvicorn.Server(config).run(sockets=[listener])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a SavedModel directory (e.g. exports/mnist/1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=1024, help="as the service's BATCH_MAX_SIZE")
    args = parser.parse_args()
    processes = [
        multiprocessing.Process(target=worker, args=(args.model, args.host, args.port, args.max_batch))
        for _ in range(args.workers)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
