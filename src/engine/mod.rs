//! The refresh engine: sleeps until the next account is due, claims due accounts from the store
//! (a lease and an in-flight attempt recorded in the row, in one transaction), refreshes them
//! with an adaptive number in flight per profile, and commits each outcome before anything else
//! happens with it.
//!
//! Three rooms: [`policy`] (pure: what a row and an answer mean), [`pauses`] (profiles paused
//! for misconfiguration), and this loop. One account's problem never stops the others.

pub mod pauses;
pub mod policy;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::breaker::Admit;
use crate::config::{Profile, TokenType};
use crate::limiter::Signal;
use crate::provider::RefreshError;
use crate::shared::{Runtime, Shared, lock};
use crate::state::State;
use crate::store::{
    Account, ClaimGroup, Committed, Decision, Guard, Lease, Outcome, PausedProfile, StoreError,
};
use policy::{Admission, Cx};

/// How often the engine asks SQLite whether another program committed (new or relinked rows),
/// and checks that the database file is still the one it opened.
pub const CHANGE_POLL: Duration = Duration::from_secs(1);
/// Most new rows looked at per claim.
const EVAL_BATCH: usize = 512;
/// Most due rows of a paused or deferred profile moved out of the way per claim.
const DEFER_BATCH: usize = 256;
/// How often the at-risk and lapse sweeps run.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Why the engine loop ended.
#[derive(Debug)]
pub enum Ended {
    /// Asked to stop; every outcome committed or journaled.
    Stopped,
    /// The database file was replaced or removed under the daemon.
    StoreReplaced(StoreError),
}

/// The result of a refresh asked for on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDemand {
    /// A request went out (or one already in flight finished); read the row again.
    Done,
    /// Not now: paused, the minimum gap, the ceiling, the breaker; try again at this time.
    NotBefore(i64, String),
    /// Another process holds the account (its own refresh is in flight).
    HeldElsewhere,
    /// No such account.
    Unknown,
    /// The account cannot be refreshed (its state or row says why).
    Refused(String),
}

pub struct Engine {
    shared: Arc<Shared>,
    /// Wakes the loop: a flight finished, a profile resumed, a reload, an on-demand request.
    wake: Notify,
    /// Accounts with a token request in flight here (or being claimed for one on demand), and
    /// a signal when it is committed: one flight per account, whoever asks.
    flights: Mutex<crate::FastMap<String, Flight>>,
    next_flight: std::sync::atomic::AtomicU64,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
    /// tokend itself marked rows for evaluation (resumed, relinked): look for new rows.
    fresh: std::sync::atomic::AtomicBool,
    /// Refresh tokens to revoke (superseded or unused), sent when their profile has a free
    /// request slot, after refreshes: revocation is hygiene, refreshes keep grants alive.
    revocations: Mutex<std::collections::VecDeque<Revocation>>,
    /// Claimed accounts waiting for a request slot, by profile. Claims run up to one limit
    /// ahead of the requests in flight, so a finished request is followed at once by the next
    /// instead of by a round trip to the store (which may be syncing a commit).
    ready: Mutex<crate::FastMap<String, std::collections::VecDeque<Waiting>>>,
}

struct Flight {
    id: u64,
    done: watch::Receiver<bool>,
}

/// A claimed account (leased, its attempt recorded) waiting for a free request slot of its
/// profile, with its flight.
struct Waiting {
    account: Account,
    flight: (u64, watch::Sender<bool>),
}

struct Revocation {
    profile: String,
    token: secrecy::SecretString,
    why: &'static str,
}

/// Most revocations waiting; beyond this the oldest are dropped (they stay usable at the
/// provider until they would have been used: a backlog this long means the server is far
/// behind anyway).
const MAX_REVOCATIONS: usize = 100_000;

impl Engine {
    pub fn new(shared: Arc<Shared>, hard_stop: CancellationToken) -> Arc<Engine> {
        Arc::new(Engine {
            shared,
            wake: Notify::new(),
            flights: Mutex::new(crate::FastMap::default()),
            next_flight: std::sync::atomic::AtomicU64::new(1),
            tracker: TaskTracker::new(),
            hard_stop,
            fresh: std::sync::atomic::AtomicBool::new(false),
            revocations: Mutex::new(std::collections::VecDeque::new()),
            ready: Mutex::new(crate::FastMap::default()),
        })
    }

    /// Rows were marked for evaluation by tokend itself (its own commits do not move
    /// `data_version`): look at them now.
    pub fn evaluate_soon(&self) {
        // Rows were added or changed: what is counted changed too.
        self.shared.state_changed();
        self.fresh.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// For a one-off action without the loop (`tokend accounts refresh` while no daemon runs):
    /// send the revocations still queued, which only the loop sends otherwise, and wait for
    /// them and every other task. Without this a superseded refresh token stays usable.
    pub async fn finish(self: &Arc<Self>) {
        self.send_revocations(&self.shared.runtime());
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Wake the loop (a reload, a resumed profile, a new row linked through the API).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Before the loop starts: take back pauses recorded by a previous run, and make the
    /// requests that dead processes on this host left in flight due first (their leases need
    /// not run out: the process is gone).
    pub async fn recover(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        let rt = s.runtime();
        let now = s.clock.now();
        for p in s.store.paused_profiles().await? {
            let Some(profile) = rt.config.profile(&p.name) else {
                continue;
            };
            s.pauses
                .restore(&p, &fingerprint(profile), now, pause_initial(&rt));
            tracing::warn!(profile = %p.name, reason = %p.reason, since = %crate::clock::rfc3339(p.since),
                "profile paused by a previous run; it is retried with one request");
        }
        for (owner, n) in s.store.in_flight_owners().await? {
            if owner != s.owner && crate::shared::owner_is_dead(&owner) {
                let moved = s.store.recover_dead_owner(&owner, now).await?;
                tracing::warn!(owner = %owner, requests = n, accounts = moved,
                    "refreshes left in flight by a process that is gone: retrying them first with the stored refresh token");
            }
        }
        let names: Vec<String> = rt.config.profiles.iter().map(|p| p.name.clone()).collect();
        let n = s.store.reevaluate_orphans(names).await?;
        if n > 0 {
            tracing::info!(accounts = n, "re-evaluating accounts whose profile changed");
        }
        Ok(())
    }

    /// The engine loop. Returns once `stop` fires and every in-flight refresh has been
    /// committed (or journaled when the hard stop comes first).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> Ended {
        let s = self.shared.clone();
        let mut runtime = s.runtime_changes();
        let mut turn = Turn {
            known_next: None,
            dirty: true,
            look_for_new: true,
            data_version: s.store.data_version().await.ok(),
            last_poll: Instant::now(),
            last_renew: Instant::now(),
            last_sweep: Instant::now() - SWEEP_EVERY,
        };
        let ended = loop {
            s.stats.heartbeat.fetch_add(1, Ordering::Relaxed);
            s.stats
                .progress_ms
                .store(s.clock.now_ms(), Ordering::Relaxed);
            if stop.is_cancelled() {
                break Ended::Stopped;
            }
            if let Some(e) = s.fatal() {
                break Ended::StoreReplaced(e);
            }
            let rt = s.runtime();
            let now = s.clock.now();
            // (Finished requests send waiting accounts; this catches a pause or a breaker
            // that closed while nothing was in flight.)
            self.dispatch_all(None);
            turn.look_for_new |= self.fresh.swap(false, Ordering::Relaxed);
            turn.dirty |= self.retry_paused(&rt, now).await;
            let due_now = turn.known_next.is_none_or(|t| t <= now);
            // A due time may be a new row's lease running out: look for new rows too.
            turn.look_for_new |= due_now && turn.known_next.is_some();
            let may_be_due = turn.dirty || turn.look_for_new || due_now;
            // While refused outcomes wait in memory, start nothing new.
            let writable = s.stats.uncommitted.load(Ordering::Relaxed) == 0;
            // Every request slot taken (or too few free for a batch): a finished request
            // wakes the loop, and nothing is asked of the store until then.
            let waiting = !self.has_room(&rt);
            let mut more = false;
            if writable && may_be_due && !waiting {
                if turn.look_for_new
                    && let Some(full) = self.evaluate_new(&rt, now).await
                {
                    turn.look_for_new = full;
                    more |= full;
                }
                more |= self.claim_due(&rt, now).await;
                self.send_revocations(&rt);
            }
            if !more && !waiting && (turn.dirty || may_be_due) {
                let grace = rt.config.daemon.http_timeout.as_secs_i64() + 1;
                turn.known_next = s.store.next_due(groups(&rt), grace).await.ok().flatten();
                turn.dirty = false;
            }
            if turn.last_sweep.elapsed() >= SWEEP_EVERY {
                turn.last_sweep = Instant::now();
                self.sweep(&rt, now).await;
            }

            // Sleep until the next due time, a finished flight, a change by another program
            // (polled cheaply), a reload, or shutdown.
            let now = s.clock.now();
            let until_due = match turn.known_next {
                _ if more => Duration::ZERO,
                // Due but held by a lease (ours in flight, or another instance's).
                Some(t) if t <= now => Duration::from_millis(250),
                Some(t) => s.clock.until(t),
                None => Duration::from_secs(3600),
            };
            let poll_in = CHANGE_POLL.saturating_sub(turn.last_poll.elapsed());
            let sleep = until_due.min(poll_in);
            let slots_full = waiting || !self.has_room(&rt);
            if !sleep.is_zero() || (more && slots_full) || (waiting && may_be_due) {
                let sleep = if sleep.is_zero() {
                    poll_in.max(Duration::from_millis(10))
                } else {
                    sleep
                };
                tokio::select! {
                    _ = stop.cancelled() => break Ended::Stopped,
                    _ = tokio::time::sleep(sleep) => {}
                    _ = self.wake.notified() => turn.dirty = true,
                    _ = runtime.changed() => {
                        turn.dirty = true;
                        turn.look_for_new = true;
                        self.reloaded().await;
                    }
                }
            }
            if turn.last_poll.elapsed() >= CHANGE_POLL {
                turn.last_poll = Instant::now();
                match s.store.data_version().await {
                    Ok(v) if Some(v) != turn.data_version => {
                        turn.data_version = Some(v);
                        turn.look_for_new = true;
                        turn.dirty = true;
                        s.stats.generation.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("database changed by another connection");
                    }
                    Ok(_) => {}
                    Err(e @ StoreError::Replaced { .. }) => s.set_fatal(&e),
                    Err(_) => turn.look_for_new = true,
                }
            }
            let lease = rt.config.daemon.lease.get();
            if turn.last_renew.elapsed() >= lease / 3 {
                turn.last_renew = Instant::now();
                self.renew_leases(&rt).await;
            }
        };
        // Claimed accounts not sent yet are given back.
        let waiting: Vec<Waiting> = lock(&self.ready).drain().flat_map(|(_, q)| q).collect();
        self.give_back(waiting);
        self.tracker.close();
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = self.hard_stop.cancelled() => {
                // Give the commits that were abandoned a moment to journal and report.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
            }
        }
        ended
    }

    /// Look at rows inserted or changed by other programs and schedule them. Returns whether
    /// more may be waiting, or `None` when the claim failed.
    async fn evaluate_new(&self, rt: &Arc<Runtime>, now: i64) -> Option<bool> {
        let s = &self.shared;
        let admissions = self.paused_set(rt);
        let config = rt.clone();
        let decided = s
            .store
            .evaluate_new(self.lease(rt, now), EVAL_BATCH, move |a| {
                let cx = Cx {
                    config: &config.config,
                    now,
                };
                let admission = admission_of(&config, &admissions, a);
                policy::schedule(&cx, a, admission)
            })
            .await;
        match decided {
            Ok(e) => {
                if !e.changes.is_empty() || !e.problems.is_empty() {
                    s.state_changed();
                }
                log_changes(&e.changes);
                for p in &e.problems {
                    tracing::error!(account_id = %p.id, reason = %p.reason, "account state: invalid (unreadable row)");
                }
                s.store_writes();
                Some(e.looked_at == EVAL_BATCH)
            }
            Err(e) => {
                s.claim_failed(&e);
                None
            }
        }
    }

    /// Claim due rows for the free request slots of each profile and refresh them. Returns
    /// whether more may be due.
    async fn claim_due(self: &Arc<Self>, rt: &Arc<Runtime>, now: i64) -> bool {
        let s = &self.shared;
        let d = &rt.config.daemon;
        let ceiling = d.max_concurrent_refreshes.get();
        let mut room = self.room(rt);
        let mut groups = Vec::new();
        let mut admissions: HashMap<String, Admission> = HashMap::new();
        for p in &rt.config.profiles {
            let admission = self.admission(p, now);
            let limit = match admission {
                Admission::Open => {
                    let queued = self.queued(Some(&p.name));
                    let n = s.limits.claimable(&p.name, ceiling, queued).min(room);
                    room -= n;
                    n
                }
                Admission::Probe => usize::from(s.limits.in_flight() < ceiling),
                Admission::Paused | Admission::Defer(_) => DEFER_BATCH,
            };
            admissions.insert(p.name.clone(), admission);
            groups.push(ClaimGroup {
                profile: Some(p.name.clone()),
                limit,
            });
        }
        if groups.iter().all(|g| g.limit == 0) {
            return false;
        }
        let config = rt.clone();
        let decide_admissions = admissions.clone();
        let claimed = s
            .store
            .claim_due(self.lease(rt, now), groups, move |a| {
                let cx = Cx {
                    config: &config.config,
                    now,
                };
                policy::plan(&cx, a, admission_of(&config, &decide_admissions, a))
            })
            .await;
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                s.claim_failed(&e);
                self.unused_probes(&admissions, &[]);
                return false;
            }
        };
        s.store_writes();
        if !claimed.changes.is_empty() || !claimed.problems.is_empty() {
            s.state_changed();
        }
        log_changes(&claimed.changes);
        for p in &claimed.problems {
            tracing::error!(account_id = %p.id, reason = %p.reason, "account state: invalid (unreadable row)");
        }
        self.unused_probes(&admissions, &claimed.requests);
        // Probes go out at once; the rest wait for their profile's slots.
        let mut queued: Vec<String> = Vec::new();
        for a in claimed.requests {
            let profile = rt.config.profile_for(a.profile.as_deref()).map(|p| &p.name);
            let probe = profile.and_then(|p| admissions.get(p)) == Some(&Admission::Probe);
            match profile {
                Some(p) if !probe => {
                    let flight = self.new_flight(&mut lock(&self.flights), &a.id);
                    let w = Waiting { account: a, flight };
                    lock(&self.ready).entry(p.clone()).or_default().push_back(w);
                    if !queued.contains(p) {
                        queued.push(p.clone());
                    }
                }
                _ => self.spawn_refresh(rt.clone(), a, None),
            }
        }
        for p in queued {
            self.dispatch(&p);
        }
        claimed.full_groups > 0
    }

    /// Room for claims overall: `max_concurrent_refreshes` in flight and as many waiting.
    fn room(&self, rt: &Runtime) -> usize {
        let ceiling = rt.config.daemon.max_concurrent_refreshes.get();
        let held = self.shared.limits.in_flight() + self.queued(None);
        (2 * ceiling).saturating_sub(held)
    }

    /// Claimed accounts waiting for a slot: of one profile, or of all.
    fn queued(&self, profile: Option<&str>) -> usize {
        let ready = lock(&self.ready);
        match profile {
            Some(p) => ready.get(p).map_or(0, |q| q.len()),
            None => ready.values().map(|q| q.len()).sum(),
        }
    }

    /// Whether some profile may claim a batch now.
    fn has_room(&self, rt: &Runtime) -> bool {
        let s = &self.shared;
        let ceiling = rt.config.daemon.max_concurrent_refreshes.get();
        self.room(rt) > 0
            && rt.config.profiles.iter().any(|p| {
                s.limits
                    .claimable(&p.name, ceiling, self.queued(Some(&p.name)))
                    > 0
            })
    }

    /// Send waiting accounts into free request slots, the finished request's profile first
    /// (the ceiling is shared by all profiles).
    fn dispatch_all(self: &Arc<Self>, first: Option<&str>) {
        if let Some(p) = first {
            self.dispatch(p);
        }
        let others: Vec<String> = lock(&self.ready)
            .iter()
            .filter(|(p, q)| !q.is_empty() && Some(p.as_str()) != first)
            .map(|(p, _)| p.clone())
            .collect();
        for p in others {
            self.dispatch(&p);
        }
    }

    /// Send waiting accounts of `profile` into its free request slots. If the profile was
    /// paused or its breaker opened since they were claimed, give them back instead: their
    /// rows are planned again.
    fn dispatch(self: &Arc<Self>, profile: &str) {
        let s = &self.shared;
        let rt = s.runtime();
        let ceiling = rt.config.daemon.max_concurrent_refreshes.get();
        let open = !s.pauses.is_paused(profile)
            && matches!(s.breakers.peek(profile, s.clock.now()), Admit::Yes);
        let mut ready = lock(&self.ready);
        let Some(q) = ready.get_mut(profile) else {
            return;
        };
        if !open {
            let back: Vec<Waiting> = q.drain(..).collect();
            drop(ready);
            self.give_back(back);
            return;
        }
        while s.limits.free(profile, ceiling) > 0 && s.limits.in_flight() < ceiling {
            let Some(w) = q.pop_front() else {
                break;
            };
            self.spawn_refresh(rt.clone(), w.account, Some(w.flight));
        }
    }

    /// Release claimed accounts that will not be sent (their leases and attempts cleared),
    /// then end their flights, so an on-demand caller that joined one finds the row free.
    fn give_back(self: &Arc<Self>, back: Vec<Waiting>) {
        if back.is_empty() {
            return;
        }
        let me = self.clone();
        self.tracker.spawn(async move {
            let s = &me.shared;
            // A row a dead process left in flight keeps its attempt: a request for its
            // refresh token may have gone out, and recovery must still say so.
            let claims = back
                .iter()
                .filter(|w| w.account.left_in_flight_by.is_none())
                .filter_map(|w| Some((w.account.id.clone(), w.account.attempt?)))
                .collect();
            if let Err(e) = s.store.release(&s.owner, claims).await {
                tracing::warn!(error = %e, "cannot release claimed accounts (their leases run out instead)");
            }
            for w in back {
                let (n, done) = w.flight;
                me.end_flight(&w.account.id, n, done);
            }
            me.wake.notify_one();
        });
    }

    /// A probe slot granted for a profile that found nothing to send is given back.
    fn unused_probes(&self, admissions: &HashMap<String, Admission>, sent: &[Account]) {
        for (p, a) in admissions {
            if *a == Admission::Probe && !sent.iter().any(|r| r.profile.as_deref() == Some(p)) {
                if self.shared.pauses.is_paused(p) {
                    self.shared.pauses.unused_probe(p);
                } else {
                    self.shared.breakers.cancel_probe(p);
                }
            }
        }
    }

    fn lease(&self, rt: &Runtime, now: i64) -> Lease {
        let d = &rt.config.daemon;
        Lease {
            owner: self.shared.owner.clone(),
            now,
            until: now + d.lease.as_secs_i64(),
            grace: d.http_timeout.as_secs_i64() + 1,
        }
    }

    fn admission(&self, p: &Profile, now: i64) -> Admission {
        let s = &self.shared;
        match s.pauses.admission(&p.name) {
            Some(true) => return Admission::Probe,
            Some(false) => return Admission::Paused,
            None => {}
        }
        match s.breakers.admit(&p.name, now) {
            Admit::Yes => Admission::Open,
            Admit::Probe => Admission::Probe,
            Admit::Defer(until) => Admission::Defer(until),
        }
    }

    fn paused_set(&self, rt: &Runtime) -> HashMap<String, Admission> {
        rt.config
            .profiles
            .iter()
            .filter(|p| self.shared.pauses.is_paused(&p.name))
            .map(|p| (p.name.clone(), Admission::Paused))
            .collect()
    }

    /// Register a flight for `id` (the caller must know none is there).
    fn new_flight(
        &self,
        flights: &mut crate::FastMap<String, Flight>,
        id: &str,
    ) -> (u64, watch::Sender<bool>) {
        let n = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        flights.insert(id.to_owned(), Flight { id: n, done: rx });
        (n, tx)
    }

    /// End flight `n` of `id` (if it is still the one registered) and tell its waiters.
    fn end_flight(&self, id: &str, n: u64, done: watch::Sender<bool>) {
        let mut f = lock(&self.flights);
        if f.get(id).is_some_and(|fl| fl.id == n) {
            f.remove(id);
        }
        drop(f);
        let _ = done.send(true);
    }

    fn spawn_refresh(
        self: &Arc<Self>,
        rt: Arc<Runtime>,
        a: Account,
        flight: Option<(u64, watch::Sender<bool>)>,
    ) {
        let s = &self.shared;
        let (n, done) = match flight {
            Some(f) => f,
            None => self.new_flight(&mut lock(&self.flights), &a.id),
        };
        let Some(profile) = rt.config.profile_for(a.profile.as_deref()).cloned() else {
            // Its profile is gone (a reload): the row is planned again.
            self.give_back(vec![Waiting {
                account: a,
                flight: (n, done),
            }]);
            return;
        };
        let ceiling = rt.config.daemon.max_concurrent_refreshes.get();
        s.limits.started(&profile.name, ceiling);
        let me = self.clone();
        self.tracker.spawn(async move {
            let id = a.id.clone();
            let name = profile.name.clone();
            me.refresh(&rt, &profile, a).await;
            me.end_flight(&id, n, done);
            me.dispatch_all(Some(&name));
            me.wake.notify_one();
        });
    }

    /// Make the request for one leased account and commit what it means.
    async fn refresh(self: &Arc<Self>, rt: &Runtime, profile: &Profile, a: Account) {
        let s = &self.shared;
        let d = &rt.config.daemon;
        let ceiling = d.max_concurrent_refreshes.get();
        let Some(presented) = a.refresh_token.clone() else {
            s.limits
                .finished(&profile.name, Duration::ZERO, Signal::Nothing, ceiling);
            return;
        };
        let Some(attempt) = a.attempt else {
            s.limits
                .finished(&profile.name, Duration::ZERO, Signal::Nothing, ceiling);
            return;
        };
        let started = Instant::now();
        let result = rt
            .provider
            .refresh(profile, &presented, s.clock.now())
            .await;
        let took = started.elapsed();
        let now = s.clock.now();
        let (outcome_name, signal) = match &result {
            Ok(_) => ("refreshed", Signal::Answered),
            Err(RefreshError::InvalidGrant(_)) => ("invalid_grant", Signal::Answered),
            Err(RefreshError::Misconfigured { .. }) => ("misconfigured", Signal::Nothing),
            Err(RefreshError::Transient { .. }) => ("transient", Signal::Overloaded),
        };
        s.limits.finished(&profile.name, took, signal, ceiling);
        // The slot is free: the next claimed account goes out while this outcome commits, and
        // the loop may claim more.
        self.dispatch_all(Some(&profile.name));
        self.wake.notify_one();
        s.metrics.refresh(&profile.name, outcome_name, took);
        let cx = Cx {
            config: &rt.config,
            now,
        };
        let r = policy::refreshed(&cx, profile, &a, &result);
        let was_paused = a.state == State::Paused;
        match &result {
            Ok(_) => {
                s.stats.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                self.breaker_record(rt, profile, false, now).await;
            }
            Err(RefreshError::InvalidGrant(_)) => {
                s.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                // The server answered: as far as the breaker is concerned, it works.
                self.breaker_record(rt, profile, false, now).await;
                s.record_error(
                    "refresh",
                    r.change.last_error.as_deref().unwrap_or_default(),
                );
            }
            Err(RefreshError::Misconfigured { .. }) => {
                s.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                let reason = r.change.reason.clone().unwrap_or_default();
                s.record_error("profile", &reason);
                self.pause_profile(rt, profile, &reason, now).await;
            }
            Err(RefreshError::Transient { reason, .. }) => {
                s.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                s.record_error("refresh", reason);
                self.breaker_record(rt, profile, true, now).await;
                if was_paused {
                    s.pauses.inconclusive(&profile.name);
                }
            }
        }
        if let Some(problem) = &r.expiry_guessed
            && s.first_time("expiry", &profile.name)
        {
            tracing::warn!(profile = %profile.name, problem = %problem,
                default_token_lifetime_s = profile.default_token_lifetime.as_secs_i64(),
                "the token endpoint's expires_in is unusable; assuming the profile's default_token_lifetime (said once per profile)");
        }
        if let Some(lifetime) = r.lead_clamped
            && s.first_time("lead", &profile.name)
        {
            tracing::warn!(profile = %profile.name, lifetime_s = lifetime,
                refresh_lead_s = d.refresh_lead.as_secs_i64(), refresh_jitter_s = d.refresh_jitter.as_secs_i64(),
                "refresh_lead does not fit this profile's token lifetime: refreshing at half the lifetime instead (said once per profile)");
        }
        let rotated = r.tokens.as_ref().is_some_and(|t| t.refresh_token.is_some());
        let new_refresh = r.tokens.as_ref().and_then(|t| t.refresh_token.clone());
        let next = r.change.next_action_at;
        let guard = if r.tokens.is_some() {
            Guard::Presented(presented.clone())
        } else {
            Guard::Attempt(attempt)
        };
        let to = r.change.to;
        let outcome = Outcome {
            id: a.id.clone(),
            guard,
            tokens: r.tokens,
            change: r.change,
            notes: r.notes,
            now,
        };
        let reason = outcome.change.reason.clone();
        let error = outcome.change.last_error.clone();
        let committed = s.commit(outcome, &self.hard_stop).await;
        let latency_ms = took.as_millis() as u64;
        match &committed {
            Some(Committed::Applied { from, lapse }) => {
                tracing::info!(account_id = %a.id, profile = %profile.name, outcome = outcome_name,
                    latency_ms, next_action_at = next, error = error.as_deref(), "refresh");
                if *lapse {
                    s.stats.lapses.fetch_add(1, Ordering::Relaxed);
                    s.metrics.lapse(&profile.name, 1);
                    tracing::error!(account_id = %a.id, profile = %profile.name,
                        expired_for_s = r.lapsed_by.unwrap_or(0),
                        "lapse: the access token expired before its refresh was stored");
                }
                if *from != to {
                    log_transition(&a.id, *from, to, reason.as_deref());
                    s.state_changed();
                }
                if result.is_ok() && was_paused && s.pauses.resume(&profile.name) {
                    self.resume_profile(rt, profile, now).await;
                }
                if rotated && profile.revoke_superseded {
                    self.revoke_later(rt, profile, presented, "superseded");
                }
            }
            Some(Committed::Superseded) | Some(Committed::Gone) => {
                tracing::warn!(account_id = %a.id, profile = %profile.name, outcome = outcome_name,
                    "the account changed while its refresh was in flight (relinked, removed, or refreshed by another tokend): its row wins, the pair just received is revoked");
                if let Some(fresh) = new_refresh {
                    self.revoke_later(rt, profile, fresh, "unused");
                }
            }
            Some(Committed::Stale) => {
                tracing::info!(account_id = %a.id, profile = %profile.name, outcome = outcome_name,
                    "the account was relinked or taken over while its refresh was in flight; its row wins");
            }
            None => {}
        }
    }

    /// Revoke a refresh token that tokend no longer needs (RFC 7009), when the profile has a
    /// free request slot. A failure is logged and never touches the account.
    fn revoke_later(
        &self,
        _rt: &Runtime,
        profile: &Profile,
        token: secrecy::SecretString,
        why: &'static str,
    ) {
        let mut q = lock(&self.revocations);
        if q.len() >= MAX_REVOCATIONS {
            q.pop_front();
            if self.shared.first_time("revocation backlog", &profile.name) {
                tracing::warn!(profile = %profile.name, "more than {MAX_REVOCATIONS} refresh tokens wait to be revoked: dropping the oldest (they stay usable at the provider)");
            }
        }
        q.push_back(Revocation {
            profile: profile.name.clone(),
            token,
            why,
        });
        drop(q);
        self.wake.notify_one();
    }

    /// Send queued revocations into the request slots refreshes left free.
    fn send_revocations(self: &Arc<Self>, rt: &Arc<Runtime>) {
        let s = &self.shared;
        let ceiling = rt.config.daemon.max_concurrent_refreshes.get();
        let mut q = lock(&self.revocations);
        let mut kept = std::collections::VecDeque::new();
        while let Some(r) = q.pop_front() {
            let room = ceiling.saturating_sub(s.limits.in_flight());
            let Some(profile) = rt.config.profile(&r.profile) else {
                continue;
            };
            if room == 0
                || s.limits.free(&r.profile, ceiling) == 0
                || self.queued(Some(&r.profile)) > 0
                || s.pauses.is_paused(&r.profile)
            {
                kept.push_back(r);
                continue;
            }
            s.limits.started(&r.profile, ceiling);
            let provider = rt.provider.clone();
            let profile = profile.clone();
            let me = self.clone();
            self.tracker.spawn(async move {
                let started = Instant::now();
                let result = provider
                    .revoke(&profile, &r.token, crate::provider::TokenHint::RefreshToken)
                    .await;
                let signal = if result.is_ok() { Signal::Answered } else { Signal::Nothing };
                me.shared
                    .limits
                    .finished(&profile.name, started.elapsed(), signal, ceiling);
                if let Err(e) = result {
                    tracing::warn!(profile = %profile.name, error = %e, what = r.why,
                        "could not revoke a refresh token tokend no longer holds (the account is unaffected)");
                }
                me.wake.notify_one();
            });
        }
        *q = kept;
    }

    async fn breaker_record(&self, rt: &Runtime, profile: &Profile, failed: bool, now: i64) {
        let s = &self.shared;
        let d = &rt.config.daemon;
        let initial = d.retry_initial.get().max(Duration::from_secs(5));
        match s
            .breakers
            .record(&profile.name, failed, now, initial, d.retry_max.get())
        {
            Some(false) => {
                tracing::warn!(profile = %profile.name, "most requests to this profile fail: circuit open, probing with one request at a time");
            }
            Some(true) => {
                // Recovered: the accounts left failing are due at once, not at their backoff.
                let single = rt.config.single_profile().is_some();
                let woken = s
                    .store
                    .wake_failing(&profile.name, single, now)
                    .await
                    .unwrap_or(0);
                tracing::info!(profile = %profile.name, accounts = woken,
                    "profile answers again: circuit closed, failing accounts retried now");
                self.wake.notify_one();
            }
            None => {}
        }
    }

    async fn pause_profile(&self, rt: &Runtime, profile: &Profile, reason: &str, now: i64) {
        let s = &self.shared;
        let newly = s.pauses.pause(
            &profile.name,
            reason,
            &fingerprint(profile),
            now,
            pause_initial(rt),
            rt.config.daemon.retry_max.get(),
        );
        if newly {
            tracing::error!(profile = %profile.name, error = %reason,
                "profile misconfigured: pausing its accounts until it works again (they keep their tokens and are not marked needs_reauth)");
        }
        let single = rt.config.single_profile().is_some();
        let p = PausedProfile {
            name: profile.name.clone(),
            reason: reason.to_owned(),
            since: now,
            fingerprint: fingerprint(profile),
        };
        match s.store.pause_profile(p, single, now).await {
            Ok(n) if n > 0 => s.state_changed(),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(profile = %profile.name, error = %e, "cannot record the pause")
            }
        }
    }

    async fn resume_profile(&self, rt: &Runtime, profile: &Profile, now: i64) {
        let s = &self.shared;
        let single = rt.config.single_profile().is_some();
        match s
            .store
            .resume_profile(&profile.name, single, "profile works again", now)
            .await
        {
            Ok(n) => {
                tracing::info!(profile = %profile.name, accounts = n, "profile works again; its accounts resume");
                s.state_changed();
                self.evaluate_soon();
            }
            Err(e) => {
                tracing::error!(profile = %profile.name, error = %e, "cannot resume profile accounts")
            }
        }
    }

    /// When a paused profile's retry time comes, or its settings changed, let one of its user
    /// accounts try again. Returns whether it changed anything.
    async fn retry_paused(&self, rt: &Runtime, now: i64) -> bool {
        let s = &self.shared;
        let due = s
            .pauses
            .due(now, |name| rt.config.profile(name).map(fingerprint));
        let single = rt.config.single_profile().is_some();
        for r in &due {
            match s.store.probe_profile(&r.profile, single, now).await {
                Ok(true) => {
                    tracing::info!(profile = %r.profile, settings_changed = r.changed,
                        "retrying paused profile with one account")
                }
                Ok(false) => {
                    // No user account to probe with: nothing shows the profile is broken.
                    if s.pauses.resume(&r.profile)
                        && let Some(p) = rt.config.profile(&r.profile)
                    {
                        self.resume_profile(rt, p, now).await;
                    }
                }
                Err(e) => {
                    s.pauses.unused_probe(&r.profile);
                    tracing::error!(profile = %r.profile, error = %e, "cannot retry paused profile");
                }
            }
        }
        !due.is_empty()
    }

    /// A new configuration: rows of profiles that are gone are looked at again.
    async fn reloaded(&self) {
        let rt = self.shared.runtime();
        let names: Vec<String> = rt.config.profiles.iter().map(|p| p.name.clone()).collect();
        match self.shared.store.reevaluate_orphans(names).await {
            Ok(n) if n > 0 => {
                tracing::info!(accounts = n, "re-evaluating accounts whose profile changed");
                self.evaluate_soon();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot re-evaluate accounts after a reload"),
        }
    }

    async fn renew_leases(&self, rt: &Runtime) {
        let ids: Vec<String> = lock(&self.flights).keys().cloned().collect();
        // (A flight still being claimed has no lease yet; renewing it changes nothing.)
        if ids.is_empty() {
            return;
        }
        let until = self.shared.clock.now() + rt.config.daemon.lease.as_secs_i64();
        if let Err(e) = self
            .shared
            .store
            .renew_leases(&self.shared.owner, ids, until)
            .await
        {
            tracing::warn!(error = %e, "cannot renew the leases of refreshes in flight");
        }
    }

    /// Record events for refresh tokens newly at risk and tokens that lapsed.
    async fn sweep(&self, rt: &Runtime, now: i64) {
        let s = &self.shared;
        let d = &rt.config.daemon;
        let before =
            now - (d.refresh_token_lifetime.get() - d.refresh_token_margin.get()).as_secs() as i64;
        match s.store.sweep(before, now).await {
            Ok(found) => {
                for (id, profile) in &found.at_risk {
                    tracing::warn!(account_id = %id, profile = profile.as_deref().unwrap_or(""),
                        "refresh token nears the end of its lifetime; the account will need reauthorisation unless it refreshes");
                }
                for (id, profile) in &found.lapsed {
                    let p = profile.clone().unwrap_or_default();
                    s.metrics.lapse(&p, 1);
                    s.stats.lapses.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(account_id = %id, profile = %p,
                        "lapse: the access token of an account tokend keeps alive has expired and no refresh is stored yet");
                }
                if !found.at_risk.is_empty() || !found.lapsed.is_empty() {
                    s.state_changed();
                }
            }
            Err(e) => tracing::debug!(error = %e, "sweep skipped"),
        }
    }

    /// Refresh `id` now if policy allows (the minimum gap, the hourly ceiling, pauses, the
    /// breaker), as one flight with any refresh of it already under way here; returns once the
    /// outcome is committed, or says why not.
    pub async fn refresh_now(self: &Arc<Self>, id: &str) -> OnDemand {
        let s = &self.shared;
        // One flight per account: join one under way, or register ours before claiming.
        let joined = {
            let mut f = lock(&self.flights);
            match f.get(id) {
                Some(fl) => Err(fl.done.clone()),
                None => {
                    let (n, tx) = self.new_flight(&mut f, id);
                    Ok((n, tx, f.get(id).map(|fl| fl.done.clone())))
                }
            }
        };
        let (n, done, mut mine) = match joined {
            Ok(ours) => ours,
            Err(mut theirs) => {
                let _ = theirs.wait_for(|d| *d).await;
                return OnDemand::Done;
            }
        };
        let rt = s.runtime();
        let now = s.clock.now();
        let refused = |why: OnDemand| {
            self.end_flight(id, n, done.clone());
            why
        };
        let account = match s.store.get(id).await {
            Ok(Some(Ok(a))) => a,
            Ok(Some(Err(p))) => return refused(OnDemand::Refused(p.reason)),
            Ok(None) => return refused(OnDemand::Unknown),
            Err(e) => return refused(OnDemand::Refused(e.to_string())),
        };
        if account.token_type == TokenType::Company {
            return refused(OnDemand::Refused("company tokens are not refreshed".into()));
        }
        if let Some(p) = rt.config.profile_for(account.profile.as_deref()) {
            if s.pauses.is_paused(&p.name) {
                return refused(OnDemand::NotBefore(
                    now + 60,
                    format!("its profile {} is paused", p.name),
                ));
            }
            if let Admit::Defer(until) = s.breakers.peek(&p.name, now) {
                return refused(OnDemand::NotBefore(
                    until,
                    "most requests to its profile fail (circuit open)".into(),
                ));
            }
        }
        // What policy says, read-only first: refusing writes nothing (an API call never moves
        // an account's schedule).
        let cx = Cx {
            config: &rt.config,
            now,
        };
        if let Decision::Write(ch) = policy::plan(&cx, &account, Admission::Open) {
            return refused(match ch.next_action_at {
                Some(t) if ch.to.is_schedulable() => OnDemand::NotBefore(
                    t,
                    ch.last_error.unwrap_or_else(|| {
                        "too soon after the last refresh (the minimum gap)".into()
                    }),
                ),
                _ => OnDemand::Refused(ch.reason.unwrap_or_else(|| ch.to.to_string())),
            });
        }
        let config = rt.clone();
        let claimed = s
            .store
            .claim_one(id, self.lease(&rt, now), move |a| {
                let cx = Cx {
                    config: &config.config,
                    now,
                };
                // Whatever changed since the read is left for the loop to decide.
                match policy::plan(&cx, a, Admission::Open) {
                    Decision::Request => Decision::Request,
                    _ => Decision::Keep,
                }
            })
            .await;
        match claimed {
            Ok(Some((a, Decision::Request))) => {
                self.spawn_refresh(rt.clone(), a, Some((n, done)));
                if let Some(rx) = mine.as_mut() {
                    let _ = rx.wait_for(|d| *d).await;
                }
                OnDemand::Done
            }
            Ok(Some((_, Decision::Keep))) => {
                self.end_flight(id, n, done);
                // Leased: by this engine's loop a moment ago (then wait for its flight), or by
                // another process.
                let theirs = {
                    let f = lock(&self.flights);
                    f.get(id).map(|fl| fl.done.clone())
                };
                match theirs {
                    Some(mut rx) => {
                        let _ = rx.wait_for(|d| *d).await;
                        OnDemand::Done
                    }
                    None => OnDemand::HeldElsewhere,
                }
            }
            Ok(Some((_, Decision::Write(ch)))) => {
                s.state_changed();
                refused(match ch.next_action_at {
                    Some(t) if ch.to.is_schedulable() => OnDemand::NotBefore(
                        t,
                        ch.last_error.unwrap_or_else(|| {
                            "too soon after the last refresh (the minimum gap)".into()
                        }),
                    ),
                    _ => OnDemand::Refused(ch.reason.unwrap_or_else(|| ch.to.to_string())),
                })
            }
            Ok(Some((_, Decision::Probe))) => {
                refused(OnDemand::Refused("not a user account".into()))
            }
            Ok(None) => refused(OnDemand::Unknown),
            Err(e) => refused(OnDemand::Refused(e.to_string())),
        }
    }
}

/// What the loop remembers between turns.
struct Turn {
    /// The earliest scheduled action we know of.
    known_next: Option<i64>,
    /// Whether `known_next` may be stale.
    dirty: bool,
    /// Whether new or relinked rows may be waiting (another connection committed).
    look_for_new: bool,
    data_version: Option<i64>,
    last_poll: Instant,
    last_renew: Instant,
    last_sweep: Instant,
}

/// The claim groups of a configuration: one per profile.
fn groups(rt: &Runtime) -> Vec<Option<String>> {
    rt.config
        .profiles
        .iter()
        .map(|p| Some(p.name.clone()))
        .collect()
}

/// An account's admission, from its profile's (a row naming no profile belongs to the only
/// one); `Open` for a profile not in `admissions`.
fn admission_of(rt: &Runtime, admissions: &HashMap<String, Admission>, a: &Account) -> Admission {
    rt.config
        .profile_for(a.profile.as_deref())
        .and_then(|p| admissions.get(&p.name).copied())
        .unwrap_or(Admission::Open)
}

fn pause_initial(rt: &Runtime) -> Duration {
    rt.config
        .daemon
        .retry_initial
        .get()
        .max(Duration::from_secs(30))
}

/// A fingerprint of everything about a profile that affects its requests, so a reload (or a
/// restart) can tell whether a paused profile changed, without keeping its secret in the clear.
pub fn fingerprint(p: &Profile) -> String {
    use secrecy::ExposeSecret;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        p.base_url.as_str(),
        p.client_id.as_str(),
        p.client_secret.expose_secret(),
        &p.scopes.join(" "),
    ] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    ctx.finish()
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn log_changes(changes: &[(String, State, State, Option<String>)]) {
    for (id, from, to, reason) in changes {
        log_transition(id, *from, *to, reason.as_deref());
    }
}

/// One line per state change: INFO for recovery, WARN for failing/paused, ERROR for the states
/// only a person can fix.
pub fn log_transition(id: &str, from: State, to: State, reason: Option<&str>) {
    let reason = reason.unwrap_or("");
    let state = to;
    let (from, to) = (from.as_str(), to.as_str());
    match state {
        State::Active => tracing::info!(account_id = %id, from, to, reason, "account state"),
        State::Failing | State::Paused => {
            tracing::warn!(account_id = %id, from, to, reason, "account state")
        }
        State::NeedsReauth | State::Revoked | State::Invalid => {
            tracing::error!(account_id = %id, from, to, reason, "account state")
        }
    }
}
