# syntax=docker/dockerfile:1
#
# Neiromatrius worker image: one replica per container.
#   docker build -t neiromatrius-worker .
#   docker run --rm -e RABBITMQ_URL=... -e REDIS_URL=... neiromatrius-worker
# Both stages use the same base so the virtual environment built in the first one runs unchanged
# in the second. For a byte-identical rebuild pin the base by digest as well:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:... .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the locked dependencies and the project, installed into /opt/venv ----
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src

# The lock goes first so that the dependency layer is reused while only the code changes.
# --no-deps plus pip check: a package missing from the lock fails the build instead of floating.
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock

COPY pyproject.toml README.md ./
COPY worker/ ./worker/
RUN pip install --no-cache-dir --no-deps . && pip check

# ---- runtime: the interpreter, the virtual environment, an unprivileged user; no compilers ----
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    STATS_HOST=0.0.0.0 \
    STATS_PORT=8080

RUN groupadd --system --gid 10001 neiromatrius \
    && useradd --system --uid 10001 --gid neiromatrius --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin neiromatrius

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 8080
# The worker drains in-flight messages on SIGTERM; give it the compose stop_grace_period to do so.
STOPSIGNAL SIGTERM
# The slim image has no curl: ask the liveness endpoint with the standard library instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('STATS_PORT', '8080') + '/health/live', timeout=4)"]

CMD ["neiromatrius-worker", "run"]
