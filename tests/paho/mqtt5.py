#!/usr/bin/env python3
"""MQTT 5 behaviours seen through a third client implementation: Eclipse Paho's Python
client (paho-mqtt 2.x, from PyPI), against a broker on 127.0.0.1.

The cases follow what the Paho interoperability suite checks (client_test5.py), written
for moatmq: each is a function named case_*, run in order with fresh client ids and
topics; the script prints one line per case ("ok NAME" or "FAIL NAME: why") and exits 1
if any failed. Run by tests/tests/paho.rs, which starts the broker with
limits.max_keepalive = 60.

    python3 tests/paho/mqtt5.py --port 1883 [CASE ...]
"""

import argparse
import socket
import sys
import threading
import time
import traceback

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST = "127.0.0.1"
PORT = 1883
WAIT = 5.0
QUIET = 0.5
_serial = [0]


def unique(name):
    _serial[0] += 1
    return f"{name}-{_serial[0]}"


def props(kind, **values):
    p = Properties(kind)
    for k, v in values.items():
        setattr(p, k, v)
    return p


class Client:
    """A paho client on its own network thread, recording what arrives."""

    def __init__(self, name, manual_ack=False):
        self.id = unique(name)
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        self.cond = threading.Condition()
        self.messages = []
        self.subacks = {}
        self.connack = None
        self.disconnected = None
        self.c.on_message = self._message
        self.c.on_subscribe = self._subscribe
        self.c.on_connect = self._connect
        self.c.on_disconnect = self._disconnect

    def _message(self, client, userdata, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = reason_codes
            self.cond.notify_all()

    def _connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = (flags, reason_code, properties)
            self.cond.notify_all()

    def _disconnect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.disconnected = reason_code
            self.cond.notify_all()

    def wait(self, what, timeout=WAIT):
        with self.cond:
            return self.cond.wait_for(what, timeout)

    def connect(self, clean_start=True, keepalive=60, properties=None):
        self.connack = None
        self.c.connect(HOST, PORT, keepalive=keepalive, clean_start=clean_start,
                       properties=properties)
        self.c.loop_start()
        assert self.wait(lambda: self.connack is not None), "no CONNACK"
        flags, rc, p = self.connack
        assert not rc.is_failure, f"CONNACK {rc}"
        return flags, p

    def subscribe(self, topic, qos=2, properties=None, **options):
        _, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=qos, **options),
                                  properties=properties)
        assert self.wait(lambda: mid in self.subacks), "no SUBACK"
        return self.subacks[mid]

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0:
            info.wait_for_publish(WAIT)
            assert info.is_published(), f"publish to {topic} not acknowledged"

    def received(self, count, timeout=WAIT):
        self.wait(lambda: len(self.messages) >= count, timeout)
        return list(self.messages)

    def quiet(self, count):
        """Waits QUIET and checks that no more than `count` messages arrived."""
        time.sleep(QUIET)
        got = list(self.messages)
        assert len(got) == count, [(m.topic, m.payload) for m in got]
        return got

    def disconnect(self, properties=None):
        self.c.disconnect(properties=properties)
        self.wait(lambda: self.disconnected is not None, 2)
        self.c.loop_stop()

    def drop(self):
        """Closes the socket without DISCONNECT (as a crashed device)."""
        self.c.socket().shutdown(socket.SHUT_RDWR)
        self.c.loop_stop()


def case_qos_is_min_of_published_and_granted():
    topic = unique("qos")
    sub2, sub1, pub = Client("sub2"), Client("sub1"), Client("pub")
    for c in (sub2, sub1, pub):
        c.connect()
    sub2.subscribe(topic, qos=2)
    sub1.subscribe(topic, qos=1)
    for qos in (0, 1, 2):
        pub.publish(topic, f"qos {qos}", qos=qos)
    got2 = [m.qos for m in sub2.received(3)]
    got1 = [m.qos for m in sub1.received(3)]
    assert got2 == [0, 1, 2], got2
    assert got1 == [0, 1, 1], got1
    for c in (sub2, sub1, pub):
        c.disconnect()


def case_no_local():
    topic = unique("nolocal")
    a, b = Client("a"), Client("b")
    a.connect()
    b.connect()
    a.subscribe(topic, noLocal=True)
    b.subscribe(topic, noLocal=True)
    a.publish(topic, b"from a")
    assert [m.payload for m in b.received(1)] == [b"from a"]
    a.quiet(0)
    b.publish(topic, b"from b")
    assert [m.payload for m in a.received(1)] == [b"from b"]
    b.quiet(1)
    a.disconnect()
    b.disconnect()


def case_retain_as_published():
    topic = unique("rap")
    rap, plain = Client("rap"), Client("plain")
    rap.connect()
    plain.connect()
    rap.subscribe(topic, retainAsPublished=True)
    plain.subscribe(topic)
    rap.publish(topic, b"not retained", retain=False)
    rap.publish(topic, b"retained", retain=True)
    assert [m.retain for m in rap.received(2)] == [False, True]
    assert [m.retain for m in plain.received(2)] == [False, False]
    rap.publish(topic, b"", retain=True)  # clears it
    rap.disconnect()
    plain.disconnect()


def case_retain_handling():
    base = unique("rh")
    pub = Client("pub")
    pub.connect()
    for i, qos in enumerate((0, 1, 2)):
        pub.publish(f"{base}/{i}", f"r{i}", qos=qos, retain=True)
    wild = f"{base}/+"
    c = Client("c")
    c.connect()
    c.subscribe(wild, retainHandling=1)
    assert sorted(m.qos for m in c.received(3)) == [0, 1, 2]
    c.subscribe(wild, retainHandling=1)
    c.quiet(3)
    c.disconnect()
    c = Client("c")
    c.connect()
    c.subscribe(wild, retainHandling=2)
    c.quiet(0)
    c.disconnect()
    c = Client("c")
    c.connect()
    c.subscribe(wild, retainHandling=0)
    c.received(3)
    c.subscribe(wild, retainHandling=0)
    assert len(c.received(6)) == 6
    c.disconnect()
    for i in range(3):
        pub.publish(f"{base}/{i}", b"", qos=1, retain=True)
    pub.disconnect()


def case_subscription_identifiers():
    base = unique("subid")
    topic = f"{base}/a"
    a, b = Client("a"), Client("b")
    flags, p = a.connect()
    assert getattr(p, "SubscriptionIdentifierAvailable", 1) == 1
    b.connect()
    a.subscribe(topic, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=456789))
    b.subscribe(topic, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=2))
    b.subscribe(f"{base}/+",
                properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=3))
    a.publish(topic, b"identified")
    got = a.received(1)
    assert got[0].properties.SubscriptionIdentifier == [456789], got[0].properties
    got = b.received(2)
    time.sleep(QUIET)
    ids = sorted(i for m in b.messages for i in m.properties.SubscriptionIdentifier)
    assert ids == [2, 3], ids
    a.disconnect()
    b.disconnect()


def case_request_response():
    topic = unique("reqresp")
    req, resp = Client("requester"), Client("responder")
    req.connect()
    resp.connect()
    req.subscribe(topic, noLocal=True)
    resp.subscribe(topic, noLocal=True)
    req.publish(topic, b"request", properties=props(
        PacketTypes.PUBLISH, ResponseTopic=topic, CorrelationData=b"334"))
    got = resp.received(1)[0]
    assert got.properties.ResponseTopic == topic
    assert got.properties.CorrelationData == b"334"
    resp.publish(got.properties.ResponseTopic, b"response", properties=props(
        PacketTypes.PUBLISH, CorrelationData=got.properties.CorrelationData))
    answer = req.received(1)[0]
    assert answer.payload == b"response" and answer.properties.CorrelationData == b"334"
    req.quiet(1)
    req.disconnect()
    resp.disconnect()


def case_user_properties_and_payload_format():
    topic = unique("props")
    c = Client("c")
    c.connect()
    c.subscribe(topic)
    p = props(PacketTypes.PUBLISH, UserProperty=[("a", "2"), ("c", "3")],
              PayloadFormatIndicator=1, ContentType="My name")
    for qos in (0, 1, 2):
        c.publish(topic, b"", qos=qos, properties=p)
    got = c.received(3)
    assert sorted(m.qos for m in got) == [0, 1, 2]
    for m in got:
        assert m.properties.UserProperty == [("a", "2"), ("c", "3")], m.properties
        assert m.properties.PayloadFormatIndicator == 1
        assert m.properties.ContentType == "My name"
    c.disconnect()


def case_publication_expiry():
    topic = unique("expiry")
    sub, pub = Client("sub"), Client("pub")
    sub.connect(properties=props(PacketTypes.CONNECT, SessionExpiryInterval=30))
    sub.subscribe(topic)
    sub.disconnect()
    pub.connect()
    for secs in (1, 6):
        for qos in (1, 2):
            pub.publish(topic, f"{qos} expires in {secs}", qos=qos,
                        properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=secs))
    time.sleep(3)
    sub.connect(clean_start=False, properties=props(PacketTypes.CONNECT,
                                                    SessionExpiryInterval=30))
    got = sub.received(2)
    sub.quiet(2)
    for m in got:
        assert b"expires in 6" in m.payload, m.payload
        assert m.properties.MessageExpiryInterval < 6, m.properties
    sub.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    pub.disconnect()


def case_session_expiry():
    c = Client("session")
    topic = unique("sess")
    for expiry, wait, present in ((0, 0, False), (5, 2, True)):
        connect = props(PacketTypes.CONNECT, SessionExpiryInterval=expiry)
        flags, _ = c.connect(clean_start=True, properties=connect)
        assert not flags.session_present
        c.subscribe(topic)
        c.disconnect()
        time.sleep(wait)
        flags, _ = c.connect(clean_start=False, properties=connect)
        assert flags.session_present == present, (expiry, flags)
        c.disconnect()
    # A new expiry in DISCONNECT (3.14.2.2.2), then 0 in DISCONNECT ends the session.
    connect = props(PacketTypes.CONNECT, SessionExpiryInterval=1)
    c.connect(clean_start=True, properties=connect)
    c.subscribe(topic)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=5))
    time.sleep(2)
    flags, _ = c.connect(clean_start=False, properties=connect)
    assert flags.session_present
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    flags, _ = c.connect(clean_start=False, properties=connect)
    assert not flags.session_present
    c.disconnect()


def case_will_message_and_will_delay():
    topic = unique("will")
    watcher = Client("watcher")
    watcher.connect()
    watcher.subscribe(topic)
    dying = Client("dying")
    dying.c.will_set(topic, b"gone", qos=1)
    dying.connect()
    dying.drop()
    assert [m.payload for m in watcher.received(1)] == [b"gone"]
    # Will delay 1 s under a session expiry of 5 s: the will comes after about 1 s.
    delayed = Client("delayed")
    delayed.c.will_set(topic, b"late", qos=1,
                       properties=props(PacketTypes.WILLMESSAGE, WillDelayInterval=1))
    delayed.connect(properties=props(PacketTypes.CONNECT, SessionExpiryInterval=5))
    start = time.monotonic()
    delayed.drop()
    assert [m.payload for m in watcher.received(2)][1] == b"late"
    took = time.monotonic() - start
    assert 0.8 < took < 3.5, f"will after {took:.1f} s"
    watcher.disconnect()


def case_flow_control():
    topic = unique("flow")
    sub = Client("sub", manual_ack=True)
    sub.connect(properties=props(PacketTypes.CONNECT, ReceiveMaximum=2))
    sub.subscribe(topic, qos=1)
    pub = Client("pub")
    pub.connect()
    for i in range(5):
        pub.publish(topic, f"m{i}", qos=1)
    sub.received(2)
    sub.quiet(2)  # no third before an acknowledgement
    acked = 0
    while acked < 5:
        got = sub.received(acked + 1)
        for m in got[acked:]:
            sub.c.ack(m.mid, m.qos)
            acked += 1
    assert [m.payload for m in sub.messages] == [f"m{i}".encode() for i in range(5)]
    sub.disconnect()
    pub.disconnect()


def case_server_keep_alive():
    c = Client("keepalive")
    _, p = c.connect(keepalive=0)
    assert p.ServerKeepAlive == 60, p
    c.disconnect()
    c = Client("keepalive")
    _, p = c.connect(keepalive=30)
    assert not hasattr(p, "ServerKeepAlive") or p.ServerKeepAlive == 30, p
    c.disconnect()


def case_maximum_packet_size():
    topic = unique("maxpacket")
    small = Client("small")
    small.connect(properties=props(PacketTypes.CONNECT, MaximumPacketSize=64))
    small.subscribe(topic)
    small.publish(topic, b"x" * 200)
    small.publish(topic, b"fits")
    got = small.received(1)
    small.quiet(1)
    assert got[0].payload == b"fits"
    small.disconnect()


def case_server_topic_aliases():
    topic = unique("alias")
    c = Client("aliased")
    c.connect(properties=props(PacketTypes.CONNECT, TopicAliasMaximum=5))
    c.subscribe(topic)
    for i in range(3):
        c.publish(topic, f"m{i}")
    got = c.received(3)
    # paho-mqtt hands aliases to the application, which resolves them (3.3.2.3.4).
    aliases, resolved = {}, []
    for m in got:
        alias = getattr(m.properties, "TopicAlias", None)
        if m.topic:
            aliases[alias] = m.topic
        resolved.append(m.topic or aliases.get(alias))
    assert resolved == [topic] * 3, resolved
    assert [m.topic for m in got][1:] == ["", ""], "the alias replaces the topic"
    assert [m.payload for m in got] == [b"m0", b"m1", b"m2"]
    c.disconnect()


def case_assigned_client_id():
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    seen = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, rc, p):
        seen["rc"], seen["props"] = rc, p
        done.set()

    c.on_connect = on_connect
    c.connect(HOST, PORT, clean_start=True)
    c.loop_start()
    assert done.wait(WAIT)
    assert not seen["rc"].is_failure
    assert seen["props"].AssignedClientIdentifier, seen["props"]
    c.disconnect()
    c.loop_stop()


def case_shared_subscription():
    topic = unique("shared")
    a, b, pub = Client("a"), Client("b"), Client("pub")
    for c in (a, b, pub):
        c.connect()
    a.subscribe(f"$share/group/{topic}")
    b.subscribe(f"$share/group/{topic}")
    for i in range(10):
        pub.publish(topic, f"m{i}")
    deadline = time.monotonic() + WAIT
    while len(a.messages) + len(b.messages) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(QUIET)
    payloads = sorted(m.payload for m in a.messages + b.messages)
    assert payloads == sorted(f"m{i}".encode() for i in range(10)), payloads
    for c in (a, b, pub):
        c.disconnect()


def case_dollar_topics_and_unsubscribe():
    base = unique("dollar")
    c = Client("c")
    c.connect()
    c.subscribe(f"{base}/+")
    c.subscribe("+/x")
    c.c.publish("$x/x", b"dollar", qos=0)  # refused or dropped: never delivered to +/x
    c.publish(f"{base}/a", b"a")
    c.received(1)
    c.c.unsubscribe(f"{base}/+")
    time.sleep(QUIET)
    c.publish(f"{base}/b", b"after unsubscribe")
    c.quiet(1)
    c.disconnect()


def main():
    global PORT
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("cases", nargs="*")
    args = parser.parse_args()
    PORT = args.port
    cases = [(n, f) for n, f in globals().items() if n.startswith("case_")]
    if args.cases:
        cases = [(n, f) for n, f in cases if n[5:] in args.cases]
    failed = 0
    for name, case in cases:
        try:
            case()
            print(f"ok {name[5:]}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case
            failed += 1
            print(f"FAIL {name[5:]}: {e!r}", flush=True)
            traceback.print_exc()
    print(f"{len(cases) - failed} of {len(cases)} passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
