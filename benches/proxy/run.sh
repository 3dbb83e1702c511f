#!/usr/bin/env bash
# Proxy benchmark: the same small file through each target, side by side, interleaved.
#
#   bash benches/proxy/run.sh [DURATION_SECS] [REPETITIONS]   # throughput, latency, CPU
#   bash benches/proxy/run.sh ttm [TRIALS]                    # time to mitigate (esper dev)
#   bash benches/proxy/run.sh memory                          # bytes per cache entry
#   bash benches/proxy/run.sh latency [RATE] [SECS] [REPS]     # percentiles at a fixed rate
#
# Targets: the upstream directly (nginx serving the file), a bare Pingora pass-through
# (bare-pingora; bare-pingora-mimalloc is the same with the esper binary's allocator),
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

throughput() {
    DURATION=${1:-10}
    local reps=${2:-3}
    need nginx haproxy wrk curl
    (cd "$ROOT" && cargo build --profile "$PROFILE" -q -p esper -p esper-bench-proxy)
    start_upstream
    start_nginx_proxy
    start_haproxy
    "$BIN/bare-pingora" 127.0.0.1:18083 "$UP" 1 >/dev/null 2>&1 &
    PIDS+=($!)
    local bare=$!
    "$BIN/bare-pingora-mimalloc" 127.0.0.1:18086 "$UP" 1 >/dev/null 2>&1 &
    PIDS+=($!)
    local bare_mi=$!
    start_brokers
    esper_proxy 18084 18094 http://127.0.0.1:18091
    local empty=$!
    echo "loading 1,000,000 + 100,000 mitigations..."
    "$BIN/load-mitigations" http://127.0.0.1:18092 1000000 100000 1000 >"$WORK/loader.log" 2>&1 &
    PIDS+=($!)
    until grep -q loaded "$WORK/loader.log"; do sleep 1; done
    esper_proxy 18085 18095 http://127.0.0.1:18092
    local loaded=$!
    # The same work as the pass-through baselines, which add no headers.
    ESPER_FORWARD_HEADERS=none esper_proxy 18088 18089 http://127.0.0.1:18091
    local no_headers=$!
    wait_port 127.0.0.1:18083
    wait_port 127.0.0.1:18086
    wait_port 127.0.0.1:18084
    wait_port 127.0.0.1:18085
    wait_port 127.0.0.1:18088
    # Wait until the loaded proxy holds the whole set.
    until curl -s http://127.0.0.1:18095/metrics | awk '/^esper_proxy_cache_entries / {exit !($2 >= 1100000)}'; do
        sleep 1
    done
    local up_workers np_workers
    up_workers=$(pgrep -f "nginx: worker" | tr '\n' ' ')
    echo "target,req_per_s,p50,p99,cpu_us_per_req" | tee "$WORK/results.csv"
    np_workers=$(pgrep -P "$NGINX_PROXY" | tr '\n' ' ')
    for _ in $(seq 1 "$reps"); do
        # shellcheck disable=SC2086
        measure direct 18080 $(pgrep -P "$(cat "$WORK/up/nginx.pid")")
        measure bare-pingora 18083 "$bare"
        measure bare-pingora-mimalloc 18086 "$bare_mi"
        measure esper-empty 18084 "$empty"
        measure esper-loaded 18085 "$loaded"
        measure esper-no-headers 18088 "$no_headers"
        # shellcheck disable=SC2086
        measure nginx 18081 $np_workers
        measure haproxy 18082 "$HAPROXY"
    done
    : "$up_workers"
    echo
    echo "medians:"
    python3 - "$WORK/results.csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def us(v):
    v = v.strip()
    for suf, f in (("us", 1), ("ms", 1000), ("s", 1e6)):
        if v.endswith(suf):
            return float(v[: -len(suf)]) * f
    return float(v)
by = {}
for r in rows:
    by.setdefault(r["target"], []).append(r)
med = {}
for t, rs in by.items():
    med[t] = {
        "rps": statistics.median(float(r["req_per_s"]) for r in rs),
        "p50": statistics.median(us(r["p50"]) for r in rs),
        "p99": statistics.median(us(r["p99"]) for r in rs),
        "cpu": statistics.median(float(r["cpu_us_per_req"]) for r in rs),
    }
base = med["bare-pingora"]
mi = med["bare-pingora-mimalloc"]
print("| target | req/s | p50 µs | p99 µs | CPU µs/req | req/s vs bare Pingora | CPU vs bare Pingora | CPU vs bare Pingora (mimalloc) | CPU vs nginx |")
print("|---|---|---|---|---|---|---|---|---|")
for t, m in med.items():
    print(f"| {t} | {m['rps']:.0f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['cpu']:.1f} | "
          f"{m['rps'] / base['rps']:.2f} | {m['cpu'] / base['cpu']:.2f} | {m['cpu'] / mi['cpu']:.2f} | "
          f"{m['cpu'] / med['nginx']['cpu']:.2f} |")
PY
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
    (cd "$ROOT" && cargo build --profile "$PROFILE" -q -p esper -p esper-bench-proxy)
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
    (cd "$ROOT" && cargo build --profile "$PROFILE" -q -p esper -p esper-bench-proxy)
    start_upstream
    start_nginx_proxy
    start_haproxy
    "$BIN/bare-pingora" 127.0.0.1:18083 "$UP" 1 >/dev/null 2>&1 &
    PIDS+=($!)
    "$BIN/bare-pingora-mimalloc" 127.0.0.1:18086 "$UP" 1 >/dev/null 2>&1 &
    PIDS+=($!)
    start_brokers
    esper_proxy 18084 18094 http://127.0.0.1:18091
    # The same proxy posting its events to a sink that takes them without parsing: the
    # ingestion broker shares this machine's two cores, and parsing every batch is load
    # that a broker elsewhere would not put on the proxy's host.
    start_event_sink
    esper_proxy 18087 18097 http://127.0.0.1:18091 http://127.0.0.1:18098
    ESPER_FORWARD_HEADERS=none esper_proxy 18088 18089 http://127.0.0.1:18091
    wait_port 127.0.0.1:18088
    wait_port 127.0.0.1:18083
    wait_port 127.0.0.1:18086
    wait_port 127.0.0.1:18084
    wait_port 127.0.0.1:18087
    echo "target,sent,errors,late,p50_us,p90_us,p99_us,p999_us,max_us" | tee "$WORK/latency.csv"
    local target port rep
    local targets=(direct:18080 bare-pingora:18083 bare-pingora-mimalloc:18086
        esper-empty:18084 esper-event-sink:18087 esper-no-headers:18088 nginx:18081
        haproxy:18082)
    for rep in $(seq 1 "$reps"); do
        # A different order in each repetition (the same on every rerun), so no target
        # always follows the same neighbour or comes at the same point of a repetition.
        for target in $(python3 -c 'import random, sys
t = sys.argv[2:]; random.Random(int(sys.argv[1])).shuffle(t); print(*t)' "$rep" "${targets[@]}"); do
            port=${target#*:}
            echo "${target%%:*},$("$BIN/fixed-rate" "127.0.0.1:$port" /index.html "$rate" "$secs" 20)" |
                tee -a "$WORK/latency.csv"
        done
    done
    echo
    echo "medians at $rate requests/s:"
    python3 - "$WORK/latency.csv" <<'PY'
import csv, random, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by = {}
for r in rows:
    by.setdefault(r["target"], []).append(r)
med = {t: {k: statistics.median(float(r[k]) for r in rs) for k in ("p50_us", "p90_us", "p99_us", "p999_us")}
       for t, rs in by.items()}
base = med["bare-pingora"]
# Paired by repetition: the i-th run of a target against the i-th run of bare Pingora,
# moments apart, so the machine's slow drifts cancel out. The interval is a bootstrap
# of the median difference (fixed seed, so a rerun on the same data prints the same).
rng = random.Random(1)
def paired(t):
    d = [float(a["p99_us"]) - float(b["p99_us"]) for a, b in zip(by[t], by["bare-pingora"])]
    boots = sorted(statistics.median(rng.choices(d, k=len(d))) for _ in range(2000))
    return statistics.median(d), boots[100], boots[1899]
print("| target | p50 µs | p90 µs | p99 µs | p99.9 µs | p99 − bare Pingora's, µs (medians) "
      "| paired p99 difference, µs: median [90% interval] |")
print("|---|---|---|---|---|---|---|")
canonical = ["direct", "bare-pingora", "bare-pingora-mimalloc", "esper-empty",
             "esper-event-sink", "esper-no-headers", "nginx", "haproxy"]
for t, m in sorted(med.items(), key=lambda kv: canonical.index(kv[0]) if kv[0] in canonical else 99):
    mid, lo, hi = paired(t)
    print(f"| {t} | {m['p50_us']:.0f} | {m['p90_us']:.0f} | {m['p99_us']:.0f} | {m['p999_us']:.0f} | "
          f"{m['p99_us'] - base['p99_us']:+.0f} | {mid:+.0f} [{lo:+.0f}, {hi:+.0f}] |")
PY
}

case "${1:-}" in
ttm) shift; ttm "$@" ;;
latency) shift; latency "$@" ;;
memory) shift; memory "$@" ;;
*) throughput "$@" ;;
esac
