"""The tracking server's authorization function: MLflow's basic auth, plus read-only users.

MLflow's basic-auth app lets every signed-in user create experiments and registered models (and gives
it MANAGE on what it creates), whatever ``default_permission`` says. The ``service`` credentials sit
on every replica, so anyone holding them could create objects, among them the trainers' gate lock
(the registered model ``mnist-cnn--gate-lock``), and stall every training. For the users named in
``MLFLOW_READ_ONLY_USERS`` (``service`` by default) this function lets through only reads: GET, HEAD
and OPTIONS, and the POST endpoints that only search (``.../search``, the UI's ``/graphql``
queries). Any other request of theirs is answered 403 with MLflow's JSON error body.

start.sh names it in the auth config (``authorization_function = read_only_auth:authenticate``).
"""

from __future__ import annotations

import os

from flask import Response, jsonify, request
from mlflow.server.auth import authenticate_request_basic_auth
from werkzeug.datastructures import Authorization

READ_METHODS = {"GET", "HEAD", "OPTIONS"}
READ_ONLY_POSTS = ("/search", "/graphql")


def read_only_users() -> set[str]:
    return {name.strip() for name in os.environ.get("MLFLOW_READ_ONLY_USERS", "service").split(",") if name.strip()}


def authenticate() -> Authorization | Response:
    authorization = authenticate_request_basic_auth()
    if not isinstance(authorization, Authorization) or authorization.username not in read_only_users():
        return authorization
    path = request.path.rstrip("/")
    if request.method in READ_METHODS or (request.method == "POST" and path.endswith(READ_ONLY_POSTS)):
        return authorization
    answer = jsonify(
        {
            "error_code": "PERMISSION_DENIED",
            "message": f"Permission denied: user {authorization.username!r} is read-only ({request.method} {path})",
        }
    )
    answer.status_code = 403
    return answer
