#!/usr/bin/env python3
"""Soak driver for scripts/soak.sh: mixed MQTT 3.1.1 traffic over TLS with password logins.

drive:  for --duration seconds run, at once,
        - a latency pair (alice publishes QoS 1 to alice/lat, alice's subscriber times it),
        - retained updates (alice, QoS 1, 100 topics, next update only after the PUBACK),
        - ACL-denied publishes (bob writes to alice/lat; alice must never see them),
        - wrong-password logins (must be refused with CONNACK 4/5),
        - connection churn (connect, subscribe, disconnect);
        prints a line every 10 s and writes a JSON report with the acknowledged retained state.
verify: after a restart, subscribe to alice/ret/# and check that every acknowledged
        retained message comes back with its last acknowledged payload.
Standard library only; a deliberately small client (no QoS 2, no MQTT 5).
"""
import argparse, json, socket, ssl, struct, sys, threading, time

def varint(n):
    out = bytearray()
    while True:
        b = n % 128; n //= 128
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)

def s(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">H", len(b)) + b

def frame(first, body): return bytes([first]) + varint(len(body)) + body

class Client:
    def __init__(self, a, cid, user, pw):
        raw = socket.create_connection((a.host, a.port), timeout=10)
        ctx = ssl.create_default_context(cafile=a.ca)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.sock.settimeout(10)
        self.buf = b""; self.lock = threading.Lock()
        flags = 0x02 | 0xC0
        body = s("MQTT") + bytes([4, flags]) + struct.pack(">H", 30) + s(cid) + s(user) + s(pw)
        self.send(frame(0x10, body))
        first, body = self.read()
        self.rc = body[1] if first == 0x20 else -1

    def send(self, data):
        with self.lock: self.sock.sendall(data)

    def read(self):
        while True:
            if len(self.buf) >= 2:
                n, mul, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]; n += (b & 0x7F) * mul; mul *= 128; i += 1
                    if not b & 0x80: break
                else:
                    i = None
                if i is not None and len(self.buf) >= i + n and not self.buf[i - 1] & 0x80:
                    first, body = self.buf[0], self.buf[i:i + n]
                    self.buf = self.buf[i + n:]
                    return first, body
            chunk = self.sock.recv(65536)
            if not chunk: raise ConnectionError("closed by broker")
            self.buf += chunk

    def publish(self, topic, payload, qos=1, retain=False, pkid=1):
        body = s(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
        self.send(frame(0x30 | (qos << 1) | int(retain), body))

    def subscribe(self, filt, qos=1, pkid=1):
        self.send(frame(0x82, struct.pack(">H", pkid) + s(filt) + bytes([qos])))

    def close(self):
        try:
            self.send(b"\xe0\x00"); self.sock.close()
        except OSError: pass

class Stats:
    def __init__(self):
        self.lock = threading.Lock(); self.lat = []; self.window = []
        self.count = {k: 0 for k in ["published", "received", "retained_acked", "denied_sent",
                                     "denied_leaked", "bad_logins_refused", "churn", "errors"]}
        self.errors = []; self.retained = {}
    def inc(self, k, n=1):
        with self.lock: self.count[k] += n
    def err(self, where, e):
        with self.lock:
            self.count["errors"] += 1
            if len(self.errors) < 50: self.errors.append(f"{time.strftime('%H:%M:%S')} {where}: {e}")

def pct(v, p):
    if not v: return None
    v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))]

def forever(a, st, stop, where, fn):
    while not stop.is_set():
        try: fn()
        except Exception as e:  # noqa: BLE001 - every error is counted and reported
            st.err(where, repr(e)); time.sleep(0.5)

def drive(a):
    st, stop = Stats(), threading.Event()
    def latency():
        sub = Client(a, "soak-lat-sub", "alice", "alicepw"); sub.subscribe("alice/lat/#")
        sub.read()  # SUBACK
        pub = Client(a, "soak-lat-pub", "alice", "alicepw")
        def reader():
            try:
                while not stop.is_set():
                    first, body = sub.read()
                    if first >> 4 != 3: continue
                    tl = struct.unpack(">H", body[:2])[0]; i = 2 + tl
                    if (first >> 1) & 3: sub.send(frame(0x40, body[i:i + 2])); i += 2
                    payload = body[i:]
                    if payload.startswith(b"DENIED"): st.inc("denied_leaked"); continue
                    sent = float(payload.decode())
                    with st.lock:
                        d = time.time() - sent; st.lat.append(d); st.window.append(d)
                    st.inc("received")
            except Exception as e:  # noqa: BLE001
                if not stop.is_set(): st.err("latency-sub", repr(e))
        t = threading.Thread(target=reader, daemon=True); t.start()
        pkid = 0
        while not stop.is_set():
            pkid = pkid % 65535 + 1
            pub.publish("alice/lat/x", repr(time.time()).encode(), qos=1, pkid=pkid)
            first, _ = pub.read()
            if first != 0x40: raise RuntimeError(f"expected PUBACK, got {first:#x}")
            st.inc("published")
            if a.rate: time.sleep(1 / a.rate)
        pub.close(); sub.close(); t.join(2)
    def retained():
        c = Client(a, "soak-retained", "alice", "alicepw"); seq = 0
        while not stop.is_set():
            seq += 1; topic = f"alice/ret/{seq % 100}"; payload = f"v{seq}".encode()
            c.publish(topic, payload, qos=1, retain=True, pkid=seq % 65535 + 1)
            first, _ = c.read()
            if first != 0x40: raise RuntimeError(f"expected PUBACK, got {first:#x}")
            with st.lock: st.retained[topic] = payload.decode()
            st.inc("retained_acked"); time.sleep(0.01)
        c.close()
    def denied():
        c = Client(a, "soak-bob", "bob", "bobpw"); n = 0
        while not stop.is_set():
            n += 1; c.publish("alice/lat/x", b"DENIED", qos=1, pkid=n % 65535 + 1)
            c.read(); st.inc("denied_sent"); time.sleep(0.05)
        c.close()
    def bad_login():
        while not stop.is_set():
            c = Client(a, "soak-bad", "alice", "wrong")
            if c.rc in (4, 5): st.inc("bad_logins_refused")
            else: st.err("bad-login", f"CONNACK {c.rc}")
            c.close(); time.sleep(1)
    def churn():
        while not stop.is_set():
            c = Client(a, "soak-churn", "bob", "bobpw")
            if c.rc != 0: raise RuntimeError(f"churn CONNACK {c.rc}")
            c.subscribe("bob/#"); c.read(); c.close(); st.inc("churn"); time.sleep(0.2)
    jobs = [("latency", latency), ("retained", retained), ("denied", denied),
            ("bad-login", bad_login), ("churn", churn)]
    threads = [threading.Thread(target=forever, args=(a, st, stop, n, f), daemon=True) for n, f in jobs]
    start = time.time()
    for t in threads: t.start()
    last, last_pub = start, 0
    while time.time() - start < a.duration:
        time.sleep(min(10, max(0.1, a.duration - (time.time() - start))))
        now = time.time()
        with st.lock:
            w, st.window = st.window, []; pub = st.count["published"]
            rate = (pub - last_pub) / (now - last); last, last_pub = now, pub
            p99 = pct(w, 0.99)
        print(f"t={now - start:6.0f}s  {rate:7.0f} msg/s  p99 {p99 * 1000 if p99 else 0:7.1f} ms  "
              f"retained acked {st.count['retained_acked']}  errors {st.count['errors']}", flush=True)
    stop.set()
    for t in threads: t.join(15)
    el = time.time() - start
    with st.lock:
        report = {"duration_s": round(el, 1), "counts": st.count,
                  "throughput_msg_s": round(st.count["published"] / el, 1),
                  "latency_ms": {k: round(v * 1000, 2) if v is not None else None for k, v in
                                 {"p50": pct(st.lat, .5), "p99": pct(st.lat, .99), "max": pct(st.lat, 1)}.items()},
                  "errors": st.errors, "retained": st.retained}
    json.dump(report, open(a.out, "w"), indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "retained"}, indent=1))
    return 0 if st.count["denied_leaked"] == 0 else 1

def verify(a):
    report = json.load(open(a.out)); want = report["retained"]
    c = Client(a, "soak-verify", "alice", "alicepw")
    if c.rc != 0: print(f"verify: CONNACK {c.rc}"); return 1
    c.subscribe("alice/ret/#"); got = {}
    c.sock.settimeout(3)
    try:
        while True:
            first, body = c.read()
            if first >> 4 != 3: continue
            tl = struct.unpack(">H", body[:2])[0]; topic = body[2:2 + tl].decode(); i = 2 + tl
            if (first >> 1) & 3: c.send(frame(0x40, body[i:i + 2])); i += 2
            got[topic] = body[i:].decode()
    except (socket.timeout, TimeoutError): pass
    missing = {t: v for t, v in want.items() if got.get(t) != v}
    print(f"verify: {len(want)} acknowledged retained topics, {len(got)} replayed after restart, "
          f"{len(missing)} missing or stale")
    for t, v in list(missing.items())[:10]: print(f"  {t}: want {v}, got {got.get(t)}")
    return 0 if not missing else 1

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["drive", "verify"])
    p.add_argument("--host", default="127.0.0.1"); p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True); p.add_argument("--duration", type=float, default=120)
    p.add_argument("--rate", type=float, default=0, help="latency publishes per second (0 = as fast as acks allow)")
    p.add_argument("--out", default="soak-report.json")
    a = p.parse_args()
    sys.exit(drive(a) if a.mode == "drive" else verify(a))
