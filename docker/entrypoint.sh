#!/bin/sh
# fedsite container entrypoint: one image, three roles.
#
#   entrypoint.sh certs        write dev TLS certificates into $FEDSITE_CERTS_DIR (kept if already there)
#   entrypoint.sh coordinator  write the job file and tokens from the environment, then serve it (resumes a run)
#   entrypoint.sh client       take part in the job (makes a demo data shard if $FEDSITE_DATA is missing)
#   entrypoint.sh <command>    run anything else (e.g. fedsite-client split ...)
#
# Every path and setting comes from the environment with a container default,
# so the same script runs as a plain process in the tests (tests/hardening/test_deploy.py).
set -eu

role="${1:-}"
[ $# -gt 0 ] && shift

CERTS="${FEDSITE_CERTS_DIR:-/certs}"
DATA="${FEDSITE_DATA_DIR:-/data}"
STATE="${FEDSITE_STATE_DIR:-/state}"
EXAMPLES="${FEDSITE_EXAMPLES:-/opt/fedsite/coordinator/examples}"
PORT="${FEDSITE_PORT:-50051}"
PYTHON="${FEDSITE_PYTHON:-python}"
MTLS="${FEDSITE_MTLS:-1}"

die() { echo "fedsite-entrypoint: error: $*" >&2; exit 2; }

case "$role" in
certs)
    set -- --output-dir "$CERTS" --keep-existing --host coordinator
    for host in $(echo "${FEDSITE_CERT_HOSTS:-}" | tr ',' ' '); do set -- "$@" --host "$host"; done
    exec "$PYTHON" -m coordinator.certs "$@"
    ;;
coordinator)
    [ -f "$CERTS/server.pem" ] || die "no certificate in $CERTS (run the certs service first)"
    mkdir -p "$DATA"
    job="${FEDSITE_JOB_FILE:-}"
    if [ -z "$job" ]; then
        [ -n "${FEDSITE_TOKENS:-}" ] || die "FEDSITE_TOKENS is empty: set the client tokens in .env"
        echo "$FEDSITE_TOKENS" | tr ',' '\n' | sed '/^[[:space:]]*$/d' > "$DATA/tokens.txt"
        client_ca=""
        [ "$MTLS" = "1" ] && client_ca="$CERTS/ca.pem"
        job="$DATA/job.toml"
        cat > "$job" <<JOB
# written by docker/entrypoint.sh from the environment (.env); set FEDSITE_JOB_FILE to use your own
[job]
name = "${FEDSITE_JOB_NAME:-compose-demo}"
mode = "${FEDSITE_MODE:-lora}"
rounds = ${FEDSITE_ROUNDS:-3}
clients_per_round = ${FEDSITE_CLIENTS_PER_ROUND:-3}
min_clients = ${FEDSITE_MIN_CLIENTS:-2}
round_timeout_s = ${FEDSITE_ROUND_TIMEOUT_S:-900}
seed = 0

[model]
path = "${FEDSITE_MODEL:-minilm}"
task = "classification"
max_length = ${FEDSITE_MAX_LENGTH:-64}

[data]
validation = "${FEDSITE_VALIDATION:-$EXAMPLES/data/wordnet_supersense.validation.jsonl.gz}"
validation_max_examples = ${FEDSITE_VALIDATION_MAX:-2000}

[train]
local_steps = ${FEDSITE_LOCAL_STEPS:-30}
batch_size = ${FEDSITE_BATCH_SIZE:-16}
lr = ${FEDSITE_LR:-2e-3}

[enrollment]
tokens_file = "tokens.txt"

[tls]
cert = "$CERTS/server.pem"
key = "$CERTS/server-key.pem"
client_ca = "$client_ca"
JOB
    fi
    out="$DATA/run"
    set -- serve --config "$job" --address "${FEDSITE_ADDRESS:-0.0.0.0:$PORT}" --output-dir "$out" "$@"
    # a restarted container (killed, crashed, host rebooted) continues its run: the coordinator refuses an
    # output directory with metrics or checkpoints unless resuming (docker/faults.sh shows it)
    if [ -f "$out/metrics.jsonl" ] || [ -d "$out/checkpoints" ]; then set -- "$@" --resume; fi
    if [ -n "${FEDSITE_METRICS_PORT:-}" ] && "$PYTHON" -m coordinator serve --help 2>/dev/null | grep -q -- --metrics-port; then
        set -- "$@" --metrics-port "$FEDSITE_METRICS_PORT" --metrics-host "${FEDSITE_METRICS_HOST:-0.0.0.0}"
    fi
    if [ -n "${FEDSITE_DASHBOARD_PORT:-}" ]; then
        # off loopback the dashboard needs a token; the CLI reads it from FEDSITE_DASHBOARD_TOKEN (kept out of ps)
        [ -n "${FEDSITE_DASHBOARD_TOKEN:-}" ] || die "FEDSITE_DASHBOARD_PORT is set but FEDSITE_DASHBOARD_TOKEN is empty: set a dashboard token in .env (or unset the port)"
        set -- "$@" --dashboard-port "$FEDSITE_DASHBOARD_PORT" --dashboard-host "${FEDSITE_DASHBOARD_HOST:-0.0.0.0}"
    fi
    exec "$PYTHON" -m coordinator "$@"
    ;;
client)
    [ -f "$CERTS/ca.pem" ] || die "no CA certificate in $CERTS (run the certs service first)"
    [ -n "${FEDSITE_TOKEN:-}" ] || die "FEDSITE_TOKEN is empty: set this client's token in .env"
    data="${FEDSITE_DATA:-$DATA/train.jsonl}"
    if [ ! -f "$data" ] && [ -n "${FEDSITE_DEMO_SHARD:-}" ]; then
        # demo only: "i/N" = the i-th (0-based) of N iid shards of the bundled WordNet training split
        index="${FEDSITE_DEMO_SHARD%/*}"
        count="${FEDSITE_DEMO_SHARD#*/}"
        "$PYTHON" -m client split --data "$EXAMPLES/data/wordnet_supersense.train.jsonl.gz" \
            --clients "$count" --output-dir "$DATA/demo-shards" --seed 0 > /dev/null
        data="$DATA/demo-shards/client-$(printf '%03d' "$index").jsonl"
    fi
    [ -f "$data" ] || die "no data at $data (mount a file there, set FEDSITE_DATA, or FEDSITE_DEMO_SHARD=i/N)"
    set -- run --coordinator "${FEDSITE_COORDINATOR:-coordinator:$PORT}" --data "$data" --state-dir "$STATE" \
        --ca-cert "$CERTS/ca.pem" "$@"
    [ "$MTLS" = "1" ] && set -- "$@" --cert "$CERTS/client.pem" --key "$CERTS/client-key.pem"
    [ -n "${FEDSITE_CLIENT_NAME:-}" ] && set -- "$@" --name "$FEDSITE_CLIENT_NAME"
    exec "$PYTHON" -m client "$@"
    ;;
"")
    die "usage: entrypoint.sh certs|coordinator|client [extra arguments] (or any command)"
    ;;
*)
    exec "$role" "$@"
    ;;
esac
