#!/usr/bin/env bash
# Issue 14 benchmark: durable persistent sessions, moatmq next to Mosquitto with
# `persistence true`, in one invocation.
#
# 1. Offline queue throughput. A persistent subscriber (3.1.1, clean session 0, QoS 1 on
#    `sess/#`) is left offline; PUBLISHERS publishers send MESSAGES QoS 1 messages of
#    PAYLOAD bytes (INFLIGHT unacknowledged each), counted when acknowledged; then the
#    subscriber reconnects (1.5 s later) and takes its queue (acknowledging each; rate
#    from the CONNACK to the last message), then removes its session (clean session 1).
#    The broker's CPU time (user + system, /proc/PID/stat) from before the publish to
#    1.5 s after it, per message, is less noisy than the rates on shared cores. Brokers,
#    all running, taking turns, REPEATS rounds, median kept:
#    moatmq [sessions] autosave_interval = 0 (each queued copy fsynced, group commit,
#    before the PUBACK), = 1 (saved every second), enabled = false (in memory only, as
#    rumqttd: the baseline), and Mosquitto autosave_interval 1 (it has no per-message
#    fsync mode: its autosave rewrites the whole database).
# 2. Restart. SESSIONS persistent sessions each subscribed to its own topic
#    (`q/<i/1000>/<i%1000>`), offline, get PER_SESSION QoS 1 messages of SMALL bytes each
#    (SESSIONS * PER_SESSION in all, 4 publishers); the broker is stopped (SIGTERM: moatmq
#    commits, Mosquitto saves mosquitto.db), the files' sizes per queued message taken,
#    and the broker started again from a copy of them, RESTARTS times: time from the spawn
#    to a CONNACK with session present for session 0 and to the last of its PER_SESSION
#    messages. Bytes the broker caused to be written during the fill (/proc/PID/io
#    write_bytes, before the stop) are shown too. moatmq at interval 1, Mosquitto at 1.
#
# Knobs: MESSAGES (500000), PUBLISHERS (4), INFLIGHT (100), PAYLOAD (100), REPEATS (3),
# SESSIONS (10000), PER_SESSION (100), SMALL (32), RESTARTS (3), IDLE (10), PARTS ("1 2"),
# SKIP_BUILD=1, MOATMQ_BIN=path. With the defaults about 3.5 minutes and 1 GB in $TMPDIR.
# Not a test.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=common.sh
source "$ROOT/crates/bench/common.sh"
knobs MESSAGES=500000 PUBLISHERS=4 INFLIGHT=100 PAYLOAD=100 REPEATS=3 SESSIONS=10000 \
    PER_SESSION=100 SMALL=32 RESTARTS=3 IDLE=10 PARTS="1 2"

need=$((SESSIONS + 1000))
if (($(ulimit -n) < need)); then
    ulimit -n "$need" 2>/dev/null || { log "need $need open files (ulimit -n), have $(ulimit -n)"; exit 1; }
fi

build
need_mosquitto
B="$BIN/moatmq-bench"
log "$(machine)"
"$MOATMQ" keygen --out "$WORK/retained.key" >&2

# moat_conf NAME PORT SESSIONS_TOML QUEUED: $WORK/NAME.toml, store in $WORK/NAME/.
moat_conf() {
    moatmq_config "$1" "max_connections = $((SESSIONS + 1000))" \
        "max_sessions_per_user = $((SESSIONS + 1000))" "max_queued_messages = $4" \
        "max_queued_bytes = 1073741824" <<CONF
[[listener]]
name = "bench"
bind = "127.0.0.1:$2"
allow_anonymous = true

[retained]
path = "$WORK/$1"
key_file = "$WORK/retained.key"

[sessions]
$3
CONF
}

# mosq_conf NAME PORT QUEUED: $WORK/NAME.conf, mosquitto.db in $WORK/NAME/.
mosq_conf() {
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1.conf" <<CONF
$MOSQ_USER
listener $2 127.0.0.1
allow_anonymous true
max_inflight_messages 100
max_queued_messages $3
persistence true
persistence_location $WORK/$1/
autosave_interval 1
log_type error
log_type warning
CONF
}

# --- 1. offline queue throughput ------------------------------------------------------
# The broker's CPU time (user + system, clock ticks) from /proc/PID/stat.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# cpu_us PID TICKS_BEFORE MESSAGES: broker CPU microseconds per message since then.
cpu_us() {
    awk -v a="$2" -v b="$(cpu_ticks "$1")" -v hz="$(getconf CLK_TCK)" -v n="$3" \
        'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / n }'
}
THROUGHPUT="$WORK/throughput"
: >"$THROUGHPUT"
if [[ " $PARTS " == *" 1 "* ]]; then
    declare -A PORT PID_OF
    BROKERS=(moatmq-autosave-0 moatmq-autosave-1 moatmq-in-memory mosquitto-autosave-1)
    for b in moatmq-autosave-0 moatmq-autosave-1 moatmq-in-memory; do
        PORT[$b]=$(free_port)
        case $b in
        moatmq-autosave-0) s="autosave_interval = 0" ;;
        moatmq-autosave-1) s="autosave_interval = 1" ;;
        *) s="enabled = false" ;;
        esac
        moat_conf "$b" "${PORT[$b]}" "$s" $((MESSAGES * 2))
        start "$b" "$MOATMQ" serve -c "$WORK/$b.toml"
        PID_OF[$b]=${PIDS[-1]}
        wait_port "$b" "${PORT[$b]}" "${PIDS[-1]}"
    done
    PORT[mosquitto-autosave-1]=$(free_port)
    mosq_conf mosquitto-autosave-1 "${PORT[mosquitto-autosave-1]}" $((MESSAGES * 2))
    start mosquitto-autosave-1 "$MOSQUITTO" -c "$WORK/mosquitto-autosave-1.conf"
    PID_OF[mosquitto-autosave-1]=${PIDS[-1]}
    wait_port mosquitto-autosave-1 "${PORT[mosquitto-autosave-1]}" "${PIDS[-1]}"
    sleep 1
    for round in $(seq 1 "$REPEATS"); do
        for b in "${BROKERS[@]}"; do
            p=${PORT[$b]}
            pid=${PID_OF[$b]}
            "$B" session-setup --mqtt "127.0.0.1:$p" --sessions 1 --id "sub-$round" \
                --filter 'sess/#' --label "$b" >/dev/null
            cpu0=$(cpu_ticks "$pid")
            pub=$("$B" retained-pub --port "$p" --retain false --prefix sess --topics 1000 \
                --messages "$MESSAGES" --publishers "$PUBLISHERS" --inflight "$INFLIGHT" \
                --payload "$PAYLOAD" --label "$b")
            sleep 1.5 # the autosave of the last second is part of the cost
            cpu=$(cpu_us "$pid" "$cpu0" "$MESSAGES")
            drain=$("$B" session-drain --mqtt "127.0.0.1:$p" --client-id "sub-$round-0" \
                --expect "$MESSAGES" --idle "$IDLE" --clean-after --label "$b")
            log "round $round: $pub"
            log "round $round: $drain"
            echo "$b $(field msgs_per_s "$pub") $(field drain_msgs_per_s "$drain")" \
                "$(field ack_p50_ms "$pub") $(field ack_p99_ms "$pub") $(field ack_max_ms "$pub")" \
                "$(field received "$drain") $(field dup "$drain") $cpu" \
                "$(field connack_ms "$drain") $(field last_ms "$drain")" >>"$THROUGHPUT"
        done
    done
    for pid in "${PIDS[@]}"; do
        stop "$pid"
    done
    PIDS=()
fi

# --- 2. restart with SESSIONS sessions and SESSIONS * PER_SESSION queued messages -------
TOTAL=$((SESSIONS * PER_SESSION))
RESTART="$WORK/restart"
FILES="$WORK/files"
: >"$RESTART"
: >"$FILES"
if [[ " $PARTS " == *" 2 "* ]]; then
    # fill NAME PORT CMD...: start, SESSIONS sessions, TOTAL messages, write_bytes, stop.
    fill() {
        local name=$1 port=$2 pid setup pub io
        shift 2
        start "$name" "$@"
        pid=${PIDS[-1]}
        wait_port "$name" "$port" "$pid" 600
        setup=$("$B" session-setup --mqtt "127.0.0.1:$port" --sessions "$SESSIONS" --id dev \
            --prefix q --label "$name")
        log "$setup"
        pub=$("$B" retained-pub --port "$port" --retain false --prefix q --topics "$SESSIONS" \
            --messages "$TOTAL" --publishers 4 --inflight "$INFLIGHT" --payload "$SMALL" \
            --label "$name-fill")
        log "$pub"
        sleep 2 # one more autosave for both
        io=$(sed -n 's/^write_bytes: //p' "/proc/$pid/io")
        stop "$pid"
        echo "$name $(field sessions_per_s "$setup") $(field msgs_per_s "$pub") $io" >>"$FILES"
    }
    MR=$(free_port)
    moat_conf moatmq-restart "$MR" "autosave_interval = 1" $((PER_SESSION * 2))
    fill moatmq-restart "$MR" "$MOATMQ" serve -c "$WORK/moatmq-restart.toml"
    MOAT_LOG=$(stat -c %s "$WORK/moatmq-restart/sessions.log")
    MOAT_LIST=$(
        t=$(date +%s%N)
        "$MOATMQ" sessions list -c "$WORK/moatmq-restart.toml" | tail -1
        echo "(read in $((($(date +%s%N) - t) / 1000000)) ms)"
    )
    log "sessions.log: $MOAT_LOG bytes; sessions list: $MOAT_LIST"
    cp -a "$WORK/moatmq-restart" "$WORK/moatmq-restart.orig"

    QR=$(free_port)
    mosq_conf mosquitto-restart "$QR" $((PER_SESSION * 2))
    fill mosquitto-restart "$QR" "$MOSQUITTO" -c "$WORK/mosquitto-restart.conf"
    MOSQ_DB=$(stat -c %s "$WORK/mosquitto-restart/mosquitto.db")
    log "mosquitto.db: $MOSQ_DB bytes"
    cp -a "$WORK/mosquitto-restart" "$WORK/mosquitto-restart.orig"

    for round in $(seq 1 "$RESTARTS"); do
        for name in moatmq-restart mosquitto-restart; do
            rm -rf "${WORK:?}/$name"
            cp -a "$WORK/$name.orig" "$WORK/$name"
            if [[ $name == moatmq-restart ]]; then
                port=$MR
                cmd=("$MOATMQ" serve -c "$WORK/moatmq-restart.toml")
            else
                port=$QR
                cmd=("$MOSQUITTO" -c "$WORK/mosquitto-restart.conf")
            fi
            line=$("$B" session-drain --mqtt "127.0.0.1:$port" --client-id dev-0 \
                --expect "$PER_SESSION" --idle "$IDLE" --label "$name" -- "${cmd[@]}")
            log "restart $round: $line"
            echo "$name $(field connack_ms "$line") $(field last_ms "$line")" \
                "$(field session_present "$line") $(field received "$line")" >>"$RESTART"
        done
    done
fi

# --- tables ---------------------------------------------------------------------------
echo
echo "Durable sessions; $(machine) at the end."
if [[ -s "$THROUGHPUT" ]]; then
    echo
    echo "Offline queue: $MESSAGES QoS 1 messages of $PAYLOAD B from $PUBLISHERS publishers" \
        "($INFLIGHT in flight each) to one offline persistent subscriber, then drained;" \
        "median of $REPEATS rounds (each column's median on its own; PUBACK latencies from" \
        "the round with the median publish rate)."
    echo
    echo "| broker | publish msgs/s | PUBACK p50 ms | p99 ms | max ms | broker CPU µs/msg (publish) | reconnect → CONNACK ms | reconnect → last ms | drain msgs/s (from CONNACK) | drained | DUP |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    med() { awk -v c="$1" '{ print $1, $c }' "$THROUGHPUT" | median_table 1; }
    drains=$(med 3)
    cpus=$(med 9)
    connacks=$(med 10)
    lasts=$(med 11)
    pick() { awk -v b="$1" '$1 == b { print $2 }' <<<"$2"; }
    while read -r b p _ p50 p99 pmax recv dup _; do
        echo "| $b | $p | $p50 | $p99 | $pmax | $(pick "$b" "$cpus") | $(pick "$b" "$connacks") |" \
            "$(pick "$b" "$lasts") | $(pick "$b" "$drains") | $recv | $dup |"
    done < <(median_table 1 <"$THROUGHPUT")
    echo
    # Issue 14's figure: interval 1 against in-memory sessions, on the publish rate, on
    # the drain, and end to end (each round's publish time plus its drain time).
    awk -v n="$MESSAGES" '
        function median(a, m,   i, j, t) {
            for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++)
                if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return a[int((m + 1) / 2)]
        }
        $1 == "moatmq-autosave-1" { k = ++a; ap[k] = $2; ad[k] = $3; ae[k] = n / $2 + n / $3 }
        $1 == "moatmq-in-memory" { k = ++m; mp[k] = $2; md[k] = $3; me[k] = n / $2 + n / $3 }
        END {
            if (a == 0 || m == 0) exit
            printf "Interval 1 / in memory: publish %.2f, drain %.2f, end to end %.2f" \
                " (%.2f s against %.2f s).\n", median(ap, a) / median(mp, m),
                median(ad, a) / median(md, m), median(me, m) / median(ae, a),
                median(ae, a), median(me, m)
        }' "$THROUGHPUT"
    echo
    echo "All rounds (broker publish drain p50 p99 max drained dup cpu_us_per_msg connack_ms last_ms):"
    sed 's/^/    /' "$THROUGHPUT"
fi
if [[ -s "$RESTART" ]]; then
    echo
    echo "Restart: $SESSIONS sessions x $PER_SESSION queued messages of $SMALL B = $TOTAL;" \
        "ms from the spawn, median of $RESTARTS (by CONNACK time)."
    echo
    echo "| broker | CONNACK (session present) | last of session 0's $PER_SESSION | received | file bytes | bytes per queued message | fill: sessions/s | fill: msgs/s | written during fill (write_bytes) per message |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    while read -r name connack last present recv; do
        read -r _ sps mps io < <(awk -v n="$name" '$1 == n' "$FILES")
        if [[ $name == moatmq-restart ]]; then size=$MOAT_LOG; else size=$MOSQ_DB; fi
        echo "| $name | $connack ($present) | $last | $recv | $size |" \
            "$(awk -v s="$size" -v t="$TOTAL" 'BEGIN { printf "%.1f", s / t }') | $sps | $mps |" \
            "$(awk -v s="$io" -v t="$TOTAL" 'BEGIN { printf "%.1f", s / t }') |"
    done < <(median_table 1 <"$RESTART")
    echo
    echo "moatmq sessions list after the fill: $MOAT_LIST"
    echo
    echo "All restarts (broker connack_ms last_ms session_present received):"
    sed 's/^/    /' "$RESTART"
fi
