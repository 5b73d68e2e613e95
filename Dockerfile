# The image of the facets services in docker-compose.yml: the Prefect server, the deploy step,
# the CPU workers and (built with EXTRAS="[training]") the GPU worker.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    FACETS_HOME=/opt/facets

WORKDIR /opt/facets

# The package: the top-level folders are the subpackages of `facets` (see pyproject.toml).
# A new top-level package folder needs its line here too.
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY storage/ storage/
COPY llm/ llm/
COPY simulator/ simulator/
COPY ingest/ ingest/
COPY tasks/ tasks/
COPY pipeline/ pipeline/
COPY release/ release/
COPY evaluation/ evaluation/
COPY flows/ flows/
COPY training/ training/
COPY testing/ testing/

# EXTRAS: e.g. "[training]" for the GPU worker. EXTRA_PACKAGES: e.g. "s3fs" for an s3:// data dir.
ARG EXTRAS=""
ARG EXTRA_PACKAGES=""
RUN pip install ".${EXTRAS}" ${EXTRA_PACKAGES}

# The deployments; FACETS_HOME (this directory) is where runs resolve relative paths such as data_dir=data.
COPY prefect.yaml ./
# the bundled sample that the try-it (`sample`) deployments read
COPY tests/data/ tests/data/
RUN mkdir -p data

CMD ["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"]
