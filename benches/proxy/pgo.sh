#!/usr/bin/env bash
# Profile-guided builds of esper and the bare Pingora pass-throughs: an instrumented
# build, a training run of each through the benchmark's traffic (keep-alive GETs of the
# 601-byte file, esper-proxy with its defaults, reporting every request to an event sink),
# then the build that uses the profile.
#
#   bash benches/proxy/pgo.sh [TRAIN_SECS]      # default 20
#
# The binaries land in target/pgo/x86_64-unknown-linux-gnu/profiling (esper,
# bare-pingora, bare-pingora-mimalloc, fixed-rate, ...), for example side by side with
# the plain builds:
#
#   T=target/profiling P=target/pgo/x86_64-unknown-linux-gnu/profiling
#   VARIANTS="plain:$T/esper:1.0 pgo:$P/esper:1.0" EXTRA_BARE="bare-pingora-pgo:$P/bare-pingora" \
#     RATE=1000 PROFILE=profiling bash benches/proxy/variants.sh 10 10
#
# Needs rustup's llvm-tools component (llvm-profdata matching rustc's LLVM); it is added
# if missing. Each build is a full fat-LTO build in its own target directory (about ten
# minutes apiece on 2 cores).
set -euo pipefail
TRAIN_SECS=${1:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGETS_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GEN=$TARGETS_DIR/pgo-gen
USE=$TARGETS_DIR/pgo
DATA=${PGO_DATA:-/tmp/esper-pgo}

host=$(rustc -vV | sed -n 's/^host: //p')
profdata=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$profdata" ]; then
    rustup component add llvm-tools >/dev/null
fi
[ -x "$profdata" ] || { echo "llvm-profdata not found at $profdata" >&2; exit 1; }

# With --target, RUSTFLAGS reach the binaries' code only, not build scripts and macros.
build() { # TARGET_DIR RUSTFLAGS
    RUSTFLAGS=$2 CARGO_TARGET_DIR=$1 cargo build -q --profile profiling --target "$host" \
        -p esper -p esper-bench-proxy
}

rm -rf "$DATA"
mkdir -p "$DATA"
echo "instrumented build ($GEN)"
build "$GEN" "-Cprofile-generate=$DATA/raw"

BIN=$GEN/$host/profiling
# shellcheck source=benches/proxy/common.sh
source "$ROOT/benches/proxy/common.sh"
start_upstream
start_event_sink
"$BIN/esper" broker run mitigation --listen 127.0.0.1:18091 >/dev/null 2>&1 &
PIDS+=($!)
# Each target: started, driven at a fixed rate, then stopped with SIGINT so that it exits
# normally and writes its profile.
train() { # PORT COMMAND...
    local port=$1 pid
    shift
    "$@" >"$WORK/train.log" 2>&1 &
    pid=$!
    wait_port "127.0.0.1:$port"
    "$BIN/fixed-rate" "127.0.0.1:$port" /index.html 3000 "$TRAIN_SECS" 20 >/dev/null
    kill -INT "$pid"
    wait "$pid" || true
}
echo "training, $TRAIN_SECS s per target"
train 18083 "$BIN/bare-pingora" 127.0.0.1:18083 "$UP" 1
train 18086 "$BIN/bare-pingora-mimalloc" 127.0.0.1:18086 "$UP" 1
train 18100 env ESPER_UPSTREAM=$UP ESPER_PROXY_THREADS=1 ESPER_PROXY_ID=train RUST_LOG=warn \
    ESPER_INGESTION_URL=http://127.0.0.1:18098 ESPER_MITIGATION_URL=http://127.0.0.1:18091 \
    "$BIN/esper" proxy run --listen 127.0.0.1:18100 --ops-listen 127.0.0.1:18120
# The mitigation broker, instrumented too, writes its profile as it stops.
cleanup
trap - EXIT
ls "$DATA"/raw/*.profraw >/dev/null 2>&1 || { echo "no profile was written" >&2; exit 1; }
"$profdata" merge -o "$DATA/merged.profdata" "$DATA"/raw/*.profraw

echo "optimized build ($USE)"
build "$USE" "-Cprofile-use=$DATA/merged.profdata"
echo "built with the profile: $USE/$host/profiling"
