//! What the engine, the revocation checks, the health writer and the API share: the store, the
//! clock, the configuration in force, the counters, the per-profile pause/breaker/limit state,
//! and the one way to commit an outcome (holding it, and journaling a rotated pair, while the
//! store cannot write).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::breaker::Breakers;
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::pauses::Pauses;
use crate::journal::{Journal, Record};
use crate::limiter::Limits;
use crate::provider::Provider;
use crate::store::{Committed, Guard, Outcome, Store, StoreError};

/// The configuration in force and the client built from it; swapped whole on reload, and read
/// by every task from the watch channel.
pub struct Runtime {
    pub config: Config,
    pub provider: Provider,
    /// When this configuration was loaded (unix seconds).
    pub loaded_at: i64,
}

impl Runtime {
    pub fn new(config: Config, loaded_at: i64) -> anyhow::Result<Runtime> {
        let provider = Provider::new(&config.daemon)?;
        Ok(Runtime {
            config,
            provider,
            loaded_at,
        })
    }
}

/// What tokend has done since start, for the health file, `STATUS=` and metrics.
#[derive(Default)]
pub struct Stats {
    pub refreshes_ok: AtomicU64,
    pub refreshes_failed: AtomicU64,
    pub probes_ok: AtomicU64,
    pub probes_failed: AtomicU64,
    pub lapses: AtomicU64,
    /// Bumped whenever the engine gets through a loop turn: the watchdog's proof of progress.
    pub heartbeat: AtomicU64,
    /// When the engine last got through a loop turn (unix ms): `/healthz`'s proof of progress.
    pub progress_ms: std::sync::atomic::AtomicI64,
    /// Bumped on every write of ours and every commit seen from another connection: the health
    /// writer recounts accounts only when it moved.
    pub generation: AtomicU64,
    pub store_unwritable: AtomicBool,
    /// Outcomes the store has refused so far and that are being retried.
    pub uncommitted: AtomicUsize,
    last_errors: Mutex<HashMap<&'static str, (String, i64)>>,
    store_error: Mutex<Option<String>>,
}

impl Stats {
    pub fn last_errors(&self) -> Vec<(&'static str, String, i64)> {
        let mut v: Vec<_> = lock(&self.last_errors)
            .iter()
            .map(|(k, (m, t))| (*k, m.clone(), *t))
            .collect();
        v.sort();
        v
    }

    pub fn store_error(&self) -> Option<String> {
        lock(&self.store_error).clone()
    }
}

pub(crate) use crate::lock;

pub struct Shared {
    pub store: Store,
    pub clock: Clock,
    runtime: watch::Receiver<Arc<Runtime>>,
    /// This process, as recorded in the leases it takes.
    pub owner: String,
    pub stats: Stats,
    /// Rung on every state change, for the health writer.
    pub changed: Notify,
    pub pauses: Pauses,
    pub breakers: Breakers,
    pub limits: Limits,
    pub journal: Option<Journal>,
    /// Accounts whose rotated pair is in the journal and not yet in the store.
    journaled: Mutex<BTreeSet<String>>,
    /// Set when the database file was replaced under us: the daemon must stop.
    fatal: Mutex<Option<StoreError>>,
    /// One warning per (what, profile), for findings that would otherwise repeat per refresh.
    warned: Mutex<HashSet<(&'static str, String)>>,
    pub metrics: crate::metrics::Metrics,
    /// The last count of every account (see [`Shared::counts`]).
    counted: Mutex<Option<LastCount>>,
}

/// The last count of every account, and when another may run.
struct LastCount {
    generation: u64,
    counts: Vec<crate::store::Count>,
    /// Clock milliseconds before which the count is reused even if something changed.
    next_ms: i64,
}

/// Counting reads every account (about a second at ten million rows). A count that took
/// longer than [`COUNT_SLOW`] is reused, even after a change, for a hundred times as long as
/// it took, so it never costs more than 1 % of a core however often the health file is
/// written or metrics are scraped; faster counts (under half a million accounts or so) are
/// always fresh.
const COUNT_SHARE: u32 = 100;
const COUNT_SLOW: std::time::Duration = std::time::Duration::from_millis(50);

impl Shared {
    /// When the counts may be taken again, if something changed since they were and counting
    /// is held back until then (`None`: current, or may be counted now).
    pub fn counts_stale_until(&self) -> Option<i64> {
        let generation = self.stats.generation.load(Ordering::Relaxed);
        let now = self.clock.now_ms();
        lock(&self.counted)
            .as_ref()
            .filter(|last| last.generation != generation && last.next_ms > now)
            .map(|last| last.next_ms)
    }

    /// Accounts by state, token type and profile: counted again when something changed, at
    /// most as often as [`COUNT_SHARE`] allows.
    pub async fn counts(&self) -> Result<Vec<crate::store::Count>, StoreError> {
        let generation = self.stats.generation.load(Ordering::Relaxed);
        if let Some(last) = lock(&self.counted).as_ref()
            && (last.generation == generation || self.clock.now_ms() < last.next_ms)
        {
            return Ok(last.counts.clone());
        }
        let started = std::time::Instant::now();
        let counts = self.store.counts().await?;
        let took = started.elapsed();
        let gap = if took > COUNT_SLOW {
            (took * COUNT_SHARE).as_millis() as i64
        } else {
            0
        };
        *lock(&self.counted) = Some(LastCount {
            generation,
            counts: counts.clone(),
            next_ms: self.clock.now_ms() + gap,
        });
        Ok(counts)
    }

    pub fn new(
        store: Store,
        clock: Clock,
        runtime: watch::Receiver<Arc<Runtime>>,
        owner: String,
        journal: Option<Journal>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            store,
            clock,
            runtime,
            owner,
            stats: Stats::default(),
            changed: Notify::new(),
            pauses: Pauses::default(),
            breakers: Breakers::default(),
            limits: Limits::default(),
            counted: Mutex::new(None),
            journal,
            journaled: Mutex::new(BTreeSet::new()),
            fatal: Mutex::new(None),
            warned: Mutex::new(HashSet::new()),
            metrics: crate::metrics::Metrics::default(),
        })
    }

    /// The configuration and client in force now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.borrow().clone()
    }

    /// A receiver that sees every reload.
    pub fn runtime_changes(&self) -> watch::Receiver<Arc<Runtime>> {
        self.runtime.clone()
    }

    /// Something in the store changed state: recount for the health file.
    pub fn state_changed(&self) {
        self.stats.generation.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    pub fn record_error(&self, kind: &'static str, msg: &str) {
        lock(&self.stats.last_errors).insert(kind, (msg.to_owned(), self.clock.now()));
    }

    /// Whether this is the first time `what` is said about `profile`.
    pub fn first_time(&self, what: &'static str, profile: &str) -> bool {
        lock(&self.warned).insert((what, profile.to_owned()))
    }

    /// The store error that ended writing for good (the database file was replaced), if any.
    pub fn fatal(&self) -> Option<StoreError> {
        lock(&self.fatal).clone()
    }

    /// Accounts whose rotated pair waits in the journal.
    pub fn journaled(&self) -> Vec<String> {
        lock(&self.journaled).iter().cloned().collect()
    }

    fn store_failed(&self, e: &StoreError) {
        if !self.stats.store_unwritable.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "the store cannot write; holding outcomes (rotated pairs go to the recovery journal) and retrying");
            self.state_changed();
        }
        *lock(&self.stats.store_error) = Some(e.to_string());
        self.record_error("store", &e.to_string());
    }

    /// A claim or other write failed: record it for the health file.
    pub fn claim_failed(&self, e: &StoreError) {
        if matches!(e, StoreError::Replaced { .. }) {
            self.set_fatal(e);
        }
        if !self.stats.store_unwritable.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "cannot claim accounts: the store does not accept writes");
            self.state_changed();
        }
        *lock(&self.stats.store_error) = Some(e.to_string());
        self.record_error("store", &e.to_string());
    }

    pub fn set_fatal(&self, e: &StoreError) {
        let mut f = lock(&self.fatal);
        if f.is_none() {
            tracing::error!(error = %e, "the database file is not the one tokend opened: no more writes; stopping so the service manager restarts tokend on the file now at the path");
            *f = Some(e.clone());
            self.stats.store_unwritable.store(true, Ordering::Relaxed);
            *lock(&self.stats.store_error) = Some(e.to_string());
            self.changed.notify_one();
        }
    }

    /// The store wrote: if it had been failing, say it recovered.
    pub fn store_writes(&self) {
        if self.stats.uncommitted.load(Ordering::Relaxed) == 0
            && self.fatal().is_none()
            && self.stats.store_unwritable.swap(false, Ordering::Relaxed)
        {
            tracing::info!("the store accepts writes again");
            *lock(&self.stats.store_error) = None;
            self.state_changed();
        }
    }

    /// Put a rotated pair in the recovery journal. Returns whether it is there.
    fn journal_pair(&self, o: &Outcome) -> bool {
        let (Some(journal), Some(tokens)) = (&self.journal, &o.tokens) else {
            return false;
        };
        let presented = match &o.guard {
            Guard::Presented(p) => crate::journal::digest(p),
            Guard::PresentedDigest(d) => d.clone(),
            _ => return false,
        };
        let record = Record {
            account: o.id.clone(),
            presented_sha256: presented,
            access_token: tokens.access_token.clone(),
            refresh_token: tokens.refresh_token.clone(),
            expires_at: tokens.expires_at,
            scopes: tokens.scopes.clone(),
            at: o.now,
        };
        match journal.append(&record) {
            Ok(()) => {
                lock(&self.journaled).insert(o.id.clone());
                tracing::warn!(account_id = %o.id, journal = %journal.path().display(),
                    "rotated pair kept in the recovery journal until the store takes it");
                true
            }
            Err(e) => {
                tracing::error!(account_id = %o.id, journal = %journal.path().display(), error = %e,
                    "cannot write the recovery journal: this rotated pair exists only in memory until the store takes it");
                false
            }
        }
    }

    /// Commit an outcome. While the store cannot write, hold it and retry (a rotated pair goes
    /// to the recovery journal at the first failure); give up only when `hard_stop` fires (the
    /// journal then carries the pair to the next start) or the database file was replaced.
    pub async fn commit(&self, o: Outcome, hard_stop: &CancellationToken) -> Option<Committed> {
        let mut delay = Duration::from_millis(100);
        let mut held = false;
        let mut journaled = false;
        loop {
            match self.store.commit(o.clone()).await {
                Ok(c) => {
                    self.stats.generation.fetch_add(1, Ordering::Relaxed);
                    if held {
                        self.stats.uncommitted.fetch_sub(1, Ordering::Relaxed);
                        tracing::info!(account_id = %o.id, "held outcome committed");
                    }
                    if journaled {
                        lock(&self.journaled).remove(&o.id);
                        if let Some(j) = &self.journal {
                            j.settled();
                        }
                    }
                    self.store_writes();
                    return Some(c);
                }
                Err(e) => {
                    if o.tokens.is_some() && !journaled {
                        journaled = self.journal_pair(&o);
                    }
                    if matches!(e, StoreError::Replaced { .. }) {
                        self.set_fatal(&e);
                        if held {
                            self.stats.uncommitted.fetch_sub(1, Ordering::Relaxed);
                        }
                        return None;
                    }
                    if !e.is_transient() {
                        tracing::error!(account_id = %o.id, error = %e, "the store refused an outcome");
                        if held {
                            self.stats.uncommitted.fetch_sub(1, Ordering::Relaxed);
                        }
                        return None;
                    }
                    if !held {
                        held = true;
                        self.stats.uncommitted.fetch_add(1, Ordering::Relaxed);
                    }
                    self.store_failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = hard_stop.cancelled() => {
                            self.stats.uncommitted.fetch_sub(1, Ordering::Relaxed);
                            if o.tokens.is_some() {
                                tracing::error!(account_id = %o.id, journaled,
                                    "stopping with a rotated pair not in the store{}",
                                    if journaled { " (it is in the recovery journal; the next start stores it)" } else { ": IT IS LOST" });
                            }
                            return None;
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// This process's id in leases: host, pid, the process start time (so a reused pid is not
/// mistaken for us) and a random part.
pub fn owner_id() -> String {
    format!(
        "{}:{}:{}:{:08x}",
        hostname(),
        std::process::id(),
        start_ticks(std::process::id()).unwrap_or(0),
        fastrand::u32(..)
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty() && !s.contains(':'))
        .unwrap_or_else(|| "localhost".into())
}

/// The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that took leases as `owner` is certainly gone: it ran on this host and
/// its pid is gone or belongs to a process started at another time. `false` when alive or when
/// it cannot be told (another host: its leases run out instead).
pub fn owner_is_dead(owner: &str) -> bool {
    let mut parts = owner.split(':');
    let (Some(host), Some(pid), Some(start)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if host != hostname() {
        return false;
    }
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    match start_ticks(pid) {
        None => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        Some(s) => s != start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_id_names_this_live_process_and_a_gone_one_reads_dead() {
        let me = owner_id();
        assert!(!owner_is_dead(&me), "this process is alive");
        let parts: Vec<&str> = me.split(':').collect();
        // A process that has exited.
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let start = start_ticks(pid).unwrap_or(0);
        child.wait().expect("wait");
        assert!(owner_is_dead(&format!("{}:{pid}:{start}:x", parts[0])));
        // A live pid started at another time: a reused pid, not the owner.
        let reused = format!("{}:1:{}:x", parts[0], start_ticks(1).unwrap_or(0) + 1);
        assert!(owner_is_dead(&reused));
        let init = format!("{}:1:{}:x", parts[0], start_ticks(1).unwrap_or(0));
        assert!(
            !owner_is_dead(&init),
            "pid 1 with its own start time is alive"
        );
        let other_host = format!("elsewhere:{}:{}:x", parts[1], parts[2]);
        assert!(!owner_is_dead(&other_host), "another host cannot be judged");
        assert!(!owner_is_dead("cli-123"));
    }
}
