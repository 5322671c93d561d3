#!/usr/bin/env bash
# Soak run (not part of CI): the release broker with TLS, password logins, the default
# tenant-isolation ACL and an encrypted retained store (autosave_interval = 0: durable
# before the PUBACK), driven by scripts/soak.py with mixed traffic for SOAK_SECONDS
# (default 120). Samples the broker's RSS every 10 s, then restarts the broker (SIGTERM)
# and checks that every acknowledged retained message is replayed.
#
#   scripts/soak.sh            # 2 minutes
#   SOAK_SECONDS=600 scripts/soak.sh
# Output: the driver's lines, an RSS table, a JSON report in $SOAK_DIR (default a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL="${SOAK_SECONDS:-120}"
DIR="${SOAK_DIR:-$(mktemp -d /tmp/moatmq-soak.XXXXXX)}"
mkdir -p "$DIR"
cargo build --release -q -p moatmq
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/moatmq"

# TLS: a throwaway CA and a server certificate for localhost / 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=soak ca" \
    -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$DIR/server.key" -out "$DIR/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$DIR/san.ext"
openssl x509 -req -in "$DIR/server.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -CAcreateserial \
    -days 2 -extfile "$DIR/san.ext" -out "$DIR/server.crt" 2>/dev/null
chmod 600 "$DIR"/*.key

rm -f "$DIR/passwd"
echo alicepw | "$BIN" passwd "$DIR/passwd" alice >/dev/null
echo bobpw | "$BIN" passwd "$DIR/passwd" bob >/dev/null
"$BIN" keygen --out "$DIR/retained.key" >/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$DIR/broker.toml" <<TOML
[[listener]]
name = "tls"
bind = "127.0.0.1:$PORT"
[listener.tls]
cert = "server.crt"
key = "server.key"
[auth]
password_file = "passwd"
[retained]
path = "data"
key_file = "retained.key"
autosave_interval = 0
[rate_limit]
connections_per_second = 0
messages_per_second = 0
[log]
level = "warn"
TOML
"$BIN" check -c "$DIR/broker.toml"

start_broker() {
    "$BIN" serve -c "$DIR/broker.toml" >>"$DIR/broker.log" 2>&1 &
    BROKER=$!
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "broker did not start; see $DIR/broker.log" >&2
    exit 1
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

start_broker
echo "soak: $SECONDS_TOTAL s, broker pid $BROKER, files in $DIR"
( while kill -0 "$BROKER" 2>/dev/null; do
      echo "$(date +%s) $(rss_kb "$BROKER")"; sleep 10
  done ) > "$DIR/rss.txt" &
SAMPLER=$!
status=0
python3 scripts/soak.py drive --port "$PORT" --ca "$DIR/ca.crt" --duration "$SECONDS_TOTAL" \
    --out "$DIR/report.json" || status=$?
kill "$SAMPLER" 2>/dev/null || true
echo "broker RSS over time (s since start, MiB):"
awk 'NR==1 {t0=$1} {printf "  %5d  %6.1f\n", $1-t0, $2/1024}' "$DIR/rss.txt"

kill -TERM "$BROKER"
wait "$BROKER" || true
start_broker
python3 scripts/soak.py verify --port "$PORT" --ca "$DIR/ca.crt" --out "$DIR/report.json" || status=$?
kill -TERM "$BROKER"
wait "$BROKER" || true
echo "soak: exit $status (report: $DIR/report.json, broker log: $DIR/broker.log)"
exit "$status"
