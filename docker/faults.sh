#!/usr/bin/env bash
# Faults in the compose deployment, for real: a six-round job (docker/smoke/faults.toml) in the compose
# stack; after round 2 the coordinator's container is killed (SIGKILL, `docker kill`) and brought back with
# `docker-compose up -d` (the entrypoint resumes a run that has metrics: --resume); after the next round a
# client's container is killed and brought back the same way, and must rejoin from its state volume
# (no new enrolment, no new package download) and complete a later round. Passes only if the job then
# finishes with every round exactly once, all rounds ok, and final/ loads. One summary line.
#
#   bash docker/faults.sh          # same settings as docker/smoke.sh (SMOKE_SKIP_BUILD=1 reuses the image)
set -euo pipefail
# shellcheck source=docker/lib.sh
. "$(dirname "$0")/lib.sh"

prepare_stack faults.toml
say "starting project $PROJECT (faults job: 6 rounds)"
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "docker-compose up failed"; }
timeout=${SMOKE_TIMEOUT_S:-2400}

# 1. the coordinator, killed mid-job
wait_for_round 2 "$timeout"
coordinator=$(container_of coordinator)
before=$(last_round)
docker kill "$coordinator" >/dev/null
killed_at=$(date -u +%Y-%m-%dT%H:%M:%S)
[[ "$(state_of coordinator)" != running* ]] || fail "the coordinator still runs after docker kill"
say "killed the coordinator after round $before; bringing it back"
compose up -d --no-build coordinator >>"$WORK/up.log" 2>&1 || fail "docker-compose up coordinator failed"
deadline=$(( $(date +%s) + 300 ))
until docker logs --since "$killed_at" "$(container_of coordinator)" 2>&1 | grep -q "resumed after round"; do
  [ "$(date +%s)" -lt "$deadline" ] \
    || fail "the restarted coordinator did not resume: $(docker logs --since "$killed_at" "$(container_of coordinator)" 2>&1 | tail -n 5)"
  sleep 2
done
resumed=$(docker logs --since "$killed_at" "$(container_of coordinator)" 2>&1 | grep -o "resumed after round [0-9]*" | head -n 1)
say "coordinator: $resumed"

# 2. a client, killed and restarted: it must come back from its state volume
client_id=$(docker logs "$(container_of client-2)" 2>&1 | grep -o "enrolled as [^ ]*" | head -n 1 | cut -d' ' -f3)
[ -n "$client_id" ] || fail "client-2 never logged its enrolment"
wait_for_round $(( before + 1 )) "$timeout"
docker kill "$(container_of client-2)" >/dev/null
client_killed_at=$(date -u +%Y-%m-%dT%H:%M:%S)
killed_round=$(last_round)
say "killed client-2 ($client_id) after round $killed_round; bringing it back"
compose up -d --no-build client-2 >>"$WORK/up.log" 2>&1 || fail "docker-compose up client-2 failed"

wait_for_coordinator_exit "$timeout"
restart_log=$(docker logs --since "$client_killed_at" "$(container_of client-2)" 2>&1)
echo "$restart_log" | grep -q "ready:" || fail "client-2 did not get ready again after its restart"
if echo "$restart_log" | grep -Eq "enrolled as|job package verified"; then
  fail "client-2 enrolled or downloaded again after its restart instead of using its state volume"
fi
summary=$(check_metrics 6 2) || fail "$summary"
read -r rounds first_acc last_acc <<<"$summary"
rejoined=$(python3 - "$WORK/metrics.jsonl" "$client_id" "$killed_round" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(" ".join(str(r["round"]) for r in records
               if r["round"] > int(sys.argv[3]) and sys.argv[2] in r.get("completed_client_ids", [])))
PY
)
[ -n "$rejoined" ] || fail "client-2 ($client_id) completed no round after its restart"
loaded=$(check_final) || fail "final/ did not load: $(tail -n 3 "$WORK/final.err")"
read -r labels _ <<<"$loaded"
echo "faults: OK: coordinator killed after round $before, $resumed; client-2 killed after round $killed_round," \
  "rejoined from its state volume (no re-enrolment, no re-download), completed round(s) $rejoined;" \
  "rounds 0..$rounds each exactly once, all ok; val_accuracy $first_acc -> $last_acc; final/ loads ($labels labels);" \
  "$(( $(date +%s) - START ))s"
