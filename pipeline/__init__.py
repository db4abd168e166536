"""Training pipeline: data -> model -> train -> evaluate -> export -> register (``python -m pipeline``)."""
