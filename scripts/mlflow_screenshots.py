"""Screenshots of the MLflow UI as a reviewer first sees it, for the docs (a script, not a test).

Starts ``mlflow ui`` on a free loopback port over a tracking store and points headless Chromium (Debian's
``chromium``) at four pages: the runs list, the newest training run, the newest tune parent run and the
registered model. Usage::

    python scripts/mlflow_screenshots.py --tracking-uri sqlite:///mlflow.db --out docs/images
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contract import REGISTERED_MODEL  # noqa: E402
from harness.launcher import start_mlflow_server, stop_process  # noqa: E402

EXPERIMENT = "mnist"


def pages(tracking_uri: str) -> dict[str, str]:
    """Name → UI route (after ``/#``) for each screenshot."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"error: no experiment {EXPERIMENT!r} in {tracking_uri}: train first")
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["start_time DESC"], output_format="list")
    top_level = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    training = [run for run in top_level if "tune.study" not in run.data.tags]
    tuning = [run for run in top_level if "tune.study" in run.data.tags]
    routes = {"runs": f"/experiments/{experiment.experiment_id}/runs"}
    if training:
        routes["training-run"] = f"/experiments/{experiment.experiment_id}/runs/{training[0].info.run_id}"
    if tuning:
        routes["tune-parent"] = f"/experiments/{experiment.experiment_id}/runs/{tuning[0].info.run_id}"
    routes["registered-model"] = f"/models/{REGISTERED_MODEL}"
    return routes


def screenshot(chromium: str, url: str, out: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--virtual-time-budget=15000",  # the UI is a single-page app: let it fetch and render
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="the store to show, e.g. sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--size", default="1440,900", help="browser window, width,height")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        parser.error("no Chromium on PATH (Debian package `chromium`)")
    routes = pages(args.tracking_uri)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs:
        server = start_mlflow_server(args.tracking_uri, Path(logs) / "mlflow.log")
        try:
            for name, route in routes.items():
                path = args.out / f"mlflow-{name}.png"
                screenshot(chromium, f"{server.url}/#{route}", path, args.size)
                print(f"{path}  ({route})")
        finally:
            stop_process(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
