# Shared by the benchmark scripts in crates/bench (sourced, not run, after
# `set -euo pipefail`): the repository root, work folder, cleanup of every server
# started, free ports, waiting for a port, release build, mosquitto install, moatmq
# configs, the results file.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN="$ROOT/target/release"
MOATMQ=${MOATMQ_BIN:-$BIN/moatmq}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moatmq-bench.XXXXXX")
PIDS=()
# One line per run, "KEY... VALUE...", for median_table.
RESULTS="$WORK/results"
: >"$RESULTS"

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "$(basename "$0"): $*" >&2; }

# knobs NAME=DEFAULT...: each NAME keeps its value from the environment, else DEFAULT.
knobs() {
    local kv name
    for kv in "$@"; do
        name=${kv%%=*}
        if [[ -z "${!name:-}" ]]; then
            printf -v "$name" '%s' "${kv#*=}"
        fi
    done
}

# A loopback port nobody listens on (checked by connecting; the servers bind right after).
free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    log "no free port found"
    exit 1
}

# wait_for NAME PID TRIES WHAT CHECK...: runs CHECK every 0.1 s until it succeeds;
# stops the script with NAME's log if its process PID ends first, or after TRIES tries
# (NAME not WHAT).
wait_for() {
    local name=$1 pid=$2 tries=$3 what=$4
    shift 4
    for _ in $(seq 1 "$tries"); do
        if "$@" 2>/dev/null; then
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited before $what; its log:"
            cat "$WORK/$name.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    log "$name is not $what"
    exit 1
}

# port_open PORT: something listens on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1")
}

# wait_port NAME PORT PID [TRIES of 0.1 s]
wait_port() {
    wait_for "$1" "$3" "${4:-100}" "listening on 127.0.0.1:$2" port_open "$2"
}

# start NAME CMD...: runs a server in the background, logging to $WORK/NAME.log.
start() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}

# stop PID: SIGTERM and wait (lets moatmq flush and mosquitto save).
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

build() {
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        log "building release binaries"
        if [[ -n "${MOATMQ_BIN:-}" ]]; then
            (cd "$ROOT" && cargo build --release -p moatmq-bench)
        else
            (cd "$ROOT" && cargo build --release -p moatmq -p moatmq-bench)
        fi
    fi
}

need_mosquitto() {
    if ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
        log "installing mosquitto"
        apt-get install -y mosquitto >&2 || { apt-get update >&2 && apt-get install -y mosquitto >&2; }
    fi
    MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
    MOSQUITTO_PASSWD=$(command -v mosquitto_passwd || echo /usr/bin/mosquitto_passwd)
    # Started as root, mosquitto switches to the `mosquitto` user, which cannot read
    # the files in $WORK: stay root then (loopback-only benchmark servers).
    MOSQ_USER=""
    if [[ $(id -u) == 0 ]]; then
        MOSQ_USER="user root"
    fi
}

# moatmq_config NAME [LIMIT...]: writes $WORK/NAME.toml, the TOML on stdin followed by
# what every benchmark config needs, and checks it with `moatmq check`. The rate limits
# are off: the defaults (20 connections/s per address, 1000 msgs/s and 10 MiB/s per
# client, 32 connections per address still logging in) would be measured, since every
# bench client is 127.0.0.1. Each LIMIT is one more line of [limits].
moatmq_config() {
    local file="$WORK/$1.toml" limit
    shift
    {
        cat
        cat <<'CONF'

[log]
level = "warn"

[rate_limit]
connections_per_second = 0
messages_per_second = 0
bytes_per_second = 0

[limits]
max_connections_per_address = 1000000
max_pending_per_address = 1000000
CONF
        for limit in "$@"; do
            echo "$limit"
        done
    } >"$file"
    "$MOATMQ" check -c "$file" >&2
}

# record KEY LINE FIELD...: appends "KEY VALUE..." to $RESULTS, each VALUE the FIELD of
# LINE (a moatmq-bench report, `name=value` words).
record() {
    local key=$1 line=$2 name values=()
    shift 2
    for name in "$@"; do
        values+=("$(field "$name" "$line")")
    done
    echo "$key ${values[*]}" >>"$RESULTS"
}

machine() {
    echo "$(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u '+%Y-%m-%d %H:%M') UTC"
}

field() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }

# median_table KEYCOLS: stdin = lines "key... value rest..."; for each key (the first
# KEYCOLS fields) keeps the line with the median value (field KEYCOLS+1), in first-seen
# key order.
median_table() {
    awk -v k="$1" '
        {
            key = $1; for (i = 2; i <= k; i++) key = key " " $i
            if (!(key in n)) order[++s] = key
            n[key]++; line[key, n[key]] = $0; val[key, n[key]] = $(k + 1)
        }
        END {
            for (j = 1; j <= s; j++) {
                key = order[j]; m = n[key]
                for (a = 1; a <= m; a++) idx[a] = a
                for (a = 1; a <= m; a++) for (b = a + 1; b <= m; b++)
                    if (val[key, idx[b]] + 0 < val[key, idx[a]] + 0) { t = idx[a]; idx[a] = idx[b]; idx[b] = t }
                print line[key, idx[int((m + 1) / 2)]]
            }
        }'
}
