#!/usr/bin/env bash
# Issue 5 benchmark: moatmq's encrypted retained store next to Mosquitto's persistence.
#
# 1. `moatmq-bench store` (moatmq-store API, no broker): fill MESSAGES retained messages
#    of 100 B, reopen the store (read + decrypt + verify: the load at start), then 5
#    saves of 1000 changed topics each (log size before/after flush), then one full
#    compaction (what rewriting the whole store would cost on every save).
# 2. Start: `moatmq serve` on that store; time to /readyz = 200, to the first CONNACK,
#    to the first and to the last of the MESSAGES retained messages on `bench/#` (until
#    all arrived, IDLE s without one or TIMEOUT s; with the delivery rate).
#    Mosquitto (persistence true) is filled with the same topics over MQTT, stopped
#    (it saves mosquitto.db) and timed the same way (no /readyz: first CONNACK).
# 3. Retained-publish throughput, 8 publishers, QoS 1, 100 B, 10000 of the MESSAGES
#    topics replaced over and over, DURATION s per run, against moatmq with
#    autosave_interval = 1, moatmq with autosave_interval = 0 (durable before PUBACK)
#    and Mosquitto with autosave_interval 1 (each save rewrites the whole database),
#    all three holding MESSAGES retained messages. REPEATS rounds, median kept.
#
# Knobs: MESSAGES (1000000), DURATION (10), REPEATS (3), PUBLISHERS (8), IDLE (5),
# TIMEOUT (120), SKIP_BUILD=1, MOATMQ_BIN=path. About 4 minutes and 2 GB of disk in $TMPDIR.
# Not a test.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs MESSAGES=1000000 DURATION=10 REPEATS=3 PUBLISHERS=8 IDLE=5 TIMEOUT=120

build
need_mosquitto
B="$BIN/moatmq-bench"
log "$(machine)"

# --- 1. store API ---------------------------------------------------------------------
"$MOATMQ" keygen --out "$WORK/retained.key" >&2
STORE=$("$B" store --dir "$WORK/store-1s" --key "$WORK/retained.key" --messages "$MESSAGES" \
    --payload 100 --changes 1000 --saves 5)
log "$STORE"
cp -a "$WORK/store-1s" "$WORK/store-0s"

# --- 2. start and replay --------------------------------------------------------------
moat_conf() { # NAME PORT METRICS_PORT STORE INTERVAL
    moatmq_config "$1" <<CONF
[[listener]]
name = "bench"
bind = "127.0.0.1:$2"
allow_anonymous = true

[retained]
path = "$4"
key_file = "$WORK/retained.key"
autosave_interval = $5
max_messages = $((MESSAGES * 2))

[metrics]
bind = "127.0.0.1:$3"
CONF
}
M1=$(free_port)
M1_METRICS=$(free_port)
moat_conf moatmq-1s "$M1" "$M1_METRICS" "$WORK/store-1s" 1
START_MOAT=$("$B" startup --mqtt "127.0.0.1:$M1" --readyz "127.0.0.1:$M1_METRICS" \
    --filter 'bench/#' --expect "$MESSAGES" --idle "$IDLE" --timeout "$TIMEOUT" --label moatmq -- "$MOATMQ" serve -c "$WORK/moatmq-1s.toml")
log "$START_MOAT"

Q=$(free_port)
mkdir -p "$WORK/mosq"
mosq_conf() { # NAME AUTOSAVE_INTERVAL
    cat >"$WORK/$1.conf" <<CONF
$MOSQ_USER
listener $Q 127.0.0.1
allow_anonymous true
max_inflight_messages 100
max_queued_messages 0
persistence true
persistence_location $WORK/mosq/
autosave_interval $2
log_type error
log_type warning
CONF
}
mosq_conf mosquitto-fill 0
start mosquitto "$MOSQUITTO" -c "$WORK/mosquitto-fill.conf"
wait_port mosquitto "$Q" "${PIDS[-1]}"
FILL=$("$B" retained-pub --port "$Q" --publishers 8 --topics "$MESSAGES" --messages "$MESSAGES" \
    --payload 100 --label mosquitto-fill)
log "$FILL"
stop "${PIDS[-1]}"
log "mosquitto.db: $(stat -c %s "$WORK/mosq/mosquitto.db") bytes"
mosq_conf mosquitto-1s 1
START_MOSQ=$("$B" startup --mqtt "127.0.0.1:$Q" --filter 'bench/#' --expect "$MESSAGES" \
    --idle "$IDLE" --timeout "$TIMEOUT" --label mosquitto -- "$MOSQUITTO" -c "$WORK/mosquitto-1s.conf")
log "$START_MOSQ"

# --- 3. throughput --------------------------------------------------------------------
start mosquitto "$MOSQUITTO" -c "$WORK/mosquitto-1s.conf"
wait_port mosquitto "$Q" "${PIDS[-1]}" 600
start moatmq-1s "$MOATMQ" serve -c "$WORK/moatmq-1s.toml"
wait_port moatmq-1s "$M1" "${PIDS[-1]}" 600
M0=$(free_port)
moat_conf moatmq-0s "$M0" "$(free_port)" "$WORK/store-0s" 0
start moatmq-0s "$MOATMQ" serve -c "$WORK/moatmq-0s.toml"
wait_port moatmq-0s "$M0" "${PIDS[-1]}" 600
sleep 2
declare -A PORT=([mosquitto-autosave-1]=$Q [moatmq-autosave-1]=$M1 [moatmq-autosave-0]=$M0)
for round in $(seq 1 "$REPEATS"); do
    for broker in moatmq-autosave-1 moatmq-autosave-0 mosquitto-autosave-1; do
        line=$("$B" retained-pub --port "${PORT[$broker]}" --publishers "$PUBLISHERS" \
            --topics 10000 --payload 100 --duration "$DURATION" --label "$broker")
        log "round $round: $line"
        record "$broker" "$line" msgs_per_s ack_p50_ms ack_p99_ms ack_max_ms
    done
done

# --- tables ---------------------------------------------------------------------------
echo
echo "Retained store, $MESSAGES messages of 100 B; $(machine) at the end."
echo
echo "store (moatmq-store API): $STORE"
echo "mosquitto fill over MQTT: $FILL; mosquitto.db $(stat -c %s "$WORK/mosq/mosquitto.db") bytes"
echo
echo "Times in ms from the spawn. Wildcard: \`bench/#\` (counted until all $MESSAGES arrived," \
    "${IDLE}s without one or ${TIMEOUT}s); sampled: 100 exact topics subscribed at the same time on a second connection."
echo
echo "| broker | /readyz | first CONNACK | SUBSCRIBE to first retained | first retained | wildcard delivered (distinct) | SUBSCRIBE to last | wildcard msgs/s | sampled found | all sampled |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for s in "$START_MOAT" "$START_MOSQ"; do
    echo "| $(field label "$s") | $(field ready_ms "$s") | $(field connack_ms "$s") |" \
        "$(field subscribe_to_first_ms "$s") | $(field first_retained_ms "$s") |" \
        "$(field received "$s") ($(field distinct "$s")) | $(field subscribe_to_last_ms "$s") |" \
        "$(field wildcard_msgs_per_s "$s") |" \
        "$(field sampled_found "$s")/$(field sampled "$s") | $(field all_sampled_ms "$s") |"
done
echo
echo "Retained publish, $PUBLISHERS publishers, QoS 1, 10000 topics replaced, ${DURATION} s per run," \
    "$MESSAGES retained held, median of $REPEATS rounds."
echo
echo "| broker | msgs/s | PUBACK p50 ms | p99 ms | max ms |"
echo "|---|---:|---:|---:|---:|"
median_table 1 <"$RESULTS" | awk '{ printf "| %s | %.0f | %s | %s | %s |\n", $1, $2, $3, $4, $5 }'
