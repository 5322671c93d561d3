//! [`Nats`]: `nats-server -js` processes for the cluster suites (Debian package
//! nats-server, installed by .ci/run), on 127.0.0.1 ports the system chose: one server,
//! or several joined in a NATS cluster by routes on loopback. Killed and reaped on drop.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const START: Duration = Duration::from_secs(10);

/// Running nats-servers.
pub struct Nats {
    ports: Vec<u16>,
    children: Vec<Child>,
}

/// `n` distinct ports the system had free a moment ago: each is held until all are
/// picked, so one is never given twice (a server's client port equal to another's
/// route port made a client reach a route: "attempted to connect to route port").
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("a bound port").port())
        .collect()
}

impl Nats {
    /// One server with JetStream, its store under `dir`.
    pub fn single(dir: &Path) -> Nats {
        Nats::cluster(dir, 1)
    }

    /// `n` servers with JetStream, each with a store under `dir`; with `n > 1` they form
    /// the NATS cluster `moatmq-test`, every server with a route to every other.
    pub fn cluster(dir: &Path, n: usize) -> Nats {
        let mut ports = free_ports(2 * n);
        let routes = ports.split_off(n);
        let mut children = Vec::new();
        for i in 0..n {
            let store = dir.join(format!("nats-{i}"));
            let mut config = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{}\"\n\
                 jetstream {{ store_dir: \"{}\" }}\n",
                ports[i],
                store.display()
            );
            if n > 1 {
                let others: Vec<String> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| format!("\"nats-route://127.0.0.1:{}\"", routes[j]))
                    .collect();
                config.push_str(&format!(
                    "cluster {{\n  name: moatmq-test\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                    routes[i],
                    others.join(", ")
                ));
            }
            let path = dir.join(format!("nats-{i}.conf"));
            std::fs::write(&path, config).expect("write nats config");
            let child = Command::new("nats-server")
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server starts (install the package nats-server)");
            children.push(child);
        }
        for &port in &ports {
            let deadline = Instant::now() + START;
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "nats-server did not listen");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Nats { ports, children }
    }

    /// The URL of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    /// Every server's URL.
    pub fn urls(&self) -> Vec<String> {
        (0..self.ports.len()).map(|i| self.url(i)).collect()
    }

    /// Kills server `i` (named `n{i}` in its cluster), as a crash would.
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
