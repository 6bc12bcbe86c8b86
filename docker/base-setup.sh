#!/bin/sh
# Image base set-up, run by the Dockerfile as root in the base stage: Python 3.11 in a venv at /opt/venv,
# the extra CA certificates, the unprivileged user. Works on python:3.11-slim (Python present) and on a
# bare Debian/Ubuntu image (Python from the distribution's packages, through its own apt mirror), so an
# air-gapped site can start from an image it built itself. Every failure is one line naming what is missing.
set -eu
die() { echo "fedsite image: error: $*" >&2; exit 2; }

certs_dir=/usr/local/share/ca-certificates/fedsite
has_certs=0
ls "$certs_dir"/*.crt >/dev/null 2>&1 && has_certs=1

need=""
command -v python3 >/dev/null 2>&1 || need="python3 python3-venv"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need="python3 python3-venv"
[ -f /etc/ssl/certs/ca-certificates.crt ] && command -v update-ca-certificates >/dev/null 2>&1 \
    || need="$need ca-certificates"
if [ -n "$need" ]; then
    command -v apt-get >/dev/null 2>&1 \
        || die "base image ${BASE_IMAGE:-?} lacks $need and has no apt-get to install it: use python:3.11-slim or a Debian/Ubuntu image"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "base image ${BASE_IMAGE:-?}: apt-get update failed (is its Debian mirror reachable?)"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null \
        || die "base image ${BASE_IMAGE:-?}: could not install $need with apt-get"
    rm -rf /var/lib/apt/lists/*
fi
version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$version" in
    3.11) ;;
    *) die "base image ${BASE_IMAGE:-?} has Python $version; fedsite's image needs 3.11 (the wheelhouse is cp311)" ;;
esac

if [ "$has_certs" = 1 ]; then
    update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed on $certs_dir/*.crt (are they PEM?)"
    echo "fedsite image: added $(ls "$certs_dir"/*.crt | wc -l) extra CA certificate(s)"
fi

python3 -m venv /opt/venv || die "python3 -m venv failed in base image ${BASE_IMAGE:-?}"
id fedsite >/dev/null 2>&1 || useradd --create-home --uid 10001 fedsite
mkdir -p /certs /data /state
chown fedsite:fedsite /certs /data /state
echo "fedsite image: Python $(python3 -c 'import platform; print(platform.python_version())') on ${BASE_IMAGE:-?}"
