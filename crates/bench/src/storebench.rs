//! `store`: moatmq-store used directly (no broker): fill a store with `--messages`
//! retained messages, time reopening it (read, decrypt and verify the whole log: what
//! `moatmq serve` does before it replays), then measure `--saves` saves of `--changes`
//! replaced topics each (log file size before/after `flush`), and one full compaction
//! (the cost a whole-database save would have every time). Through the saves and the
//! compaction a reader thread walks `<prefix>/#` 64 messages at a time, as a subscribing
//! gateway does (without the socket writes between batches, so it competes for the lock
//! all the time), and reports its slowest step in each phase (`reader_*_max_ms`: a quiet
//! second, the `set`s before the saves, the `flush`es, the compaction): a save's fsync or
//! the compaction must not hold it up.
//!
//! Topics are `<prefix>/<i / 1000>/<i % 1000>`, the same names `retained-pub` uses, so a
//! broker started on this store can be updated in place.

use anyhow::{bail, Context};
use moatmq_store::{RetainedKey, RetainedMessage, Store, StoreLimits};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// Store folder; must be empty or absent. Left in place for a broker to use.
    #[arg(long)]
    dir: PathBuf,
    /// Key file (`moatmq keygen --out FILE`).
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Topics replaced before each measured save.
    #[arg(long, default_value_t = 1000)]
    changes: u64,
    /// Measured saves.
    #[arg(long, default_value_t = 5)]
    saves: u64,
    #[arg(long, default_value = "bench")]
    prefix: String,
}

pub fn topic(prefix: &str, i: u64) -> String {
    format!("{prefix}/{}/{}", i / 1000, i % 1000)
}

fn message(prefix: &str, i: u64, version: u64, len: usize) -> RetainedMessage {
    let mut payload = vec![0u8; len];
    for (k, b) in payload.iter_mut().enumerate() {
        *b = (i as usize)
            .wrapping_mul(31)
            .wrapping_add(k)
            .wrapping_add(version as usize) as u8;
    }
    RetainedMessage {
        topic: topic(prefix, i),
        payload,
        qos: 1,
        properties: None,
        expires_at: None,
        owner: None,
    }
}

pub fn run(args: StoreArgs) -> anyhow::Result<String> {
    if args.dir.exists() && std::fs::read_dir(&args.dir)?.next().is_some() {
        bail!("{} is not empty", args.dir.display());
    }
    let key = || RetainedKey::load(&args.key).context("key file");
    let (mut store, _) = Store::open(&args.dir, key()?, StoreLimits::UNLIMITED)?;
    let started = Instant::now();
    for i in 0..args.messages {
        store.set(message(&args.prefix, i, 0, args.payload))?;
    }
    let set_secs = started.elapsed().as_secs_f64();
    let first = store.flush()?;
    let fill_secs = started.elapsed().as_secs_f64();
    let file_after_fill = store.file_bytes();
    drop(store);

    let started = Instant::now();
    let (mut store, loaded) = Store::open(&args.dir, key()?, StoreLimits::UNLIMITED)?;
    let load_secs = started.elapsed().as_secs_f64();
    if loaded.len() as u64 != args.messages {
        bail!(
            "reopened {} messages, wrote {}",
            loaded.len(),
            args.messages
        );
    }
    drop(loaded);

    // The reader's slowest step in nanoseconds, read and reset at each phase's end.
    let slowest = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (set, stop, slowest, filter) = (
            store.retained_set().clone(),
            stop.clone(),
            slowest.clone(),
            format!("{}/#", args.prefix),
        );
        std::thread::spawn(move || {
            let mut after: Option<String> = None;
            let mut batch = Vec::with_capacity(64);
            while !stop.load(Ordering::Relaxed) {
                batch.clear();
                let t = Instant::now();
                let more = set.matching(&filter, after.as_deref(), 64, &mut batch);
                slowest.fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                after = if more {
                    batch.last().map(|m| m.topic.clone())
                } else {
                    None
                };
            }
        })
    };
    let phase_ms = || slowest.swap(0, Ordering::Relaxed) as f64 / 1e6;
    // A quiet second first: what a step costs with nothing else touching the store.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let reader_quiet_ms = phase_ms();

    // Saves: `changes` distinct topics spread over the whole store each time.
    let mut per_save = Vec::new();
    let (mut reader_sets_ms, mut reader_flush_ms) = (0f64, 0f64);
    let stride = (args.messages / args.changes.max(1)).max(1);
    for s in 0..args.saves {
        for c in 0..args.changes {
            let i = (c * stride + s * 7919) % args.messages;
            store.set(message(&args.prefix, i, s + 1, args.payload))?;
        }
        reader_sets_ms = reader_sets_ms.max(phase_ms());
        let before = std::fs::metadata(store.log_path())?.len();
        let t = Instant::now();
        let stats = store.flush()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let after = std::fs::metadata(store.log_path())?.len();
        per_save.push((after - before, stats.records, ms));
        reader_flush_ms = reader_flush_ms.max(phase_ms());
    }
    let file_before_compact = store.file_bytes();
    let t = Instant::now();
    store.compact()?;
    let compact_secs = t.elapsed().as_secs_f64();
    let file_after_compact = store.file_bytes();
    let reader_compact_ms = phase_ms();
    stop.store(true, Ordering::Relaxed);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;

    let bytes: Vec<String> = per_save.iter().map(|s| s.0.to_string()).collect();
    let ms: Vec<String> = per_save.iter().map(|s| format!("{:.1}", s.2)).collect();
    let records: Vec<String> = per_save.iter().map(|s| s.1.to_string()).collect();
    Ok(format!(
        "store messages={} payload={} set_secs={:.2} fill_flush_records={} fill_secs={:.2} \
         file_bytes={} open_secs={:.2} changes={} save_records={} save_bytes={} \
         save_bytes_per_change={:.0} save_ms={} file_before_compact={} compact_secs={:.2} \
         file_after_compact={} reader_quiet_max_ms={:.2} reader_sets_max_ms={:.2} \
         reader_flush_max_ms={:.2} reader_compact_max_ms={:.2}",
        args.messages,
        args.payload,
        set_secs,
        first.records,
        fill_secs,
        file_after_fill,
        load_secs,
        args.changes,
        records.join(","),
        bytes.join(","),
        per_save.iter().map(|s| s.0).sum::<u64>() as f64
            / (per_save.len() as u64 * args.changes.max(1)).max(1) as f64,
        ms.join(","),
        file_before_compact,
        compact_secs,
        file_after_compact,
        reader_quiet_ms,
        reader_sets_ms,
        reader_flush_ms,
        reader_compact_ms,
    ))
}
