//! moatmq's fuzz runner, without libFuzzer (cargo-fuzz needs a nightly compiler).
//!
//! For each target: every corpus file is run once (seeds and known-bad regressions), then
//! until the time bound inputs are either generated (structure-aware, 10%) or mutated from
//! the pool (stacked byte mutations and splices, 90%). Inputs a target accepts join the
//! pool, a cheap stand-in for coverage feedback. Every input runs in-process under
//! `catch_unwind`; the first panic writes the input to `fuzz/artifacts/<target>/` and
//! exits 1. A watchdog does the same for an input that runs longer than `--hang` seconds.
//! Runs are deterministic for a given `--seed` and `--runs`.
//!
//! ```text
//! moatmq-fuzz run <target|all> [--seconds N] [--runs N] [--seed N] [--hang N]
//! moatmq-fuzz replay <target|all> [FILE...]
//! moatmq-fuzz seeds
//! moatmq-fuzz list
//! ```

#![forbid(unsafe_code)]

mod mqtt;
mod mutate;
mod seeds;
mod store;
mod targets;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use targets::{Target, TARGETS};

/// Most inputs kept in the pool (seeds are never evicted).
const POOL_CAP: usize = 1024;

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Committed inputs of a target: its corpus folder plus known-bad files the crates keep.
fn corpus_dirs(target: &str) -> Vec<PathBuf> {
    let root = fuzz_dir();
    let repo = root.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut dirs = vec![root.join("corpus").join(target)];
    let extra: &[&str] = match target {
        "acl_parse" => &["crates/acl/testdata/invalid"],
        "passwd_parse" => &["crates/auth/testdata", "crates/auth/testdata/bad"],
        "config_parse" => &["crates/config/testdata/mosquitto"],
        "store_records" => &["crates/store/testdata"],
        _ => &[],
    };
    dirs.extend(extra.iter().map(|d| repo.join(d)));
    dirs
}

fn load_corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in corpus_dirs(target) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

struct Opts {
    seconds: f64,
    runs: Option<u64>,
    seed: u64,
    hang: u64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(info.to_string());
        }
    }));
    let usage = "usage: moatmq-fuzz run <target|all> [--seconds N] [--runs N] [--seed N] [--hang N]\n       moatmq-fuzz replay <target|all> [FILE...]\n       moatmq-fuzz seeds | list";
    let Some(cmd) = args.first() else {
        eprintln!("{usage}");
        return ExitCode::from(64);
    };
    match cmd.as_str() {
        "list" => {
            for t in TARGETS {
                println!("{}", t.name);
            }
            ExitCode::SUCCESS
        }
        "seeds" => match seeds::write_all(&fuzz_dir().join("corpus")) {
            Ok(n) => {
                println!("wrote {n} seed files");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("seeds: {e}");
                ExitCode::FAILURE
            }
        },
        "run" | "replay" => {
            let Some(which) = args.get(1) else {
                eprintln!("{usage}");
                return ExitCode::from(64);
            };
            let selected: Vec<&Target> = TARGETS
                .iter()
                .filter(|t| which == "all" || t.name == which)
                .collect();
            if selected.is_empty() {
                eprintln!("unknown target {which}; `moatmq-fuzz list` names them");
                return ExitCode::from(64);
            }
            if cmd == "replay" {
                let files: Vec<PathBuf> = args[2..].iter().map(PathBuf::from).collect();
                return replay(&selected, &files);
            }
            let opts = match parse_opts(&args[2..]) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("{e}\n{usage}");
                    return ExitCode::from(64);
                }
            };
            for t in selected {
                if !fuzz(t, &opts) {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{usage}");
            ExitCode::from(64)
        }
    }
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        seconds: 10.0,
        runs: None,
        seed: rand::random(),
        hang: 10,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {value}");
        match flag.as_str() {
            "--seconds" => o.seconds = value.parse().map_err(|_| bad())?,
            "--runs" => o.runs = Some(value.parse().map_err(|_| bad())?),
            "--seed" => o.seed = value.parse().map_err(|_| bad())?,
            "--hang" => o.hang = value.parse().map_err(|_| bad())?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// Runs one input; `Err(panic message)` if it panicked.
fn run_one(t: &Target, input: &[u8]) -> Result<bool, String> {
    catch_unwind(AssertUnwindSafe(|| (t.run)(input))).map_err(|_| take_panic())
}

fn take_panic() -> String {
    LAST_PANIC
        .lock()
        .ok()
        .and_then(|mut p| p.take())
        .unwrap_or_else(|| "panic".into())
}

fn replay(selected: &[&Target], files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for t in selected {
        let inputs: Vec<(PathBuf, Vec<u8>)> = if files.is_empty() {
            load_corpus(t.name)
        } else {
            files
                .iter()
                .filter_map(|p| std::fs::read(p).ok().map(|b| (p.clone(), b)))
                .collect()
        };
        let mut accepted = 0;
        for (path, input) in &inputs {
            match run_one(t, input) {
                Ok(a) => accepted += a as usize,
                Err(msg) => {
                    eprintln!("{}: {} panics: {msg}", t.name, path.display());
                    failed = true;
                }
            }
        }
        println!(
            "{}: replayed {} inputs, {accepted} accepted",
            t.name,
            inputs.len()
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Fuzzes one target until its time or run bound; `false` on a finding.
fn fuzz(t: &Target, o: &Opts) -> bool {
    let corpus = load_corpus(t.name);
    let mut rng = StdRng::seed_from_u64(o.seed);
    println!(
        "{}: seed {} ({} corpus files), {} s",
        t.name,
        o.seed,
        corpus.len(),
        o.seconds
    );
    // 1. Every committed input once.
    for (path, input) in &corpus {
        if let Err(msg) = run_one(t, input) {
            eprintln!("{}: corpus file {} panics: {msg}", t.name, path.display());
            return false;
        }
    }
    let mut pool: Vec<Vec<u8>> = corpus.into_iter().map(|(_, b)| b).collect();
    let seeds = pool.len();

    // 2. The watchdog: an input running past --hang seconds is written out, then exit.
    let current: Arc<Mutex<Vec<u8>>> = Arc::default();
    let started_ms = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    {
        let (current, started_ms, name, hang) =
            (current.clone(), started_ms.clone(), t.name, o.hang);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let s = started_ms.load(Ordering::Relaxed);
            let now = epoch.elapsed().as_millis() as u64;
            if s != 0 && now.saturating_sub(s) > hang * 1000 {
                let input = current.lock().map(|c| c.clone()).unwrap_or_default();
                let path = write_artifact(name, "hang", &input);
                eprintln!(
                    "{name}: input runs over {hang} s; written to {}",
                    path.display()
                );
                std::process::exit(1);
            }
        });
    }

    // 3. Generate or mutate until the bound.
    let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
    let (mut execs, mut accepted) = (0u64, 0u64);
    loop {
        if o.runs.map_or(Instant::now() >= deadline, |r| execs >= r) {
            break;
        }
        execs += 1;
        let input = if pool.is_empty() || rng.gen_bool(0.1) {
            match catch_unwind(AssertUnwindSafe(|| (t.generate)(&mut rng))) {
                Ok(i) => i,
                Err(_) => {
                    let msg = take_panic();
                    eprintln!(
                        "{}: generator check failed (seed {}, exec {execs}): {msg}",
                        t.name, o.seed
                    );
                    return false;
                }
            }
        } else {
            let a = &pool[rng.gen_range(0..pool.len())];
            let b = &pool[rng.gen_range(0..pool.len())];
            mutate::mutate(&mut rng, a, b, t.dict)
        };
        if let Ok(mut c) = current.lock() {
            c.clone_from(&input);
        }
        started_ms.store(epoch.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
        let result = run_one(t, &input);
        started_ms.store(0, Ordering::Relaxed);
        match result {
            Ok(true) => {
                accepted += 1;
                if pool.len() < POOL_CAP {
                    pool.push(input);
                } else if pool.len() > seeds {
                    let i = rng.gen_range(seeds..pool.len());
                    pool[i] = input;
                }
            }
            Ok(false) => {}
            Err(msg) => {
                let path = write_artifact(t.name, "crash", &input);
                eprintln!(
                    "{}: panic after {execs} inputs (seed {}): {msg}\ninput written to {}",
                    t.name,
                    o.seed,
                    path.display()
                );
                return false;
            }
        }
    }
    let secs = epoch.elapsed().as_secs_f64().max(1e-9);
    println!(
        "{}: {execs} inputs in {secs:.1} s ({:.0}/s), {accepted} accepted, pool {}, peak RSS {} kB, no panic",
        t.name,
        execs as f64 / secs,
        pool.len(),
        peak_rss_kb()
    );
    true
}

fn write_artifact(target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = fuzz_dir().join("artifacts").join(target);
    let _ = std::fs::create_dir_all(&dir);
    // FNV-1a names the input by content.
    let hash = input.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let path = dir.join(format!("{kind}-{hash:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// Peak resident set size of this process (VmHWM), in kB.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
