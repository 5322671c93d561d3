#!/usr/bin/env bash
# Cluster benchmark (issue 16): moatmq on one node and on three nodes sharing one NATS
# JetStream server, against nats-server's own MQTT listener, in one invocation.
#
# Starts, each on free loopback ports:
# - "moatmq": one moatmq node without [cluster] (single-node mode, the default);
# - a nats-server with JetStream for the cluster, and three moatmq nodes A, B, C with
#   [cluster] on it: "moatmq-1node" runs every client on node A (what [cluster] costs a
#   node's local traffic), "moatmq-3nodes" puts the publishers on A and B and the
#   subscribers on B and C (fan-out) or C (fan-in), so every delivery crosses NATS;
# - "nats-mqtt": a second nats-server with JetStream and its MQTT listener (3.1.1), the
#   reference the issue names.
# Then, brokers interleaved, REPEATS rounds, median round kept:
# - fan-in: PUBLISHERS publishers -> 1 subscriber, QoS 0 and 1, 64 B (`moatmq-bench
#   fanin`, window WINDOW);
# - fan-out: 1 publisher -> SUBSCRIBERS subscribers, QoS 0 and 1, 64 B (the rate is
#   deliveries per second);
# - shared: PUBLISHERS publishers -> SUBSCRIBERS members of one shared subscription
#   group (`--shared`), QoS 0 and 1, 64 B: each message delivered once in all
#   (moatmq-3nodes: publishers on A, members on B and C; nats-server's MQTT has no
#   shared subscriptions, so no reference);
# - latency: one QoS 1 publisher at RATE msgs/s for LATENCY_SECS s to one QoS 1
#   subscriber (on another node for moatmq-3nodes);
# - retained: 8 publishers set RETAINED retained QoS 1 messages of 100 B on as many
#   topics (`moatmq-bench retained-pub`, 100 unacknowledged each): on a cluster node
#   each PUBACK waits for the transfer stream and the retained bucket (moatmq-3nodes:
#   the same, published on node A, with B and C taking every change in).
#
# Knobs (environment): PUBLISHERS (4), SUBSCRIBERS (4), MESSAGES per run (200000),
# TIMEOUT per run in seconds (30), REPEATS (3), WINDOW (2000), RATE (1000),
# LATENCY_SECS (6), RETAINED (20000), PARTS ("fanin fanout latency retained"; also
# "shared": which
# to run), SKIP_BUILD=1 to reuse binaries. Installs nats-server (Debian) if it
# is missing. Not a test: nothing runs this from `cargo test` or CI.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs PUBLISHERS=4 SUBSCRIBERS=4 MESSAGES=200000 TIMEOUT=30 REPEATS=3 WINDOW=2000 \
    RATE=1000 LATENCY_SECS=6 RETAINED=20000 PARTS="fanin fanout latency retained"

build
if ! command -v nats-server >/dev/null; then
    log "installing nats-server"
    apt-get install -y nats-server >&2 || { apt-get update >&2 && apt-get install -y nats-server >&2; }
fi
B="$BIN/moatmq-bench"
# f NAME LINE: the field, or 0 when the run failed.
f() {
    local v
    v=$(field "$1" "$2")
    echo "${v:-0}"
}

# wait_ready NAME METRICS_PORT PID: until /readyz answers 200 (a cluster node is ready
# once it is subscribed in NATS and has loaded the retained bucket).
wait_ready() {
    wait_for "$1" "$3" 200 "ready" curl -fsS -o /dev/null "http://127.0.0.1:$2/readyz"
}

# --- servers -------------------------------------------------------------------------
NATS_PORT=$(free_port)
start nats nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/js"
wait_port nats "$NATS_PORT" "${PIDS[-1]}"

REF_PORT=$(free_port)
REF_MQTT=$(free_port)
cat >"$WORK/nats-mqtt.conf" <<EOF
server_name: "ref"
listen: "127.0.0.1:$REF_PORT"
jetstream { store_dir: "$WORK/js-ref" }
mqtt { listen: "127.0.0.1:$REF_MQTT" }
EOF
start nats-mqtt nats-server -c "$WORK/nats-mqtt.conf"
wait_port nats-mqtt "$REF_MQTT" "${PIDS[-1]}"

"$MOATMQ" keygen --out "$WORK/retained.key" >&2

SINGLE=$(free_port)
moatmq_config single <<EOF
[[listener]]
name = "bench"
bind = "127.0.0.1:$SINGLE"
allow_anonymous = true
EOF
start single "$MOATMQ" serve -c "$WORK/single.toml"
wait_port single "$SINGLE" "${PIDS[-1]}"

declare -A NODE
for n in a b c; do
    NODE[$n]=$(free_port)
    metrics=$(free_port)
    moatmq_config "node-$n" <<EOF
[[listener]]
name = "bench"
bind = "127.0.0.1:${NODE[$n]}"
allow_anonymous = true

[metrics]
bind = "127.0.0.1:$metrics"

[retained]
path = "$WORK/store-$n"
key_file = "$WORK/retained.key"

[cluster]
servers = ["nats://127.0.0.1:$NATS_PORT"]
node_name = "node-$n"
EOF
    start "node-$n" "$MOATMQ" serve -c "$WORK/node-$n.toml"
    wait_ready "node-$n" "$metrics" "${PIDS[-1]}"
done
A=${NODE[a]} BB=${NODE[b]} C=${NODE[c]}
log "nats :$NATS_PORT, nats-mqtt :$REF_MQTT, moatmq :$SINGLE, nodes :$A :$BB :$C"

BROKERS=(moatmq moatmq-1node moatmq-3nodes nats-mqtt)
# ports BROKER KIND: "--port P [--pub-ports ..] [--sub-ports ..]" for that broker.
ports() {
    case "$1:$2" in
        moatmq:*) echo "--port $SINGLE" ;;
        nats-mqtt:*) echo "--port $REF_MQTT" ;;
        moatmq-1node:* | moatmq-3nodes:retained) echo "--port $A" ;;
        moatmq-3nodes:fanin) echo "--port $A --pub-ports $A,$BB --sub-ports $C" ;;
        moatmq-3nodes:fanout | moatmq-3nodes:shared) echo "--port $A --pub-ports $A --sub-ports $BB,$C" ;;
    esac
}
# latency_addrs BROKER: "--mqtt ADDR [--sub-mqtt ADDR]".
latency_addrs() {
    case "$1" in
        moatmq) echo "--mqtt 127.0.0.1:$SINGLE" ;;
        nats-mqtt) echo "--mqtt 127.0.0.1:$REF_MQTT" ;;
        moatmq-1node) echo "--mqtt 127.0.0.1:$A" ;;
        moatmq-3nodes) echo "--mqtt 127.0.0.1:$A --sub-mqtt 127.0.0.1:$BB" ;;
    esac
}

# --- runs ----------------------------------------------------------------------------
# part NAME: whether PARTS names it.
part() { [[ " $PARTS " == *" $1 "* ]]; }
touch "$RESULTS" "$WORK/latency" "$WORK/retained"
for round in $(seq 1 "$REPEATS"); do
    for kind in fanin fanout shared; do
        part "$kind" || continue
        for qos in 0 1; do
            for broker in "${BROKERS[@]}"; do
                case $kind in
                    fanin) shape=(--publishers "$PUBLISHERS" --subscribers 1) ;;
                    fanout) shape=(--publishers 1 --subscribers "$SUBSCRIBERS") ;;
                    shared)
                        [[ $broker == nats-mqtt ]] && continue
                        shape=(--publishers "$PUBLISHERS" --subscribers "$SUBSCRIBERS"
                            --shared bench)
                        ;;
                esac
                # shellcheck disable=SC2046 # ports are words on purpose
                line=$("$B" fanin $(ports "$broker" "$kind") "${shape[@]}" --qos "$qos" \
                    --payload 64 --messages "$MESSAGES" --window "$WINDOW" \
                    --timeout "$TIMEOUT" --label "$broker") || line="fanin failed"
                log "round $round $kind: $line"
                echo "$kind $qos $broker $(f msgs_per_s "$line") $(f p50_us "$line")" \
                    "$(f p99_us "$line") $(f lost "$line")" >>"$RESULTS"
            done
        done
    done
    for broker in "${BROKERS[@]}"; do
        part latency || break
        # shellcheck disable=SC2046
        line=$("$B" latency $(latency_addrs "$broker") --rate "$RATE" --secs "$LATENCY_SECS" \
            --topic "bench/latency/$round" --label "$broker") || line="latency failed"
        log "round $round latency: $line"
        echo "latency 1 $broker $(f p50_us "$line") $(f p99_us "$line")" \
            "$(f received "$line")/$(f sent "$line")" >>"$WORK/latency"
    done
    for broker in "${BROKERS[@]}"; do
        part retained || break
        # shellcheck disable=SC2046
        line=$("$B" retained-pub $(ports "$broker" retained) --publishers 8 \
            --topics "$RETAINED" --messages "$RETAINED" --payload 100 --qos 1 \
            --prefix "bench/retained/$round" --label "$broker") || line="retained failed"
        log "round $round retained: $line"
        echo "retained 1 $broker $(f msgs_per_s "$line") $(f ack_p50_ms "$line")" \
            "$(f ack_p99_ms "$line")" >>"$WORK/retained"
    done
done

# --- tables --------------------------------------------------------------------------
echo
echo "Cluster: $PUBLISHERS publishers -> 1 subscriber (fan-in), 1 publisher ->" \
    "$SUBSCRIBERS subscribers (fan-out), 64 B, $MESSAGES messages per run, window $WINDOW," \
    "median of $REPEATS rounds; $(machine)."
echo
echo "| shape | QoS | broker | deliveries/s | p50 ms | p99 ms | lost |"
echo "|---|---|---|---:|---:|---:|---:|"
median_table 3 <"$RESULTS" | awk '{ printf "| %s | %s | %s | %d | %.1f | %.1f | %s |\n",
    $1, $2, $3, $4, $5 / 1000, $6 / 1000, $7 }'
echo
echo "| shape | QoS | moatmq-3nodes / nats-mqtt | moatmq-1node / moatmq |"
echo "|---|---|---:|---:|"
median_table 3 <"$RESULTS" | awk '
    { rate[$1 " " $2 " " $3] = $4; if (!(($1 " " $2) in seen)) { seen[$1 " " $2] = 1; order[++s] = $1 " " $2 } }
    END {
        for (i = 1; i <= s; i++) {
            k = order[i]; split(k, p, " ")
            n = rate[k " nats-mqtt"]; m = rate[k " moatmq"]
            printf "| %s | %s | %.2f | %.2f |\n", p[1], p[2],
                (n > 0 ? rate[k " moatmq-3nodes"] / n : 0), (m > 0 ? rate[k " moatmq-1node"] / m : 0)
        }
    }'
echo
echo "QoS 1 latency at $RATE msgs/s, $LATENCY_SECS s (first second not counted), median p50 of $REPEATS rounds:"
echo
echo "| broker | p50 µs | p99 µs | received/sent |"
echo "|---|---:|---:|---:|"
median_table 3 <"$WORK/latency" | awk '{ printf "| %s | %s | %s | %s |\n", $3, $4, $5, $6 }'
echo
echo "Retained QoS 1 publishes: 8 publishers, $RETAINED topics of 100 B, median of $REPEATS rounds:"
echo
echo "| broker | msgs/s | PUBACK p50 ms | PUBACK p99 ms |"
echo "|---|---:|---:|---:|"
median_table 3 <"$WORK/retained" | awk '{ printf "| %s | %s | %s | %s |\n", $3, $4, $5, $6 }'
