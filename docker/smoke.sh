#!/usr/bin/env bash
# The deployment, end to end, from a checkout: build the image, bring up the compose stack (certificates
# job, coordinator, three clients over mutual TLS) on a short job on the embedded MiniLM
# (docker/smoke/job.toml), wait for it to finish, check that every round ran once with all three clients
# and that final/ loads with plain transformers (and final/adapter/ with peft) and that the live dashboard
# answers over HTTPS behind its token while the job runs, print one summary line,
# tear everything down (containers, network, volumes). Exit 0 only if all of that held.
#
#   bash docker/smoke.sh
#
# Needs a Docker engine and docker-compose (on a Debian host without them: bash docker/engine.sh). The
# image is built air-gapped when it can be (the base image local/debian:bookworm if present, the
# wheelhouse docker/wheelhouse if made, this host's extra CA certificates).
# Settings: SMOKE_BASE_IMAGE (default local/debian:bookworm if present, else python:3.11-slim),
# SMOKE_SKIP_BUILD=1 (use the image fedsite:$SMOKE_IMAGE_TAG as it is), SMOKE_IMAGE_TAG (default smoke),
# SMOKE_TIMEOUT_S (default 1800), SMOKE_KEEP=1 (leave the stack up to look at it).
set -euo pipefail
# shellcheck source=docker/lib.sh
. "$(dirname "$0")/lib.sh"

prepare_stack job.toml
say "starting project $PROJECT (certs, coordinator, client-1..3; mutual TLS)"
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "docker-compose up failed"; }
# while the job runs: the dashboard answers over HTTPS (the dev CA's server certificate) behind its token
wait_for_round 0 "${SMOKE_TIMEOUT_S:-1800}"
dashboard=$(check_dashboard) || fail "dashboard: $dashboard"
wait_for_coordinator_exit "${SMOKE_TIMEOUT_S:-1800}"
summary=$(check_metrics 3 3) || fail "$summary"
read -r rounds first_acc last_acc <<<"$summary"
# the clients end by themselves once the coordinator says the job is done
for service in client-1 client-2 client-3; do
  deadline=$(( $(date +%s) + 120 ))
  until [[ "$(state_of $service)" == exited* ]]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$service did not stop after the job ended: $(state_of $service)"
    sleep 2
  done
  [[ "$(state_of $service)" == "exited 0 "* ]] || fail "$service ended with $(state_of $service)"
done
loaded=$(check_final) || fail "final/ did not load: $(tail -n 3 "$WORK/final.err")"
read -r labels params label <<<"$loaded"
[ -n "${label:-}" ] || fail "final/ did not load: $(tail -n 3 "$WORK/final.err")"
echo "smoke: OK: image fedsite:$SMOKE_IMAGE_TAG ${IMAGE_MB} MB; $rounds rounds x 3 clients over mutual TLS;" \
  "val_accuracy $first_acc -> $last_acc; $dashboard; final/ loads ($labels labels, $params parameters, adapter via peft);" \
  "$(( $(date +%s) - START ))s"
