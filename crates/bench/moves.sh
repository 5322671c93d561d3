#!/usr/bin/env bash
# Session moves between cluster nodes (issue 16): what a rolling restart costs when its
# clients' persistent sessions come back on another node at once, under traffic.
#
# For each build (moatmq from MOATMQ_BIN or target/release, and BASELINE_BIN when set),
# rounds interleaved, REPEATS rounds, median kept, each round from nothing: a
# nats-server with JetStream and two nodes A and B of that build on it; SESSIONS
# persistent sessions (3.1.1, clean session 0, QoS 1, each on its own topic) set up on A
# and left offline there (`moatmq-bench session-setup`); a QoS 1 publisher on A to one
# topic nobody subscribes to (`retained-pub --retain false`, 1 publisher, 10 in flight)
# so the transfer stream grows while the sessions move; after WARMUP seconds of it every
# session comes back on B, PARALLEL at a time (`moatmq-bench session-resume`): each is
# handed over by A, and B reads from the transfer stream what was published while it
# moved. Reported: the time until every session had its CONNACK, how many said session
# present, how many got none within 10 s (or were refused), CONNACK p50/p99/max, node B's CPU time (user + system, /proc/PID/stat) for
# the moves, and its passes over the transfer stream (`moatmq_cluster_transfer_reads_total`;
# "-" for a build without the metric, which read once per session).
#
# Knobs: SESSIONS (2000), PARALLEL (256), REPEATS (3), WARMUP (2), SKIP_BUILD=1,
# MOATMQ_BIN, BASELINE_BIN. Not a test.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs SESSIONS=2000 PARALLEL=256 REPEATS=3 WARMUP=2

build
B="$BIN/moatmq-bench"
"$MOATMQ" keygen --out "$WORK/retained.key" >&2
BUILDS=(moatmq)
declare -A BUILD_BIN=([moatmq]="$MOATMQ")
if [[ -n "${BASELINE_BIN:-}" ]]; then
    BUILDS+=(moatmq-base)
    BUILD_BIN[moatmq-base]="$BASELINE_BIN"
fi

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# one_round BUILD ROUND: prints "BUILD secs present failed p50 p99 max cpu_s passes".
one_round() {
    local build=$1 round=$2 bin=${BUILD_BIN[$1]} dir="$WORK/$1-$2"
    mkdir -p "$dir"
    local nats_port first_pid
    nats_port=$(free_port)
    start "nats-$build-$round" nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$dir/js"
    first_pid=${#PIDS[@]}
    wait_port "nats-$build-$round" "$nats_port" "${PIDS[-1]}"
    declare -A port metrics pid
    for n in a b; do
        port[$n]=$(free_port)
        metrics[$n]=$(free_port)
        moatmq_config "$build-$round-$n" "max_sessions_per_user = $((SESSIONS + 100))" \
            "max_connections = $((SESSIONS + 1000))" <<EOF
[[listener]]
name = "bench"
bind = "127.0.0.1:${port[$n]}"
allow_anonymous = true

[metrics]
bind = "127.0.0.1:${metrics[$n]}"

[retained]
path = "$dir/store-$n"
key_file = "$WORK/retained.key"

[cluster]
servers = ["nats://127.0.0.1:$nats_port"]
node_name = "node-$n"
EOF
        start "$build-$round-$n" "$bin" serve -c "$WORK/$build-$round-$n.toml"
        pid[$n]=${PIDS[-1]}
        wait_for "$build-$round-$n" "${pid[$n]}" 300 ready \
            curl -fsS -o /dev/null "http://127.0.0.1:${metrics[$n]}/readyz"
    done
    "$B" session-setup --mqtt "127.0.0.1:${port[a]}" --sessions "$SESSIONS" --id dev \
        --prefix moved --label "$build" >/dev/null
    "$B" retained-pub --port "${port[a]}" --retain false --prefix noise --topics 1 \
        --messages 100000000 --publishers 1 --inflight 10 --payload 64 --label noise \
        >/dev/null 2>&1 &
    local noise=$!
    sleep "$WARMUP"
    local cpu0 line cpu1 passes
    cpu0=$(cpu_ticks "${pid[b]}")
    line=$("$B" session-resume --mqtt "127.0.0.1:${port[b]}" --sessions "$SESSIONS" \
        --id dev --parallel "$PARALLEL" --label "$build")
    cpu1=$(cpu_ticks "${pid[b]}")
    kill "$noise" 2>/dev/null || true
    wait "$noise" 2>/dev/null || true
    log "round $round: $line"
    passes=$(curl -fsS "http://127.0.0.1:${metrics[b]}/metrics" |
        awk '$1 == "moatmq_cluster_transfer_reads_total" { print $2 }')
    echo "$build $(field secs "$line") $(field present "$line") $(field failed "$line")" \
        "$(field connack_p50_ms "$line")" \
        "$(field connack_p99_ms "$line") $(field connack_max_ms "$line")" \
        "$(awk -v a="$cpu0" -v b="$cpu1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / hz }')" \
        "${passes:--}"
    # This round's servers go; the next starts from nothing.
    for p in "${PIDS[@]:$((first_pid - 1))}"; do
        stop "$p"
    done
    PIDS=("${PIDS[@]:0:$((first_pid - 1))}")
}

for round in $(seq 1 "$REPEATS"); do
    for build in "${BUILDS[@]}"; do
        one_round "$build" "$round" >>"$RESULTS"
    done
done

echo
echo "Session moves: $SESSIONS persistent sessions set up on node A come back on node B" \
    "at once ($PARALLEL at a time) under QoS 1 traffic; median of $REPEATS rounds; $(nproc) CPUs," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u '+%Y-%m-%d %H:%M UTC')."
echo
echo "| build | all back, s | session present | no CONNACK in 10 s | CONNACK p50 / p99 / max ms | node B CPU s | transfer stream passes |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for build in "${BUILDS[@]}"; do
    awk -v b="$build" '$1 == b' "$RESULTS" | sort -k2 -n |
        awk -v n="$REPEATS" 'NR == int((n + 1) / 2) {
            printf "| %s | %s | %s | %s | %s / %s / %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9
        }'
done
