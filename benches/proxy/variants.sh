#!/usr/bin/env bash
# Variants of esper-proxy against bare Pingora, interleaved, for profiling and tuning:
# the pieces of run.sh (upstream nginx, bare-pingora, ingestion and mitigation brokers)
# with one esper-proxy per VARIANTS entry, "name:esper-binary:sample_rate", e.g.
#
#   VARIANTS="rate1:$T/esper:1.0 rate0.01:$T/esper:0.01" bash benches/proxy/variants.sh 5 3
#
# HOLD=SECS starts everything, writes the proxies' pids to $OUT/pids, prints "ready" and
# waits (to attach perf). Figures as in run.sh: req/s and the proxy's CPU µs per request.
# Run `cargo build --release -p esper -p esper-bench-proxy` first.
set -euo pipefail
DURATION=${1:-5}; REPS=${2:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=${OUT:-/tmp/esper-variants}
mkdir -p "$OUT"
# shellcheck source=benches/proxy/common.sh
source "$ROOT/benches/proxy/common.sh"
start_upstream
"$BIN/bare-pingora" 127.0.0.1:18083 "$UP" 1 >/dev/null 2>&1 & PIDS+=($!); BARE=$!
"$BIN/esper" broker run ingestion --listen 127.0.0.1:18090 >/dev/null 2>&1 & PIDS+=($!)
"$BIN/esper" broker run mitigation --listen 127.0.0.1:18091 >/dev/null 2>&1 & PIDS+=($!)
sleep 1
declare -A VPID VPORT
port=18084
for v in $VARIANTS; do
  IFS=: read -r name bin rate <<<"$v"
  ESPER_UPSTREAM=$UP ESPER_PROXY_THREADS=1 ESPER_PROXY_ID=bench RUST_LOG=warn ESPER_SAMPLE_RATE=$rate \
    ESPER_INGESTION_URL=http://127.0.0.1:18090 ESPER_MITIGATION_URL=http://127.0.0.1:18091 \
    "$bin" proxy run --listen "127.0.0.1:$port" --ops-listen "127.0.0.1:$((port+10))" 2>"$WORK/$name.log" & PIDS+=($!)
  VPID[$name]=$!; VPORT[$name]=$port; port=$((port+1))
done
wait_port 127.0.0.1:18083
for v in $VARIANTS; do IFS=: read -r name _ _ <<<"$v"; wait_port 127.0.0.1:${VPORT[$name]}; done
echo "${VPID[@]}" >"$OUT/pids"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
measure() { # NAME PORT PID
  local b a out reqs rps p50 p99
  b=$(ticks $3)
  out=$(wrk -t2 -c50 -d"${DURATION}s" --latency "http://127.0.0.1:$2/index.html")
  # A figure measured on error answers would be meaningless.
  if echo "$out" | grep -q "Non-2xx"; then echo "$out" >&2; echo "error answers from port ${port:-$2}" >&2; exit 1; fi
  a=$(ticks $3)
  reqs=$(echo "$out" | awk '/requests in/ {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}'); p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  echo "$1,$rps,$p50,$p99,$(awk -v t=$((a-b)) -v hz=$(getconf CLK_TCK) -v n=$reqs 'BEGIN{printf "%.1f", t/hz*1e6/n}')" | tee -a "$OUT/results.csv"
}
[ -n "${HOLD:-}" ] && { echo ready; sleep "$HOLD"; exit 0; }
: >"$OUT/results.csv"
for _ in $(seq 1 "$REPS"); do
  measure bare-pingora 18083 $BARE
  for v in $VARIANTS; do IFS=: read -r name _ _ <<<"$v"; measure "$name" ${VPORT[$name]} ${VPID[$name]}; done
done
python3 - "$OUT/results.csv" <<'PY'
import statistics, sys
rows=[r.split(',') for r in open(sys.argv[1]).read().split()]
by={}
for r in rows: by.setdefault(r[0],[]).append(r)
base=statistics.median(float(r[4]) for r in by['bare-pingora'])
for t,rs in by.items():
    cpu=statistics.median(float(r[4]) for r in rs); rps=statistics.median(float(r[1]) for r in rs)
    print(f"| {t} | {rps:.0f} | {cpu:.1f} | {cpu/base:.2f} | cpu runs {[r[4] for r in rs]} p50s {[r[2] for r in rs]} p99s {[r[3] for r in rs]}")
PY
