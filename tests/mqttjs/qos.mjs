// MQTT.js (a fourth MQTT implementation) against moatmq: every delivery at
// min(published QoS, granted QoS) (MQTT 5 3.8.4, 3.1.1 3.8.4), for MQTT 3.1.1 and 5, over
// the transport of the URL given. Run by tests/tests/mqttjs.rs:
//   node qos.mjs URL TOPIC_PREFIX [CA CERT KEY]
// Prints one line per case and "FAIL ..." for each wrong delivery; exits 1 on any.
import { readFileSync } from "node:fs";
import mqtt from "mqtt";

const [url, prefix, ca, cert, key] = process.argv.slice(2);
const tls = ca
  ? {
      ca: readFileSync(ca),
      servername: "localhost",
      ...(cert ? { cert: readFileSync(cert), key: readFileSync(key) } : {}),
    }
  : {};

let failed = false;
for (const protocolVersion of [4, 5]) {
  const base = `${prefix}/v${protocolVersion}`;
  const options = { protocolVersion, reconnectPeriod: 0, connectTimeout: 5000, ...tls };
  const sub = await mqtt.connectAsync(url, { ...options, clientId: `js-sub-${protocolVersion}` });
  const pub = await mqtt.connectAsync(url, { ...options, clientId: `js-pub-${protocolVersion}` });
  const got = new Map();
  sub.on("message", (topic, _payload, packet) => got.set(topic, packet.qos));
  for (const granted of [0, 1, 2]) {
    const acks = await sub.subscribeAsync(`${base}/g${granted}/#`, { qos: granted });
    if (acks[0].qos !== granted) {
      console.log(`FAIL v${protocolVersion}: granted ${acks[0].qos} for QoS ${granted}`);
      failed = true;
    }
  }
  for (const granted of [0, 1, 2]) {
    for (const published of [0, 1, 2]) {
      await pub.publishAsync(`${base}/g${granted}/p${published}`, "x", { qos: published });
    }
  }
  const deadline = Date.now() + 5000;
  while (got.size < 9 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  for (const granted of [0, 1, 2]) {
    for (const published of [0, 1, 2]) {
      const topic = `${base}/g${granted}/p${published}`;
      const want = Math.min(granted, published);
      const qos = got.get(topic);
      const verdict = qos === want ? "ok" : "FAIL";
      failed ||= qos !== want;
      console.log(`${verdict} v${protocolVersion} published ${published} granted ${granted}: delivered ${qos ?? "nothing"}, want ${want}`);
    }
  }
  await sub.endAsync();
  await pub.endAsync();
}
process.exit(failed ? 1 : 0);
