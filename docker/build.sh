#!/usr/bin/env bash
# Build the fedsite image, checking the build arguments first (each mistake is one line naming what is
# missing), and report the image's size.
#
#   bash docker/build.sh                                   # python:3.11-slim, from PyPI (+ PyTorch CPU index)
#   bash docker/wheelhouse.sh                              # once, on a machine that reaches an index
#   bash docker/build.sh --offline --base local/debian:bookworm --ca-certs /usr/local/share/ca-certificates
#
# Options:
#   --base IMAGE        base image (default python:3.11-slim; a Debian/Ubuntu image gets Python from apt)
#   --offline           install only from the wheelhouse (no index is contacted)
#   --wheelhouse DIR    wheel folder inside this checkout (default docker/wheelhouse)
#   --ca-certs DIR      extra CA certificates (*.crt) to trust during the build (copied into docker/ca-certificates)
#   --tag NAME          image name (default fedsite:latest)
#   --gpu               CUDA torch instead of the CPU build
#   -- ARGS...          passed to docker build as they are (e.g. --build-arg PIP_INDEX_URL=http://mirror/simple)
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "build: error: $*" >&2; exit 2; }

base=python:3.11-slim offline=0 wheelhouse=docker/wheelhouse ca_certs="" tag=fedsite:latest variant=cpu
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=${2:?--base needs an image}; shift 2 ;;
    --offline) offline=1; shift ;;
    --wheelhouse) wheelhouse=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --ca-certs) ca_certs=${2:?--ca-certs needs a folder}; shift 2 ;;
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    --gpu) variant=gpu; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option '$1' (see the top of docker/build.sh)" ;;
  esac
done

command -v docker >/dev/null || die "no docker command: install Docker (on Debian: bash docker/engine.sh)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start it: bash docker/engine.sh)"
if ! docker image inspect "$base" >/dev/null 2>&1 && ! docker pull -q "$base" >/dev/null 2>&1; then
  die "base image '$base' is not here and cannot be pulled (no registry reachable?): build one with bash docker/engine.sh and pass --base local/debian:bookworm"
fi
wheelhouse=${wheelhouse%/}
case "$(realpath -m "$wheelhouse")/" in
  "$(pwd)"/*) ;;
  *) die "the wheelhouse '$wheelhouse' must be inside this checkout (the build context)" ;;
esac
[ -d "$wheelhouse" ] || die "no wheelhouse folder '$wheelhouse' (make it: bash docker/wheelhouse.sh $wheelhouse)"
if [ "$offline" = 1 ]; then
  ls "$wheelhouse"/*.whl >/dev/null 2>&1 || die "--offline but '$wheelhouse' has no wheels: run bash docker/wheelhouse.sh $wheelhouse"
  ls "$wheelhouse"/torch-*.whl >/dev/null 2>&1 || die "--offline but '$wheelhouse' has no torch wheel: run bash docker/wheelhouse.sh $wheelhouse"
fi
if [ -n "$ca_certs" ]; then
  ls "$ca_certs"/*.crt >/dev/null 2>&1 || die "--ca-certs '$ca_certs' holds no *.crt files"
  cp "$ca_certs"/*.crt docker/ca-certificates/
fi

start=$(date +%s)
echo "build: $tag from $base (torch $variant, $([ "$offline" = 1 ] && echo "offline from $wheelhouse" || echo "index"))"
docker build --force-rm --tag "$tag" --build-arg BASE_IMAGE="$base" --build-arg OFFLINE="$offline" \
  --build-arg WHEELHOUSE="$wheelhouse" --build-arg TORCH_VARIANT="$variant" ${extra[@]+"${extra[@]}"} . \
  || die "docker build failed (the line above 'fedsite image: error' or docker's own error says why)"
bytes=$(docker image inspect -f '{{.Size}}' "$tag")
echo "build: $tag built in $(( $(date +%s) - start ))s; image size $(( bytes / 1000000 )) MB"
