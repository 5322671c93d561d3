#!/usr/bin/env bash
# Issue 4 benchmark: ACL cost.
#
# 1. `acl-micro` (moatmq-acl directly): ns per check_read / check_publish with 10000
#    users x 10 rules (+1 pattern), with the same rules for 10 users, and with the
#    built-in default.
# 2. End to end: fan-in (8 publishers -> 1 subscriber, logged in as user tenant42, topics
#    under tenant42/app/) against two moatmq servers that differ only in [acl]: the
#    built-in default (`pattern readwrite %u/#`) and the generated 10000-user ACL file,
#    where tenant42's messages are checked against its 10 rules (one `deny` inside the
#    granted tree, so every rule is evaluated for every message, in and out). moatmq has
#    no "ACL off"; plain rumqttd-ref (no checks at all) is shown for reference. Servers
#    take turns, REPEATS rounds, the median kept.
#
# Knobs: MESSAGES (300000), REPEATS (5), PUBLISHERS (8), SKIP_BUILD=1, MOATMQ_BIN=path.
# About 3 minutes. Not a test.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
knobs MESSAGES=300000 REPEATS=5 PUBLISHERS=8

build
log "$(machine)"
MICRO=$("$BIN/acl-micro")
log "$MICRO"

"$BIN/acl-micro" --write-acl "$WORK/aclfile"
printf 'tenant42-secret\n' | "$MOATMQ" passwd "$WORK/passwd" tenant42 >&2

moat_conf() { # NAME PORT ACL_LINE
    moatmq_config "$1" <<CONF
[[listener]]
name = "bench"
bind = "127.0.0.1:$2"

[auth]
allow_anonymous = false
password_file = "$WORK/passwd"

[acl]
$3
CONF
}
P_BUILTIN=$(free_port)
moat_conf builtin "$P_BUILTIN" ""
start moatmq-builtin "$MOATMQ" serve -c "$WORK/builtin.toml"
wait_port moatmq-builtin "$P_BUILTIN" "${PIDS[-1]}"
P_FILE=$(free_port)
moat_conf aclfile "$P_FILE" "file = \"$WORK/aclfile\""
start moatmq-aclfile "$MOATMQ" serve -c "$WORK/aclfile.toml"
wait_port moatmq-aclfile "$P_FILE" "${PIDS[-1]}"
P_REF=$(free_port)
start rumqttd "$BIN/rumqttd-ref" --bind "127.0.0.1:$P_REF"
wait_port rumqttd "$P_REF" "${PIDS[-1]}"

declare -A PORT=([moatmq-builtin]=$P_BUILTIN [moatmq-aclfile]=$P_FILE [rumqttd]=$P_REF)
for round in $(seq 1 "$REPEATS"); do
    for qos in 0 1; do
        for broker in moatmq-builtin moatmq-aclfile rumqttd; do
            auth=(--username tenant42 --password tenant42-secret)
            [[ $broker == rumqttd ]] && auth=()
            line=$("$BIN/moatmq-bench" fanin --port "${PORT[$broker]}" "${auth[@]}" \
                --prefix tenant42/app --publishers "$PUBLISHERS" --qos "$qos" --payload 64 \
                --messages "$MESSAGES" --timeout 15 --label "$broker")
            log "round $round: $line"
            record "$qos $broker" "$line" msgs_per_s p50_us p99_us lost
        done
    done
done

echo
echo "ACL micro benchmark (one thread): users=10000, 10 rules each + 1 pattern."
echo
echo "| ACL | check | ns/decision | decisions/s | allowed |"
echo "|---|---|---:|---:|---:|"
grep 'check=' <<<"$MICRO" | tr ' ' '\n' | sed -n 's/^\(acl\|check\|ns_per_decision\|decisions_per_s\|allowed\)=//p' |
    paste - - - - - | awk '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }'
echo
echo "Fan-in with ACLs, $PUBLISHERS publishers -> 1 subscriber as tenant42, 64 B, $MESSAGES messages," \
    "window 2000, median of $REPEATS rounds; $(machine) at the end."
echo
echo "| QoS | broker | msgs/s | p50 ms | p99 ms | lost |"
echo "|---|---|---:|---:|---:|---:|"
median_table 2 <"$RESULTS" | tee "$WORK/medians" | awk '
    function ms(us) { return us == "-" ? "-" : sprintf("%.1f", us / 1000) }
    { printf "| %s | %s | %.0f | %s | %s | %s |\n", $1, $2, $3, ms($4), ms($5), $6 }'
echo
awk '{ r[$1 " " $2] = $3 } END {
    for (q = 0; q <= 1; q++)
        printf "QoS %d: ACL file / built-in = %.3f, built-in / rumqttd = %.2f\n", q,
            r[q " moatmq-aclfile"] / r[q " moatmq-builtin"], r[q " moatmq-builtin"] / r[q " rumqttd"]
}' "$WORK/medians"
