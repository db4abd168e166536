# The project image, built once and used by the `trainer` and `service` compose services.
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
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 CMD curl -fsS http://127.0.0.1:3000/readyz || exit 1
CMD ["bentoml", "serve", "service:Digits", "--host", "0.0.0.0", "--port", "3000"]
