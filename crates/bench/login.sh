#!/usr/bin/env bash
# Issue 3 benchmark: login storms against moatmq and Mosquitto, in one invocation.
#
# Each broker gets two listeners: plain TCP with a password file (moatmq: Argon2id made
# by `moatmq passwd`; Mosquitto: `mosquitto_passwd`, its $7$ PBKDF2-SHA512) and TLS
# requiring a client certificate whose CN is the username (moatmq: identity = "cn";
# Mosquitto: require_certificate + use_identity_as_username). Certificates come from
# `moatmq-bench certs` (ECDSA P-256). For each broker and mode, `moatmq-bench login`
# runs CONCURRENCY logins in flight (connect, CONNACK, DISCONNECT) for DURATION seconds
# while two already connected probe clients exchange PROBE_RATE QoS 0 messages/s;
# the probe's latency is reported before (BASELINE seconds) and during the storm.
# Brokers and modes take turns, REPEATS rounds, the median round (logins/s) is kept.
#
# Knobs: CONCURRENCY (16), DURATION (10), BASELINE (3), PROBE_RATE (200), REPEATS (3),
# SKIP_BUILD=1, MOATMQ_BIN=path. About 4 minutes. Not a test.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs CONCURRENCY=16 DURATION=10 BASELINE=3 PROBE_RATE=200 REPEATS=3

build
need_mosquitto
C="$WORK/certs"
"$BIN/moatmq-bench" certs --out "$C" --clients storm,probe

# --- passwords ----------------------------------------------------------------------
printf 'storm-secret\n' | "$MOATMQ" passwd "$WORK/passwd" storm >&2
printf 'probe-secret\n' | "$MOATMQ" passwd "$WORK/passwd" probe >&2
"$MOSQUITTO_PASSWD" -c -b "$WORK/mosquitto.passwd" storm storm-secret
"$MOSQUITTO_PASSWD" -b "$WORK/mosquitto.passwd" probe probe-secret
log "moatmq hash: $(grep '^storm:' "$WORK/passwd" | cut -d'$' -f2-3), mosquitto hash: \$$(grep '^storm:' "$WORK/mosquitto.passwd" | cut -d'$' -f2)\$"

# --- servers ------------------------------------------------------------------------
M_PW=$(free_port)
M_TLS=$(free_port)
moatmq_config broker <<CONF
[[listener]]
name = "password"
bind = "127.0.0.1:$M_PW"

[[listener]]
name = "mtls"
bind = "127.0.0.1:$M_TLS"
[listener.tls]
cert = "$C/server.crt"
key = "$C/server.key"
client_ca = "$C/ca.crt"
require_client_cert = true
identity = "cn"

[auth]
allow_anonymous = false
password_file = "$WORK/passwd"
# Every login hashed: this measures the first verification (fleet.sh measures reconnects).
credential_cache_ttl = 0
CONF
start moatmq "$MOATMQ" serve -c "$WORK/broker.toml"
wait_port moatmq "$M_PW" "${PIDS[-1]}"
wait_port moatmq "$M_TLS" "${PIDS[-1]}"

Q_PW=$(free_port)
Q_TLS=$(free_port)
cat >"$WORK/mosquitto.conf" <<CONF
$MOSQ_USER
per_listener_settings true
log_type error
log_type warning

listener $Q_PW 127.0.0.1
allow_anonymous false
password_file $WORK/mosquitto.passwd

listener $Q_TLS 127.0.0.1
allow_anonymous false
cafile $C/ca.crt
certfile $C/server.crt
keyfile $C/server.key
require_certificate true
use_identity_as_username true
CONF
start mosquitto "$MOSQUITTO" -c "$WORK/mosquitto.conf"
wait_port mosquitto "$Q_PW" "${PIDS[-1]}"
wait_port mosquitto "$Q_TLS" "${PIDS[-1]}"
log "moatmq :$M_PW/:$M_TLS, mosquitto :$Q_PW/:$Q_TLS; $(machine)"

# --- runs ---------------------------------------------------------------------------
declare -A PW_PORT=([moatmq]=$M_PW [mosquitto]=$Q_PW)
declare -A TLS_PORT=([moatmq]=$M_TLS [mosquitto]=$Q_TLS)
COMMON=(--concurrency "$CONCURRENCY" --duration "$DURATION" --baseline "$BASELINE"
    --probe-rate "$PROBE_RATE")
for round in $(seq 1 "$REPEATS"); do
    for mode in password mtls; do
        for broker in moatmq mosquitto; do
            if [[ $mode == password ]]; then
                args=(--addr "127.0.0.1:${PW_PORT[$broker]}" --username storm --password storm-secret
                    --probe-username probe --probe-password probe-secret)
            else
                args=(--addr "127.0.0.1:${TLS_PORT[$broker]}" --ca "$C/ca.crt"
                    --cert "$C/storm.crt" --key "$C/storm.key"
                    --probe-cert "$C/probe.crt" --probe-key "$C/probe.key")
            fi
            line=$("$BIN/moatmq-bench" login "${args[@]}" "${COMMON[@]}" --label "$broker")
            log "round $round $mode: $line"
            record "$mode $broker" "$line" logins_per_s failed login_p50_ms login_p99_ms \
                probe_base_p50_us probe_base_p99_us probe_storm_p50_us probe_storm_p99_us
        done
    done
done

echo
echo "Login storm, $CONCURRENCY logins in flight for ${DURATION} s, probe $PROBE_RATE msgs/s," \
    "median of $REPEATS rounds; $(machine) at the end."
echo
echo "| login | broker | logins/s | failed | login p50 ms | login p99 ms | probe p50/p99 ms before | probe p50/p99 ms during |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
median_table 2 <"$RESULTS" | awk '
    function ms(us) { return us == "-" ? "-" : sprintf("%.2f", us / 1000) }
    { printf "| %s | %s | %.0f | %s | %s | %s | %s / %s | %s / %s |\n", $1, $2, $3, $4, $5, $6,
        ms($7), ms($8), ms($9), ms($10) }'
