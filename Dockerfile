# The pipeline's image (`trainer`, `tuner`, the Kubernetes Jobs). The service runs the Bento's image:
# bentoml build && bentoml containerize digits:latest (bentofile.yaml).
FROM python:3.11.7-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2
RUN apt-get update && apt-get install -y --no-install-recommends curl git && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 app
WORKDIR /app
COPY pyproject.toml README.md contract.py quiet.py ./
COPY pipeline ./pipeline
COPY service ./service
RUN pip install .
USER app
CMD ["python", "-m", "pipeline", "train"]
