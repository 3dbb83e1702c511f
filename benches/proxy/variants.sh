#!/usr/bin/env bash
# Variants of esper-proxy against bare Pingora, interleaved, for profiling and tuning:
# the pieces of run.sh (upstream nginx, bare-pingora, bare-pingora-mimalloc, the event
# sink, a mitigation broker) with one esper-proxy per VARIANTS entry,
# "name:esper-binary:sample_rate", e.g. two builds of esper side by side:
#
#   VARIANTS="old:/tmp/esper-old:1.0 new:$T/esper:1.0" bash benches/proxy/variants.sh 5 8
#
# or one build with a setting changed, as a fourth field NAME=VALUE:
#
#   VARIANTS="case:$T/esper:1.0:ESPER_PRESERVE_HEADER_CASE=true defaults:$T/esper:1.0" \
#     bash benches/proxy/variants.sh 4 14
#
# Besides the totals, CPU is split into user and kernel time (a change in user-space
# work shows in the first without the kernel's wake-up costs blurring it).
#
# RATE=N loads every target at once at N requests/s each instead (measure_together in
# common.sh: ratios steadier than in turn), e.g. to weigh each feature's cost:
#
#   E=$T/esper
#   VARIANTS="defaults:$E:1.0 no-timer:$E:1.0:ESPER_UPSTREAM_IDLE_TIMEOUT=0s" \
#     RATE=1500 bash benches/proxy/variants.sh 10 10
#
# (a setting may be several, comma-separated, as in NAME=VALUE,NAME=VALUE).
#
# EXTRA_BARE="name:binary ..." adds bare Pingora pass-throughs of other builds (pgo.sh's).
#
# THREADS=SECS prints, per thread of every target, CPU time and wake-ups a second: first
# over SECS with no traffic, then over SECS at RATE (default 1000) requests/s each (what
# background work costs, beside the requests):
#
#   VARIANTS="old:/tmp/esper-old:1.0 new:$T/esper:1.0" THREADS=10 bash benches/proxy/variants.sh
#
# BLOCK=ENTITY (with RATE) publishes a block of ENTITY, e.g. ip:127.0.0.1, before the
# measurement: every esper target then answers its local 403 (the cost of refusing a
# flagged client), while the bare pass-throughs still proxy:
#
#   VARIANTS="plain:$T/esper:1.0 pgo:$P/esper:1.0" BLOCK=ip:127.0.0.1 RATE=1000 \
#     bash benches/proxy/variants.sh 10 10
#
# HOLD=SECS starts everything, writes the proxies' pids to $OUT/pids, prints "ready" and
# waits (to attach perf). Figures as in run.sh (targets in a shuffled order per
# repetition, CPU per request paired with bare Pingora's by repetition).
# Run `cargo build --profile "$PROFILE" -p esper -p esper-bench-proxy` first.
set -euo pipefail
DURATION=${1:-5}; REPS=${2:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PROFILE=${PROFILE:-release}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
OUT=${OUT:-/tmp/esper-variants}
mkdir -p "$OUT"
# shellcheck source=benches/proxy/common.sh
source "$ROOT/benches/proxy/common.sh"
start_upstream
start_event_sink
"$BIN/bare-pingora" 127.0.0.1:18083 "$UP" 1 >/dev/null 2>&1 & PIDS+=($!); BARE=$!
"$BIN/bare-pingora-mimalloc" 127.0.0.1:18086 "$UP" 1 >/dev/null 2>&1 & PIDS+=($!); BARE_MI=$!
# BARE_IDLE=SECS adds bare Pingora with that idle timeout on its pooled connections.
[ -n "${BARE_IDLE:-}" ] && { "$BIN/bare-pingora" 127.0.0.1:18087 "$UP" 1 "$BARE_IDLE" >/dev/null 2>&1 & PIDS+=($!); BARE_IDLE_PID=$!; }
"$BIN/esper" broker run mitigation --listen 127.0.0.1:18091 >/dev/null 2>&1 & PIDS+=($!)
sleep 1
declare -A VPID VPORT
port=18100
for v in $VARIANTS; do
  IFS=: read -r name bin rate setting <<<"$v"
  # shellcheck disable=SC2086
  env ${setting//,/ } ESPER_UPSTREAM=$UP ESPER_PROXY_THREADS=1 ESPER_PROXY_ID=bench RUST_LOG=warn ESPER_SAMPLE_RATE=$rate \
    ESPER_INGESTION_URL=http://127.0.0.1:18098 ESPER_MITIGATION_URL=http://127.0.0.1:18091 \
    "$bin" proxy run --listen "127.0.0.1:$port" --ops-listen "127.0.0.1:$((port+20))" 2>"$WORK/$name.log" & PIDS+=($!)
  VPID[$name]=$!; VPORT[$name]=$port; port=$((port+1))
done
VPID[bare-pingora]=$BARE; VPORT[bare-pingora]=18083
VPID[bare-pingora-mimalloc]=$BARE_MI; VPORT[bare-pingora-mimalloc]=18086
[ -n "${BARE_IDLE:-}" ] && { VPID[bare-pingora-idle-timer]=$BARE_IDLE_PID; VPORT[bare-pingora-idle-timer]=18087; }
# EXTRA_BARE="name:binary ..." adds more bare Pingora pass-throughs (another build of it).
port=18140
for b in ${EXTRA_BARE:-}; do
  IFS=: read -r name bin <<<"$b"
  "$bin" "127.0.0.1:$port" "$UP" 1 >/dev/null 2>&1 & PIDS+=($!)
  VPID[$name]=$!; VPORT[$name]=$port; port=$((port+1))
done
for name in "${!VPORT[@]}"; do wait_port "127.0.0.1:${VPORT[$name]}"; done
echo "${VPID[@]}" >"$OUT/pids"
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
measure() { # NAME PORT PID
  local b a out reqs rps p50 p99
  b=$(ticks "$3")
  out=$(wrk -t2 -c50 -d"${DURATION}s" --latency "http://127.0.0.1:$2/index.html")
  # A figure measured on error answers would be meaningless.
  if echo "$out" | grep -q "Non-2xx"; then echo "$out" >&2; echo "error answers from port $2" >&2; exit 1; fi
  a=$(ticks "$3")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}'); p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  echo "$1,$rps,$p50,$p99,$(awk -v b="$b" -v a="$a" -v hz="$(getconf CLK_TCK)" -v n="$reqs" 'BEGIN{
    split(b, x, " "); split(a, y, " "); u = (y[1] - x[1]) / hz * 1e6 / n; s = (y[2] - x[2]) / hz * 1e6 / n
    printf "%.1f,%.2f,%.2f", u + s, u, s}')" | tee -a "$OUT/results.csv"
}
[ -n "${HOLD:-}" ] && { echo ready; sleep "$HOLD"; exit 0; }
if [ -n "${THREADS:-}" ]; then
  # Each thread's CPU (schedstat) and voluntary context switches (its wake-ups).
  per_thread() {
    local name t
    for name in "${!VPID[@]}"; do
      for t in /proc/"${VPID[$name]}"/task/*; do
        echo "$name/$(tr ' ' _ <"$t/comm")/${t##*/} $(awk '{print $1}' "$t/schedstat") $(awk '/^voluntary_ctxt/ {print $2}' "$t/status")"
      done
    done | sort
  }
  report() { # BEFORE AFTER
    join "$1" "$2" | awk -v s="$THREADS" '$4 > $2 {printf "%-44s %8.3f ms/s %7.1f wake-ups/s\n", $1, ($4 - $2) / 1e6 / s, ($5 - $3) / s}'
  }
  load() { # SECS
    local gens=() name
    for name in "${!VPORT[@]}"; do
      "$BIN/fixed-rate" "127.0.0.1:${VPORT[$name]}" /index.html "${RATE:-1000}" "$1" 20 >/dev/null & gens+=($!)
    done
    wait "${gens[@]}"
  }
  per_thread >"$WORK/t0"; sleep "$THREADS"; per_thread >"$WORK/t1"
  echo "no traffic, $THREADS s:"; report "$WORK/t0" "$WORK/t1"
  load 2
  per_thread >"$WORK/t2"; load "$THREADS"; per_thread >"$WORK/t3"
  echo "${RATE:-1000} requests/s each, $THREADS s:"; report "$WORK/t2" "$WORK/t3"
  exit 0
fi
declare -A VSTATUS
if [ -n "${BLOCK:-}" ]; then
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ); until=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
  curl -fsS -o /dev/null -H 'content-type: application/json' http://127.0.0.1:18091/api/mitigations -d "{\"mitigations\": [{
    \"id\": \"bench-block\", \"entity\": \"$BLOCK\", \"action\": {\"type\": \"block\"},
    \"reason\": {\"summary\": \"benchmark\"}, \"origin\": \"manual\",
    \"created_at\": \"$now\", \"expires_at\": \"$until\"}]}"
  for v in $VARIANTS; do
    IFS=: read -r name _ <<<"$v"
    VSTATUS[$name]=403
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${VPORT[$name]}/index.html")" = 403 ]; do sleep 0.2; done
  done
fi
if [ -n "${RATE:-}" ]; then
  targets=()
  for name in "${!VPORT[@]}"; do targets+=("$name:${VPORT[$name]}:${VPID[$name]}:${VSTATUS[$name]:-200}"); done
  echo "target,sent,errors,late,p50_us,p90_us,p99_us,p999_us,max_us,cpu_us_per_req" >"$OUT/together.csv"
  measure_together "$OUT/together.csv" "$RATE" "$DURATION" "$REPS" "${targets[@]}"
  python3 "$ROOT/benches/proxy/summary.py" latency "$OUT/together.csv"
  exit 0
fi
echo "target,req_per_s,p50,p99,cpu_us_per_req,user_us_per_req,sys_us_per_req" >"$OUT/results.csv"
for rep in $(seq 1 "$REPS"); do
  for name in $(shuffled "$rep" "${!VPORT[@]}"); do measure "$name" "${VPORT[$name]}" "${VPID[$name]}"; done
done
python3 "$ROOT/benches/proxy/summary.py" throughput "$OUT/results.csv"
