# The backup as a sidecar container: see contrib/compose.backup.yml and the README.
#   docker build -t immich-stream .
# BASE: any image with Python 3.11+ and its venv module (a local one where registries
# cannot be reached: docker build --build-arg BASE=my/python:3.11 ...).
# PIP_ARGS: extra pip options, e.g. "--no-index --find-links /src/wheels" to install offline
# from wheels put into ./wheels first (pip wheel -w wheels .: this package and its dependencies).
# PACKAGE: what pip installs: /src[notify] (built from the source here, with Apprise for
# --notify) or, offline, immich-stream[notify] (its wheel from wheels/, nothing to build).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG PIP_ARGS=""
ARG PACKAGE=/src[notify]
# .dockerignore lets in pyproject.toml, README.md, immich_stream/ and wheels/ only
COPY . /src
RUN python3 -m venv /opt/immich-stream \
    && /opt/immich-stream/bin/pip install --no-cache-dir --disable-pip-version-check $PIP_ARGS $PACKAGE \
    && rm -rf /src
# /state keeps which containers a killed run left stopped, so the next run starts them first.
ENV PATH=/opt/immich-stream/bin:$PATH \
    IMMICH_STREAM_STATE_DIR=/state \
    PYTHONUNBUFFERED=1
VOLUME /state
# root: reading Postgres's data directory (mode 0700, owned by the postgres uid) and the
# Docker socket need it. With --stop app (no cold copy of the data directory) a user in the
# socket's group who can read the library is enough: docker run --user UID:DOCKER_GID ...
ENTRYPOINT ["immich-stream"]
CMD ["schedule", "--at", "03:30", "--", "backup", "--prune"]
