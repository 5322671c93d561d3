#!/usr/bin/env bash
# Issue 17 benchmark: a fleet of devices against moatmq and Mosquitto, in one invocation.
#
# - reconnect: COUNT password devices (users dev0.., moatmq: Argon2id at its own
#   parameters from `moatmq-bench passwords`; Mosquitto: $7$ PBKDF2 from
#   `mosquitto_passwd -U`) log in all at once and stay; then every connection drops at
#   the same moment (the devices' network restarting, the broker still running) and all
#   come back at once. Time until the last device has its CONNACK, per wave. moatmq's
#   second wave is answered from its verified-credential cache ([auth]
#   credential_cache_ttl); "moatmq-nocache" is the same broker with the cache off.
# - idle: COUNT anonymous devices connect and stay idle, over plain TCP and over TLS;
#   the broker's VmRSS before and with them, per connection.
# - latency: one QoS 1 publisher at each of RATES messages/s to one QoS 1 subscriber
#   (`moatmq-bench latency`, LATENCY_SECS seconds, the first not counted), p50/p99 from
#   the publisher's write to the subscriber's read; Mosquitto with set_tcp_nodelay.
# - retained: RETAINED retained QoS 1 messages of 100 B on as many topics (8 publishers,
#   each acknowledged), the broker's VmRSS before and 3 s after, per message. Both keep
#   them in memory only (moatmq without a [retained] store, Mosquitto without
#   persistence), as a default install does.
# Devices come from SOURCES loopback addresses (127.0.0.2 and up). Brokers take turns,
# REPEATS rounds, the median round is kept.
#
# Knobs: COUNT (10000), SOURCES (50), REPEATS (1), PARTS ("reconnect idle latency"),
# SETTLE (8 s between the last idle device's CONNACK and the RSS reading: past moatmq's
# 5 s idle trim), RATES ("1000 10000"), LATENCY_SECS (10), RETAINED (100000), SKIP_BUILD=1,
# MOATMQ_BIN=path.
# Hashing COUNT Argon2id entries takes ~COUNT/80 s on 2 cores; each moatmq first wave
# about as long. Not a test.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs COUNT=10000 SOURCES=50 REPEATS=1 PARTS="reconnect idle latency retained" SETTLE=8 \
    RATES="1000 10000" LATENCY_SECS=10 RETAINED=100000
part() { [[ " $PARTS " == *" $1 "* ]]; }

# Per process: the broker holds COUNT sockets, the client holds COUNT more.
need=$((COUNT + 1000))
if (($(ulimit -n) < need)); then
    ulimit -n "$need" 2>/dev/null || { log "need $need open files (ulimit -n), have $(ulimit -n)"; exit 1; }
fi

build
need_mosquitto
C="$WORK/certs"
"$BIN/moatmq-bench" certs --out "$C" --clients probe

# Without the reconnect part one entry does: the password listeners only need a file.
hashed=$COUNT
part reconnect || hashed=1
log "hashing $hashed passwords"
"$BIN/moatmq-bench" passwords --count "$hashed" --out "$WORK/passwd" --plain "$WORK/mosquitto.passwd"
"$MOSQUITTO_PASSWD" -U "$WORK/mosquitto.passwd"

# --- servers ------------------------------------------------------------------------
moat_conf() { # NAME CACHE_TTL: writes $WORK/NAME.toml; prints its three ports
    local name=$1 ttl=$2 pw open tls
    pw=$(free_port)
    open=$(free_port)
    tls=$(free_port)
    moatmq_config "$name" "max_connections = $((COUNT * 2 + 100))" <<CONF
[[listener]]
name = "password"
bind = "127.0.0.1:$pw"

[[listener]]
name = "open"
bind = "127.0.0.1:$open"
allow_anonymous = true

[[listener]]
name = "tls"
bind = "127.0.0.1:$tls"
allow_anonymous = true
[listener.tls]
cert = "$C/server.crt"
key = "$C/server.key"

[auth]
password_file = "$WORK/passwd"
credential_cache_ttl = $ttl
CONF
    echo "$pw $open $tls"
}

declare -A PW_PORT OPEN_PORT TLS_PORT CMD
read -r PW_PORT[moatmq] OPEN_PORT[moatmq] TLS_PORT[moatmq] < <(moat_conf moatmq 600)
read -r PW_PORT[moatmq-nocache] OPEN_PORT[moatmq-nocache] TLS_PORT[moatmq-nocache] \
    < <(moat_conf moatmq-nocache 0)
CMD[moatmq]="$MOATMQ serve -c $WORK/moatmq.toml"
CMD[moatmq-nocache]="$MOATMQ serve -c $WORK/moatmq-nocache.toml"

PW_PORT[mosquitto]=$(free_port)
OPEN_PORT[mosquitto]=$(free_port)
TLS_PORT[mosquitto]=$(free_port)
cat >"$WORK/mosquitto.conf" <<CONF
$MOSQ_USER
per_listener_settings true
log_type error
log_type warning
set_tcp_nodelay true

listener ${PW_PORT[mosquitto]} 127.0.0.1
allow_anonymous false
password_file $WORK/mosquitto.passwd

listener ${OPEN_PORT[mosquitto]} 127.0.0.1
allow_anonymous true

listener ${TLS_PORT[mosquitto]} 127.0.0.1
allow_anonymous true
certfile $C/server.crt
keyfile $C/server.key
CONF
CMD[mosquitto]="$MOSQUITTO -c $WORK/mosquitto.conf"

# A fresh broker per measurement: nothing remembered, nothing allocated before.
fresh() { # BROKER: starts it, sets PID
    # shellcheck disable=SC2086
    start "$1" ${CMD[$1]}
    PID=${PIDS[-1]}
    wait_port "$1" "${PW_PORT[$1]}" "$PID" 300
    wait_port "$1" "${OPEN_PORT[$1]}" "$PID"
    wait_port "$1" "${TLS_PORT[$1]}" "$PID"
}

log "$COUNT devices from $SOURCES addresses; $(machine)"
for round in $(seq 1 "$REPEATS"); do
    part reconnect || break
    for broker in moatmq moatmq-nocache mosquitto; do
        fresh "$broker"
        line=$("$BIN/moatmq-bench" reconnect --addr "127.0.0.1:${PW_PORT[$broker]}" --passwords \
            --count "$COUNT" --sources "$SOURCES" --label "$broker")
        log "round $round reconnect: $line"
        record "reconnect $broker" "$line" again_s first_s first_retries again_retries
        stop "$PID"
    done
done
for round in $(seq 1 "$REPEATS"); do
    part idle || break
    for broker in moatmq mosquitto; do
        for mode in tcp tls; do
            fresh "$broker"
            if [[ $mode == tcp ]]; then
                args=(--addr "127.0.0.1:${OPEN_PORT[$broker]}")
            else
                args=(--addr "127.0.0.1:${TLS_PORT[$broker]}" --ca "$C/ca.crt")
            fi
            line=$("$BIN/moatmq-bench" idle "${args[@]}" --pid "$PID" --count "$COUNT" \
                --settle "$SETTLE" --sources "$SOURCES" --label "$broker")
            log "round $round idle $mode: $line"
            record "idle-$mode $broker" "$line" per_conn_kib rss_before_kib rss_kib
            stop "$PID"
        done
    done
done
for round in $(seq 1 "$REPEATS"); do
    part latency || break
    for broker in moatmq mosquitto; do
        fresh "$broker"
        for rate in $RATES; do
            line=$("$BIN/moatmq-bench" latency --mqtt "127.0.0.1:${OPEN_PORT[$broker]}" \
                --rate "$rate" --secs "$LATENCY_SECS" --label "$broker")
            log "round $round latency: $line"
            record "latency-$rate $broker" "$line" p50_us p99_us max_us received sent
        done
        stop "$PID"
    done
done
for round in $(seq 1 "$REPEATS"); do
    part retained || break
    for broker in moatmq mosquitto; do
        fresh "$broker"
        before=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$PID/status")
        "$BIN/moatmq-bench" retained-pub --port "${OPEN_PORT[$broker]}" --publishers 8 \
            --topics "$RETAINED" --messages "$RETAINED" --payload 100 --qos 1 \
            --prefix fleet/r --label "$broker" >&2
        sleep 3
        after=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$PID/status")
        line="per_msg_b=$(((after - before) * 1024 / RETAINED)) rss_before_kib=$before rss_kib=$after"
        log "round $round retained $broker: $line"
        record "retained $broker" "$line" per_msg_b rss_before_kib rss_kib
        stop "$PID"
    done
done

echo
echo "Fleet of $COUNT devices from $SOURCES loopback addresses, median of $REPEATS rounds;" \
    "$(machine) at the end."
echo
if part reconnect; then
    echo "| reconnect storm | all back after the drop, s | first login wave, s | retries first / again |"
    echo "|---|---:|---:|---:|"
    median_table 2 <"$RESULTS" | awk '$1 == "reconnect" {
        printf "| %s | %.2f | %.2f | %s / %s |\n", $2, $3, $4, $5, $6 }'
    echo
fi
if part idle; then
    echo "| idle connections | broker | RSS per connection, KiB | RSS before, MiB | RSS with them, MiB |"
    echo "|---|---|---:|---:|---:|"
    median_table 2 <"$RESULTS" | awk '$1 ~ /^idle/ {
        printf "| %s | %s | %.1f | %.0f | %.0f |\n", substr($1, 6), $2, $3, $4 / 1024, $5 / 1024 }'
    echo
fi
if part latency; then
    echo "| QoS 1 latency | broker | p50 µs | p99 µs | max µs | received / sent |"
    echo "|---|---|---:|---:|---:|---:|"
    median_table 2 <"$RESULTS" | awk '$1 ~ /^latency/ {
        printf "| %s msgs/s | %s | %s | %s | %s | %s / %s |\n", substr($1, 9), $2, $3, $4, $5, $6, $7 }'
fi
if part retained; then
    echo
    echo "| $RETAINED retained messages, 100 B | broker | RSS per message, B | RSS before, MiB | RSS with them, MiB |"
    echo "|---|---|---:|---:|---:|"
    median_table 2 <"$RESULTS" | awk '$1 == "retained" {
        printf "| in memory | %s | %s | %.0f | %.0f |\n", $2, $3, $4 / 1024, $5 / 1024 }'
fi
