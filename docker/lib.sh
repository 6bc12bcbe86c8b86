# Shared by docker/smoke.sh and docker/faults.sh (sourced, not run): a throw-away compose project of the
# repository's docker-compose.yml with docker/smoke/compose.yml on top, its own ports, tokens and
# volumes, always torn down at exit.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SMOKE_IMAGE_TAG=${SMOKE_IMAGE_TAG:-smoke}
PROJECT=${SMOKE_PROJECT:-fedsite-smoke-$$}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedsite-smoke.XXXXXX")
START=$(date +%s)
trap 'rm -rf "$WORK"' EXIT  # until prepare_stack puts the full teardown in place

say() { echo "$(basename "$0" .sh): $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# docker-compose with nothing of the caller's environment but what it needs: FEDSITE_* or PYTHON* variables
# of the calling shell would override the env file, and Debian's docker-compose is a Python program
compose() {
  env -i PATH="$PATH" HOME="${HOME:-/root}" ${DOCKER_HOST:+DOCKER_HOST="$DOCKER_HOST"} \
    docker-compose --project-directory "$REPO" -p "$PROJECT" -f "$REPO/docker-compose.yml" \
    -f "$REPO/docker/smoke/compose.yml" --env-file "$WORK/smoke.env" "$@"
}

teardown() {
  local code=$?
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    say "SMOKE_KEEP=1: leaving project $PROJECT up (docker-compose -p $PROJECT ... down -v to remove)"
  elif [ -f "$WORK/smoke.env" ]; then
    if [ "$code" != 0 ]; then
      say "logs of the failed run (last 40 lines per service):"
      compose logs --no-color --tail 40 >&2 2>/dev/null || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || say "warning: 'docker-compose -p $PROJECT down -v' failed"
  fi
  rm -rf "$WORK"
  exit "$code"
}

# engine, image, env file: everything before 'up'
prepare_stack() {  # $1 = job file name under docker/smoke/
  command -v docker >/dev/null && command -v docker-compose >/dev/null \
    || fail "docker and docker-compose are needed (on Debian: bash docker/engine.sh)"
  docker info >/dev/null 2>&1 || fail "no Docker engine answers (start one: bash docker/engine.sh)"
  if [ "${SMOKE_SKIP_BUILD:-0}" = 1 ]; then
    docker image inspect "fedsite:$SMOKE_IMAGE_TAG" >/dev/null 2>&1 \
      || fail "SMOKE_SKIP_BUILD=1 but there is no image fedsite:$SMOKE_IMAGE_TAG"
  else
    # air-gapped when it can be: a local Debian base and the wheelhouse, if this machine has them
    local base=${SMOKE_BASE_IMAGE:-} args=()
    if [ -z "$base" ]; then
      if docker image inspect local/debian:bookworm >/dev/null 2>&1; then base=local/debian:bookworm
      else base=python:3.11-slim; fi
    fi
    args=(--base "$base" --tag "fedsite:$SMOKE_IMAGE_TAG")
    ls "$REPO"/docker/wheelhouse/torch-*.whl >/dev/null 2>&1 && args+=(--offline)
    ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1 && args+=(--ca-certs /usr/local/share/ca-certificates)
    bash "$REPO/docker/build.sh" "${args[@]}" >"$WORK/build.log" 2>&1 \
      || { tail -n 20 "$WORK/build.log" >&2; fail "the image did not build (full log above)"; }
    grep '^build: ' "$WORK/build.log" >&2
  fi
  IMAGE_MB=$(( $(docker image inspect -f '{{.Size}}' "fedsite:$SMOKE_IMAGE_TAG") / 1000000 ))
  cat >"$WORK/smoke.env" <<ENV
FEDSITE_IMAGE_TAG=$SMOKE_IMAGE_TAG
FEDSITE_PORT=$(free_port)
FEDSITE_METRICS_PORT=$(free_port)
FEDSITE_DASHBOARD_PORT=$(free_port)
FEDSITE_DASHBOARD_TOKEN=smoke-dashboard-token
FEDSITE_BIND=127.0.0.1
FEDSITE_MTLS=1
FEDSITE_TOKEN_1=smoke-token-1
FEDSITE_TOKEN_2=smoke-token-2
FEDSITE_TOKEN_3=smoke-token-3
FEDSITE_SMOKE_JOB=$1
# small demo shards (3 of 30 of the WordNet training split, ~3,100 examples each) keep the rounds short
FEDSITE_DEMO_SHARD_1=0/30
FEDSITE_DEMO_SHARD_2=1/30
FEDSITE_DEMO_SHARD_3=2/30
ENV
  trap teardown EXIT
  trap 'exit 130' INT TERM
}

container_of() { compose ps -q "$1" 2>/dev/null; }

# "running", "exited 0", ... of a service's container
state_of() {
  local id
  id=$(container_of "$1")
  [ -n "$id" ] || { echo "absent"; return; }
  docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$id"
}

# the coordinator's metrics.jsonl as it is now (empty while it has none)
metrics() {
  local id
  id=$(container_of coordinator)
  [ -n "$id" ] || return 0
  docker cp "$id:/data/run/metrics.jsonl" - 2>/dev/null | tar -xO 2>/dev/null || true
}

last_round() { metrics | python3 -c 'import json, sys; print(max([json.loads(l)["round"] for l in sys.stdin if l.strip()] or [-1]))'; }

# a client container that the restart policy keeps restarting will not get better by waiting
check_clients_not_looping() {
  local service restarts
  for service in client-1 client-2 client-3; do
    restarts=$(state_of "$service" | cut -d' ' -f3)
    if [ "${restarts:-0}" -gt 3 ] 2>/dev/null; then
      fail "$service keeps restarting ($restarts times): $(docker logs --tail 1 "$(container_of "$service")" 2>&1)"
    fi
  done
}

# wait until the coordinator's container has exited (0 = the job finished); fail on a crash loop or the deadline
wait_for_coordinator_exit() {  # $1 = deadline in seconds from now
  local deadline=$(( $(date +%s) + $1 )) state
  while :; do
    state=$(state_of coordinator)
    case "$state" in
      "exited 0 "*) return 0 ;;
      exited*|dead*) fail "the coordinator stopped: $state (status, exit code, restarts)" ;;
    esac
    [ "$(echo "$state" | cut -d' ' -f3)" -le 3 ] 2>/dev/null || fail "the coordinator keeps restarting: $state"
    check_clients_not_looping
    [ "$(date +%s)" -lt "$deadline" ] || fail "the job did not finish within $1 s (last round $(last_round))"
    sleep 5
  done
}

wait_for_round() {  # $1 = round, $2 = deadline in seconds from now
  local deadline=$(( $(date +%s) + $2 ))
  until [ "$(last_round)" -ge "$1" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "round $1 did not complete within $2 s (last round $(last_round))"
    case "$(state_of coordinator)" in exited*|dead*) fail "the coordinator stopped: $(state_of coordinator)" ;; esac
    check_clients_not_looping
    sleep 3
  done
}

# every round 0..N exactly once, all "ok" with at least $2 clients; prints "rounds first_acc last_acc"
check_metrics() {  # $1 = rounds, $2 = min completed clients per round
  metrics >"$WORK/metrics.jsonl"
  python3 - "$WORK/metrics.jsonl" "$1" "$2" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
rounds, least = int(sys.argv[2]), int(sys.argv[3])
seen = [r["round"] for r in records]
if seen != list(range(rounds + 1)):
    sys.exit(f"metrics.jsonl rounds are {seen}, not 0..{rounds} each exactly once")
bad = [(r["round"], r.get("status"), r.get("completed_clients")) for r in records[1:]
       if r.get("status") != "ok" or r.get("completed_clients", 0) < least]
if bad:
    sys.exit(f"rounds not ok with >= {least} clients (round, status, completed): {bad}")
print(rounds, f"{records[0]['val_accuracy']:.3f}", f"{records[-1]['val_accuracy']:.3f}")
PY
}

# final/ loads with plain transformers, final/adapter/ with peft; prints "labels parameters"
check_final() {
  compose run --rm --no-deps -T --entrypoint python coordinator - <<'PY' 2>"$WORK/final.err" | tail -n 1
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("/data/run/final")
tokenizer = AutoTokenizer.from_pretrained("/data/run/final")
batch = tokenizer(["dog: a domesticated carnivorous mammal"], return_tensors="pt")
with torch.no_grad():
    label = model.config.id2label[int(model(**batch).logits.argmax())]
PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("/data/run/final"), "/data/run/final/adapter")
print(len(model.config.id2label), sum(p.numel() for p in model.parameters()), label)
PY
}

# the coordinator's dashboard from this host, as a viewer reaches it: HTTPS on the published port, the dev CA,
# refused without the token, /api/status with it; prints "dashboard OK over HTTPS (<what the job is doing>)"
check_dashboard() {
  local id port token
  id=$(container_of coordinator)
  docker cp "$id:/certs/ca.pem" "$WORK/ca.pem" >/dev/null 2>&1 || { echo "no ca.pem in the coordinator"; return 1; }
  port=$(sed -n 's/^FEDSITE_DASHBOARD_PORT=//p' "$WORK/smoke.env")
  token=$(sed -n 's/^FEDSITE_DASHBOARD_TOKEN=//p' "$WORK/smoke.env")
  python3 - "$WORK/ca.pem" "$port" "$token" <<'PY'
import json, ssl, sys, urllib.error, urllib.request
ca, port, token = sys.argv[1:]
context = ssl.create_default_context(cafile=ca)
url = f"https://127.0.0.1:{port}/api/status"
try:
    urllib.request.urlopen(url, context=context, timeout=60)
    sys.exit("answered without the token")
except urllib.error.HTTPError as exc:
    if exc.code != 401:
        sys.exit(f"without the token: HTTP {exc.code}, not 401")
request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(request, context=context, timeout=60) as response:
    status = json.loads(response.read())
print(f"dashboard OK over HTTPS ({status.get('status_text')})")
PY
}
