//! Router supervision (issue 11): when the router thread dies or stops answering,
//! `/healthz` and `/readyz` turn 503 and `Broker::serve` returns the failure within 5 s.
//! The faults are real: a panic reached through raw router links, and a router thread
//! blocked on a lock (feature `test-hooks`, enabled by the testkit).

use moatmq_broker::{Broker, RouterFailure, RouterFault};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An anonymous broker with metrics, started by the test itself: its folder and config.
fn config() -> (tempfile::TempDir, moatmq_config::Config) {
    let (dir, path) = moatmq_testkit::TestBroker::builder()
        .anonymous()
        .metrics()
        .write();
    (dir, moatmq_config::Config::load(&path).unwrap())
}

async fn status(addr: SocketAddr, path: &str) -> u16 {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
    else {
        return 0;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut body = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut body)).await;
    body.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

async fn supervised(fault: RouterFault) -> RouterFailure {
    let (_dir, config) = config();
    let broker = Broker::start(config).await.unwrap();
    let m = broker.metrics_addr().unwrap();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    broker.inject_router_fault(fault);
    let faulted = Instant::now();
    let mut serve = tokio::spawn(broker.serve(async move {
        let _ = stopped.await;
    }));
    // Both endpoints fail, and serve returns, within 5 s of the fault.
    let result = tokio::time::timeout(Duration::from_secs(5), &mut serve).await;
    let failure = match result {
        Ok(Ok(Err(failure))) => failure,
        other => panic!("serve did not fail within 5 s: {other:?}"),
    };
    assert!(faulted.elapsed() < Duration::from_secs(5));
    assert_eq!(status(m, "/healthz").await, 503, "healthz");
    assert_eq!(status(m, "/readyz").await, 503, "readyz");
    failure
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_panic_fails_health_and_ends_serve() {
    assert_eq!(supervised(RouterFault::Kill).await, RouterFailure::Died);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_router_fails_health_and_ends_serve() {
    let failure = supervised(RouterFault::Wedge).await;
    assert!(matches!(failure, RouterFailure::Wedged(_)), "{failure:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_router_stays_healthy() {
    let (_dir, config) = config();
    let broker = Broker::start(config).await.unwrap();
    let m = broker.metrics_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(broker.serve(async move {
        let _ = stopped.await;
    }));
    // Longer than the wedge threshold: the pings keep being answered.
    tokio::time::sleep(moatmq_broker::WEDGED_AFTER + Duration::from_secs(1)).await;
    assert_eq!(status(m, "/healthz").await, 200);
    assert_eq!(status(m, "/readyz").await, 200);
    let _ = stop.send(());
    assert!(serve.await.unwrap().is_ok());
}
