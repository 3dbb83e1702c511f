#!/usr/bin/env bash
# Proxy benchmark: the same small file through each target, side by side, interleaved.
#
#   bash benches/proxy/run.sh [DURATION_SECS] [REPETITIONS]   # throughput, latency, CPU
#   bash benches/proxy/run.sh ttm [TRIALS]                    # time to mitigate (esper dev)
#   bash benches/proxy/run.sh memory                          # bytes per cache entry
#   bash benches/proxy/run.sh latency [RATE] [SECS] [REPS]     # percentiles at a fixed rate
#   bash benches/proxy/run.sh together [RATE] [SECS] [REPS]    # CPU, every target at once
#
# Targets: the upstream directly (nginx serving the file), a bare Pingora pass-through
# (bare-pingora; bare-pingora-mimalloc is the same with the esper binary's allocator;
# bare-pingora-idle-timer gives its pooled connections esper-proxy's default idle timeout),
# esper-proxy with an empty cache, esper-proxy with 1,000,000 address mitigations and
# 100,000 network mitigations while new ones stream in (1,000/s), esper-proxy adding no
# forwarding headers (esper-no-headers: the work the pass-throughs do), nginx as a
# reverse proxy, HAProxy. Every proxy gets one worker thread (on 2 cores shared with
# wrk, one beats two); all bind loopback. Load: wrk, 2 threads, 50 keep-alive
# connections. CPU per request is the proxy process's (all its threads') utime+stime
# from /proc over the run, divided by the requests wrk completed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# PROFILE=profiling measures the build that perf and callgrind read (same code, line tables).
PROFILE=${PROFILE:-release}
BIN=$CARGO_TARGET_DIR/$PROFILE
# shellcheck source=benches/proxy/common.sh
source "$ROOT/benches/proxy/common.sh"

need() {
    local missing=()
    for pkg in "$@"; do
        command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

start_nginx_proxy() {
    start_nginx np <<CONF
http {
    access_log off;
    keepalive_requests 1000000;
    upstream app { server $UP; keepalive 128; }
    server {
        listen 127.0.0.1:18081;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
    NGINX_PROXY=$NGINX_PID
    wait_port 127.0.0.1:18081
}

start_haproxy() {
    cat >"$WORK/haproxy.cfg" <<CONF
global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend f
    bind 127.0.0.1:18082
    default_backend b
backend b
    http-reuse always
    server s1 $UP
CONF
    haproxy -f "$WORK/haproxy.cfg" -db &
    PIDS+=($!)
    HAPROXY=$!
    wait_port 127.0.0.1:18082
}

esper_proxy() { # PORT OPS_PORT MITIGATION_URL [INGESTION_URL]
    ESPER_UPSTREAM=$UP ESPER_PROXY_THREADS=1 ESPER_PROXY_ID=bench RUST_LOG=warn \
        ESPER_INGESTION_URL=${4:-http://127.0.0.1:18090} ESPER_MITIGATION_URL=$3 \
        "$BIN/esper" proxy run --listen "127.0.0.1:$1" --ops-listen "127.0.0.1:$2" &
    PIDS+=($!)
}

start_brokers() {
    "$BIN/esper" broker run ingestion --listen 127.0.0.1:18090 >/dev/null 2>&1 &
    PIDS+=($!)
    "$BIN/esper" broker run mitigation --listen 127.0.0.1:18091 >/dev/null 2>&1 &
    PIDS+=($!)
    "$BIN/esper" broker run mitigation --listen 127.0.0.1:18092 >/dev/null 2>&1 &
    PIDS+=($!)
    sleep 1
}

# All of a process's CPU ticks (utime + stime), children's processes included for nginx.
ticks() {
    local total=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] || continue
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$total"
}

measure() { # NAME PORT PIDS...
    local name=$1 port=$2
    shift 2
    local before after out
    before=$(ticks "$@")
    out=$(wrk -t2 -c50 -d"${DURATION}s" --latency "http://127.0.0.1:$port/index.html")
    # A figure measured on error answers would be meaningless.
    if echo "$out" | grep -q "Non-2xx"; then echo "$out" >&2; echo "error answers from port ${port:-$2}" >&2; exit 1; fi
    after=$(ticks "$@")
    local reqs rps p50 p99
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    local hz
    hz=$(getconf CLK_TCK)
    local cpu_us
    cpu_us=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$reqs" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    echo "$name,$rps,$p50,$p99,$cpu_us" | tee -a "$WORK/results.csv"
}

# Events dropped by the esper-proxy whose ops port is $1 (a proxy that drops events does
# less work than one that delivers them, so a run where one dropped any is refused).
dropped() {
    curl -s "http://127.0.0.1:$1/metrics" | awk '/^esper_proxy_events_dropped_total/ {n += $2} END {print n + 0}'
}

# Stops the run when an esper-proxy (by ops port) dropped events: its figures would not
# be comparable.
refuse_dropped() {
    local ops
    for ops in "$@"; do
        if [ "$(dropped "$ops")" != 0 ]; then
            echo "the esper-proxy with ops port $ops dropped events: its figures are not comparable" >&2
            exit 1
        fi
    done
}

# The targets that are not esper-proxy (the upstream, both bare Pingoras, nginx, HAProxy)
# and the brokers; the bare Pingoras' pids are left in BARE, BARE_MI and BARE_TIMER.
start_baselines() {
    start_upstream
    start_nginx_proxy
    start_haproxy
    "$BIN/bare-pingora" 127.0.0.1:18083 "$UP" 1 >/dev/null 2>&1 &
    PIDS+=($!)
    BARE=$!
    "$BIN/bare-pingora-mimalloc" 127.0.0.1:18086 "$UP" 1 >/dev/null 2>&1 &
    PIDS+=($!)
    BARE_MI=$!
    # Its pooled connections idle out as esper-proxy's do by default (1 minute).
    "$BIN/bare-pingora" 127.0.0.1:18093 "$UP" 1 60 >/dev/null 2>&1 &
    PIDS+=($!)
    BARE_TIMER=$!
    start_brokers
    wait_port 127.0.0.1:18083
    wait_port 127.0.0.1:18086
    wait_port 127.0.0.1:18093
}

# Those targets as name:port:pids (pids comma-separated: the processes whose CPU time is
# the target's), one per line.
baseline_targets() {
    echo "direct:18080:$(pgrep -P "$(cat "$WORK/up/nginx.pid")" | paste -sd,)"
    echo "bare-pingora:18083:$BARE"
    echo "bare-pingora-mimalloc:18086:$BARE_MI"
    echo "bare-pingora-idle-timer:18093:$BARE_TIMER"
    echo "nginx:18081:$(pgrep -P "$NGINX_PROXY" | paste -sd,)"
    echo "haproxy:18082:$HAPROXY"
}

# The esper binary and the bare pass-throughs, in the chosen profile.
build_targets() {
    (cd "$ROOT" && cargo build --profile "$PROFILE" -q -p esper -p esper-bench-proxy)
}

throughput() {
    DURATION=${1:-10}
    local reps=${2:-3}
    need nginx haproxy wrk curl
    build_targets
    start_baselines
    # The esper targets post their events to a sink that answers 202 without reading them
    # (as the broker answers), not to the ingestion broker: with nothing claiming, the
    # broker's queue (1,000,000 items) fills within one repetition and then refuses
    # batches, which the proxy drops, doing less work than one whose events are taken;
    # and the broker's parsing of every batch would be load on these two shared cores
    # that a broker on its own host does not put on the proxy's.
    start_event_sink
    local sink=http://127.0.0.1:18098
    esper_proxy 18084 18094 http://127.0.0.1:18091 $sink
    local empty=$!
    echo "loading 1,000,000 + 100,000 mitigations..."
    "$BIN/load-mitigations" http://127.0.0.1:18092 1000000 100000 1000 >"$WORK/loader.log" 2>&1 &
    PIDS+=($!)
    until grep -q loaded "$WORK/loader.log"; do sleep 1; done
    esper_proxy 18085 18095 http://127.0.0.1:18092 $sink
    local loaded=$!
    # The same work as the pass-through baselines, which add no headers.
    ESPER_FORWARD_HEADERS=none esper_proxy 18088 18089 http://127.0.0.1:18091 $sink
    local no_headers=$!
    wait_port 127.0.0.1:18084
    wait_port 127.0.0.1:18085
    wait_port 127.0.0.1:18088
    # Wait until the loaded proxy holds the whole set.
    until curl -s http://127.0.0.1:18095/metrics | awk '/^esper_proxy_cache_entries / {exit !($2 >= 1100000)}'; do
        sleep 1
    done
    echo "target,req_per_s,p50,p99,cpu_us_per_req" | tee "$WORK/results.csv"
    local target name port pids rep
    local targets
    mapfile -t targets < <(baseline_targets)
    targets+=("esper-empty:18084:$empty" "esper-loaded:18085:$loaded" "esper-no-headers:18088:$no_headers")
    for rep in $(seq 1 "$reps"); do
        for target in $(shuffled "$rep" "${targets[@]}"); do
            IFS=: read -r name port pids <<<"$target"
            # shellcheck disable=SC2086
            measure "$name" "$port" ${pids//,/ }
        done
    done
    refuse_dropped 18094 18095 18089
    echo
    echo "medians, and CPU per request paired with bare Pingora's by repetition:"
    python3 "$ROOT/benches/proxy/summary.py" throughput "$WORK/results.csv"
}

# Time to mitigate: through `esper dev` with its default settings, a fresh client address
# per trial fails POST /login until answered 403. The example policy's threshold is 10
# failed logins a minute; the time runs from the 10th request to the first 403.
ttm() {
    local trials=${1:-20}
    need curl
    (cd "$ROOT" && cargo build --profile "$PROFILE" -q -p esper)
    "$BIN/esper" dev --proxy-listen 127.0.0.1:18100 >"$WORK/dev.log" 2>&1 &
    PIDS+=($!)
    until curl -s -o /dev/null http://127.0.0.1:18100/; do sleep 0.2; done
    for t in $(seq 1 "$trials"); do
        local ip="127.0.1.$t" n=0 mark="" code
        while :; do
            n=$((n + 1))
            code=$(curl -s -o /dev/null -w '%{http_code}' --interface "$ip" \
                -X POST -d "username=admin&password=guess$n" http://127.0.0.1:18100/login)
            [ "$n" -eq 10 ] && mark=$(date +%s%N)
            if [ "$code" = 403 ]; then
                echo $(( ($(date +%s%N) - mark) / 1000000 )) >>"$WORK/ttm.txt"
                break
            fi
            [ "$n" -gt 2000 ] && { echo "trial $t: never blocked" >&2; exit 1; }
            sleep 0.01
        done
    done
    python3 - "$WORK/ttm.txt" <<'PY'
import statistics, sys
ms = sorted(int(l) for l in open(sys.argv[1]))
p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
print(f"time to mitigate over {len(ms)} trials: p50 {statistics.median(ms):.0f} ms, p99 {p99} ms, max {ms[-1]} ms")
PY
}

# Memory: resident memory of three proxies, one with an empty cache, one following a
# broker holding 1,000,000 address mitigations, one following a broker holding 100,000
# /24 network mitigations; bytes per entry = (RSS - empty RSS) / entries. (The loaders
# also publish one new address mitigation every 100 ms, a few hundred in all.)
memory() {
    need curl
    build_targets
    start_brokers
    "$BIN/esper" broker run mitigation --listen 127.0.0.1:18093 >/dev/null 2>&1 &
    PIDS+=($!)
    sleep 1
    "$BIN/load-mitigations" http://127.0.0.1:18092 1000000 0 0 >"$WORK/exact.log" 2>&1 &
    PIDS+=($!)
    "$BIN/load-mitigations" http://127.0.0.1:18093 0 100000 0 >"$WORK/ranges.log" 2>&1 &
    PIDS+=($!)
    until grep -q loaded "$WORK/exact.log" && grep -q loaded "$WORK/ranges.log"; do sleep 1; done
    esper_proxy 18084 18094 http://127.0.0.1:18091
    local empty=$!
    esper_proxy 18085 18095 http://127.0.0.1:18092
    local exact=$!
    esper_proxy 18086 18096 http://127.0.0.1:18093
    local ranges=$!
    entries() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^esper_proxy_cache_entries / {print $2}'; }
    until [ "$(entries 18095 | cut -d. -f1)" -ge 1000000 ] 2>/dev/null; do sleep 1; done
    until [ "$(entries 18096 | cut -d. -f1)" -ge 100000 ] 2>/dev/null; do sleep 1; done
    rss() { awk '/^VmRSS/ {print $2 * 1024}' "/proc/$1/status"; }
    peak() { awk '/^VmHWM/ {print $2 * 1024}' "/proc/$1/status"; }
    # The allocator returns what the snapshot's parsing used a little after it is freed:
    # wait until the resident sizes hold still (5 s unchanged within 1%, at most 60 s).
    local last="" now stable=0
    for _ in $(seq 1 60); do
        now="$(rss $exact) $(rss $ranges)"
        if [ -n "$last" ] && python3 -c "import sys; a=[float(x) for x in sys.argv[1].split()]; b=[float(x) for x in sys.argv[2].split()]; sys.exit(0 if all(abs(x-y) <= 0.01*y for x,y in zip(a,b)) else 1)" "$now" "$last"; then
            stable=$((stable + 1))
            [ "$stable" -ge 5 ] && break
        else
            stable=0
        fi
        last=$now
        sleep 1
    done
    python3 - "$(rss $empty)" "$(rss $exact)" "$(entries 18095)" "$(rss $ranges)" "$(entries 18096)" \
        "$(peak $exact)" "$(peak $ranges)" <<'PY'
import sys
empty, exact, n_exact, ranges, n_ranges, exact_peak, ranges_peak = (float(v) for v in sys.argv[1:])
mib = lambda b: b / 2**20
print(f"empty cache: RSS {mib(empty):.1f} MiB")
print(f"{n_exact:.0f} address mitigations: RSS {mib(exact):.1f} MiB, {(exact - empty) / n_exact:.0f} bytes per entry; "
      f"peak RSS while loading {mib(exact_peak):.1f} MiB")
print(f"{n_ranges:.0f} entries with 100,000 /24 networks: RSS {mib(ranges):.1f} MiB, {(ranges - empty) / n_ranges:.0f} bytes per entry; "
      f"peak RSS while loading {mib(ranges_peak):.1f} MiB")
PY
}

# Latency below saturation: the same fixed schedule of requests (RATE a second over 20
# keep-alive connections, open loop) through each target in turn, so the percentiles
# are each proxy's own latency rather than queueing in a saturated closed-loop run.
latency() {
    local rate=${1:-5000} secs=${2:-10} reps=${3:-3}
    need nginx haproxy curl
    build_targets
    start_baselines
    esper_proxy 18084 18094 http://127.0.0.1:18091
    local empty=$!
    # The same proxy posting its events to a sink that takes them without parsing: the
    # ingestion broker shares this machine's two cores, and parsing every batch is load
    # that a broker elsewhere would not put on the proxy's host.
    start_event_sink
    esper_proxy 18087 18097 http://127.0.0.1:18091 http://127.0.0.1:18098
    local sink=$!
    ESPER_FORWARD_HEADERS=none esper_proxy 18088 18089 http://127.0.0.1:18091 http://127.0.0.1:18098
    local no_headers=$!
    wait_port 127.0.0.1:18088
    wait_port 127.0.0.1:18084
    wait_port 127.0.0.1:18087
    echo "target,sent,errors,late,p50_us,p90_us,p99_us,p999_us,max_us,cpu_us_per_req" | tee "$WORK/latency.csv"
    local target name port rep pids before out
    local targets
    mapfile -t targets < <(baseline_targets)
    targets+=("esper-empty:18084:$empty" "esper-event-sink:18087:$sink" "esper-no-headers:18088:$no_headers")
    for rep in $(seq 1 "$reps"); do
        for target in $(shuffled "$rep" "${targets[@]}"); do
            IFS=: read -r name port pids <<<"$target"
            # shellcheck disable=SC2086
            before=$(cpu_ns ${pids//,/ })
            out=$("$BIN/fixed-rate" "127.0.0.1:$port" /index.html "$rate" "$secs" 20)
            # shellcheck disable=SC2086
            echo "$name,$out,$(awk -v t=$(($(cpu_ns ${pids//,/ }) - before)) -v n="${out%%,*}" \
                'BEGIN { printf "%.2f", t / 1000 / n }')" | tee -a "$WORK/latency.csv"
        done
    done
    echo
    echo "medians at $rate requests/s:"
    python3 "$ROOT/benches/proxy/summary.py" latency "$WORK/latency.csv"
}

# CPU per request with every target loaded at once, each at RATE requests/s (see
# measure_together in common.sh): the steadiest ratio this machine gives.
together() {
    local rate=${1:-1500} secs=${2:-10} reps=${3:-10}
    need nginx haproxy curl
    build_targets
    start_baselines
    start_event_sink
    local sink=http://127.0.0.1:18098
    esper_proxy 18087 18097 http://127.0.0.1:18091 $sink
    local defaults=$!
    ESPER_FORWARD_HEADERS=none esper_proxy 18088 18089 http://127.0.0.1:18091 $sink
    local no_headers=$!
    wait_port 127.0.0.1:18087
    wait_port 127.0.0.1:18088
    local targets
    # Not the upstream itself: its CPU here is that of serving every other target too.
    mapfile -t targets < <(baseline_targets | grep -v '^direct:')
    targets+=("esper-event-sink:18087:$defaults" "esper-no-headers:18088:$no_headers")
    echo "target,sent,errors,late,p50_us,p90_us,p99_us,p999_us,max_us,cpu_us_per_req" | tee "$WORK/together.csv"
    measure_together "$WORK/together.csv" "$rate" "$secs" "$reps" "${targets[@]}"
    refuse_dropped 18097 18089
    echo
    echo "medians, every target at $rate requests/s at once:"
    python3 "$ROOT/benches/proxy/summary.py" latency "$WORK/together.csv"
}

case "${1:-}" in
ttm) shift; ttm "$@" ;;
latency) shift; latency "$@" ;;
together) shift; together "$@" ;;
memory) shift; memory "$@" ;;
*) throughput "$@" ;;
esac
