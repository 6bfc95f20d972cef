# The llm-operator image: one program, `llm-operator`, whose subcommands are the operator
# (`run`) and the gateway (`gateway`); the Helm chart runs both from this image.
#
#   docker build -t ghcr.io/llm-operator/llm-operator:0.1.0 .
#
# Runs as the non-root user 65532 with a read-only root filesystem (the chart mounts /tmp).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m venv /opt/llm-operator \
 && /opt/llm-operator/bin/pip install --upgrade pip \
 && /opt/llm-operator/bin/pip install . \
 && /opt/llm-operator/bin/python -m compileall -q /opt/llm-operator

FROM python:3.11-slim
LABEL org.opencontainers.image.title="llm-operator" \
      org.opencontainers.image.description="Kubernetes operator for LLM serving on GPUs, and its OpenAI-compatible gateway" \
      org.opencontainers.image.source="https://github.com/llm-operator/llm-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/llm-operator /opt/llm-operator
ENV PATH=/opt/llm-operator/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["llm-operator"]
CMD ["--help"]
