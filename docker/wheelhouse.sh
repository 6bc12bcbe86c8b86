#!/usr/bin/env bash
# Make the wheelhouse an air-gapped image build installs from (no index reached during `docker build`).
#
#   bash docker/wheelhouse.sh [DIR]        # default DIR: docker/wheelhouse (inside the build context)
#   docker build --build-arg WHEELHOUSE=docker/wheelhouse -t fedsite .
#
# Run it on a Linux x86_64 (or the image's architecture) machine with Python 3.11 that reaches a package
# index: the wheels must match the image's interpreter (python:3.11-slim and Debian 12 both have 3.11).
# It collects every wheel fedsite needs, its extras' too (pip wheel builds any that exist only as source),
# the CPU build of torch, and setuptools/wheel (to build fedsite itself offline), then checks the result
# installs with --no-index. The CPU torch wheel is not on PyPI for Linux: where pip does not already find it (a local
# --find-links, as on fedsite's build machines), point pip at a copy or at the PyTorch CPU index first:
#
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash docker/wheelhouse.sh
#
# TORCH_VARIANT=gpu collects PyPI's default (CUDA) torch instead. The wheels are not committed
# (docker/wheelhouse/.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${1:-docker/wheelhouse}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_VARIANT="${TORCH_VARIANT:-cpu}"

die() { echo "wheelhouse: error: $*" >&2; exit 2; }

version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') \
  || die "no Python at '$PYTHON' (set PYTHON=python3.11)"
[ "$version" = "3.11" ] || die "$PYTHON is Python $version; the image runs 3.11, so its wheels must be cp311 (set PYTHON)"
case "$TORCH_VARIANT" in cpu|gpu) ;; *) die "TORCH_VARIANT must be cpu or gpu, got '$TORCH_VARIANT'" ;; esac

mkdir -p "$DIR"
echo "wheelhouse: collecting wheels into $DIR (torch $TORCH_VERSION, $TORCH_VARIANT)"
# --find-links: wheels already in DIR are reused, so running it again after a requirement changes is quick
# .[all]: the base and every extra, what the image installs (docker/pip-install.sh)
"$PYTHON" -m pip wheel --quiet --wheel-dir "$DIR" --find-links "$DIR" "torch==$TORCH_VERSION" ".[all]" "setuptools>=68" wheel \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
rm -f "$DIR"/fedsite-*.whl  # the image builds fedsite from the checkout it is given

torch_wheel=$(ls "$DIR"/torch-"$TORCH_VERSION"*.whl 2>/dev/null | head -1)
[ -n "$torch_wheel" ] || die "no torch $TORCH_VERSION wheel landed in $DIR"
if [ "$TORCH_VARIANT" = cpu ]; then
  case "$torch_wheel" in
    *+cpu-*) ;;
    *) rm -f "$torch_wheel"
       die "pip found only the CUDA build of torch ($(basename "$torch_wheel")); set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu or PIP_FIND_LINKS=<folder with torch-$TORCH_VERSION+cpu-cp311-*.whl> and run again" ;;
  esac
fi

# the proof that it is complete: resolve fedsite's requirements from these wheels alone
"$PYTHON" -m pip install --quiet --dry-run --no-index --find-links "$DIR" --ignore-installed \
  "torch==$TORCH_VERSION" ".[all]" >/dev/null \
  || die "the wheelhouse is incomplete: pip cannot install fedsite from $DIR alone (see above)"
echo "wheelhouse: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR ($(basename "$torch_wheel"))"
