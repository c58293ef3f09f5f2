//! The refresh engine: sleeps until the next account is due, claims due accounts from the store
//! (a lease recorded in the database), refreshes them with bounded concurrency, and writes each
//! outcome back through the store before doing anything else with it.
//!
//! One account's problem never stops the others: a bad row becomes `invalid`, a dead grant
//! `needs_reauth`, a profile with a wrong secret is paused as a whole, transient failures back off.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::ExposeSecret;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::breaker::{Admit, Breakers};
use crate::config::{Config, DaemonConfig, Profile, TokenType};
use crate::provider::{Grant, Provider, RefreshError};
use crate::state::State;
use crate::store::{Account, Applied, NewTokens, Store, Update};

/// How often the engine asks SQLite whether another program committed (new or relinked rows).
pub const CHANGE_POLL: Duration = Duration::from_secs(1);

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The first whole unix second at or after `delay` from now (so a Retry-After is never cut short).
pub fn unix_after(delay: Duration) -> i64 {
    let at = SystemTime::now() + delay;
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_secs() as i64 + i64::from(d.subsec_nanos() > 0)
}

/// Time from now until the start of unix second `t` (zero if past).
fn until_unix(t: i64) -> Duration {
    let at = UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// The configuration in force and the client built from it; swapped whole on reload.
pub struct Runtime {
    pub config: Config,
    pub provider: Provider,
}

impl Runtime {
    pub fn new(config: Config) -> anyhow::Result<Runtime> {
        let provider = Provider::new(&config.daemon)?;
        Ok(Runtime { config, provider })
    }
}

/// What the engine has done since start, for the health file and `STATUS=`.
#[derive(Default)]
pub struct Stats {
    pub refreshes_ok: AtomicU64,
    pub refreshes_failed: AtomicU64,
    pub probes_ok: AtomicU64,
    pub probes_failed: AtomicU64,
    /// Bumped whenever the engine gets through a loop turn: the watchdog's proof of progress.
    pub heartbeat: AtomicU64,
    /// Bumped on every write of ours and every commit seen from another connection: the health
    /// writer recounts accounts only when it moved.
    pub generation: AtomicU64,
    pub store_unwritable: AtomicBool,
    /// Outcomes the store has refused so far and that are being retried.
    pub uncommitted: std::sync::atomic::AtomicUsize,
    pub last_errors: Mutex<HashMap<&'static str, (String, i64)>>,
    pub store_error: Mutex<Option<String>>,
}

impl Stats {
    pub fn record_error(&self, kind: &'static str, msg: &str) {
        if let Ok(mut m) = self.last_errors.lock() {
            m.insert(kind, (msg.to_owned(), unix_now()));
        }
    }
}

#[derive(Debug, Clone)]
struct PausedProfile {
    fingerprint: u64,
    retry_at: i64,
    backoff: Duration,
    reason: String,
    /// One request may go out to find out whether the profile works again.
    probe_allowed: bool,
}

fn pause_backoff_initial(d: &DaemonConfig) -> Duration {
    d.retry_initial.get().max(Duration::from_secs(30))
}

/// Shared between the loop and its per-account tasks.
pub struct Engine {
    store: Store,
    runtime: watch::Receiver<Arc<Runtime>>,
    owner: String,
    pub stats: Arc<Stats>,
    /// Rung on every state change, for the health writer.
    pub changed: Arc<Notify>,
    wake: Notify,
    paused: Mutex<HashMap<String, PausedProfile>>,
    breakers: Breakers,
    at_risk_logged: Mutex<HashSet<String>>,
}

impl Engine {
    pub fn new(store: Store, runtime: watch::Receiver<Arc<Runtime>>, owner: String) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            runtime,
            owner,
            stats: Arc::new(Stats::default()),
            changed: Arc::new(Notify::new()),
            wake: Notify::new(),
            paused: Mutex::new(HashMap::new()),
            breakers: Breakers::default(),
            at_risk_logged: Mutex::new(HashSet::new()),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn rt(&self) -> Arc<Runtime> {
        self.runtime.borrow().clone()
    }

    /// The configuration and client in force now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.rt()
    }

    /// Profiles paused for misconfiguration, with the reason.
    pub fn paused_profiles(&self) -> Vec<(String, String)> {
        self.paused
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.reason.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Something in the store changed state: recount for the health file.
    fn state_changed(&self) {
        self.stats.generation.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Wake the loop (a reload, a resumed profile).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// The engine loop. Returns once `shutdown` fires and every in-flight refresh has been
    /// committed (or `hard_stop` fires first).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, hard_stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut limit = self.rt().config.daemon.max_concurrent_refreshes.get();
        let permits = Arc::new(Semaphore::new(limit));
        // Bounds the rows looked at but not yet written back (new rows being scheduled).
        let evaluating = Arc::new(Semaphore::new(EVAL_IN_FLIGHT));
        let mut runtime = self.runtime.clone();
        let mut data_version = self.store.data_version().await.ok();
        let mut last_change_poll = Instant::now();
        let mut look_for_new = true;
        // The earliest scheduled action we know of, and whether it may be stale.
        let mut known_next: Option<i64> = None;
        let mut dirty = true;
        loop {
            self.stats.heartbeat.fetch_add(1, Ordering::Relaxed);
            if shutdown.is_cancelled() {
                break;
            }
            let rt = self.rt();
            let want = rt.config.daemon.max_concurrent_refreshes.get();
            if want > limit {
                permits.add_permits(want - limit);
                limit = want;
            } else if want < limit {
                limit -= permits.forget_permits(limit - want);
            }
            dirty |= self.resume_due_profiles(&rt.config).await;

            // Nothing can be due before the earliest scheduled time we know of, unless
            // something changed since we looked: then skip the claims (write transactions).
            let now = unix_now();
            let may_be_due = dirty || look_for_new || known_next.is_none_or(|t| t <= now);
            // While refused outcomes wait in memory, start nothing new.
            let writable = self.stats.uncommitted.load(Ordering::Relaxed) == 0;
            let mut more = false;
            if writable && may_be_due {
                // New or relinked rows exist only after another connection committed.
                // (`None`: the claim failed or slots are full; look again next turn.)
                if look_for_new
                    && let Some(full) = self
                        .evaluate_new(&rt, &evaluating, &tracker, &hard_stop)
                        .await
                {
                    look_for_new = full;
                    more |= full;
                }
                more |= self.refresh_due(&rt, &permits, &tracker, &hard_stop).await;
            }
            if !more && (dirty || may_be_due) {
                known_next = self.store.next_due().await.ok().flatten();
                dirty = false;
            }

            // Sleep until the next due time, a freed slot (if work is waiting), a change by
            // another program (polled cheaply), a reload, or shutdown.
            let now = unix_now();
            let until_due = match known_next {
                _ if more => Duration::ZERO,
                Some(t) if t <= now => {
                    // Due but held by a lease (ours in flight, or another instance's): look
                    // again when something finishes, or soon.
                    Duration::from_millis(250)
                }
                Some(t) => until_unix(t),
                None => Duration::from_secs(3600),
            };
            let poll_in = CHANGE_POLL.saturating_sub(last_change_poll.elapsed());
            let sleep = until_due.min(poll_in);
            if !sleep.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(sleep) => {}
                    _ = self.wake.notified() => dirty = true,
                    _ = runtime.changed() => dirty = true,
                }
            } else if more && permits.available_permits() == 0 {
                // Work is waiting for a free slot.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wake.notified() => dirty = true,
                    _ = tokio::time::sleep(poll_in.max(Duration::from_millis(10))) => {}
                }
            }
            if last_change_poll.elapsed() >= CHANGE_POLL {
                last_change_poll = Instant::now();
                let v = self.store.data_version().await.ok();
                if v != data_version || v.is_none() {
                    data_version = v;
                    look_for_new = true;
                    dirty = true;
                    self.stats.generation.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("database changed by another connection");
                }
            }
        }
        tracker.close();
        tokio::select! {
            _ = tracker.wait() => {}
            _ = hard_stop.cancelled() => {
                tracing::warn!("shutdown timeout reached with refreshes still in flight");
            }
        }
    }

    /// Look at rows inserted or changed by other programs and schedule them (no requests here:
    /// one already due is scheduled for now and taken by [`Self::refresh_due`]). Returns whether
    /// more may be waiting, or `None` when the claim failed.
    async fn evaluate_new(
        self: &Arc<Self>,
        rt: &Arc<Runtime>,
        evaluating: &Arc<Semaphore>,
        tracker: &TaskTracker,
        hard_stop: &CancellationToken,
    ) -> Option<bool> {
        let room = evaluating.available_permits().min(EVAL_BATCH);
        if room == 0 {
            // Still writing back the last batches; their completion wakes the loop.
            return None;
        }
        let now = unix_now();
        let accounts = self.claim(rt, now, room, true).await?;
        let more = accounts.len() == room;
        for a in accounts {
            let Ok(slot) = evaluating.clone().try_acquire_owned() else {
                let _ = self.store.release(&a.id, &self.owner).await;
                continue;
            };
            let update = self.schedule(rt, &a, now);
            let engine = self.clone();
            let hard = hard_stop.clone();
            tracker.spawn(async move {
                engine.commit(update, &hard).await;
                drop(slot);
                engine.wake.notify_one();
            });
        }
        Some(more)
    }

    /// Claim due rows for the free request slots and refresh them. Returns whether more may be due.
    async fn refresh_due(
        self: &Arc<Self>,
        rt: &Arc<Runtime>,
        permits: &Arc<Semaphore>,
        tracker: &TaskTracker,
        hard_stop: &CancellationToken,
    ) -> bool {
        let free = permits.available_permits();
        if free == 0 {
            return true;
        }
        let now = unix_now();
        let Some(accounts) = self.claim(rt, now, free, false).await else {
            return false;
        };
        let more = accounts.len() == free;
        for a in accounts {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                let _ = self.store.release(&a.id, &self.owner).await;
                continue;
            };
            let plan = self.plan(rt, &a, now);
            let engine = self.clone();
            let hard = hard_stop.clone();
            let rt = rt.clone();
            tracker.spawn(async move {
                let update = match plan {
                    Plan::Write(u) => u,
                    Plan::Refresh(job) => engine.refresh(&rt, *job).await,
                };
                engine.commit(update, &hard).await;
                drop(permit);
                engine.wake.notify_one();
            });
        }
        more
    }

    /// Lease up to `limit` rows (new ones with `fresh`, else due ones); `None` when the store
    /// refused, which is recorded for the health file.
    async fn claim(
        &self,
        rt: &Runtime,
        now: i64,
        limit: usize,
        fresh: bool,
    ) -> Option<Vec<Account>> {
        let lease_until = now + rt.config.daemon.lease.as_secs_i64();
        match self
            .store
            .claim_due(now, limit, &self.owner, lease_until, fresh)
            .await
        {
            Ok(a) => Some(a),
            Err(e) => {
                self.claim_failed(&e);
                None
            }
        }
    }

    fn claim_failed(&self, e: &crate::store::StoreError) {
        if !self.stats.store_unwritable.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "cannot claim accounts: the store does not accept writes");
            self.state_changed();
        }
        if let Ok(mut m) = self.stats.store_error.lock() {
            *m = Some(e.to_string());
        }
        self.stats.record_error("store", &e.to_string());
    }

    fn store_writes_again(&self) {
        if self.stats.uncommitted.load(Ordering::Relaxed) == 0
            && self.stats.store_unwritable.swap(false, Ordering::Relaxed)
        {
            tracing::info!("the store accepts writes again");
            if let Ok(mut e) = self.stats.store_error.lock() {
                *e = None;
            }
            self.state_changed();
            self.wake.notify_one();
        }
    }

    /// When a paused profile's retry time comes, or its config changed, let one of its accounts
    /// try again. Returns whether it changed anything.
    async fn resume_due_profiles(&self, config: &Config) -> bool {
        let now = unix_now();
        let due: Vec<String> = {
            let Ok(mut paused) = self.paused.lock() else {
                return false;
            };
            // A profile that left the config no longer pauses anything.
            paused.retain(|name, _| config.profile(name).is_some());
            paused
                .iter_mut()
                .filter_map(|(name, p)| {
                    let fingerprint = config.profile(name)?.fingerprint();
                    let changed = fingerprint != p.fingerprint;
                    if !changed && (p.retry_at > now || p.probe_allowed) {
                        return None;
                    }
                    if changed {
                        p.fingerprint = fingerprint;
                        p.backoff = pause_backoff_initial(&config.daemon);
                    }
                    p.retry_at = now + p.backoff.as_secs() as i64;
                    p.backoff = (p.backoff * 2).min(config.daemon.retry_max.get().max(p.backoff));
                    p.probe_allowed = true;
                    Some(name.clone())
                })
                .collect()
        };
        let changed = !due.is_empty();
        for name in due {
            let is_default = config.profiles.len() == 1;
            match self
                .store
                .resume_profile(&name, is_default, "profile retried", now, Some(1))
                .await
            {
                Ok(n) if n > 0 => {
                    tracing::info!(profile = %name, "retrying paused profile with one account");
                }
                Ok(_) => {}
                Err(e) => tracing::error!(profile = %name, error = %e, "cannot resume profile"),
            }
        }
        changed
    }

    /// Commit an outcome; if the store cannot write, keep it and try again until it can.
    pub async fn commit(&self, update: Update, hard_stop: &CancellationToken) {
        let mut delay = Duration::from_millis(100);
        let mut held = false;
        loop {
            match self.store.apply(update.clone(), &self.owner).await {
                Ok(applied) => {
                    self.stats.generation.fetch_add(1, Ordering::Relaxed);
                    if held {
                        self.stats.uncommitted.fetch_sub(1, Ordering::Relaxed);
                        tracing::info!(account_id = %update.id, "held outcome committed");
                    }
                    self.store_writes_again();
                    match applied {
                        Applied::Yes if update.from != Some(update.to) => {
                            log_transition(&update);
                            self.state_changed();
                        }
                        Applied::Yes => {}
                        Applied::Stale => tracing::warn!(
                            account_id = %update.id,
                            "account changed by another program while being handled; its new row wins"
                        ),
                    }
                    return;
                }
                Err(e) => {
                    if !held {
                        held = true;
                        self.stats.uncommitted.fetch_add(1, Ordering::Relaxed);
                    }
                    if !self.stats.store_unwritable.swap(true, Ordering::Relaxed) {
                        tracing::error!(error = %e, "the store cannot write; holding outcomes in memory and retrying");
                        self.state_changed();
                    }
                    if let Ok(mut m) = self.stats.store_error.lock() {
                        *m = Some(e.to_string());
                    }
                    self.stats.record_error("store", &e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = hard_stop.cancelled() => {
                            tracing::error!(account_id = %update.id, "giving up an uncommitted outcome at forced stop");
                            return;
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Judge a claimed row written by whoever: an update to write without any request
    /// (invalid row, company token, dead refresh token), or what scheduling it needs to know.
    fn judge<'r>(&self, rt: &'r Runtime, a: &Account, now: i64) -> Result<Judged<'r>, Box<Update>> {
        let d = &rt.config.daemon;
        let prior = State::parse(&a.state);
        let (profile, token_type) = validate(&rt.config, a, now).map_err(|reason| {
            Box::new(
                update(a, prior, State::Invalid, Some(reason.clone()), None, now)
                    .with_error(reason),
            )
        })?;
        let relinked = prior.is_none_or(State::is_terminal);
        if token_type == TokenType::Company {
            // Company tokens never expire; the revocation checks look after them.
            let reason = relinked.then(|| "company token linked".to_owned());
            return Err(Box::new(update(a, prior, keep(prior), reason, None, now)));
        }

        // Refresh-token age: past its lifetime the grant is dead, so no request is wasted.
        let issued = a.refresh_issued_at.filter(|t| *t > 0 && *t <= now + 86_400);
        if let Some(issued) = issued {
            let age = now - issued;
            if age >= d.refresh_token_lifetime.as_secs_i64() {
                let reason = format!(
                    "refresh token is {}h old, past its {}h lifetime",
                    age / 3600,
                    d.refresh_token_lifetime.as_secs_i64() / 3600
                );
                return Err(Box::new(
                    update(
                        a,
                        prior,
                        State::NeedsReauth,
                        Some(reason.clone()),
                        None,
                        now,
                    )
                    .with_error(reason),
                ));
            }
            if age
                >= (d.refresh_token_lifetime.get() - d.refresh_token_margin.get()).as_secs() as i64
                && self
                    .at_risk_logged
                    .lock()
                    .is_ok_and(|mut s| s.insert(a.id.clone()))
            {
                tracing::warn!(account_id = %a.id, profile = %profile.name, age_hours = age / 3600,
                    "refresh token nears the end of its lifetime; the account will need reauthorisation unless it refreshes");
            }
        }
        Ok(Judged {
            profile,
            prior,
            relinked,
            // An expiry that is missing or absurd is unknown: refreshing yields a real one.
            expires_at: a.expires_at.filter(|e| *e > 0 && *e < now + 366 * 86_400),
        })
    }

    /// A new or relinked row: schedule it (for now, if it is already due). Never a request.
    fn schedule(&self, rt: &Runtime, a: &Account, now: i64) -> Update {
        let j = match self.judge(rt, a, now) {
            Ok(j) => j,
            Err(u) => return *u,
        };
        let has_access = a
            .access_token
            .as_ref()
            .is_some_and(|t| !t.expose_secret().is_empty());
        let due = match j.expires_at {
            Some(e) if has_access => due_time(e, &rt.config.daemon).max(now),
            _ => now,
        };
        let reason = j.relinked.then(|| "new grant written".to_owned());
        let mut u = update(a, j.prior, keep(j.prior), reason, Some(due), now);
        u.failures = a.failures;
        u
    }

    /// A row whose time came: refresh it, unless its profile is paused or its breaker open.
    fn plan(&self, rt: &Runtime, a: &Account, now: i64) -> Plan {
        let j = match self.judge(rt, a, now) {
            Ok(j) => j,
            Err(u) => return Plan::Write(*u),
        };
        let name = &j.profile.name;
        if !self.may_request(name) {
            let reason = Some("profile is paused".to_owned());
            return Plan::Write(update(a, j.prior, State::Paused, reason, None, now));
        }
        if let Admit::Defer(until) = self.breakers.admit(name, now) {
            // The profile's server is mostly failing: wait for the breaker's probe, no request.
            let reason = format!("circuit open for profile {name}: most requests fail");
            let mut u = update(
                a,
                j.prior,
                State::Failing,
                Some(reason.clone()),
                Some(until),
                now,
            )
            .with_error(reason);
            u.failures = a.failures;
            return Plan::Write(u);
        }
        Plan::Refresh(Box::new(RefreshJob {
            account: a.clone(),
            profile: j.profile.clone(),
            prior: j.prior,
            expires_at: j.expires_at,
        }))
    }

    /// Make the request for one account and say what to write back.
    async fn refresh(&self, rt: &Runtime, job: RefreshJob) -> Update {
        let d = &rt.config.daemon;
        let RefreshJob {
            account: a,
            profile,
            prior,
            expires_at,
        } = job;
        let started = Instant::now();
        let now = unix_now();
        let Some(refresh_token) = a.refresh_token.clone() else {
            let reason = "user token without a refresh_token".to_owned();
            return update(&a, prior, State::Invalid, Some(reason.clone()), None, now)
                .with_error(reason);
        };
        let result = rt.provider.refresh(&profile, &refresh_token, now).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        let now = unix_now();
        match result {
            Ok(grant) => {
                self.stats.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                self.breaker_record(rt, &profile, false, now).await;
                if self.unpause(&profile.name) {
                    self.resume_profile_all(&rt.config, &profile.name, now)
                        .await;
                }
                self.at_risk_logged.lock().map(|mut s| s.remove(&a.id)).ok();
                // STOPGAP until the engine rewrite: a grant without an access token or a known
                // lifetime keeps what was rotated and is retried with backoff as failing.
                let expires_at = grant.expires_at().filter(|_| grant.access_token.is_some());
                let Some(expires_at) = expires_at else {
                    let missing = grant
                        .access_token
                        .is_none()
                        .then(|| "no usable access_token".to_owned());
                    let problems: Vec<String> = missing
                        .into_iter()
                        .chain(grant.expiry_problem.clone())
                        .collect();
                    let reason = format!("incomplete token response: {}", problems.join("; "));
                    self.stats.record_error("refresh", &reason);
                    let failures = a.failures.saturating_add(1);
                    let next = unix_after(backoff(d, failures).max(Duration::from_secs(1)));
                    tracing::warn!(account_id = %a.id, profile = %profile.name, outcome = "incomplete",
                        error = %reason, latency_ms, failures, next_action_at = next, "refresh kept the rotated token; will retry");
                    let mut u = update(
                        &a,
                        prior,
                        State::Failing,
                        Some(reason.clone()),
                        Some(next),
                        now,
                    )
                    .with_error(reason);
                    u.failures = failures;
                    u.tokens = Some(new_tokens(grant, now));
                    return u;
                };
                let next = due_time(expires_at, d);
                tracing::info!(account_id = %a.id, profile = %profile.name, outcome = "refreshed",
                    latency_ms, expires_at, next_action_at = next, "refresh");
                let reason = (prior != Some(State::Active)).then(|| "refreshed".to_owned());
                let mut u = update(&a, prior, State::Active, reason, Some(next), now);
                u.tokens = Some(new_tokens(grant, now));
                u
            }
            Err(RefreshError::InvalidGrant(desc)) => {
                self.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                // The server answered: as far as the breaker is concerned, it works.
                self.breaker_record(rt, &profile, false, now).await;
                let reason = format!("invalid_grant: {desc}");
                self.stats.record_error("refresh", &reason);
                tracing::info!(account_id = %a.id, profile = %profile.name, outcome = "invalid_grant",
                    latency_ms, next_action_at = "none: needs reauthorisation", "refresh");
                update(
                    &a,
                    prior,
                    State::NeedsReauth,
                    Some("the provider rejected the grant (invalid_grant)".into()),
                    None,
                    now,
                )
                .with_error(reason)
            }
            Err(RefreshError::Misconfigured { code, description }) => {
                self.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                let reason = format!("profile {}: {code}: {description}", profile.name);
                self.stats.record_error("profile", &reason);
                tracing::info!(account_id = %a.id, profile = %profile.name, outcome = %code,
                    latency_ms, next_action_at = "none: profile paused", "refresh");
                self.pause_profile(&rt.config, &profile, &reason, now).await;
                let mut u = update(&a, prior, State::Paused, Some(reason.clone()), None, now)
                    .with_error(reason);
                u.failures = a.failures;
                u
            }
            Err(RefreshError::Transient {
                reason,
                retry_after,
            }) => {
                self.stats.refreshes_failed.fetch_add(1, Ordering::Relaxed);
                self.stats.record_error("refresh", &reason);
                self.breaker_record(rt, &profile, true, now).await;
                let failures = a.failures.saturating_add(1);
                let delay = backoff(d, failures).max(retry_after.unwrap_or_default());
                let next = unix_after(delay.max(Duration::from_secs(1)));
                let left = expires_at.map(|e| e - now);
                tracing::warn!(account_id = %a.id, profile = %profile.name, outcome = "transient",
                    error = %reason, latency_ms, failures, expires_in_s = left, next_action_at = next,
                    "refresh failed; will retry");
                let mut u = update(
                    &a,
                    prior,
                    State::Failing,
                    Some(reason.clone()),
                    Some(next),
                    now,
                )
                .with_error(reason);
                u.failures = failures;
                u
            }
        }
    }

    async fn breaker_record(&self, rt: &Runtime, profile: &Profile, failed: bool, now: i64) {
        let d = &rt.config.daemon;
        let initial = d.retry_initial.get().max(Duration::from_secs(5));
        match self
            .breakers
            .record(&profile.name, failed, now, initial, d.retry_max.get())
        {
            Some(false) => {
                tracing::warn!(profile = %profile.name, "most requests to this profile fail: circuit open, probing with one request at a time");
            }
            Some(true) => {
                // Recovered: the accounts left failing are due at once, not at their backoff.
                let is_default = rt.config.profiles.len() == 1;
                let woken = self
                    .store
                    .wake_failing(&profile.name, is_default, now)
                    .await
                    .unwrap_or(0);
                tracing::info!(profile = %profile.name, accounts = woken,
                    "profile answers again: circuit closed, failing accounts retried now");
                self.wake.notify_one();
            }
            None => {}
        }
    }

    /// Profiles whose circuit breaker is open.
    pub fn open_circuits(&self) -> Vec<String> {
        self.breakers.open()
    }

    /// Whether a request may go to `profile`: always unless it is paused, and then once per
    /// retry (the probe that finds out whether it works again).
    fn may_request(&self, profile: &str) -> bool {
        let Ok(mut m) = self.paused.lock() else {
            return false;
        };
        match m.get_mut(profile) {
            None => true,
            Some(p) => std::mem::take(&mut p.probe_allowed),
        }
    }

    /// Returns whether the profile was paused.
    fn unpause(&self, profile: &str) -> bool {
        self.paused
            .lock()
            .is_ok_and(|mut m| m.remove(profile).is_some())
    }

    async fn pause_profile(&self, config: &Config, profile: &Profile, reason: &str, now: i64) {
        let newly = {
            let Ok(mut m) = self.paused.lock() else {
                return;
            };
            let fingerprint = profile.fingerprint();
            let initial = pause_backoff_initial(&config.daemon);
            let fresh = !m.contains_key(&profile.name);
            let entry = m.entry(profile.name.clone()).or_insert(PausedProfile {
                fingerprint,
                retry_at: now + initial.as_secs() as i64,
                backoff: initial,
                reason: reason.to_owned(),
                probe_allowed: false,
            });
            entry.reason = reason.to_owned();
            fresh
        };
        if newly {
            tracing::error!(profile = %profile.name, error = %reason,
                "profile misconfigured: pausing its accounts until it works again (they are not marked needs_reauth)");
        }
        let is_default = config.profiles.len() == 1;
        match self
            .store
            .pause_profile(&profile.name, is_default, reason, now)
            .await
        {
            Ok(n) if n > 0 => {
                self.state_changed();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(profile = %profile.name, error = %e, "cannot pause profile accounts")
            }
        }
    }

    async fn resume_profile_all(&self, config: &Config, profile: &str, now: i64) {
        let is_default = config.profiles.len() == 1;
        match self
            .store
            .resume_profile(profile, is_default, "profile works again", now, None)
            .await
        {
            Ok(n) => {
                tracing::info!(profile = %profile, accounts = n, "profile works again; its accounts resume");
                self.state_changed();
                self.wake.notify_one();
            }
            Err(e) => {
                tracing::error!(profile = %profile, error = %e, "cannot resume profile accounts")
            }
        }
    }
}

/// Most rows looked at per claim, and in flight at once, when scheduling new rows.
const EVAL_BATCH: usize = 512;
const EVAL_IN_FLIGHT: usize = 2048;

enum Plan {
    Write(Update),
    Refresh(Box<RefreshJob>),
}

struct RefreshJob {
    account: Account,
    profile: Profile,
    prior: Option<State>,
    expires_at: Option<i64>,
}

/// What [`Engine::judge`] learnt of a row that needs scheduling.
struct Judged<'r> {
    profile: &'r Profile,
    prior: Option<State>,
    /// The row came out of a terminal state (or an unknown one): a new grant was written.
    relinked: bool,
    expires_at: Option<i64>,
}

/// The state a row keeps when it is rescheduled: unknown or terminal states start over.
fn keep(prior: Option<State>) -> State {
    match prior {
        Some(State::Failing) => State::Failing,
        _ => State::Active,
    }
}

/// An update of `a` from `prior` to `to`, with no tokens and no error.
fn update(
    a: &Account,
    prior: Option<State>,
    to: State,
    reason: Option<String>,
    next_action_at: Option<i64>,
    now: i64,
) -> Update {
    Update {
        id: a.id.clone(),
        revision: a.revision,
        from: prior,
        to,
        reason,
        tokens: None,
        next_action_at,
        failures: 0,
        last_error: None,
        checked_at: None,
        now,
    }
}

trait WithError {
    fn with_error(self, e: String) -> Self;
}

impl WithError for Update {
    fn with_error(mut self, e: String) -> Self {
        self.last_error = Some(e);
        self
    }
}

fn new_tokens(grant: Grant, now: i64) -> NewTokens {
    let rotated = grant.refresh_token.is_some();
    NewTokens {
        // STOPGAP: the store always writes an access token; an empty one reads as none, and an
        // unknown expiry as "now".
        expires_at: grant.expires_at().unwrap_or(now),
        access_token: grant
            .access_token
            .unwrap_or_else(|| secrecy::SecretString::from("")),
        // No refresh_token in the answer: keep the one we have (COALESCE in the store).
        refresh_token: grant.refresh_token,
        refresh_issued_at: rotated.then_some(now),
        scopes: grant.scopes,
    }
}

/// When to refresh a token expiring at `expires_at`: `lead` plus up to `jitter` before it.
pub fn due_time(expires_at: i64, d: &DaemonConfig) -> i64 {
    let jitter = d.refresh_jitter.as_secs_i64();
    let spread = if jitter > 0 {
        fastrand::i64(0..=jitter)
    } else {
        0
    };
    expires_at - d.refresh_lead.as_secs_i64() - spread
}

/// Exponential backoff with full jitter between half and all of the step.
pub fn backoff(d: &DaemonConfig, failures: u32) -> Duration {
    let initial = d.retry_initial.get().as_secs_f64();
    let step = initial * 2f64.powi(failures.saturating_sub(1).min(30) as i32);
    let capped = step.min(d.retry_max.get().as_secs_f64());
    Duration::from_secs_f64(capped * (0.5 + fastrand::f64() * 0.5))
}

/// Check a row written by another program. The reason says what is wrong, for the operator.
pub fn validate<'c>(
    config: &'c Config,
    a: &Account,
    _now: i64,
) -> Result<(&'c Profile, TokenType), String> {
    if a.id.is_empty() || a.id.trim() != a.id {
        return Err("id is empty or has leading/trailing whitespace".into());
    }
    let token_type = TokenType::parse(&a.token_type).ok_or_else(|| {
        format!(
            "unknown token_type {:?}: use \"user\" or \"company\"",
            a.token_type
        )
    })?;
    let profile = match a.profile.as_deref() {
        None | Some("") if config.profiles.len() == 1 => &config.profiles[0],
        None | Some("") => {
            return Err(format!(
                "no profile named, and the config has {} profiles",
                config.profiles.len()
            ));
        }
        Some(name) => config
            .profile(name)
            .ok_or_else(|| format!("unknown profile {name:?}"))?,
    };
    let empty = |t: &Option<secrecy::SecretString>| {
        t.as_ref()
            .is_none_or(|s| s.expose_secret().trim().is_empty())
    };
    match token_type {
        TokenType::User if empty(&a.refresh_token) => {
            Err("user token without a refresh_token".into())
        }
        TokenType::Company if empty(&a.access_token) => {
            Err("company token without an access_token".into())
        }
        _ => Ok((profile, token_type)),
    }
}

fn log_transition(u: &Update) {
    let from = u.from.map(State::as_str).unwrap_or("new");
    let reason = u.reason.as_deref().unwrap_or("");
    match u.to {
        State::Active => {
            tracing::info!(account_id = %u.id, from, to = "active", reason, "account state")
        }
        State::Failing | State::Paused => {
            tracing::warn!(account_id = %u.id, from, to = u.to.as_str(), reason, "account state")
        }
        State::NeedsReauth | State::Revoked | State::Invalid => {
            tracing::error!(account_id = %u.id, from, to = u.to.as_str(), reason, "account state")
        }
    }
}
