#!/usr/bin/env bash
# Fan-in benchmark: moatmq vs Mosquitto vs plain rumqttd, in one invocation.
#
# Builds release binaries, starts Debian's mosquitto, rumqttd-ref and `moatmq serve`,
# each on its own free loopback port, runs N publishers -> 1 subscriber at QoS 0 and 1
# with 64 B and 1 KiB payloads against each (brokers interleaved, REPEATS rounds, the
# median round kept) and prints markdown tables. All servers are killed on exit.
#
# Knobs (environment): PUBLISHERS (8), MESSAGES per run (300000), TIMEOUT per run in
# seconds (15; a run cut short reports the rate of what arrived), REPEATS (3),
# WINDOW (2000; see crates/bench/src/fanin.rs), SKIP_BUILD=1 to reuse binaries,
# MOATMQ_BIN=path to measure another moatmq build (e.g. one built from a clean checkout),
# VARIANT_RUST_LOG=filter to also run a second moatmq ("moatmq-variant") with that RUST_LOG
# (e.g. "warn,rumqttd=off": see docs/benchmarks.md, where the time goes),
# BASELINE_BIN=path to also run an older moatmq build ("moatmq-base", e.g. built from the
# commit before a change) in the same rounds, for a before/after ratio without noise
# between separate runs (keys it does not know are left out of its config).
# Not a test: nothing runs this from `cargo test` or CI.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs PUBLISHERS=8 MESSAGES=300000 TIMEOUT=15 REPEATS=3 WINDOW=2000

build
need_mosquitto

# --- servers -------------------------------------------------------------------------
MOSQ_PORT=$(free_port)
# max_inflight_messages matches moatmq's and rumqttd's 100. The queue limit is lifted
# (0 = none; the window keeps queues short anyway): with any count limit, even 100000,
# mosquitto 2.0.11 drops QoS 1 messages for the subscriber late in long runs.
cat >"$WORK/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
max_inflight_messages 100
max_queued_messages 0
log_type error
log_type warning
EOF
start mosquitto "$MOSQUITTO" -c "$WORK/mosquitto.conf"
wait_port mosquitto "$MOSQ_PORT" "${PIDS[-1]}"

REF_PORT=$(free_port)
start rumqttd "$BIN/rumqttd-ref" --bind "127.0.0.1:$REF_PORT"
wait_port rumqttd "$REF_PORT" "${PIDS[-1]}"

MOAT_PORT=$(free_port)
moatmq_config broker <<EOF
[[listener]]
name = "bench"
bind = "127.0.0.1:$MOAT_PORT"
protocol = "mqtt"
allow_anonymous = true
EOF
start moatmq "$MOATMQ" serve -c "$WORK/broker.toml"
wait_port moatmq "$MOAT_PORT" "${PIDS[-1]}"

BROKERS=(mosquitto rumqttd moatmq)
declare -A PORT=([mosquitto]=$MOSQ_PORT [rumqttd]=$REF_PORT [moatmq]=$MOAT_PORT)
if [[ -n "${VARIANT_RUST_LOG:-}" ]]; then
    VAR_PORT=$(free_port)
    sed "s/127.0.0.1:$MOAT_PORT/127.0.0.1:$VAR_PORT/" "$WORK/broker.toml" >"$WORK/variant.toml"
    start moatmq-variant env RUST_LOG="$VARIANT_RUST_LOG" "$MOATMQ" serve -c "$WORK/variant.toml"
    wait_port moatmq-variant "$VAR_PORT" "${PIDS[-1]}"
    BROKERS+=(moatmq-variant)
    PORT[moatmq-variant]=$VAR_PORT
    log "moatmq-variant :$VAR_PORT with RUST_LOG=$VARIANT_RUST_LOG"
fi

if [[ -n "${BASELINE_BIN:-}" ]]; then
    BASE_PORT=$(free_port)
    sed -e "s/127.0.0.1:$MOAT_PORT/127.0.0.1:$BASE_PORT/" \
        -e '/^max_connections_per_address/d' -e '/^max_pending_per_address/d' \
        "$WORK/broker.toml" >"$WORK/base.toml"
    start moatmq-base "$BASELINE_BIN" serve -c "$WORK/base.toml"
    wait_port moatmq-base "$BASE_PORT" "${PIDS[-1]}"
    BROKERS+=(moatmq-base)
    PORT[moatmq-base]=$BASE_PORT
    log "moatmq-base :$BASE_PORT is $BASELINE_BIN"
fi

log "mosquitto :$MOSQ_PORT, rumqttd-ref :$REF_PORT, moatmq :$MOAT_PORT"

# --- runs ----------------------------------------------------------------------------
SCENARIOS=("0 64" "0 1024" "1 64" "1 1024")

for round in $(seq 1 "$REPEATS"); do
    for scenario in "${SCENARIOS[@]}"; do
        read -r qos payload <<<"$scenario"
        for broker in "${BROKERS[@]}"; do
            line=$("$BIN/moatmq-bench" fanin --host 127.0.0.1 --port "${PORT[$broker]}" \
                --publishers "$PUBLISHERS" --qos "$qos" --payload "$payload" \
                --messages "$MESSAGES" --window "$WINDOW" --timeout "$TIMEOUT" --label "$broker")
            log "round $round: $line"
            lost=$(field lost "$line")
            [[ "$lost" == - ]] && lost="timeout ${TIMEOUT}s"
            echo "$qos $payload $broker $(field msgs_per_s "$line") $(field p50_us "$line")" \
                "$(field p99_us "$line") ${lost// /_}" >>"$RESULTS"
        done
    done
done

# --- table ---------------------------------------------------------------------------
# Per scenario and broker the round with the median msgs/s is reported (its latencies too).
echo
echo "Fan-in, $PUBLISHERS publishers -> 1 subscriber, $MESSAGES messages per run," \
    "window $WINDOW, median of $REPEATS rounds; $(nproc) CPUs, $(date -u +%Y-%m-%d)."
echo
sort -k1,1n -k2,2n -k3,3 -k4,4n "$RESULTS" | awk -v repeats="$REPEATS" -v names="${BROKERS[*]}" '
    function ms(us) { return us == "-" ? "-" : sprintf("%.1f", us / 1000) }
    {
        key = $1 " " $2 " " $3
        n[key]++
        if (n[key] == int((repeats + 1) / 2)) {
            rate[key] = $4; p50[key] = $5; p99[key] = $6; lost[key] = $7
        }
        if (!(($1 " " $2) in seen)) { seen[$1 " " $2] = 1; order[++s] = $1 " " $2 }
    }
    END {
        nb = split(names, brokers, " ")
        print "| QoS | payload | broker | msgs/s | p50 ms | p99 ms | lost |"
        print "|---|---|---|---:|---:|---:|---:|"
        for (i = 1; i <= s; i++) {
            split(order[i], sc, " ")
            for (b = 1; b <= nb; b++) {
                key = order[i] " " brokers[b]
                l = lost[key]; gsub("_", " ", l)
                printf "| %s | %s B | %s | %d | %s | %s | %s |\n", sc[1], sc[2], brokers[b],
                    rate[key], ms(p50[key]), ms(p99[key]), l
            }
        }
        print ""
        variant = 0; base = 0
        for (b = 1; b <= nb; b++) {
            if (brokers[b] == "moatmq-variant") variant = 1
            if (brokers[b] == "moatmq-base") base = 1
        }
        printf "| QoS | payload | moatmq/mosquitto (target >= 2.5) | moatmq/rumqttd (target >= 0.8) |"
        if (variant) printf " variant/mosquitto | variant/rumqttd |"
        if (base) printf " moatmq/moatmq-base |"
        print ""
        print "|---|---|---:|---:|" (variant ? "---:|---:|" : "") (base ? "---:|" : "")
        for (i = 1; i <= s; i++) {
            split(order[i], sc, " ")
            m = rate[order[i] " moatmq"]; q = rate[order[i] " mosquitto"]; r = rate[order[i] " rumqttd"]
            printf "| %s | %s B | %.2f | %.2f |", sc[1], sc[2], (q > 0 ? m / q : 0), (r > 0 ? m / r : 0)
            if (variant) {
                v = rate[order[i] " moatmq-variant"]
                printf " %.2f | %.2f |", (q > 0 ? v / q : 0), (r > 0 ? v / r : 0)
            }
            if (base) {
                o = rate[order[i] " moatmq-base"]
                printf " %.2f |", (o > 0 ? m / o : 0)
            }
            print ""
        }
    }'
