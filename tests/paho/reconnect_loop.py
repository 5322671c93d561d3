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

    python3 tests/paho/reconnect_loop.py --port 1883 [--messages 1000] [--mode mix|clean|abrupt]

Start the broker first, e.g. `moatmq serve -c broker.toml` with a [retained] store and
`limits.max_queued_messages` above 2 x N (the default 1,000 drops the newest, counted).
Mosquitto 2.0.11 (`max_queued_messages 100000`): nothing missing or twice in 8 runs.
moatmq before a790fd7: about 100 of 2,000 missing in most runs (clobbered: a message
resent under the id of an exchange still open); at a790fd7 nothing missing, but some
twice in about half the runs (a PUBREL owed after the reconnect released a message
sent under its id again before the PUBCOMP); since 9d2cddf nothing missing or twice
in 12 runs (docs/compliance.md, the packet id row).
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
    ap.add_argument("--mode", choices=["mix", "clean", "abrupt"], default="mix")
    a = ap.parse_args()

    got = []
    lock = threading.Lock()

    def on_message(_c, _u, m):
        with lock:
            got.append((m.payload.decode(), m.dup, m.mid))

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reconnect-loop", clean_session=False)
    sub.on_message = on_message
    sub._in_messages = Watched()
    reset = sub._messages_reconnect_reset_in

    def keep_watching():
        reset()
        if not isinstance(sub._in_messages, Watched):
            w = Watched()
            w.update(sub._in_messages)
            sub._in_messages = w

    sub._messages_reconnect_reset_in = keep_watching
    sub.connect(a.host, a.port)
    sub.loop_start()
    sub.subscribe("reconnect-loop/#", qos=2)
    time.sleep(0.3)

    def publisher(p):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"reconnect-loop-pub{p}")
        c.max_inflight_messages_set(20)
        c.connect(a.host, a.port)
        c.loop_start()
        for i in range(a.messages):
            c.publish(f"reconnect-loop/{p}", f"{p}:{i}", qos=2).wait_for_publish(10)
        c.loop_stop()
        c.disconnect()

    threads = [threading.Thread(target=publisher, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    rounds = 0
    while any(t.is_alive() for t in threads):
        time.sleep(random.uniform(0.01, 0.1))
        if a.mode == "clean" or (a.mode == "mix" and random.random() < 0.5):
            sub.disconnect()
        else:
            try:
                sub.socket().close()
            except Exception:
                pass
        sub.loop_stop()
        time.sleep(random.uniform(0.0, 0.05))
        sub.reconnect()
        sub.loop_start()
        rounds += 1
    time.sleep(3)
    sub.loop_stop()

    seen = collections.Counter(p for p, _, _ in got)
    missing = [f"{p}:{i}" for p in range(2) for i in range(a.messages) if f"{p}:{i}" not in seen]
    twice = [k for k, v in seen.items() if v > 1]
    print(f"reconnects {rounds} delivered {len(got)} missing {len(missing)} twice {len(twice)} "
          f"clobbered {len(Watched.clobbered)}")
    for k in twice[:10]:
        print("  twice", k, [(dup, mid) for p, dup, mid in got if p == k])
    for c in Watched.clobbered[:10]:
        print("  clobbered mid %d: held %s, replaced by %s" % c)
    return 1 if missing or twice or Watched.clobbered else 0


if __name__ == "__main__":
    raise SystemExit(main())
