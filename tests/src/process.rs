//! [`Moatmq`]: a `moatmq` child process with its output collected line by line, the
//! addresses its listeners bound read from its "listening" log lines (configs bind
//! port 0), killed and reaped on drop so a failing test leaves no broker behind.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a broker may take to bind its listeners, or to exit when it should.
const START: Duration = Duration::from_secs(5);

/// A running `moatmq`.
pub struct Moatmq {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<String>>,
    /// Each listener's name and bound address, from the "listening" log lines.
    addrs: Vec<(String, SocketAddr)>,
    /// The threads collecting stdout and stderr; they end when the process closes them.
    readers: Vec<JoinHandle<()>>,
}

impl Moatmq {
    /// `moatmq ARGS` with `env` set, and no `RUST_LOG` or retained key inherited from the
    /// test's environment.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Moatmq {
        let mut cmd = Command::new(crate::moatmq());
        cmd.args(args)
            .env_remove("RUST_LOG")
            .env_remove("MOATMQ_RETAINED_KEY")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn moatmq");
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
        let readers = [stdout, stderr]
            .into_iter()
            .map(|out| {
                let (tx, all) = (tx.clone(), log.clone());
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(Result::ok) {
                        all.lock().unwrap().push_str(&format!("{line}\n"));
                        let _ = tx.send(line);
                    }
                })
            })
            .collect();
        Moatmq {
            child,
            lines,
            log,
            addrs: Vec::new(),
            readers,
        }
    }

    /// `moatmq serve -c CONFIG`, once each listener of `config` has logged the address
    /// it bound; panics with the log if it exits or takes longer than 5 s.
    pub fn serve(config: &Path, env: &[(&str, &str)]) -> Moatmq {
        let listeners = std::fs::read_to_string(config)
            .expect("config")
            .matches("[[listener]]")
            .count();
        let path = config.to_str().expect("utf-8 config path");
        let mut m = Moatmq::spawn(&["serve", "-c", path], env);
        let deadline = Instant::now() + START;
        while m.addrs.len() < listeners {
            match m.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => m.addrs.extend(listening(&line)),
                Err(_) => {
                    if let Some(status) = m.child.try_wait().expect("try_wait") {
                        panic!("moatmq serve exited with {status}:\n{}", m.final_log());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "moatmq serve not listening within {START:?}:\n{}",
                        m.log()
                    );
                }
            }
        }
        m
    }

    /// The port the listener called `name` is bound to.
    pub fn port(&self, name: &str) -> u16 {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no listener {name} in {:?}", self.addrs))
            .1
            .port()
    }

    /// Waits (at most 5 s) for an output line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + START;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no log line with {needle:?}; log so far:\n{}", self.log()),
            }
        }
    }

    /// The output so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The whole output of a process that has exited.
    pub fn final_log(&mut self) -> String {
        for reader in self.readers.drain(..) {
            reader.join().expect("output reader");
        }
        self.log()
    }

    /// Sends a signal with kill(1), e.g. `-TERM`, `-HUP`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits for the process to exit; panics with its log if it runs past `wait`.
    pub fn exit_within(&mut self, wait: Duration) -> ExitStatus {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "moatmq kept running past {wait:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no flush, no goodbye, as in a crash or an OOM kill.
    pub fn kill(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for Moatmq {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The listener name and bound address of a "listening" log line.
fn listening(line: &str) -> Option<(String, SocketAddr)> {
    if !line.contains("listening") {
        return None;
    }
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(|v| v.trim_matches('"').to_string())
    };
    Some((field("listener=")?, field("addr=")?.parse().ok()?))
}
