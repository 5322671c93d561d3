//! Client helpers over rumqttc (MQTT 3.1.1 in [`v4`], MQTT 5 in [`v5`]): connect and
//! wait for the CONNACK, then collect what the broker sends on a channel.

use std::net::SocketAddr;
use std::time::Duration;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure something does not happen.
pub const QUIET: Duration = Duration::from_millis(400);

macro_rules! client_module {
    ($name:ident, $root:path, $incoming:path) => {
        pub mod $name {
            use super::*;
            use tokio::sync::mpsc;
            use $incoming as Incoming;
            use $root as mq;

            pub use mq::{AsyncClient, ConnectionError, EventLoop, MqttOptions};

            /// A connected client and what it received.
            pub struct Client {
                pub client: mq::AsyncClient,
                pub rx: mpsc::UnboundedReceiver<mq::Event>,
                /// The connection error that ended the event loop, once it has ended.
                pub ended: tokio::sync::watch::Receiver<Option<String>>,
                pub connack: mq::mqttbytes::$name::ConnAck,
            }

            /// Options for a client of `addr` with a short keep alive.
            pub fn options(addr: SocketAddr, id: &str) -> mq::MqttOptions {
                let mut o = mq::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_keep_alive(Duration::from_secs(5));
                o
            }

            /// Connects; `Err` carries the event loop's error (e.g. a refusing CONNACK).
            pub async fn connect(opts: mq::MqttOptions) -> Result<Client, mq::ConnectionError> {
                let (client, mut eventloop) = mq::AsyncClient::new(opts, 1000);
                let connack = loop {
                    match tokio::time::timeout(WAIT, eventloop.poll()).await {
                        Err(_) => panic!("no CONNACK within {WAIT:?}"),
                        Ok(Err(e)) => return Err(e),
                        Ok(Ok(mq::Event::Incoming(Incoming::ConnAck(ack)))) => break ack,
                        Ok(Ok(_)) => continue,
                    }
                };
                let (tx, rx) = mpsc::unbounded_channel();
                let (ended_tx, ended) = tokio::sync::watch::channel(None);
                tokio::spawn(async move {
                    loop {
                        match eventloop.poll().await {
                            Ok(event) => {
                                let _ = tx.send(event);
                            }
                            Err(e) => {
                                let _ = ended_tx.send(Some(e.to_string()));
                                break;
                            }
                        }
                    }
                });
                Ok(Client {
                    client,
                    rx,
                    ended,
                    connack,
                })
            }

            /// Connects a plain client to `addr`, panicking on refusal.
            pub async fn connected(addr: SocketAddr, id: &str) -> Client {
                connect(options(addr, id)).await.expect("client connects")
            }

            impl Client {
                /// The next PUBLISH received within `wait`.
                pub async fn publish_within(
                    &mut self,
                    wait: Duration,
                ) -> Option<mq::mqttbytes::$name::Publish> {
                    let deadline = tokio::time::Instant::now() + wait;
                    loop {
                        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                            Ok(Some(mq::Event::Incoming(Incoming::Publish(p)))) => return Some(p),
                            Ok(Some(_)) => continue,
                            Ok(None) | Err(_) => return None,
                        }
                    }
                }

                /// Publishes at QoS 1 and waits for the broker's PUBACK, so what the
                /// broker does on acceptance (route, retain, queue) has happened.
                pub async fn publish_acked(
                    &mut self,
                    topic: impl Into<String>,
                    retain: bool,
                    payload: impl AsRef<[u8]>,
                ) {
                    self.publish_at(mq::mqttbytes::QoS::AtLeastOnce, topic, retain, payload)
                        .await;
                }

                /// Publishes at QoS 1 or 2 and waits for the broker's PUBACK, or for
                /// its PUBCOMP (rumqttc answers the PUBREC itself).
                pub async fn publish_at(
                    &mut self,
                    qos: mq::mqttbytes::QoS,
                    topic: impl Into<String>,
                    retain: bool,
                    payload: impl AsRef<[u8]>,
                ) {
                    let topic = topic.into();
                    self.client
                        .publish(topic.clone(), qos, retain, payload.as_ref().to_vec())
                        .await
                        .expect("publish queued");
                    let two = qos == mq::mqttbytes::QoS::ExactlyOnce;
                    let acked = self
                        .incoming(|p| match p {
                            Incoming::PubAck(..) => (!two).then_some(()),
                            Incoming::PubComp(..) => two.then_some(()),
                            _ => None,
                        })
                        .await;
                    assert!(
                        acked.is_some(),
                        "no acknowledgement for {topic} within {WAIT:?}"
                    );
                }

                /// Subscribes at QoS 1 and waits for the SUBACK, so what is published
                /// from then on is routed to this client (granted or not: check the
                /// codes with a raw client where that matters).
                pub async fn subscribe_acked(&mut self, filter: &str) {
                    self.subscribe_at(filter, mq::mqttbytes::QoS::AtLeastOnce)
                        .await;
                }

                /// [`Self::subscribe_acked`] at `qos`.
                pub async fn subscribe_at(&mut self, filter: &str, qos: mq::mqttbytes::QoS) {
                    self.client
                        .subscribe(filter, qos)
                        .await
                        .expect("subscribe queued");
                    let acked = self
                        .incoming(|p| matches!(p, Incoming::SubAck(..)).then_some(()))
                        .await;
                    assert!(acked.is_some(), "no SUBACK for {filter} within {WAIT:?}");
                }

                /// The next PUBLISH, which must arrive within [`WAIT`].
                pub async fn next_publish(&mut self) -> mq::mqttbytes::$name::Publish {
                    self.publish_within(WAIT)
                        .await
                        .expect("a publish should arrive")
                }

                /// The next incoming packet matching `f` within [`WAIT`].
                pub async fn incoming<T>(
                    &mut self,
                    mut f: impl FnMut(&Incoming) -> Option<T>,
                ) -> Option<T> {
                    let deadline = tokio::time::Instant::now() + WAIT;
                    loop {
                        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                            Ok(Some(mq::Event::Incoming(p))) => {
                                if let Some(t) = f(&p) {
                                    return Some(t);
                                }
                            }
                            Ok(Some(_)) => continue,
                            Ok(None) | Err(_) => return None,
                        }
                    }
                }

                /// Waits until the connection has ended; returns its error text.
                pub async fn closed_within(&mut self, wait: Duration) -> Option<String> {
                    let mut ended = self.ended.clone();
                    let r = tokio::time::timeout(wait, ended.wait_for(|e| e.is_some())).await;
                    match r {
                        Ok(Ok(e)) => e.clone(),
                        _ => None,
                    }
                }
            }
        }
    };
}

client_module!(v4, rumqttc, rumqttc::Packet);
client_module!(v5, rumqttc::v5, rumqttc::v5::mqttbytes::v5::Packet);
