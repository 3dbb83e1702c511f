# Shared by run.sh, variants.sh and profile.sh (sourced, not run): a work directory
# cleaned up at exit with every process started, waiting for a port to answer, the
# upstream (nginx, one worker, serving one 601-byte file on $UP), and the measurement of
# every target at once at a fixed rate.

UP=127.0.0.1:18080
WORK=$(mktemp -d /tmp/esper-bench.XXXXXX)
# nginx workers run as an unprivileged user: they must be able to read the file served.
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Waits up to 60 s (a process under valgrind starts slowly) for HTTP answers on $1.
wait_port() {
    for _ in $(seq 1 600); do
        curl -s -o /dev/null "http://$1/" && return 0
        sleep 0.1
    done
    echo "nothing answers on $1" >&2
    exit 1
}

# Starts one nginx worker with its files in $WORK/$1 and the `http { }` block read from
# standard input; its pid is left in NGINX_PID.
start_nginx() {
    local dir="$WORK/$1"
    mkdir -p "$dir/logs"
    {
        cat <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log;
events { worker_connections 4096; }
CONF
        cat
    } >"$dir/nginx.conf"
    nginx -p "$dir" -c "$dir/nginx.conf" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
}

start_upstream() {
    mkdir -p "$WORK/up/www"
    head -c 601 /dev/zero | tr '\0' 'x' >"$WORK/up/www/index.html"
    start_nginx up <<CONF
http {
    access_log off;
    keepalive_requests 1000000;
    server { listen $UP; root $WORK/up/www; }
}
CONF
    wait_port "$UP"
}

# An endpoint on 127.0.0.1:18098 that answers every event batch 202 without reading it
# as JSON (nginx), standing in for an ingestion broker on another host.
start_event_sink() {
    start_nginx sink <<'CONF'
http {
    access_log off;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    server {
        listen 127.0.0.1:18098;
        location / { default_type application/json; return 202 '{"accepted":0,"depth":0}'; }
    }
}
CONF
    wait_port 127.0.0.1:18098
}

# The arguments after the first in an order shuffled by the seed $1: a different order
# in each repetition (the same on every rerun), so no target always follows the same
# neighbour or comes at the same point of a repetition.
shuffled() {
    python3 -c 'import random, sys
t = sys.argv[2:]; random.Random(int(sys.argv[1])).shuffle(t); print(*t)' "$@"
}

# CPU time of processes in nanoseconds (every thread's run time from schedstat): exact
# where utime and stime are counted in clock ticks, so short runs at a low rate can use it.
cpu_ns() {
    local p
    for p in "$@"; do cat "/proc/$p/task/"*/schedstat 2>/dev/null || true; done | awk '{n += $1} END {printf "%.0f\n", n}'
}

# Every target at once, each at RATE requests/s from its own fixed-rate generator, for
# SECS, REPS times; a line per target and repetition appended to CSV (the latency
# columns, then CPU µs per request). Loaded together, the targets share each moment of
# the host: on a VM whose speed drifts from one second to the next, the ratio of two
# targets measured at the same time is far steadier than one of targets measured in
# turn. The price is that each is measured beside the others' load, which at a fixed
# rate below saturation is the same for all of them.
#   measure_together CSV RATE SECS REPS name:port:pid[,pid...][:status] ...
# (status: the answer every request must get, 200 unless given).
measure_together() {
    local csv=$1 rate=$2 secs=$3 reps=$4
    shift 4
    local rep target name port pids gens out errors
    local -A before
    # A warm-up, not counted: each target's first requests open connections and fill
    # caches and buffers that the measured ones then reuse.
    gens=()
    for target in "$@"; do
        IFS=: read -r name port pids status <<<"$target"
        "$BIN/fixed-rate" "127.0.0.1:$port" /index.html "$rate" 2 20 "${status:-200}" >/dev/null &
        gens+=($!)
    done
    wait "${gens[@]}"
    for rep in $(seq 1 "$reps"); do
        gens=()
        for target in "$@"; do
            IFS=: read -r name port pids status <<<"$target"
            # shellcheck disable=SC2086
            before[$name]=$(cpu_ns ${pids//,/ })
            "$BIN/fixed-rate" "127.0.0.1:$port" /index.html "$rate" "$secs" 20 "${status:-200}" >"$WORK/together.$name" &
            gens+=($!)
        done
        wait "${gens[@]}"
        for target in "$@"; do
            IFS=: read -r name port pids _ <<<"$target"
            out=$(cat "$WORK/together.$name")
            # A figure measured on failed requests would be meaningless.
            IFS=, read -r _ errors _ <<<"$out"
            if [ "$errors" != 0 ]; then echo "$name: $errors failed requests ($out)" >&2; exit 1; fi
            # shellcheck disable=SC2086
            echo "$name,$out,$(awk -v t=$(($(cpu_ns ${pids//,/ }) - before[$name])) -v n="${out%%,*}" \
                'BEGIN { printf "%.2f", t / 1000 / n }')" | tee -a "$csv"
        done
    done
}
