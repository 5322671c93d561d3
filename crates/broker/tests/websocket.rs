//! MQTT over WebSocket (`/mqtt`, subprotocol `mqtt`), plain and over TLS, with MQTT 3.1.1
//! and 5 clients, talking to each other and to plain TCP clients on the same broker.

mod common;

use common::{suback4, V4_OK};
use moatmq_testkit::{v4, v5, Listener, TestBroker, TestCa};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::{QoS, TlsConfiguration, Transport};
use std::net::SocketAddr;

/// Anonymous listeners `ws` (WebSocket) and `tcp`.
async fn ws_and_tcp() -> TestBroker {
    TestBroker::builder()
        .listener(Listener::ws("ws"))
        .listener(Listener::tcp("tcp"))
        .anonymous()
        .start()
        .await
}

fn ws4(addr: SocketAddr, id: &str, tls: Option<&TestCa>) -> v4::MqttOptions {
    let (scheme, transport) = transport(tls);
    let url = format!("{scheme}://127.0.0.1:{}/mqtt", addr.port());
    let mut o = v4::MqttOptions::new(id, url, addr.port());
    o.set_transport(transport);
    o
}

fn ws5(addr: SocketAddr, id: &str, tls: Option<&TestCa>) -> v5::MqttOptions {
    let (scheme, transport) = transport(tls);
    let url = format!("{scheme}://127.0.0.1:{}/mqtt", addr.port());
    let mut o = v5::MqttOptions::new(id, url, addr.port());
    o.set_transport(transport);
    o
}

fn transport(tls: Option<&TestCa>) -> (&'static str, Transport) {
    match tls {
        None => ("ws", Transport::Ws),
        Some(ca) => (
            "wss",
            Transport::Wss(TlsConfiguration::Simple {
                ca: ca.pem().as_bytes().to_vec(),
                alpn: None,
                client_auth: None,
            }),
        ),
    }
}

#[tokio::test]
async fn websocket_v4_and_v5_with_tcp_clients() {
    let broker = ws_and_tcp().await;
    let ws = broker.addr("ws");
    let tcp = broker.addr("tcp");

    let mut o = ws4(ws, "ws-sub4", None);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let mut ws_sub4 = v4::connect(o).await.expect("ws v4");
    assert_eq!(suback4(&mut ws_sub4, &["w/#"]).await, vec![V4_OK]);
    let mut o = ws5(ws, "ws-sub5", None);
    o.set_max_packet_size(Some(1 << 20));
    let mut ws_sub5 = v5::connect(o).await.expect("ws v5");
    common::subscribed5(&mut ws_sub5, "w/#").await;
    let mut tcp_sub = v4::connected(tcp, "tcp-sub").await;
    assert_eq!(suback4(&mut tcp_sub, &["w/#"]).await, vec![V4_OK]);

    let ws_pub5 = v5::connect(ws5(ws, "ws-pub5", None)).await.unwrap();
    ws_pub5
        .client
        .publish("w/a", Q5::AtLeastOnce, false, "over ws v5")
        .await
        .unwrap();
    assert_eq!(
        ws_sub4.next_publish().await.payload,
        "over ws v5".as_bytes()
    );
    assert_eq!(&ws_sub5.next_publish().await.payload[..], b"over ws v5");
    assert_eq!(
        tcp_sub.next_publish().await.payload,
        "over ws v5".as_bytes()
    );

    // Larger than one WebSocket frame read, so MQTT packets span messages.
    let big = vec![b'x'; 200_000];
    let mut o = v4::options(tcp, "tcp-pub");
    o.set_max_packet_size(1 << 20, 1 << 20);
    let tcp_pub = v4::connect(o).await.unwrap();
    tcp_pub
        .client
        .publish("w/big", QoS::AtLeastOnce, false, big.clone())
        .await
        .unwrap();
    assert_eq!(ws_sub4.next_publish().await.payload, big);
    assert_eq!(ws_sub5.next_publish().await.payload, big);
}

#[tokio::test]
async fn websocket_over_tls_v4_and_v5() {
    let ca = TestCa::new("server ca");
    let wss = Listener::ws("wss").set("allow_anonymous", true).tls();
    let broker = TestBroker::builder()
        .listener(wss)
        .server_cert(&ca)
        .start()
        .await;
    let addr = broker.addr("wss");

    let mut sub = v4::connect(ws4(addr, "wss-sub", Some(&ca)))
        .await
        .expect("wss v4");
    assert_eq!(suback4(&mut sub, &["s/#"]).await, vec![V4_OK]);
    let mut sub5 = v5::connect(ws5(addr, "wss-sub5", Some(&ca)))
        .await
        .expect("wss v5");
    common::subscribed5(&mut sub5, "s/#").await;
    let publ = v5::connect(ws5(addr, "wss-pub", Some(&ca))).await.unwrap();
    publ.client
        .publish("s/1", Q5::ExactlyOnce, false, "secure")
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.payload, "secure".as_bytes());
    assert_eq!(&sub5.next_publish().await.payload[..], b"secure");
}

/// A raw WebSocket upgrade request; returns the HTTP status line.
async fn upgrade(addr: SocketAddr, path: &str, protocol: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let proto = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{proto}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(moatmq_testkit::WAIT, s.read(&mut buf))
        .await
        .expect("an HTTP answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn websocket_upgrade_needs_path_mqtt_and_the_mqtt_subprotocol() {
    let broker = ws_and_tcp().await;
    let ws = broker.addr("ws");
    assert!(upgrade(ws, "/mqtt", Some("mqtt")).await.contains(" 101 "));
    assert!(upgrade(ws, "/other", Some("mqtt")).await.contains(" 404 "));
    assert!(upgrade(ws, "/mqtt", None).await.contains(" 400 "));
    common::assert_serving(broker.addr("tcp")).await;
}
