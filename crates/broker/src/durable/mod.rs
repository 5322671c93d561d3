//! Durable persistent sessions: moatmq's own copy of every persistent session (its
//! subscriptions and the messages queued for it while offline) in the encrypted session
//! store, so that a restart or a crash loses nothing the broker acknowledged.
//!
//! rumqttd keeps sessions in memory only. While the broker runs it still queues an
//! offline session's messages and delivers them on reconnect; this book keeps the
//! durable shadow of that queue and replays it only where rumqttd has nothing:
//! - admit (`admit.rs`) enqueues each admitted message for every *offline* persistent
//!   session whose subscription it matches ([`SessionBook::enqueue`], matched here in a
//!   filter tree), at min(published QoS, granted QoS); with `autosave_interval = 0` the
//!   publisher's acknowledgement waits for the commit that holds it.
//! - At start-up every stored session is offline: its subscriptions are made again in
//!   the router (which then queues what arrives while the client is away) and its
//!   stored messages are *carried over*: rumqttd never saw them.
//! - On reconnect ([`SessionBook::resume`]) the carried-over messages are replayed by
//!   the gateway (through `deliver`, so the read ACL in force applies) before anything
//!   the router forwards; the messages queued during this run, which the router
//!   delivers itself, stay stored as the session's backlog until the client
//!   acknowledges them (`backlog.rs`), so a crash in the middle of the drain loses none.
//! - On disconnect ([`SessionBook::offline`]) the session's subscriptions go back into
//!   the filter tree *before* the router link is closed, so no message falls between
//!   the two.
//!
//! One writer thread owns the store and applies changes in the order they were sent;
//! with `autosave_interval = 0` it commits after each batch it drains (one fsync for
//! all publishers that waited meanwhile), otherwise every `autosave_interval` seconds
//! and at shutdown.

mod backlog;
mod jobs;
mod matcher;

use crate::metrics::Metrics;
use crate::retained::{load_key, RetainedError};
use backlog::Backlog;
use bytes::Bytes;
use jobs::{Jobs, Taken as JobsTaken};
use matcher::Matcher;
use moatmq_config::Config;
use moatmq_store::{
    now_unix, Delivery, Enqueued, MessageProperties, PendingWill, QueuedMessage, SessionKey,
    SessionLimits, SessionLog, SessionMeta, SessionStore, SubscriptionOptions,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// Told of each message dropped because a session's queue was full, and why
/// (`max_queued_messages` or `max_queued_bytes`): the broker counts and audits it.
/// Called on the writer's thread and, for a writer that is behind, on a gateway's.
pub type OnDrop = Arc<dyn Fn(&SessionKey, &'static str) + Send + Sync>;

/// A message the gateway replays to a resumed session, in id order.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The store's id of the message: the gateway reports it done with it.
    pub id: u64,
    pub message: QueuedMessage,
    /// Sent before without an acknowledgement: sent again with DUP.
    pub dup: bool,
    /// The packet id it was sent with, when known: sent again under it
    /// (MQTT-4.4.0-1), so the client tells it from a new message.
    pub pkid: Option<u16>,
    /// QoS 2 whose PUBREC came: only its PUBREL goes again, under `pkid`.
    pub release: bool,
}

/// What a resumed session brings back from the store.
#[derive(Debug, Clone, Default)]
pub struct Resumed {
    /// Messages from before a restart, oldest first.
    pub replay: Vec<Replay>,
    /// Incoming QoS 2 exchanges admitted, PUBREL not yet received.
    pub qos2_in: Vec<u16>,
}

/// A stored session as it was loaded, for the start-up work in `server.rs`.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: SessionKey,
    pub meta: SessionMeta,
    /// A will waiting out its delay when the broker stopped.
    pub will: Option<PendingWill>,
}

/// One offline subscription in the filter tree.
struct Sub {
    session: Arc<OfflineSession>,
    qos: u8,
}

/// An offline session as admitting sees it. What is on its way to the writer for it
/// counts against its queue's limits already, so a writer held up (a slow disk, a long
/// commit, a large resume) does not let messages pile up in memory for it past them:
/// past `max_queued_messages` (or `max_queued_bytes`) of them, the newest is dropped
/// here, as the writer would drop it once it caught up.
struct OfflineSession {
    key: SessionKey,
    /// Messages sent to the writer for it and not yet taken by it, and their bytes
    /// ([`QueuedMessage::queued_bytes`]).
    unwritten: AtomicUsize,
    unwritten_bytes: AtomicU64,
    /// While the end of its connection is collected ([`SessionBook::collected`]): what
    /// admitting dropped for it, by content, so the collection (which holds the
    /// router's copies of the same messages) does not count those again.
    dropped: Mutex<Option<HashMap<u64, u32>>>,
}

impl OfflineSession {
    fn new(key: &SessionKey, collecting: bool) -> OfflineSession {
        OfflineSession {
            key: key.clone(),
            unwritten: AtomicUsize::new(0),
            unwritten_bytes: AtomicU64::new(0),
            dropped: Mutex::new(collecting.then(HashMap::new)),
        }
    }

    /// Counts a message of `bytes` as on its way to the writer; or the limit that
    /// those already on their way leave no room under.
    fn reserve(&self, bytes: u64, limits: &SessionLimits) -> Result<(), &'static str> {
        if self.unwritten.fetch_add(1, Ordering::Relaxed) >= limits.max_queued_messages {
            self.unwritten.fetch_sub(1, Ordering::Relaxed);
            return Err("max_queued_messages");
        }
        let before = self.unwritten_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > limits.max_queued_bytes {
            self.unwritten_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.unwritten.fetch_sub(1, Ordering::Relaxed);
            return Err("max_queued_bytes");
        }
        Ok(())
    }

    /// The writer took a message of `bytes` counted by [`OfflineSession::reserve`].
    fn written(&self, bytes: u64) {
        self.unwritten.fetch_sub(1, Ordering::Relaxed);
        self.unwritten_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Notes a message admitting dropped, while its connection's end is collected.
    fn note_dropped(&self, hash: u64) {
        if let Some(noted) = lock(&self.dropped).as_mut() {
            if noted.len() < DROPPED_NOTED || noted.contains_key(&hash) {
                *noted.entry(hash).or_default() += 1;
            }
        }
    }

    /// What admitting dropped until now; nothing is noted from now on.
    fn take_dropped(&self) -> HashMap<u64, u32> {
        lock(&self.dropped).take().unwrap_or_default()
    }
}

#[derive(Default)]
struct Offline {
    tree: Matcher<Sub>,
    /// Each offline session, with its filters to take them out again.
    sessions: HashMap<SessionKey, (Arc<OfflineSession>, Vec<String>)>,
}

/// The offline sessions one admitted message is queued for, each at its QoS. Most
/// messages reach one: that one takes no allocation.
#[derive(Default)]
struct Targets {
    first: Option<(Arc<OfflineSession>, u8)>,
    more: Vec<(Arc<OfflineSession>, u8)>,
}

impl Targets {
    /// A session subscribed by two matching filters gets one copy, at the higher QoS
    /// (MQTT-3.3.4-2 allows either).
    fn add(&mut self, session: &Arc<OfflineSession>, qos: u8) {
        let known = self
            .first
            .iter_mut()
            .chain(self.more.iter_mut())
            .find(|(s, _)| Arc::ptr_eq(s, session));
        if let Some(t) = known {
            t.1 = t.1.max(qos);
        } else if self.first.is_none() {
            self.first = Some((Arc::clone(session), qos));
        } else {
            self.more.push((Arc::clone(session), qos));
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Arc<OfflineSession>, u8) -> bool) {
        self.first = self.first.take().filter(|(s, q)| keep(s, *q));
        self.more.retain(|(s, q)| keep(s, *q));
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.more.is_empty()
    }

    fn sessions(self) -> impl Iterator<Item = (Arc<OfflineSession>, u8)> {
        self.first.into_iter().chain(self.more)
    }
}

/// The delivery state of a message sent before (`sent`) under `pkid`, `released` if
/// only its PUBREL was owed.
fn delivery(sent: bool, pkid: u16, released: bool) -> Delivery {
    match (sent, released) {
        (false, _) => Delivery::Queued,
        (true, false) => Delivery::Sent { pkid },
        (true, true) => Delivery::Released { pkid },
    }
}

/// The broker's side of the session store.
pub struct SessionBook {
    jobs: Arc<Jobs<Job>>,
    offline: Mutex<Offline>,
    /// How many sessions are offline: with none, admitting a message takes no lock.
    offline_sessions: AtomicUsize,
    /// `autosave_interval = 0`: publishes wait for their commit.
    sync: bool,
    queue_qos0: bool,
    /// The store's bounds on a session's queue, which admitting applies to what is on
    /// its way to the writer ([`OfflineSession`]).
    limits: SessionLimits,
    /// Set by [`SessionBook::run`].
    on_drop: std::sync::OnceLock<OnDrop>,
    writer: Mutex<Option<Writer>>,
    metrics: Arc<Metrics>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    admissions: Arc<Admissions>,
}

/// Publishes being admitted and handed to the router ([`SessionBook::admitting`]). A
/// publish admitted while a session was still online is not queued in the store for
/// it; if its connection hands it to the router only after that session's connection
/// ended and collected what the router held, the router alone has it, and a restart
/// loses it. So a connection's end first waits for those that began before its session
/// went offline ([`SessionBook::admitted_before_now`]).
#[derive(Default)]
struct Admissions {
    /// Publishes still on their way to the router, by the stamp they began under.
    open: Mutex<BTreeMap<u64, usize>>,
    next: AtomicU64,
}

/// A connection's publishes admitted and not all handed to the router yet; dropped
/// once they are (or the connection ends).
pub struct Admitting {
    admissions: Arc<Admissions>,
    stamp: u64,
}

impl Drop for Admitting {
    fn drop(&mut self) {
        let mut open = lock(&self.admissions.open);
        if let Some(n) = open.get_mut(&self.stamp) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.stamp);
            }
        }
    }
}

enum Job {
    Put(SessionKey, SessionMeta),
    Remove(SessionKey),
    Enqueue(Targets, QueuedMessage),
    Hold(SessionKey, Vec<QueuedMessage>),
    Collected(SessionKey, Vec<QueuedMessage>, Option<Arc<OfflineSession>>),
    Sent(SessionKey, u16, QueuedMessage),
    Acked(SessionKey, u16),
    Received(SessionKey, u16),
    Released(SessionKey, u64),
    Completed(SessionKey, u16),
    Resent(SessionKey, u64, u16),
    Resume(SessionKey, oneshot::Sender<Resumed>),
    Qos2In(SessionKey, u16),
    Will(SessionKey, Option<PendingWill>),
    Qos2InDone(SessionKey, u16),
    Checkpoint(SessionKey, crate::cut::Cut),
    Repark(SessionKey),
    Complete(SessionKey, u64),
    Take(SessionKey, oneshot::Sender<Option<Taken>>),
    Adopt(SessionKey, Box<Adopted>),
    Late(
        SessionKey,
        Vec<(QueuedMessage, bool)>,
        oneshot::Sender<Option<Vec<Replay>>>,
    ),
    Commit(oneshot::Sender<bool>),
    CommitHere(oneshot::Sender<bool>),
    ParkBarrier(oneshot::Sender<()>),
    ParkFinal(oneshot::Sender<usize>),
    Stop(oneshot::Sender<()>),
}

/// A session another node handed over ([`SessionBook::adopt`]).
struct Adopted {
    meta: SessionMeta,
    messages: Vec<(QueuedMessage, bool)>,
    /// [`Exchanges::in_order`] of the messages; may be empty.
    sent_as: Vec<(u16, bool)>,
    qos2_in: Vec<u16>,
}

/// A session taken out of this node's store to be handed to another node
/// (`cluster/handoff.rs`).
#[derive(Debug, Clone)]
pub struct Taken {
    pub meta: SessionMeta,
    /// Its messages, oldest first; `true` for one sent before without an
    /// acknowledgement (sent again with DUP).
    pub messages: Vec<(QueuedMessage, bool)>,
    /// Each message's id in this node's store (they only grow), in the same order.
    pub ids: Vec<u64>,
    /// Its exchanges with the client still open.
    pub open: Exchanges,
}

/// A session's exchanges with its client still open, which move with it to another
/// node: the messages' by their ids in the store that gave them ([`Taken::ids`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Exchanges {
    /// The packet id each message sent before went under: sent again under it
    /// (MQTT-4.4.0-1).
    pub pkids: Vec<(u64, u16)>,
    /// QoS 2 messages whose PUBREC came: only their PUBREL is owed, under their
    /// packet id.
    pub released: Vec<u64>,
    /// Incoming QoS 2 exchanges admitted whose PUBREL has not come: a PUBLISH sent
    /// again under one of these ids is not admitted twice (MQTT-4.3.3).
    pub qos2_in: Vec<u16>,
}

impl Exchanges {
    /// How each message of `ids` went to the client, in order: its packet id (0: none
    /// known) and whether only its PUBREL is owed.
    pub fn in_order(&self, ids: &[u64]) -> Vec<(u16, bool)> {
        if self.pkids.is_empty() {
            return Vec::new();
        }
        let pkids: HashMap<u64, u16> = self.pkids.iter().copied().collect();
        let released: BTreeSet<u64> = self.released.iter().copied().collect();
        ids.iter()
            .map(|id| {
                let pkid = pkids.get(id).copied().unwrap_or(0);
                (pkid, pkid != 0 && released.contains(id))
            })
            .collect()
    }
}

impl Taken {
    /// What of `session` goes to another node.
    fn of(session: &moatmq_store::Session) -> Taken {
        let mut taken = Taken {
            meta: session.meta.clone(),
            messages: Vec::with_capacity(session.messages.len()),
            ids: Vec::with_capacity(session.messages.len()),
            open: Exchanges {
                qos2_in: session.qos2_in.iter().copied().collect(),
                ..Exchanges::default()
            },
        };
        for (&id, held) in session.messages.iter() {
            let sent = match held.delivery {
                Delivery::Queued => false,
                Delivery::Sent { pkid } => {
                    if pkid != 0 {
                        taken.open.pkids.push((id, pkid));
                    }
                    true
                }
                // The client has it (PUBREC): its PUBREL goes again. (A release before
                // this one sends the message again, with DUP under the same id, which
                // the client knows as one it has.)
                Delivery::Released { pkid } if pkid != 0 => {
                    taken.open.pkids.push((id, pkid));
                    taken.open.released.push(id);
                    true
                }
                // Released under an id not known: nothing can be sent again.
                Delivery::Released { .. } => continue,
            };
            taken.messages.push((held.message.clone(), sent));
            taken.ids.push(id);
        }
        taken
    }
}

/// What the session writer tells a cluster node's park task (`cluster/park.rs`) about
/// the sessions it keeps offline, in the order of the changes, so that the node's
/// handoff values follow its store ([`SessionBook::park_feed`]).
#[derive(Debug)]
pub enum ParkEvent {
    /// The session is offline here now (its connection ended, or restored at start-up).
    Offline(SessionKey, Taken),
    /// The session's client is connected here (it resumed or started, or changed its
    /// subscriptions): what it is now, for a node that claims it if this one dies.
    /// Its exchanges of incoming QoS 2 messages are left out (they change with every
    /// packet; a park holding them would refuse a new message under a freed id).
    Connected(SessionKey, Taken),
    /// The connected client has everything up to this cut (`SessionBook::checkpoint`).
    Checkpoint(SessionKey, crate::cut::Cut),
    /// Messages queued for an offline session: `(id, message)`.
    Queued(SessionKey, Vec<(u64, QueuedMessage)>),
    /// The session is no longer offline here (resumed, removed or expired).
    Gone(SessionKey),
    /// Taken out of the store to be handed over (`cluster/handoff.rs` writes it).
    Taken(SessionKey),
    /// Every change before this one is in the store's commit: `bool` whether it
    /// succeeded; the senders wait for the park as well (`autosave_interval = 0`).
    Committed(Vec<oneshot::Sender<bool>>, bool),
    /// Answered once every event before it is written.
    Barrier(oneshot::Sender<()>),
    /// At shutdown: every park made final, how many answered; the park task ends.
    Final(oneshot::Sender<usize>),
}

impl SessionBook {
    /// Takes over an opened store: every session in it is offline, its messages carried
    /// over from the previous run. Sessions whose expiry passed while the broker was
    /// down are removed first. The writer starts with [`SessionBook::run`].
    pub fn new(
        mut store: Box<dyn SessionStore>,
        autosave_interval: Duration,
        queue_qos0: bool,
        limits: SessionLimits,
        metrics: Arc<Metrics>,
    ) -> Result<(SessionBook, Vec<Loaded>), moatmq_store::StoreError> {
        let purged = store.purge_expired(now_unix())?;
        if !purged.sessions.is_empty() || purged.messages > 0 {
            info!(
                sessions = purged.sessions.len(),
                messages = purged.messages,
                "expired while the broker was down"
            );
        }
        let mut offline = Offline::default();
        let mut carried: HashMap<SessionKey, Carried> = HashMap::new();
        let mut loaded = Vec::new();
        for s in store.sessions() {
            // Every message held now is from the last run; ids only grow.
            let below = s.messages.keys().next_back().map_or(0, |id| id + 1);
            carried.insert(s.key.clone(), Carried::below(below));
            offline.add(&s.key, &s.meta.subscriptions, false);
            loaded.push(Loaded {
                key: s.key.clone(),
                meta: s.meta.clone(),
                will: s.will.clone(),
            });
        }
        store.commit()?;
        let jobs = Arc::new(Jobs::new(
            writer_behind_at(),
            metrics.session_writer_behind.clone(),
        ));
        let book = SessionBook {
            admissions: Arc::default(),
            jobs: Arc::clone(&jobs),
            offline: Mutex::new(offline),
            offline_sessions: AtomicUsize::new(0),
            sync: autosave_interval.is_zero(),
            queue_qos0,
            limits,
            on_drop: std::sync::OnceLock::new(),
            writer: Mutex::new(Some(Writer {
                store,
                carried,
                inflight: HashMap::new(),
                released: HashMap::new(),
                backlogs: HashMap::new(),
                dropped_offline: HashMap::new(),
                jobs,
                interval: autosave_interval,
                on_drop: Arc::new(|_, _| {}),
                metrics: metrics.clone(),
                fail_commits: cfg!(feature = "test-hooks")
                    && std::env::var_os("MOATMQ_TEST_SESSION_COMMIT_FAIL").is_some(),
                commit_delay: commit_delay(),
                park: None,
                unparked: Vec::new(),
            })),
            thread: Mutex::new(None),
            metrics,
        };
        book.offline_changed(|_| {});
        Ok((book, loaded))
    }

    /// Starts the writer thread; dropped messages are reported to `on_drop`.
    pub fn run(&self, on_drop: OnDrop) {
        let Some(mut writer) = lock(&self.writer).take() else {
            return;
        };
        writer.on_drop = Arc::clone(&on_drop);
        let _ = self.on_drop.set(on_drop);
        let thread = std::thread::Builder::new()
            .name("moatmq-sessions".into())
            .spawn(move || writer.run());
        match thread {
            Ok(t) => *lock(&self.thread) = Some(t),
            Err(e) => error!(error = %e, "session writer thread failed to start"),
        }
    }

    /// A cluster node keeps its offline sessions parked in NATS as they change
    /// (`cluster/park.rs`): the writer reports each change of them, in order, on the
    /// returned feed. Called before [`SessionBook::run`]; `None` after it.
    pub fn park_feed(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<ParkEvent>> {
        let mut writer = lock(&self.writer);
        let writer = writer.as_mut()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        writer.park = Some(tx);
        Some(rx)
    }

    /// Waits until the park task has written every change the writer reported before
    /// this call (at once without one).
    pub async fn parked(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::ParkBarrier(tx));
        let _ = rx.await;
    }

    /// At shutdown: every offline session parked so far is marked final in the handoff
    /// bucket (taken at once by a node claiming it); the park task ends. How many.
    pub async fn park_final(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        self.send(Job::ParkFinal(tx));
        rx.await.unwrap_or(0)
    }

    fn send(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            warn!("session writer is gone; change not stored");
        }
    }

    /// Whether the writer is behind: more changes wait for it than it should have (a
    /// slow disk, a commit or resume held up). A connected persistent session's
    /// deliveries wait meanwhile ([`SessionBook::writer_caught_up`]): each records
    /// changes, which would otherwise pile up in memory for as long as it lasts.
    pub fn writer_behind(&self) -> bool {
        self.jobs.is_behind()
    }

    /// Returns once the writer is not behind.
    pub async fn writer_caught_up(&self) {
        self.jobs.caught_up().await
    }

    /// Whether QoS 0 messages are queued for offline sessions (`queue_qos0_messages`).
    pub fn queues_qos0(&self) -> bool {
        self.queue_qos0
    }

    /// Whether publishes must wait for [`SessionBook::commit`] before their
    /// acknowledgement (`autosave_interval = 0`).
    pub fn is_sync(&self) -> bool {
        self.sync
    }

    /// Queues an admitted message for every offline session it matches. Returns whether
    /// anything was queued (with `autosave_interval = 0` the caller then commits before
    /// acknowledging).
    pub fn enqueue(
        &self,
        topic: &str,
        payload: &Bytes,
        qos: u8,
        props: impl FnOnce() -> Option<MessageProperties>,
        expires_at: Option<u64>,
    ) -> bool {
        if (qos == 0 && !self.queue_qos0) || self.offline_sessions.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut targets = Targets::default();
        {
            let offline = lock(&self.offline);
            if offline.sessions.is_empty() {
                return false;
            }
            offline
                .tree
                .for_each_match(topic, |sub| targets.add(&sub.session, qos.min(sub.qos)));
        }
        let bytes = QueuedMessage::queued_bytes_of(topic, payload);
        let mut full = Vec::new();
        targets.retain(|session, q| {
            if q == 0 && !self.queue_qos0 {
                return false;
            }
            match session.reserve(bytes, &self.limits) {
                Ok(()) => true,
                Err(limit) => {
                    full.push((Arc::clone(session), limit));
                    false
                }
            }
        });
        if !full.is_empty() {
            // One hash for every session it was dropped for.
            let hash = content_hash_of(topic, payload);
            for (session, limit) in full {
                session.note_dropped(hash);
                if let Some(on_drop) = self.on_drop.get() {
                    on_drop(&session.key, limit);
                }
            }
        }
        if targets.is_empty() {
            return false;
        }
        let message = QueuedMessage {
            topic: topic.to_string(),
            // Shared with the router's copy: no second copy of the payload in memory.
            payload: payload.clone(),
            qos,
            retain: false,
            properties: props().map(Box::new),
            expires_at,
        };
        self.send(Job::Enqueue(targets, message));
        true
    }

    /// Call before admitting a message (`admit`: a client's publish, a will, one from
    /// another cluster node); drop what it returns once the router has it (a
    /// connection: everything it admitted).
    pub fn admitting(&self) -> Admitting {
        let mut open = lock(&self.admissions.open);
        let stamp = self.admissions.next.fetch_add(1, Ordering::Relaxed);
        *open.entry(stamp).or_default() += 1;
        Admitting {
            admissions: Arc::clone(&self.admissions),
            stamp,
        }
    }

    /// Call after [`SessionBook::offline`], before collecting what the router holds
    /// for the session: waits (at most `wait`) until every publish whose admission
    /// began before now has reached the router. What began later found the session
    /// offline and is queued in the store.
    /// `false` if some had not when the wait ended.
    pub async fn admitted_before_now(&self, wait: Duration) -> bool {
        let barrier = self.admission_barrier();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.admitted_before(barrier) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A mark for [`SessionBook::admitted_before`]: the admissions begun before now.
    pub fn admission_barrier(&self) -> u64 {
        let _open = lock(&self.admissions.open);
        self.admissions.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether every publish whose admission began before `barrier` was taken has
    /// reached the router.
    pub fn admitted_before(&self, barrier: u64) -> bool {
        !lock(&self.admissions.open)
            .keys()
            .next()
            .is_some_and(|&stamp| stamp < barrier)
    }

    /// The session of `key` is parked anew as it is now (offline, or connected): a late
    /// handoff taken here removed the value its park had written.
    pub fn repark(&self, key: &SessionKey) {
        self.send(Job::Repark(key.clone()));
    }

    /// The connected client of `key` has acknowledged everything its router had for it
    /// up to `cut` (`gateway/checkpoint.rs`): its live park names it, so a node that
    /// takes the park reads what came after from the transfer stream.
    pub fn checkpoint(&self, key: &SessionKey, cut: crate::cut::Cut) {
        self.send(Job::Checkpoint(key.clone(), cut));
    }

    /// Waits until every change sent so far is durable (on a cluster node, parked in
    /// NATS too: `cluster/park.rs`); `false` if the commit failed.
    pub async fn commit(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Commit(tx));
        rx.await.unwrap_or(false)
    }

    /// Waits until every change sent so far is in this node's store, not waiting for
    /// its park in NATS (which waits for NATS while it is away); `false` if the commit
    /// failed.
    pub async fn commit_here(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.send(Job::CommitHere(tx));
        rx.await.unwrap_or(false)
    }

    /// The client of `key` is back (or a new persistent session starts): its
    /// subscriptions leave the offline tree, its meta is stored as connected and the
    /// carried-over messages are returned for replay. The messages queued during this
    /// run stay stored until the client acknowledges the router's forwards of them.
    pub async fn resume(&self, key: &SessionKey, meta: SessionMeta) -> Resumed {
        self.offline_changed(|o| o.remove(key));
        self.send(Job::Put(key.clone(), meta));
        let (tx, rx) = oneshot::channel();
        self.send(Job::Resume(key.clone(), tx));
        rx.await.unwrap_or_default()
    }

    /// An incoming QoS 2 PUBLISH `pkid` was admitted for the session of `key`.
    pub fn qos2_in(&self, key: &SessionKey, pkid: u16) {
        self.send(Job::Qos2In(key.clone(), pkid));
    }

    /// Its PUBREL arrived.
    pub fn qos2_in_done(&self, key: &SessionKey, pkid: u16) {
        self.send(Job::Qos2InDone(key.clone(), pkid));
    }

    /// Sets (the session's client went away with a delayed will) or clears (the will
    /// was published) the session's pending will.
    pub fn set_will(&self, key: &SessionKey, will: Option<PendingWill>) {
        self.send(Job::Will(key.clone(), will));
    }

    /// The session's subscriptions or expiry changed while it is connected.
    pub fn update(&self, key: &SessionKey, meta: SessionMeta) {
        self.send(Job::Put(key.clone(), meta));
    }

    /// Messages the client of `key` was sent but did not acknowledge, oldest first: they
    /// are replayed with DUP after a restart (the router redelivers them otherwise).
    pub fn hold(&self, key: &SessionKey, messages: Vec<QueuedMessage>) {
        if !messages.is_empty() {
            self.send(Job::Hold(key.clone(), messages));
        }
    }

    /// What the router still held for the session of `key` as its connection ended,
    /// oldest first, collected and acknowledged to the router
    /// (`Gateway::router_settled`), which forgets them: from now on the store alone
    /// has them, carried over like what a restart loads, so the next resume replays
    /// them, on this node or on another one, and a crash before it loses none. The
    /// forwards the client had not acknowledged are carried over too (the router was
    /// told they were). Call after [`SessionBook::offline`].
    pub fn collected(&self, key: &SessionKey, messages: Vec<QueuedMessage>) {
        let session = lock(&self.offline)
            .sessions
            .get(key)
            .map(|(s, _)| Arc::clone(s));
        self.send(Job::Collected(key.clone(), messages, session));
    }

    /// A router forward was written to the connected client of `key` with packet id
    /// `pkid`: stored as sent until [`SessionBook::acked`], so a restart or crash
    /// redelivers it with DUP.
    pub fn sent(&self, key: &SessionKey, pkid: u16, message: QueuedMessage) {
        self.send(Job::Sent(key.clone(), pkid, message));
    }

    /// The stored message `id` of `key`, replayed, was written to the client under a
    /// packet id other than the one stored with it: `pkid` from now on.
    pub fn resent(&self, key: &SessionKey, id: u64, pkid: u16) {
        self.send(Job::Resent(key.clone(), id, pkid));
    }

    /// The client is done with the forward `pkid`: its PUBACK, or a PUBREC refusing
    /// the message.
    pub fn acked(&self, key: &SessionKey, pkid: u16) {
        self.send(Job::Acked(key.clone(), pkid));
    }

    /// The client's PUBREC for the QoS 2 forward `pkid`: it has the message; until its
    /// PUBCOMP ([`SessionBook::completed`]) the PUBREL is sent again after a restart.
    pub fn received(&self, key: &SessionKey, pkid: u16) {
        self.send(Job::Received(key.clone(), pkid));
    }

    /// The client's PUBREC for the stored message `id` of `key`, replayed by the
    /// gateway: its PUBREL is sent again after a restart, not the message, until the
    /// PUBCOMP completes it ([`SessionBook::complete`]).
    pub fn released(&self, key: &SessionKey, id: u64) {
        self.send(Job::Released(key.clone(), id));
    }

    /// The client's PUBCOMP for the router's PUBREL `pkid`.
    pub fn completed(&self, key: &SessionKey, pkid: u16) {
        self.send(Job::Completed(key.clone(), pkid));
    }

    /// The client of `key` went away: from now on its messages are queued here. Call
    /// before the router link is closed.
    pub fn offline(&self, key: &SessionKey, mut meta: SessionMeta) {
        meta.disconnected_at = Some(now_unix());
        self.offline_changed(|o| o.add(key, &meta.subscriptions, true));
        self.send(Job::Put(key.clone(), meta));
    }

    /// The session is gone (clean start, clean connection, expiry).
    pub fn remove(&self, key: &SessionKey) {
        self.offline_changed(|o| o.remove(key));
        self.send(Job::Remove(key.clone()));
    }

    /// No message is queued for the session of `key` from now on (it leaves for
    /// another node: [`SessionBook::take`] follows).
    pub fn stop_queueing(&self, key: &SessionKey) {
        self.offline_changed(|o| o.remove(key));
    }

    /// Takes the session of `key` out of the store (another node holds it now): no
    /// message is queued for it here from now on. `None` if there is none.
    pub async fn take(&self, key: &SessionKey) -> Option<Taken> {
        self.stop_queueing(key);
        let (tx, rx) = oneshot::channel();
        self.send(Job::Take(key.clone(), tx));
        rx.await.ok().flatten()
    }

    /// Stores a session handed over by another node as offline, its messages carried
    /// over (replayed by the next [`SessionBook::resume`], as after a restart), with its
    /// exchanges still open (`ids`: the messages' ids in the giving node's store, which
    /// `open` names): each message sent before goes again under its packet id, a
    /// PUBREL owed goes again, and a QoS 2 PUBLISH the client sends again is not
    /// admitted twice.
    pub fn adopt(
        &self,
        key: &SessionKey,
        meta: SessionMeta,
        messages: Vec<(QueuedMessage, bool)>,
        ids: &[u64],
        open: &Exchanges,
    ) {
        let sent_as = open.in_order(ids);
        self.send(Job::Adopt(
            key.clone(),
            Box::new(Adopted {
                meta,
                messages,
                sent_as,
                qos2_in: open.qos2_in.clone(),
            }),
        ));
    }

    /// Adds messages another node handed over late (after this node started the session
    /// new, `cluster/late.rs`) to the session of `key`, carried over like an adopted
    /// session's: returned for the connection to replay now, and replayed by the next
    /// [`SessionBook::resume`] until acknowledged. `None` if the session is not kept here.
    pub async fn late(
        &self,
        key: &SessionKey,
        messages: Vec<(QueuedMessage, bool)>,
    ) -> Option<Vec<Replay>> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Late(key.clone(), messages, tx));
        rx.await.ok().flatten()
    }

    /// A replayed message was acknowledged (or will never be: ACL, size, QoS 0).
    pub fn complete(&self, key: &SessionKey, id: u64) {
        self.send(Job::Complete(key.clone(), id));
    }

    /// Changes the offline sessions and mirrors their numbers into the metrics.
    fn offline_changed(&self, change: impl FnOnce(&mut Offline)) {
        let mut offline = lock(&self.offline);
        change(&mut offline);
        self.offline_sessions
            .store(offline.sessions.len(), Ordering::Relaxed);
        self.metrics
            .sessions_offline
            .set(offline.sessions.len() as i64);
        self.metrics
            .sessions_offline_subscriptions
            .set(offline.tree.len() as i64);
    }

    /// Commits what is left and stops the writer (shutdown).
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Stop(tx));
        let _ = rx.await;
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Offline {
    /// `collecting`: its connection just ended ([`OfflineSession::dropped`]).
    fn add(
        &mut self,
        key: &SessionKey,
        subs: &BTreeMap<String, SubscriptionOptions>,
        collecting: bool,
    ) {
        self.remove(key);
        let session = Arc::new(OfflineSession::new(key, collecting));
        for (filter, opts) in subs {
            self.tree.insert(
                filter,
                Sub {
                    session: Arc::clone(&session),
                    qos: opts.qos,
                },
            );
        }
        self.sessions
            .insert(key.clone(), (session, subs.keys().cloned().collect()));
    }

    fn remove(&mut self, key: &SessionKey) {
        if let Some((_, filters)) = self.sessions.remove(key) {
            for f in filters {
                self.tree.remove(&f, |sub| sub.session.key == *key);
            }
        }
    }
}

/// The writer thread's state: the store and which messages came from the last run.
struct Writer {
    store: Box<dyn SessionStore>,
    /// Per session, which of its messages are carried over: loaded at start-up (or
    /// rewritten by a resume), adopted, or handed over late, so not in the router.
    carried: HashMap<SessionKey, Carried>,
    /// Per connected session, the store id of each forward in flight, by packet id.
    inflight: HashMap<SessionKey, HashMap<u16, u64>>,
    /// Per session, the store id of each QoS 2 forward whose PUBREC came, by packet id,
    /// until its PUBCOMP (the router may number a new forward with the same id before).
    released: HashMap<SessionKey, HashMap<u16, u64>>,
    /// Per resumed session, what was queued for it in this run and the router has not
    /// forwarded yet: kept stored until acknowledged (`backlog.rs`).
    backlogs: HashMap<SessionKey, Backlog>,
    /// Per session whose connection ended and whose router copies are not collected
    /// yet, what its offline queue dropped meanwhile (counted and audited then), by
    /// content: the collection holds the router's copies of the same messages, and
    /// does not count them again ([`Writer::collected`]).
    dropped_offline: HashMap<SessionKey, HashMap<u64, u32>>,
    jobs: Arc<Jobs<Job>>,
    interval: Duration,
    on_drop: OnDrop,
    metrics: Arc<Metrics>,
    /// Test hook (`test-hooks` and `MOATMQ_TEST_SESSION_COMMIT_FAIL`): every commit fails,
    /// as on a full or read-only disk.
    fail_commits: bool,
    /// Test hook (`test-hooks` and `MOATMQ_TEST_SESSION_COMMIT_DELAY_MS`): every commit
    /// takes this much longer, as on a slow disk.
    commit_delay: Duration,
    /// A cluster node's park task ([`SessionBook::park_feed`]).
    park: Option<tokio::sync::mpsc::UnboundedSender<ParkEvent>>,
    /// Changes for the park task waiting for the commit that makes them durable.
    unparked: Vec<ParkEvent>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Stopped (or panicked): a change sent from now on is refused, and one waiting
        // for a reply (a commit, a resume) hears that none comes.
        self.jobs.abandon();
    }
}

impl Drop for SessionBook {
    fn drop(&mut self) {
        self.jobs.close();
    }
}

impl Writer {
    fn run(mut self) {
        // The sessions restored from the store are offline here.
        if self.park.is_some() {
            let restored: Vec<ParkEvent> = self
                .store
                .sessions()
                .filter(|s| s.meta.disconnected_at.is_some())
                .map(|s| ParkEvent::Offline(s.key.clone(), Taken::of(s)))
                .collect();
            self.unparked.extend(restored);
        }
        let sync = self.interval.is_zero();
        let mut next_save = Instant::now() + self.interval;
        let mut waiters = Vec::new();
        let mut here = Vec::new();
        let mut barriers: Vec<oneshot::Sender<()>> = Vec::new();
        let mut last_park: Option<oneshot::Sender<usize>> = None;
        let mut batch = Vec::new();
        loop {
            let mut stop = None;
            match self.jobs.take(&mut batch, (!sync).then_some(next_save)) {
                JobsTaken::Some => {
                    loop {
                        for job in batch.drain(..) {
                            match job {
                                Job::Commit(w) => waiters.push(w),
                                Job::CommitHere(w) => here.push(w),
                                Job::ParkBarrier(b) => barriers.push(b),
                                Job::ParkFinal(f) => last_park = Some(f),
                                Job::Stop(s) => stop = Some(s),
                                job => self.apply(job),
                            }
                        }
                        // What came meanwhile goes into the same commit.
                        if self.jobs.take(&mut batch, Some(Instant::now())) != JobsTaken::Some {
                            break;
                        }
                    }
                    let park_asks = !barriers.is_empty() || last_park.is_some();
                    if !sync
                        && stop.is_none()
                        && waiters.is_empty()
                        && here.is_empty()
                        && !park_asks
                    {
                        // Let the next changes gather rather than be woken for each:
                        // a sender wakes the writer only while it waits in `take`.
                        std::thread::sleep(GATHER);
                    }
                }
                JobsTaken::Timeout => {}
                JobsTaken::Closed => {
                    self.commit();
                    return;
                }
            }
            let due = sync
                || Instant::now() >= next_save
                || stop.is_some()
                || !waiters.is_empty()
                || !here.is_empty()
                || !barriers.is_empty()
                || last_park.is_some();
            if due {
                let ok = self.commit();
                for w in here.drain(..) {
                    let _ = w.send(ok);
                }
                match &self.park {
                    Some(park) => {
                        // Parked only once committed: the ids a park names are never
                        // given to other messages after a crash.
                        if ok {
                            for event in self.unparked.drain(..) {
                                let _ = park.send(event);
                            }
                        }
                        // What the commit wrote is safe once parked too.
                        if !waiters.is_empty() {
                            let _ =
                                park.send(ParkEvent::Committed(std::mem::take(&mut waiters), ok));
                        }
                        for b in barriers.drain(..) {
                            let _ = park.send(ParkEvent::Barrier(b));
                        }
                        if let Some(f) = last_park.take() {
                            let _ = park.send(ParkEvent::Final(f));
                            self.park = None;
                        }
                    }
                    None => {
                        for w in waiters.drain(..) {
                            let _ = w.send(ok);
                        }
                        barriers.clear();
                        if let Some(f) = last_park.take() {
                            let _ = f.send(0);
                        }
                    }
                }
                next_save = Instant::now() + self.interval;
            }
            if let Some(s) = stop {
                let _ = s.send(());
                return;
            }
        }
    }

    fn commit(&mut self) -> bool {
        if self.store.pending() == 0 {
            return true;
        }
        if self.fail_commits {
            error!("session store commit failed (test hook)");
            return false;
        }
        std::thread::sleep(self.commit_delay);
        match self.store.commit() {
            Ok(_) => {
                let stats = self.store.stats();
                self.metrics.sessions_stored.set(stats.sessions as i64);
                self.metrics
                    .session_messages_held
                    .set(stats.held_messages as i64);
                true
            }
            Err(e) => {
                error!(error = %e, "session store commit failed");
                false
            }
        }
    }

    fn apply(&mut self, job: Job) {
        let result = match job {
            Job::Put(key, meta) => {
                let offline = meta.disconnected_at.is_some();
                if offline {
                    // Offline again: what is left of its backlog is queued, as stored,
                    // and found again at the next resume.
                    self.backlogs.remove(&key);
                    // Its connection's end collects the router's copies next.
                    self.dropped_offline.insert(key.clone(), HashMap::new());
                }
                let was_offline = self.is_offline(&key);
                let put = self.store.put_session(&key, meta).map(drop);
                if offline && !was_offline {
                    if let Some(taken) = self.store.session(&key).map(Taken::of) {
                        self.tell_park(ParkEvent::Offline(key, taken));
                    }
                } else if !offline && self.park.is_some() {
                    self.park_as_is(key);
                }
                put
            }
            Job::Remove(key) => {
                self.dropped_offline.remove(&key);
                self.carried.remove(&key);
                self.backlogs.remove(&key);
                self.inflight.remove(&key);
                self.released.remove(&key);
                self.tell_park(ParkEvent::Gone(key.clone()));
                self.store.remove_session(&key).map(drop)
            }
            Job::Enqueue(targets, message) => {
                let bytes = message.queued_bytes();
                // The last one takes the message itself: no copy for the common case.
                let mut message = Some(message);
                let mut targets = targets.sessions().peekable();
                while let Some((session, qos)) = targets.next() {
                    session.written(bytes);
                    let next = match targets.peek() {
                        Some(_) => message.clone(),
                        None => message.take(),
                    };
                    let Some(mut m) = next else { break };
                    m.qos = qos;
                    if let Err(e) = self.queue(&session.key, m) {
                        warn!(error = %e, "message not queued for an offline session");
                    }
                }
                Ok(())
            }
            Job::Hold(key, messages) => {
                for m in messages {
                    // Still stored as queued, from before the reconnect.
                    if self.take_backlog(&key, &m).is_some() {
                        continue;
                    }
                    if let Err(e) = self.queue_sent(&key, 0, m) {
                        warn!(error = %e, "unacknowledged message not stored");
                    }
                }
                Ok(())
            }
            Job::Collected(key, messages, session) => {
                let dropped = session.map(|s| s.take_dropped()).unwrap_or_default();
                self.collected(&key, messages, dropped);
                Ok(())
            }
            Job::Sent(key, pkid, message) => {
                let stored = match self.take_backlog(&key, &message) {
                    Some(id) => self.store.mark_sent(&key, id, pkid).map(|_| Some(id)),
                    None => self.queue_sent(&key, pkid, message),
                };
                stored.map(|id| {
                    let Some(id) = id else { return };
                    let inflight = self.inflight.entry(key.clone()).or_default();
                    if let Some(old) = inflight.insert(pkid, id) {
                        // The router reused the packet id: the old one was answered.
                        let _ = self.store.complete(&key, old);
                    }
                })
            }
            Job::Resent(key, id, pkid) => self.store.mark_sent(&key, id, pkid).map(drop),
            Job::Received(key, pkid) => {
                match self.inflight.get_mut(&key).and_then(|m| m.remove(&pkid)) {
                    Some(id) => {
                        self.released
                            .entry(key.clone())
                            .or_default()
                            .insert(pkid, id);
                        self.store.mark_released(&key, id).map(drop)
                    }
                    None => Ok(()),
                }
            }
            Job::Released(key, id) => self.store.mark_released(&key, id).map(drop),
            Job::Completed(key, pkid) => {
                match self.released.get_mut(&key).and_then(|m| m.remove(&pkid)) {
                    Some(id) => self.store.complete(&key, id).map(drop),
                    None => Ok(()),
                }
            }
            Job::Acked(key, pkid) => {
                let id = self.inflight.get_mut(&key).and_then(|m| m.remove(&pkid));
                match id {
                    Some(id) => self.store.complete(&key, id).map(drop),
                    None => Ok(()),
                }
            }
            Job::Resume(key, reply) => {
                self.dropped_offline.remove(&key);
                let replay = self.resume(&key);
                let _ = reply.send(replay);
                Ok(())
            }
            Job::Qos2In(key, pkid) => self.store.qos2_in(&key, pkid).map(drop),
            Job::Will(key, will) => self.store.set_will(&key, will).map(drop),
            Job::Qos2InDone(key, pkid) => self.store.qos2_in_done(&key, pkid).map(drop),
            Job::Repark(key) => {
                self.park_as_is(key);
                Ok(())
            }
            Job::Checkpoint(key, cut) => {
                if !self.is_offline(&key) {
                    self.tell_park(ParkEvent::Checkpoint(key, cut));
                }
                Ok(())
            }
            Job::Complete(key, id) => {
                if let Some(carried) = self.carried.get_mut(&key) {
                    carried.late.remove(&id);
                }
                self.store.complete(&key, id).map(drop)
            }
            Job::Take(key, reply) => {
                self.dropped_offline.remove(&key);
                self.carried.remove(&key);
                self.inflight.remove(&key);
                self.released.remove(&key);
                self.backlogs.remove(&key);
                let taken = self.store.session(&key).map(Taken::of);
                let _ = reply.send(taken);
                self.tell_park(ParkEvent::Taken(key.clone()));
                self.store.remove_session(&key).map(drop)
            }
            Job::Adopt(key, adopted) => {
                self.carried.remove(&key);
                self.backlogs.remove(&key);
                let _ = self.store.remove_session(&key);
                let Adopted {
                    meta,
                    messages,
                    sent_as,
                    qos2_in,
                } = *adopted;
                match self.store.put_session(&key, meta) {
                    Ok(_) => {
                        // Every message of the adopted session is carried over: the
                        // router here never saw them.
                        let mut below = 0;
                        let mut sent_as = sent_as.into_iter();
                        for (m, sent) in messages {
                            // Packet id 0 (none known): a stored `Sent` is only ever
                            // resent, with DUP, under an id of the gateway's.
                            let (pkid, released) = sent_as.next().unwrap_or((0, false));
                            match self.queue_in(&key, m, delivery(sent, pkid, released)) {
                                Ok(Some(id)) => below = id + 1,
                                Ok(None) => {}
                                Err(e) => warn!(error = %e, "handed-over message not stored"),
                            }
                        }
                        self.carried.insert(key.clone(), Carried::below(below));
                        for pkid in qos2_in {
                            if let Err(e) = self.store.qos2_in(&key, pkid) {
                                warn!(error = %e, "handed-over QoS 2 exchange not stored");
                            }
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Job::Late(key, messages, reply) => {
                let _ = reply.send(self.add_late(&key, messages));
                Ok(())
            }
            Job::Commit(_)
            | Job::CommitHere(_)
            | Job::ParkBarrier(_)
            | Job::ParkFinal(_)
            | Job::Stop(_) => Ok(()),
        };
        if let Err(e) = result {
            warn!(error = %e, "session store change failed");
        }
    }

    /// Holds `message` for the session of `key`: `Some(id)`, or `None` when its full
    /// queue dropped it (reported).
    fn queue(
        &mut self,
        key: &SessionKey,
        message: QueuedMessage,
    ) -> Result<Option<u64>, moatmq_store::StoreError> {
        let noted = self
            .dropped_offline
            .get(key)
            .is_some_and(|d| d.len() < DROPPED_NOTED)
            .then(|| content_hash(&message));
        Ok(match self.try_queue(key, message)? {
            Ok(id) => Some(id),
            Err(limit) => {
                if let (Some(hash), Some(noted_here)) = (noted, self.dropped_offline.get_mut(key)) {
                    *noted_here.entry(hash).or_default() += 1;
                }
                self.dropped(key, limit);
                None
            }
        })
    }

    /// [`Writer::queue`] without the report: the id, or the limit that dropped it.
    fn try_queue(
        &mut self,
        key: &SessionKey,
        message: QueuedMessage,
    ) -> Result<Result<u64, &'static str>, moatmq_store::StoreError> {
        let parked = self.park.is_some() && self.is_offline(key);
        let copy = parked.then(|| message.clone());
        Ok(match self.store.enqueue(key, message)? {
            Enqueued::Queued(id) => {
                if let Some(copy) = copy {
                    self.tell_park(ParkEvent::Queued(key.clone(), vec![(id, copy)]));
                }
                Ok(id)
            }
            Enqueued::DroppedMessages => Err("max_queued_messages"),
            Enqueued::DroppedBytes => Err("max_queued_bytes"),
        })
    }

    /// [`Writer::queue`] for a message the client was sent with `pkid`: replayed with DUP.
    fn queue_sent(
        &mut self,
        key: &SessionKey,
        pkid: u16,
        message: QueuedMessage,
    ) -> Result<Option<u64>, moatmq_store::StoreError> {
        let id = self.queue(key, message)?;
        if let Some(id) = id {
            self.store.mark_sent(key, id, pkid)?;
        }
        Ok(id)
    }

    /// [`Writer::queue`] for a message in the state it had elsewhere (on another node,
    /// or before the session was written afresh): sent before, it goes again with DUP
    /// under its packet id (0: one of the gateway's); released, only its PUBREL goes
    /// again.
    fn queue_in(
        &mut self,
        key: &SessionKey,
        message: QueuedMessage,
        state: Delivery,
    ) -> Result<Option<u64>, moatmq_store::StoreError> {
        let (pkid, released) = match state {
            Delivery::Queued => return self.queue(key, message),
            Delivery::Sent { pkid } => (pkid, false),
            Delivery::Released { pkid } => (pkid, true),
        };
        let id = self.queue_sent(key, pkid, message)?;
        if let (Some(id), true) = (id, released) {
            self.store.mark_released(key, id)?;
        }
        Ok(id)
    }

    /// What a resumed session gets replayed. This run's messages stay stored as its
    /// backlog until the router's forwards of them are acknowledged.
    fn resume(&mut self, key: &SessionKey) -> Resumed {
        // The previous connection's forwards in flight are this run's: the router sends
        // them again, and they are found in the backlog.
        self.inflight.remove(key);
        self.backlogs.remove(key);
        let carried = self.carried.get(key).cloned().unwrap_or_default();
        let Some(session) = self.store.session(key) else {
            return Resumed::default();
        };
        let qos2_in: Vec<u16> = session.qos2_in.iter().copied().collect();
        let meta = session.meta.clone();
        // The client is back before its will's delay ran out: no will.
        let had_will = session.will.is_some();
        let now = now_unix();
        let mut replay = Vec::new();
        let mut backlog = Backlog::default();
        let mut done = Vec::new();
        // PUBREC'd here in this run: the router sends the PUBREL again, the client's
        // PUBCOMP completes them (`Job::Completed`).
        let released = self.released.get(key);
        let mut awaiting_pubcomp = 0;
        for (&id, held) in session.messages.iter() {
            if held.message.is_expired(now) {
                done.push(id);
            } else if carried.holds(id) {
                replay.push(Replay {
                    id,
                    message: held.message.clone(),
                    dup: held.delivery != Delivery::Queued,
                    pkid: match held.delivery {
                        // Not under an id whose PUBREL the router owes the client: the
                        // router reused it after the PUBREC, and the client still holds
                        // that exchange open (sent under it, this would replace the
                        // message the PUBREL releases: lost).
                        Delivery::Sent { pkid }
                            if released.is_some_and(|r| r.contains_key(&pkid)) =>
                        {
                            None
                        }
                        Delivery::Sent { pkid } | Delivery::Released { pkid } if pkid != 0 => {
                            Some(pkid)
                        }
                        _ => None,
                    },
                    release: matches!(held.delivery, Delivery::Released { pkid } if pkid != 0),
                });
            } else if matches!(held.delivery, Delivery::Released { pkid }
                if released.is_some_and(|r| r.get(&pkid) == Some(&id)))
            {
                awaiting_pubcomp += 1;
            } else if held.message.qos == 0 || matches!(held.delivery, Delivery::Released { .. }) {
                // QoS 0 (`queue_qos0_messages`): forwarded once, never acknowledged, so
                // not kept for a crash (at most once). Released: the client has it
                // (PUBREC) and the router holds the rest of the exchange.
                done.push(id);
            } else {
                backlog.push(id, &held.message);
            }
        }
        if backlog.is_empty()
            && awaiting_pubcomp == 0
            && done.len() > replay.len() + qos2_in.len() + 2
        {
            // Mostly expired messages: writing the session afresh with what it keeps
            // costs less than one record per dropped message.
            replay = self.rebuild(key, meta, replay, &qos2_in);
            return Resumed { replay, qos2_in };
        }
        if !backlog.is_empty() {
            self.backlogs.insert(key.clone(), backlog);
        }
        for id in done {
            if let Err(e) = self.store.complete(key, id) {
                warn!(error = %e, "session store change failed");
            }
        }
        if had_will {
            if let Err(e) = self.store.set_will(key, None) {
                warn!(error = %e, "session store change failed");
            }
        }
        Resumed { replay, qos2_in }
    }

    /// [`SessionBook::collected`]. A collected message may be stored already: queued
    /// since the session went offline (the router forwarded it too) or left of the
    /// backlog of an earlier resume. It is queued again in the router's order, and what
    /// was queued since the disconnect that the router had not forwarded yet goes after
    /// it again, so the replay (after a restart too) keeps the order the router had.
    /// `dropped_admitting`: what admitting dropped for it meanwhile, by content.
    fn collected(
        &mut self,
        key: &SessionKey,
        messages: Vec<QueuedMessage>,
        dropped_admitting: HashMap<u64, u32>,
    ) {
        // (A PUBREL the router owes the client, it sends again itself on a resume here:
        // those stay in `released`.)
        let unacked = self.inflight.remove(key).unwrap_or_default();
        let mut dropped_before = self.dropped_offline.remove(key).unwrap_or_default();
        for (hash, n) in dropped_admitting {
            *dropped_before.entry(hash).or_default() += n;
        }
        let Some(session) = self.store.session(key) else {
            return;
        };
        if !unacked.is_empty() {
            let carried = self.carried.entry(key.clone()).or_default();
            carried.late.extend(unacked.into_values());
        }
        if messages.is_empty() {
            return;
        }
        let carried = self.carried.get(key).cloned().unwrap_or_default();
        let mut stored = Backlog::default();
        let mut since = Vec::new();
        for (&id, held) in session.messages.iter() {
            if held.delivery == Delivery::Queued && !carried.holds(id) {
                stored.push(id, &held.message);
                since.push(id);
            }
        }
        let mut again = Vec::new();
        for message in &messages {
            let (id, _) = stored.take(message, |id| {
                session.messages.get(&id).map(|held| &held.message)
            });
            again.extend(id);
        }
        // Queued since the disconnect and not among what the router held: published
        // after all of it (the router still holds these and forwards them after the
        // replay), so they go after it again, or a restart would replay them first.
        let matched: BTreeSet<u64> = again.iter().copied().collect();
        let after: Vec<(u64, QueuedMessage)> = since
            .into_iter()
            .filter(|id| !matched.contains(id))
            .filter_map(|id| session.messages.get(&id).map(|h| (id, h.message.clone())))
            .collect();
        // A cluster node parks the session afresh once, below, rather than a copy of
        // each message here.
        let park = self.park.take();
        let mut late = Vec::with_capacity(messages.len());
        let result = (|| {
            for id in again.into_iter().chain(after.iter().map(|(id, _)| *id)) {
                self.store.complete(key, id)?;
            }
            for message in messages {
                let hash = (!dropped_before.is_empty()).then(|| content_hash(&message));
                match self.try_queue(key, message)? {
                    Ok(id) => late.push(id),
                    // The offline queue dropped this one already, and said so.
                    Err(_) if hash.is_some_and(|h| take_one(&mut dropped_before, h)) => {}
                    Err(limit) => self.dropped(key, limit),
                }
            }
            for (_, message) in after {
                self.queue(key, message)?;
            }
            Ok::<(), moatmq_store::StoreError>(())
        })();
        self.park = park;
        if let Err(e) = result {
            warn!(error = %e, "messages the router held for a session not stored");
        }
        self.carried
            .entry(key.clone())
            .or_default()
            .late
            .extend(late);
        if self.is_offline(key) {
            if let Some(taken) = self.store.session(key).map(Taken::of) {
                self.tell_park(ParkEvent::Offline(key.clone(), taken));
            }
        }
    }

    /// The stored id of `forward` if it is in the backlog of the session of `key`, taken
    /// out of it; what the drain has passed by for good is completed.
    fn take_backlog(&mut self, key: &SessionKey, forward: &QueuedMessage) -> Option<u64> {
        let backlog = self.backlogs.get_mut(key)?;
        let session = self.store.session(key)?;
        let (id, skipped) = backlog.take(forward, |id| {
            session.messages.get(&id).map(|held| &held.message)
        });
        if backlog.is_empty() {
            self.backlogs.remove(key);
        }
        for id in skipped {
            if let Err(e) = self.store.complete(key, id) {
                warn!(error = %e, "session store change failed");
            }
        }
        id
    }

    /// Writes the session of `key` again with only `meta`, the carried-over `replay`
    /// messages (new ids, same delivery state) and its incoming QoS 2 exchanges.
    fn rebuild(
        &mut self,
        key: &SessionKey,
        meta: SessionMeta,
        replay: Vec<Replay>,
        qos2_in: &[u16],
    ) -> Vec<Replay> {
        let mut kept = Vec::with_capacity(replay.len());
        let mut carried = 0;
        let result = (|| {
            self.store.remove_session(key)?;
            self.store.put_session(key, meta)?;
            for &pkid in qos2_in {
                self.store.qos2_in(key, pkid)?;
            }
            for r in replay {
                let state = delivery(r.dup, r.pkid.unwrap_or(0), r.release);
                if let Some(id) = self.queue_in(key, r.message.clone(), state)? {
                    carried = id + 1;
                    kept.push(Replay { id, ..r });
                }
            }
            Ok::<(), moatmq_store::StoreError>(())
        })();
        if let Err(e) = result {
            warn!(error = %e, "session store change failed");
        }
        self.carried.insert(key.clone(), Carried::below(carried));
        kept
    }

    /// [`SessionBook::late`]: each message stored (one sent before with DUP), its id
    /// marked carried over.
    fn add_late(
        &mut self,
        key: &SessionKey,
        messages: Vec<(QueuedMessage, bool)>,
    ) -> Option<Vec<Replay>> {
        self.store.session(key)?;
        let mut replay = Vec::with_capacity(messages.len());
        for (message, dup) in messages {
            let queued = match dup {
                true => self.queue_sent(key, 0, message.clone()),
                false => self.queue(key, message.clone()),
            };
            match queued {
                Ok(Some(id)) => {
                    self.carried.entry(key.clone()).or_default().late.insert(id);
                    replay.push(Replay {
                        id,
                        message,
                        dup,
                        pkid: None,
                        release: false,
                    });
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "message handed over late not stored"),
            }
        }
        Some(replay)
    }

    fn dropped(&self, key: &SessionKey, limit: &'static str) {
        (self.on_drop)(key, limit);
    }

    /// Whether the session of `key` is kept here offline.
    fn is_offline(&self, key: &SessionKey) -> bool {
        self.store
            .session(key)
            .is_some_and(|s| s.meta.disconnected_at.is_some())
    }

    /// Parks the session of `key` anew as it is: offline, or connected (without its
    /// incoming QoS 2 exchanges, `ParkEvent::Connected`).
    fn park_as_is(&mut self, key: SessionKey) {
        let offline = self.is_offline(&key);
        if let Some(mut taken) = self.store.session(&key).map(Taken::of) {
            if offline {
                self.tell_park(ParkEvent::Offline(key, taken));
            } else {
                taken.open.qos2_in.clear();
                self.tell_park(ParkEvent::Connected(key, taken));
            }
        }
    }

    /// Reports `event` to the park task after the next successful commit.
    fn tell_park(&mut self, event: ParkEvent) {
        if self.park.is_some() {
            self.unparked.push(event);
        }
    }
}

/// Which messages of a session are carried over (the router here never saw them): ids
/// below `below` (from before a restart, or adopted; ids grow as messages are queued,
/// so every message queued in this run is at or above it) and those handed over late.
#[derive(Debug, Clone, Default)]
struct Carried {
    below: u64,
    late: BTreeSet<u64>,
}

impl Carried {
    fn below(below: u64) -> Carried {
        Carried {
            below,
            late: BTreeSet::new(),
        }
    }

    fn holds(&self, id: u64) -> bool {
        id < self.below || self.late.contains(&id)
    }
}

/// With `autosave_interval` > 0, how long the writer lets changes gather after a batch.
/// Nothing waits on it but a resuming client (its CONNACK), which this delays at most
/// once by as much.
const GATHER: Duration = Duration::from_millis(1);

/// What an offline queue drops while its session's connection is ending, noted at most
/// (per session) so the collection does not count it again; past it, a drop may be
/// counted twice.
const DROPPED_NOTED: usize = 4096;

/// A message's topic and payload, hashed within this process: the router's copy of a
/// message and the one queued offline are equal in these (two messages equal in them
/// are one as far as counting goes).
fn content_hash(m: &QueuedMessage) -> u64 {
    content_hash_of(&m.topic, &m.payload)
}

/// [`content_hash`] of a message not built yet.
fn content_hash_of(topic: &str, payload: &Bytes) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

/// Takes one `hash` out of `counts`; `false` if there was none.
fn take_one(counts: &mut HashMap<u64, u32>, hash: u64) -> bool {
    match counts.get_mut(&hash) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            counts.remove(&hash);
            true
        }
        None => false,
    }
}

/// Changes waiting for the writer past which it is behind: the gateways of connected
/// persistent sessions hold their deliveries until it takes them
/// ([`SessionBook::writer_behind`]). Each is a few hundred bytes (a delivery's record
/// shares its payload with the router's copy): some 64 MiB, a quarter of a second of
/// the fastest drain measured here (docs/benchmarks.md), so an ordinary commit does not
/// reach it. A test sets `MOATMQ_TEST_SESSION_WRITER_BEHIND`.
fn writer_behind_at() -> usize {
    static HOOKED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    crate::hooks::hooked_count(&HOOKED, "MOATMQ_TEST_SESSION_WRITER_BEHIND", 262_144)
}

/// [`Writer::commit_delay`]: none unless a test asks for it.
fn commit_delay() -> Duration {
    static HOOKED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    crate::hooks::hooked(
        &HOOKED,
        "MOATMQ_TEST_SESSION_COMMIT_DELAY_MS",
        Duration::ZERO,
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens the session store when it is on: beside the retained store, with its key and
/// autosave interval (`[sessions]` overrides). `None`: sessions stay in memory.
pub fn open(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<(SessionBook, Vec<Loaded>)>, RetainedError> {
    let (Some(sessions), Some(retained)) = (config.sessions(), &config.retained) else {
        info!("persistent sessions are kept in memory only and do not survive a restart (no [retained] store, or [sessions] enabled = false)");
        return Ok(None);
    };
    let key = load_key(config, retained)?;
    let limits = SessionLimits {
        max_queued_messages: config.limits.queued_messages_bound(),
        max_queued_bytes: config.limits.max_queued_bytes as u64,
    };
    let store = SessionLog::open(&config.resolve(&sessions.path), key, limits)?;
    let (book, loaded) = SessionBook::new(
        Box::new(store),
        Duration::from_secs(sessions.autosave_interval),
        sessions.queue_qos0_messages,
        limits,
        metrics.clone(),
    )?;
    info!(sessions = loaded.len(), "session store loaded");
    Ok(Some((book, loaded)))
}
