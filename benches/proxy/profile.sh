#!/usr/bin/env bash
# Where a proxy's CPU per request goes, counted rather than timed (so a busy 2-core machine
# does not blur it): user-space instructions per request under callgrind, and system calls
# per request under strace, for bare Pingora and esper-proxy fed the same requests.
#
#   cargo build --profile profiling -p esper -p esper-bench-proxy
#   bash benches/proxy/profile.sh [REQUESTS] [CONNECTIONS]      # default 20000 over 4
#
# Prints, per target, instructions and system calls per request, and leaves the callgrind
# files in $OUT (default /tmp/esper-profile) for `callgrind_annotate`, e.g.
#   callgrind_annotate --inclusive=yes $OUT/esper-proxy.callgrind | head -80
# CALLGRIND_ARGS adds options, e.g. "--cache-sim=yes" for cache misses by function.
# Each target gets its steady state only: collection is switched on after a warm-up on
# the same connections. esper-proxy runs with its defaults (every request reported to a
# real ingestion broker, which runs outside the measurement).
set -euo pipefail
REQUESTS=${1:-20000}
CONNS=${2:-4}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/profiling}
OUT=${OUT:-/tmp/esper-profile}
TARGETS=${TARGETS:-"bare-pingora bare-pingora-mimalloc esper-proxy esper-no-headers esper-preserve-case"}
mkdir -p "$OUT"
# shellcheck source=benches/proxy/common.sh
source "$ROOT/benches/proxy/common.sh"
for tool in valgrind strace nginx curl python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install valgrind strace nginx curl)" >&2; exit 1; }
done

PORT=18083
start_upstream
"$BIN/esper" broker run ingestion --listen 127.0.0.1:18090 >/dev/null 2>&1 &
PIDS+=($!)
"$BIN/esper" broker run mitigation --listen 127.0.0.1:18091 >/dev/null 2>&1 &
PIDS+=($!)
sleep 1

# Keep-alive GETs over CONNECTIONS connections: a warm-up, then "warm" on stdout, then
# REQUESTS more once the file GO exists.
cat >"$WORK/load.py" <<'PY'
import http.client, os, sys, threading, time
port, total, conns, go = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
clients = [http.client.HTTPConnection("127.0.0.1", port) for _ in range(conns)]
def run(c, n):
    for _ in range(n):
        c.request("GET", "/index.html")
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"status {r.status}")
def each(n):
    ts = [threading.Thread(target=run, args=(c, n)) for c in clients]
    for t in ts: t.start()
    for t in ts: t.join()
each(200)
print("warm", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
each(total // conns)
print("done", flush=True)
PY

start_target() { # NAME [WRAPPER...]
    local name=$1
    shift
    case $name in
    bare-pingora | bare-pingora-mimalloc)
        "$@" "$BIN/$name" 127.0.0.1:$PORT "$UP" 1 >"$WORK/$name.log" 2>&1 &
        ;;
    esper-proxy | esper-no-headers | esper-preserve-case)
        # esper-no-headers adds no forwarding headers, as the pass-throughs (empty: all);
        # esper-preserve-case adds them through Pingora's case-keeping header API.
        local headers="" case=""
        if [ "$name" = esper-no-headers ]; then headers=none; fi
        if [ "$name" = esper-preserve-case ]; then case=true; fi
        ESPER_FORWARD_HEADERS=$headers ESPER_PRESERVE_HEADER_CASE=$case \
            ESPER_UPSTREAM=$UP ESPER_PROXY_THREADS=1 ESPER_PROXY_ID=bench RUST_LOG=warn \
            ESPER_INGESTION_URL=http://127.0.0.1:18090 ESPER_MITIGATION_URL=http://127.0.0.1:18091 \
            "$@" "$BIN/esper" proxy run --listen 127.0.0.1:$PORT --ops-listen 127.0.0.1:18094 \
            >"$WORK/$name.log" 2>&1 &
        ;;
    esac
    TPID=$!
    PIDS+=($TPID)
    wait_port 127.0.0.1:$PORT
}

stop_target() {
    kill -INT "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    sleep 1
}

# Runs the load; between warm-up and measurement runs START, after it STOP.
drive() { # START STOP
    rm -f "$WORK/go" "$WORK/load.out"
    python3 "$WORK/load.py" $PORT "$REQUESTS" "$CONNS" "$WORK/go" >"$WORK/load.out" &
    local load=$!
    until grep -q warm "$WORK/load.out"; do sleep 0.1; done
    eval "$1"
    touch "$WORK/go"
    wait "$load"
    grep -q done "$WORK/load.out" || { echo "the load failed" >&2; exit 1; }
    eval "$2"
}

echo "target,instructions_per_request,syscalls_per_request" >"$OUT/summary.csv"
for t in $TARGETS; do
    # Instructions: callgrind, collection switched on for the measured requests only.
    start_target "$t" valgrind --tool=callgrind --instr-atstart=no --trace-children=no \
        --callgrind-out-file="$OUT/$t.callgrind" ${CALLGRIND_ARGS:-}
    vpid=$TPID
    drive "callgrind_control -i on $vpid >/dev/null" "callgrind_control -i off $vpid >/dev/null"
    stop_target "$vpid"
    ir=$(awk '/^totals:/ {print $2}' "$OUT/$t.callgrind")
    # System calls: strace counting every thread of the process.
    start_target "$t"
    spid=$TPID
    drive "strace -f -c -o $OUT/$t.strace -p $spid & SPID=\$!; sleep 1" "kill -INT \$SPID; wait \$SPID 2>/dev/null || true"
    stop_target "$spid"
    calls=$(awk '$NF == "total" {print $4}' "$OUT/$t.strace")
    python3 - "$t" "$ir" "$calls" "$REQUESTS" <<'PY' | tee -a "$OUT/summary.csv"
import sys
t, ir, calls, n = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"{t},{ir / n:.0f},{calls / n:.2f}")
PY
done
echo "callgrind and strace outputs: $OUT"
