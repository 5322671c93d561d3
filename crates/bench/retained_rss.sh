#!/usr/bin/env bash
# Issue 13 benchmark: memory of the broker holding MESSAGES retained messages, and the
# time to load them back at start, for one or two moatmq builds in the same run.
#
# For each build (BASE_BIN, labelled "before", if given; then MOATMQ_BIN or this tree's
# release build, "after"), with a fresh encrypted store (autosave_interval = 1):
# 1. fill: `moatmq-bench retained-pub` sends MESSAGES retained QoS 0 messages of PAYLOAD
#    bytes to distinct topics `bench/r/<i / 1000>/<i % 1000>` from PUBLISHERS clients;
#    wait until the `moatmq_retained_messages` gauge says MESSAGES and the store file has
#    not grown for 3 s (everything saved), then read VmRSS and VmHWM of the broker from
#    /proc/<pid>/status;
# 2. load: stop it (SIGTERM, final flush), start it again on the same store, time from
#    the spawn to /readyz = 200 (the store read, decrypted, verified and in memory), wait
#    3 s, read VmRSS and VmHWM again.
# Builds are measured one after the other, ROUNDS times, the median round kept.
#
# Knobs: MESSAGES (1000000), PAYLOAD (100), PUBLISHERS (4), ROUNDS (1), BASE_BIN=path,
# MOATMQ_BIN=path, SKIP_BUILD=1. About 1 GB of disk in $TMPDIR. Not a test.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs MESSAGES=1000000 PAYLOAD=100 PUBLISHERS=4 ROUNDS=1

build
B="$BIN/moatmq-bench"
log "$(machine)"
"$MOATMQ" keygen --out "$WORK/retained.key" >&2

metric() { # METRICS_PORT NAME
    curl -sf "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}
status_kb() { # PID FIELD
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

measure() { # LABEL BIN ROUND
    local label=$1 bin=$2 round=$3
    local name="$label-$round" port mport pid t0 n size last_size stable
    port=$(free_port)
    mport=$(free_port)
    moatmq_config "$name" <<CONF
[[listener]]
name = "bench"
bind = "127.0.0.1:$port"
allow_anonymous = true

[retained]
path = "$WORK/store-$name"
key_file = "$WORK/retained.key"
autosave_interval = 1
max_messages = $((MESSAGES * 2))
max_messages_per_user = 0
max_bytes_per_user = 0

[metrics]
bind = "127.0.0.1:$mport"
CONF
    start "$name" "$bin" serve -c "$WORK/$name.toml"
    pid=${PIDS[-1]}
    wait_port "$name" "$port" "$pid"
    t0=$(date +%s%N)
    "$B" retained-pub --port "$port" --publishers "$PUBLISHERS" --topics "$MESSAGES" \
        --messages "$MESSAGES" --payload "$PAYLOAD" --qos 0 --prefix bench/r --label "$name" >&2
    for _ in $(seq 1 1200); do
        n=$(metric "$mport" moatmq_retained_messages)
        [[ "${n:-0}" -ge "$MESSAGES" ]] && break
        sleep 0.1
    done
    [[ "${n:-0}" -ge "$MESSAGES" ]] || { log "$name holds ${n:-0} of $MESSAGES"; exit 1; }
    local fill_ms
    fill_ms=$(ms_since "$t0")
    last_size=-1
    stable=0
    while [[ $stable -lt 3 ]]; do
        sleep 1
        size=$(stat -c %s "$WORK/store-$name/retained.log")
        if [[ $size == "$last_size" ]]; then stable=$((stable + 1)); else stable=0; fi
        last_size=$size
    done
    local fill_rss fill_hwm
    fill_rss=$(status_kb "$pid" VmRSS)
    fill_hwm=$(status_kb "$pid" VmHWM)
    stop "$pid"
    # A new port: the filled broker's closed connections may still hold the old one.
    sed "s/127.0.0.1:$port/127.0.0.1:$(free_port)/" "$WORK/$name.toml" >"$WORK/$name-load.toml"
    t0=$(date +%s%N)
    start "$name-load" "$bin" serve -c "$WORK/$name-load.toml"
    pid=${PIDS[-1]}
    until curl -sf -o /dev/null "http://127.0.0.1:$mport/readyz"; do
        kill -0 "$pid" 2>/dev/null || { log "$name exited while loading"; cat "$WORK/$name-load.log" >&2; exit 1; }
        sleep 0.05
    done
    local load_ms
    load_ms=$(ms_since "$t0")
    sleep 3
    echo "$label $fill_rss $fill_hwm $fill_ms $(status_kb "$pid" VmRSS) $(status_kb "$pid" VmHWM) $load_ms $last_size"
    stop "$pid"
    rm -rf "$WORK/store-$name"
}

for round in $(seq 1 "$ROUNDS"); do
    if [[ -n "${BASE_BIN:-}" ]]; then
        measure before "$BASE_BIN" "$round" >>"$RESULTS"
        tail -n 1 "$RESULTS" >&2
    fi
    measure after "$MOATMQ" "$round" >>"$RESULTS"
    tail -n 1 "$RESULTS" >&2
done

mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
echo
echo "$MESSAGES retained messages of $PAYLOAD B (QoS 0, $PUBLISHERS publishers), encrypted store," \
    "median of $ROUNDS round(s); $(machine) at the end."
echo
echo "| build | RSS after fill, MiB | peak, MiB | fill s | RSS after load, MiB | peak, MiB | load (spawn to /readyz) s | log bytes |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
median_table 1 <"$RESULTS" | while read -r label frss fhwm fms lrss lhwm lms bytes; do
    echo "| $label | $(mib "$frss") | $(mib "$fhwm") | $(awk -v m="$fms" 'BEGIN { printf "%.1f", m / 1000 }') |" \
        "$(mib "$lrss") | $(mib "$lhwm") | $(awk -v m="$lms" 'BEGIN { printf "%.1f", m / 1000 }') | $bytes |"
done
