#!/bin/sh
# pip for the image build: from the wheelhouse only (OFFLINE=1), or from an index (PIP_INDEX_URL /
# PIP_EXTRA_INDEX_URL build args, default PyPI) with torch from the wheelhouse when it holds one, else
# from TORCH_INDEX_URL for the CPU build.
#
#   pip-install.sh torch            torch==$TORCH_VERSION, the $TORCH_VARIANT build
#   pip-install.sh requirements     fedsite's requirements (from pyproject.toml) with the extras the image needs,
#                                   not fedsite itself
set -eu
die() { echo "fedsite image: error: $*" >&2; exit 2; }

WHEELS=/tmp/wheelhouse
step="${1:-}"
# empty build args arrive as empty variables; pip would read an empty index URL as "no index"
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
    eval "value=\${$var:-}"
    if [ -z "$value" ]; then unset "$var"; else export "$var"; fi
done
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
[ -f /etc/ssl/certs/ca-certificates.crt ] && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt

wheel_count=$(ls "$WHEELS"/*.whl 2>/dev/null | wc -l)
torch_wheel=$(ls "$WHEELS"/torch-"${TORCH_VERSION}"*.whl 2>/dev/null | head -1 || true)
case "${OFFLINE:-0}" in
    1) [ "$wheel_count" -gt 0 ] || die "OFFLINE=1 but the wheelhouse ${WHEELHOUSE:-docker/wheelhouse} has no wheels: run bash docker/wheelhouse.sh first"
       set -- --no-index --find-links "$WHEELS" ;;
    0) set -- ;;
    *) die "OFFLINE must be 0 or 1, got '${OFFLINE}'" ;;
esac

pip="/opt/venv/bin/python -m pip"
case "$step" in
torch)
    case "${TORCH_VARIANT:-cpu}" in
        cpu|gpu) ;;
        *) die "TORCH_VARIANT must be cpu or gpu, got '${TORCH_VARIANT}'" ;;
    esac
    if [ -n "$torch_wheel" ]; then
        case "$torch_wheel:${TORCH_VARIANT:-cpu}" in
            *+cpu-*:gpu) die "TORCH_VARIANT=gpu but the wheelhouse holds the CPU build $(basename "$torch_wheel")" ;;
            *+cpu-*:cpu) ;;
            *:cpu) die "TORCH_VARIANT=cpu but the wheelhouse holds $(basename "$torch_wheel"), not a +cpu build" ;;
        esac
        # setuptools/wheel too: the runtime stage builds fedsite itself without an index
        $pip install --quiet "$@" --find-links "$WHEELS" "$torch_wheel"
    elif [ "${OFFLINE:-0}" = 1 ]; then
        die "OFFLINE=1 but the wheelhouse has no torch ${TORCH_VERSION} wheel: run bash docker/wheelhouse.sh first"
    elif [ "${TORCH_VARIANT:-cpu}" = cpu ]; then
        # PyPI's Linux torch is the CUDA build; the CPU build lives on the PyTorch index
        $pip install --quiet --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
            || die "could not get the CPU build of torch ${TORCH_VERSION} from ${TORCH_INDEX_URL}: make a wheelhouse (bash docker/wheelhouse.sh) or set TORCH_INDEX_URL"
    else
        $pip install --quiet "torch==${TORCH_VERSION}"
    fi
    $pip install --quiet "$@" "setuptools>=68" wheel
    ;;
requirements)
    # the base (the client) and the extras `all` stands for: the coordinator role needs [coordinator], the
    # client role's demo shards come from fedsite-client split, which needs [simulation] (flwr-datasets)
    requirements=$(/opt/venv/bin/python -c '
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
def expand(extra):  # an extra may name others of fedsite: all = ["fedsite[coordinator,simulation]"]
    for requirement in project["optional-dependencies"][extra]:
        own = re.fullmatch(r"fedsite\[([^\]]+)\]", requirement.strip())
        yield from (r for part in own.group(1).split(",") for r in expand(part.strip())) if own else [requirement]
print("\n".join(dict.fromkeys([*project["dependencies"], *expand(sys.argv[1])])))' all)
    echo "$requirements" > /tmp/requirements.txt
    # torch is already there; the constraint keeps a requirement of another package from replacing it
    /opt/venv/bin/python -c 'import torch; print("torch==" + torch.__version__)' > /tmp/constraints.txt
    $pip install --quiet "$@" -r /tmp/requirements.txt -c /tmp/constraints.txt \
        || die "pip could not install fedsite's requirements$( [ "${OFFLINE:-0}" = 1 ] && echo " from the wheelhouse alone (make it again with bash docker/wheelhouse.sh)")"
    ;;
*)
    die "pip-install.sh: unknown step '$step' (torch or requirements)"
    ;;
esac
