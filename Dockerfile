# agentstream image: the `agentstream` CLI (worker, publish, generate, sql, ...).
#
#   docker build -t agentstream .
#   docker run --rm agentstream --help
#
# docker-compose.yml runs it as the worker next to an Apache Kafka broker.

# --- build: the locked dependencies, then the project, into a virtualenv ------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=0 \
    UV_LINK_MODE=copy

# The same uv as the Makefile's UV_VERSION, and the same uv.lock: the image runs exactly the
# versions the tests ran (runtime dependencies only, no dev extra).
RUN pip install uv==0.13.9

WORKDIR /src

# Dependencies first, in a layer of their own: editing the code does not fetch them again.
# Every dependency ships manylinux wheels, so no compiler is needed.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project

COPY . .
RUN uv sync --locked --no-dev --no-editable \
    && /opt/venv/bin/agentstream --version

# --- runtime: the virtualenv only, run by an unprivileged user -----------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGENTSTREAM_DATA_DIR=/data \
    AGENTSTREAM_WEB_HOST=0.0.0.0

RUN groupadd --system --gid 10001 agentstream \
    && useradd --system --uid 10001 --gid agentstream --create-home \
       --home-dir /home/agentstream --shell /usr/sbin/nologin agentstream \
    && mkdir /data \
    && chown agentstream:agentstream /data

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/agentstream

# The Parquet lake (and agentstream.duckdb with its views). A named volume mounted here
# starts out owned by the agentstream user; a bind mount must be writable by uid 10001.
VOLUME ["/data"]
# Health (/health) and Prometheus (/metrics) pages of `agentstream worker`.
EXPOSE 6066

ENTRYPOINT ["agentstream"]
CMD ["--help"]
