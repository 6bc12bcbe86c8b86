#!/usr/bin/env bash
# A Docker engine and a registry-free base image on a Debian 12 host whose only outside access is the
# package registries (no image registry): what docker/smoke.sh and the long Docker tests need.
# Idempotent: skips what is already there.
#
#   bash docker/engine.sh          # engine up, base image local/debian:bookworm present
#   bash docker/engine.sh stop     # stop the engine this script started
#
# The Debian mirror is read from apt's active sources (deb lines and deb822 "URIs:" fields, not
# comments), and a missing /etc/apt/sources.list does not stop the script. Measured on 2 cores: apt
# ~1 min, debootstrap ~2 min, import ~3 s, engine ~1 s.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PIDFILE=${DOCKERD_PIDFILE:-/tmp/fedsite-dockerd.pid}
BASE_IMAGE=${FEDSITE_DEBIAN_IMAGE:-local/debian:bookworm}

if [ "${1:-}" = stop ]; then
  if [ -f "$PIDFILE" ] && kill "$(cat "$PIDFILE")" 2>/dev/null; then rm -f "$PIDFILE"; echo "engine stopped"; fi
  exit 0
fi

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi

# No systemd: start the daemon by hand. Default flags work (overlay2, cgroupfs, bridge + iptables).
if ! docker info >/dev/null 2>&1; then
  # at priority 0 even when this script runs under nice: containers inherit the engine's niceness, and a
  # starved client misses its heartbeats
  nohup nice -n "$((0 - $(nice)))" dockerd >/tmp/fedsite-dockerd.log 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "engine: dockerd did not start: see /tmp/fedsite-dockerd.log" >&2; exit 1; }
fi

# Base image from Debian's packages, through the mirror apt already uses.
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  mirror=$( { grep -hE '^[[:space:]]*(deb[[:space:]]|URIs:)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
              /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
            | grep -oE 'https?://[^ ]+' | grep -i debian | grep -v security | head -1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d /tmp/rootfs.XXXX)
  echo "engine: debootstrap bookworm from $mirror (about 2 minutes)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/tmp/fedsite-debootstrap.log 2>&1 \
    || { echo "engine: debootstrap failed: see /tmp/fedsite-debootstrap.log" >&2; exit 1; }
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi
docker run --rm "$BASE_IMAGE" true

# HTTPS inside containers needs this machine's extra CA certificates (as behind a corporate proxy).
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  echo "engine: extra CA certificates for image builds: /usr/local/share/ca-certificates/*.crt"
fi
echo "engine: up; base image $BASE_IMAGE; compose: docker-compose $(docker-compose version --short 2>/dev/null)"
