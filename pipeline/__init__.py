"""Training pipeline: data -> model -> train -> evaluate -> export -> register (``python -m pipeline``)."""

import os

# Plots are written to files (MLflow artifacts), never shown: matplotlib's file-only backend, chosen once
# for every module of the package before any of them imports pyplot (a desktop session would otherwise
# pick a GUI backend, which must not be used off the main thread).
os.environ.setdefault("MPLBACKEND", "Agg")
