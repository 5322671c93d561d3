#!/usr/bin/env python3
"""QoS 2 to a persistent subscriber that keeps reconnecting, seen through paho-mqtt
(2.x): a reproducer for investigations, not part of the test suite (a broker in a
reconnect loop is timing-dependent; the cases it found are tests in
crates/broker/tests/durable.rs).

Two publishers send N QoS 2 messages each to a subscriber (clean session 0, QoS 2)
that drops its connection every 10-100 ms, cleanly (DISCONNECT) or abruptly (socket
closed), and reconnects with the same paho client, which keeps its open QoS 2
exchanges as MQTT requires. paho delivers a QoS 2 message at its PUBREL, so anything
missing or delivered twice is the broker's doing. It also reports a PUBLISH that
arrived under a packet id whose exchange the client still held open for another
message ("clobbered": that message is then lost).

    python3 tests/paho/reconnect_loop.py --port 1883 [--messages 1000]
        [--mode mix|clean|abrupt|stay|away] [--protocol 4|5] [--qos 1|2]

`stay` keeps the subscriber connected, `away` keeps it offline until the publishers are
done. The publishers have persistent sessions too and wait out a broker restart, so the
broker can be stopped (SIGTERM, or kill -9 at `autosave_interval = 0`) and started
again while it runs: nothing they were acknowledged may be missing.

Start the broker first, e.g. `moatmq serve -c broker.toml` with a [retained] store and
`limits.max_queued_messages` above 2 x N (the default 1,000 drops the newest, counted).
Mosquitto 2.0.11 (`max_queued_messages 100000`): nothing missing or twice in 8 runs.
moatmq before a790fd7: about 100 of 2,000 missing in most runs (clobbered: a message
resent under the id of an exchange still open); at a790fd7 nothing missing, but some
twice in about half the runs (a PUBREL owed after the reconnect released a message
sent under its id again before the PUBCOMP); since 9d2cddf nothing missing or twice
in 12 runs (docs/compliance.md, the packet id row).

2026-12-07 at fd79adb: MQTT 5 (mix, abrupt) and QoS 1 (mix, abrupt), and a
SIGTERM restart 1.5 s into 10,000 QoS 2 messages: nothing missing or twice. kill -9 at
interval 0: nothing missing with the subscriber `away`; 1 of 6,000 missing with it
connected (`stay`), 9 and 30 in the reconnect loop: what the router held for a
connected subscriber (docs/sessions.md, "Known limits").

Two cluster nodes (one nats-server -js, nodes A and B with [cluster], autosave 1,
publishers on A, `--port A --port2 B`: the subscriber's session moves at every
reconnect), 2 x 4,000 QoS 2 messages: before 036548b and 4980f7c, 1 or 2 messages
missing in about half the runs (abrupt 5 of 16, abrupt with --wait-connack 3 of 6,
clean with --wait-connack 2 of 4; with the publishers on a third node C,
`--pub-port C`, 2 of 6), and under CPU load (a `yes` process beside it) 1 or 2 in 6 of
8 runs, some 2,000-7,000 in two more. Three causes, each now a test with its window
widened (crates/broker/tests/cluster_cut.rs, cluster_claim.rs): the new node's cut
read inside an admission of the transfer stream, or naming its own messages only up
to one another connection still held back, left out a message its router had before
the session's subscriptions; and a claim seen as the old node's connection ended was
lost, so the new node waited 3 s and started the session new. 2026-12-07 after them,
under the same CPU load: abrupt 12 of 12, publishers on C 6 of 6, clean with
--wait-connack 5 of 5 runs with nothing missing or twice.

A node killed -9 and started again (a refused reconnect goes to the other node):
three nodes at autosave 0, publishers on C, node B killed 4 s in and back 3 s later:
2,000-6,600 of 8,000 missing in 3 of 4 runs; the restarted node's handed-over session
got no SUBACK from its router (fixed in 1a7e1e8). After: still 2 of 4 runs with 5,700
and 7,000 missing, 3 of 3 with 6,600-7,500 on 2026-12-08: the node back waited up to
45 s for its consumer's redelivery before handing the session over (fixed in 4951b71),
and what its router forwarded before the connection's first checkpoint was lost with
it (fixed in 0d69b58), and a node back within the claim's wait handed over a store
copy without what its router had held (fixed in 900f974). Since: 9 of 9 runs with
nothing missing, some twice (what the subscriber got on the killed node since it
connected; docs/cluster.md, "Not yet"). Setup: a script starting nats-server -js and
three nodes at autosave 0 (a shared [retained] key, max_queued_messages 100000, rate
limits off), running this with --port A --port2 B --pub-port C, kill -9 of B 4 s in,
B started again 3 s later.
"""

import argparse
import collections
import random
import threading
import time

import paho.mqtt.client as mqtt


class Watched(collections.OrderedDict):
    """paho's open incoming QoS 2 exchanges, noting a message that replaces another."""

    clobbered = []

    def __setitem__(self, mid, msg):
        old = self.get(mid)
        if old is not None and old.payload != msg.payload:
            Watched.clobbered.append((mid, old.payload.decode(), msg.payload.decode()))
        super().__setitem__(mid, msg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--mode", choices=["mix", "clean", "abrupt", "stay", "away"], default="mix")
    ap.add_argument("--protocol", type=int, choices=[4, 5], default=4)
    ap.add_argument("--port2", type=int,
                    help="a second cluster node: the subscriber alternates between the two")
    ap.add_argument("--pub-port", type=int, help="the publishers' node (default --port)")
    ap.add_argument("--settle", type=float, default=3, help="seconds to wait for the last")
    ap.add_argument("--wait-connack", action="store_true",
                    help="leave only once the CONNACK came (otherwise possibly before it)")
    ap.add_argument("--qos", type=int, choices=[1, 2], default=2)
    a = ap.parse_args()

    got = []
    lock = threading.Lock()
    start = time.time()
    # (seconds since start, what): each move of the subscriber, for a missing message's report.
    events = []
    published_at = {}

    def on_message(_c, _u, m):
        with lock:
            got.append((m.payload.decode(), m.dup, m.mid))

    v5 = a.protocol == 5
    if v5:
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reconnect-loop",
                          protocol=mqtt.MQTTv5)
    else:
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reconnect-loop",
                          clean_session=False)
    sub.on_message = on_message
    connacked = threading.Event()
    sub.on_connect = lambda *_: connacked.set()
    sub._in_messages = Watched()
    reset = sub._messages_reconnect_reset_in

    def keep_watching():
        reset()
        if not isinstance(sub._in_messages, Watched):
            w = Watched()
            w.update(sub._in_messages)
            sub._in_messages = w

    sub._messages_reconnect_reset_in = keep_watching
    if v5:
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        sub.connect(a.host, a.port, clean_start=False, properties=props)
    else:
        sub.connect(a.host, a.port)
    sub.loop_start()
    sub.subscribe("reconnect-loop/#", qos=a.qos)
    time.sleep(0.3)

    def session_props():
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        return props

    def reconnect():
        if a.port2:
            # paho reconnects to where it connected last: move it to the other node.
            sub._port = a.port2 if sub._port == a.port else a.port
        events.append((time.time() - start, f"reconnect to :{sub._port}"))
        while True:
            try:
                sub.reconnect()
                return
            except OSError:
                # The broker is restarting; a cluster node is down: the other one.
                if a.port2:
                    sub._port = a.port2 if sub._port == a.port else a.port
                    events.append((time.time() - start, f"refused; to :{sub._port}"))
                time.sleep(0.1)

    def publisher(p):
        # Persistent too: across a broker restart (--restart-at) paho sends its open
        # exchanges again and the broker completes each exactly once.
        if v5:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"reconnect-loop-pub{p}",
                            protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"reconnect-loop-pub{p}",
                            clean_session=False)
        c.max_inflight_messages_set(20)
        c.reconnect_delay_set(0.05, 0.5)
        if v5:
            c.connect(a.host, a.pub_port or a.port, clean_start=False,
                      properties=session_props())
        else:
            c.connect(a.host, a.pub_port or a.port)
        c.loop_start()
        for i in range(a.messages):
            info = c.publish(f"reconnect-loop/{p}", f"{p}:{i}", qos=a.qos)
            # Not connected (the broker restarting): paho keeps it and sends it once back.
            deadline = time.time() + 60
            while not info._published and time.time() < deadline:
                time.sleep(0.001)
            published_at[f"{p}:{i}"] = time.time() - start
        c.loop_stop()
        c.disconnect()

    if a.mode == "away":
        # Offline while everything is published (queued for it), back afterwards.
        sub.disconnect()
        sub.loop_stop()
    threads = [threading.Thread(target=publisher, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    rounds = 0
    while any(t.is_alive() for t in threads):
        time.sleep(random.uniform(0.01, 0.1))
        if a.mode in ("stay", "away"):
            continue
        if a.wait_connack:
            connacked.wait(10)
        events.append((time.time() - start, f"leave :{sub._port}"))
        if a.mode == "clean" or (a.mode == "mix" and random.random() < 0.5):
            sub.disconnect()
        else:
            try:
                sub.socket().close()
            except Exception:
                pass
        sub.loop_stop()
        time.sleep(random.uniform(0.0, 0.05))
        connacked.clear()
        reconnect()
        sub.loop_start()
        rounds += 1
    if a.mode == "away":
        reconnect()
        sub.loop_start()
    time.sleep(a.settle)
    sub.loop_stop()

    seen = collections.Counter(p for p, _, _ in got)
    missing = [f"{p}:{i}" for p in range(2) for i in range(a.messages) if f"{p}:{i}" not in seen]
    # At QoS 1 a message may come again, with DUP, when its PUBACK was not read.
    twice = [k for k, v in seen.items() if v > 1
             and (a.qos == 2 or not all([dup for p, dup, _ in got if p == k][1:]))]
    print(f"reconnects {rounds} delivered {len(got)} missing {len(missing)} twice {len(twice)} "
          f"clobbered {len(Watched.clobbered)}")
    if missing:
        print("  missing", missing[:20])
        # A message the client holds at its PUBREC, never released: a PUBREL not sent.
        held = {m.payload.decode(): mid for mid, m in sub._in_messages.items()}
        for k in missing[:5]:
            t = published_at.get(k)
            if t is not None:
                near = [f"{e - t:+.3f} s {what}" for e, what in events if abs(e - t) < 0.5]
                print(f"  {k} completed at {t:.3f} s; moves near it: {near}")
        print("  held open by the client (id):", {k: held[k] for k in missing if k in held})
    for k in twice[:10]:
        print("  twice", k, [(dup, mid) for p, dup, mid in got if p == k])
    for c in Watched.clobbered[:10]:
        print("  clobbered mid %d: held %s, replaced by %s" % c)
    return 1 if missing or twice or Watched.clobbered else 0


if __name__ == "__main__":
    raise SystemExit(main())
