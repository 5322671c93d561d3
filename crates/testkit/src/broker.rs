//! [`TestBroker`]: the real broker on the test's runtime, its listeners on 127.0.0.1
//! with ports the system chose, in a temp folder of its own, stopped when dropped.

use crate::TestBrokerBuilder;
use moatmq_broker::Broker;
use moatmq_config::Config;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::sync::oneshot;

/// A broker running on the test's runtime until dropped.
pub struct TestBroker {
    addrs: Vec<(String, SocketAddr)>,
    metrics: Option<SocketAddr>,
    reloader: moatmq_broker::Reloader,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Folder for files the test writes (config-relative paths resolve here).
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    /// A broker to configure: `TestBroker::builder().users(..).acl(..).start()`.
    pub fn builder() -> TestBrokerBuilder {
        TestBrokerBuilder::new()
    }

    /// Starts a broker with one anonymous TCP listener called `tcp`.
    pub async fn start() -> TestBroker {
        TestBroker::builder().anonymous().start().await
    }

    /// Writes `toml` as `dir/broker.toml` and starts a broker from it (relative paths
    /// resolve in `dir`).
    pub(crate) async fn with_config_in(dir: tempfile::TempDir, toml: &str) -> TestBroker {
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, toml).expect("write config");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config: {e}"));
        let broker = Broker::start(config).await.expect("broker starts");
        let addrs = broker.local_addrs();
        let metrics = broker.metrics_addr();
        let reloader = broker.reloader();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = broker
                .serve(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        TestBroker {
            addrs,
            metrics,
            reloader,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    /// Address of the listener called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    /// Address of the metrics endpoint (`[metrics]` must be configured).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.expect("[metrics] configured")
    }

    /// The value of the metric line starting with `name` (`[metrics]` must be
    /// configured); 0 when it is absent.
    pub async fn metric(&self, name: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics_addr())
            .await
            .expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().expect("a number"))
    }

    /// Waits (at most [`crate::WAIT`]) until the metric `name` is at least `at_least`;
    /// panics naming `what` if it is not by then.
    pub async fn metric_reaches(&self, name: &str, at_least: f64, what: &str) {
        self.metric_until(name, |v| v >= at_least, what).await
    }

    /// Waits (at most [`crate::WAIT`]) until the metric `name` is `value`; panics
    /// naming `what` if it is not by then.
    pub async fn metric_is(&self, name: &str, value: f64, what: &str) {
        self.metric_until(name, |v| v == value, what).await
    }

    /// Waits (at most [`crate::WAIT`]) until the metric `name` satisfies `done`;
    /// panics naming `what` and the last value if it does not by then.
    pub async fn metric_until(&self, name: &str, done: impl Fn(f64) -> bool, what: &str) {
        let deadline = tokio::time::Instant::now() + crate::WAIT;
        loop {
            let now = self.metric(name).await;
            if done(now) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} ({name} {now})"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Does what SIGHUP does; returns the reload errors.
    pub fn reload(&self) -> Vec<String> {
        self.reloader.reload()
    }

    /// Address of the first listener.
    pub fn first_addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Waits (up to [`crate::WAIT`]) until `audit.log` has the end of the connection of
    /// client `id`: the broker is done with it, e.g. done collecting what the router
    /// still held for a persistent session. Needs the builder's `audit()`.
    pub async fn disconnect_audited(&self, id: &str) {
        let deadline = std::time::Instant::now() + crate::WAIT;
        let quoted = format!("\"{id}\"");
        while std::time::Instant::now() < deadline {
            let audit = std::fs::read_to_string(self.path("audit.log")).unwrap_or_default();
            if audit
                .lines()
                .any(|l| l.contains("\"disconnect\"") && l.contains(&quoted))
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("no disconnect of {id} audited");
    }

    /// Stops the broker as SIGTERM would, then starts it again on the same folder and
    /// config (listener ports are new).
    pub async fn restart(self) -> TestBroker {
        let dir = self.stop().await;
        TestBroker::start_in(dir).await
    }

    /// Starts a broker on the folder a stopped one handed back ([`TestBroker::stop`]),
    /// from the `broker.toml` there.
    pub async fn start_in(dir: tempfile::TempDir) -> TestBroker {
        let toml = std::fs::read_to_string(dir.path().join("broker.toml")).expect("config");
        TestBroker::with_config_in(dir, &toml).await
    }

    async fn stop_and_wait(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops the broker and hands back its folder (to inspect or tamper with its files).
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop_and_wait().await;
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    /// Stops the broker as SIGTERM would and waits for it.
    pub async fn shutdown(mut self) {
        self.stop_and_wait().await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
