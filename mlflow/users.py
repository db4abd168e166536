"""Create or update the stack's MLflow users before the server starts (start.sh runs this).

``admin`` is created by MLflow itself from MLFLOW_AUTH_ADMIN_PASSWORD. ``pipeline`` trains: MLflow
gives a user MANAGE on the experiments and registered models it creates, and nothing else beyond the
default READ. ``service`` only reads. Passwords come from the environment; a user whose variable is
unset is left as it is.
"""

from __future__ import annotations

import os

from mlflow.server.auth.config import read_auth_config
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

USERS = {"pipeline": "MLFLOW_PIPELINE_PASSWORD", "service": "MLFLOW_SERVICE_PASSWORD"}


def main() -> None:
    store = SqlAlchemyStore()
    store.init_db(read_auth_config().database_uri)
    for username, variable in USERS.items():
        password = os.environ.get(variable)
        if not password:
            continue
        if store.has_user(username):
            store.update_user(username, password=password)
            print(f"mlflow users: {username} password updated", flush=True)
        else:
            store.create_user(username, password)
            print(f"mlflow users: {username} created", flush=True)


if __name__ == "__main__":
    main()
