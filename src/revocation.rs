//! Company-token revocation checks, run on a cron schedule.
//!
//! Company tokens never expire, so only asking tells whether an administrator revoked one. Each
//! run probes every active or failing company token, spaced per profile by `probe_interval`. A
//! "dead" answer is confirmed by a second probe at least `revocation_confirm_delay` later before
//! the account becomes `revoked`; transient answers never revoke anything and are retried sooner
//! with backoff. A run still going when the next one fires is not started twice.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TokenType;
use crate::engine::{Engine, backoff, unix_now, validate};
use crate::provider::ProbeOutcome;
use crate::state::State;
use crate::store::{Account, Update};

/// Totals of one run, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub probed: u64,
    pub active: u64,
    pub suspect: u64,
    pub transient: u64,
    pub skipped: u64,
}

/// Runs checks; guards against overlap and tracks the confirmation and retry tasks it spawns.
pub struct Checker {
    engine: Arc<Engine>,
    running: AtomicBool,
    /// Accounts with a confirmation or retry pending: runs leave them to it.
    pending: Mutex<HashSet<String>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Checker {
    pub fn new(engine: Arc<Engine>, shutdown: CancellationToken) -> Arc<Checker> {
        Arc::new(Checker {
            engine,
            running: AtomicBool::new(false),
            pending: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    /// One revocation run. Returns `None` when a previous run is still going.
    pub async fn run_once(self: &Arc<Self>) -> Option<RunSummary> {
        if self.running.swap(true, Ordering::SeqCst) {
            tracing::warn!("previous revocation run still going; this one is skipped");
            return None;
        }
        let summary = self.run_inner().await;
        self.running.store(false, Ordering::SeqCst);
        tracing::info!(
            probed = summary.probed,
            active = summary.active,
            suspect = summary.suspect,
            transient = summary.transient,
            "revocation run done"
        );
        Some(summary)
    }

    async fn run_inner(self: &Arc<Self>) -> RunSummary {
        let mut summary = RunSummary::default();
        let now = unix_now();
        let accounts = match self.engine.store().company_accounts(now).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "revocation run cannot read accounts");
                return summary;
            }
        };
        // One lane per profile, each spaced by the profile's interval; lanes run side by side.
        let mut lanes: BTreeMap<String, Vec<Account>> = BTreeMap::new();
        let rt = self.engine.runtime();
        for a in accounts {
            let profile = match validate(&rt.config, &a, now) {
                Ok((p, TokenType::Company)) => p.name.clone(),
                _ => continue,
            };
            lanes.entry(profile).or_default().push(a);
        }
        let mut handles = Vec::new();
        for (profile, accounts) in lanes {
            let me = self.clone();
            handles.push(tokio::spawn(
                async move { me.lane(&profile, accounts).await },
            ));
        }
        for h in handles {
            if let Ok(s) = h.await {
                summary.probed += s.probed;
                summary.active += s.active;
                summary.suspect += s.suspect;
                summary.transient += s.transient;
                summary.skipped += s.skipped;
            }
        }
        summary
    }

    async fn lane(self: &Arc<Self>, profile: &str, accounts: Vec<Account>) -> RunSummary {
        let mut s = RunSummary::default();
        let spacing = self.engine.runtime().config.daemon.probe_interval.get();
        let mut tick = tokio::time::interval(spacing.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for a in accounts {
            if self.pending.lock().is_ok_and(|p| p.contains(&a.id)) {
                s.skipped += 1;
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.check(&a.id, false).await {
                Some(Verdict::Active) => s.active += 1,
                Some(Verdict::Suspect) => s.suspect += 1,
                Some(Verdict::Transient) => s.transient += 1,
                Some(Verdict::Revoked) | None => {
                    s.skipped += 1;
                    continue;
                }
            }
            s.probed += 1;
        }
        tracing::debug!(profile, probed = s.probed, "revocation lane done");
        s
    }

    /// Probe one company account (leasing it first) and commit what the answer means.
    async fn check(self: &Arc<Self>, id: &str, confirming: bool) -> Option<Verdict> {
        let engine = &self.engine;
        let rt = engine.runtime();
        let d = &rt.config.daemon;
        let now = unix_now();
        let a = engine
            .store()
            .lease_one(id, engine.owner(), now, now + d.lease.as_secs_i64())
            .await
            .ok()
            .flatten()?;
        let prior = State::parse(&a.state);
        let valid = validate(&rt.config, &a, now).ok();
        let (profile, token) = match (valid, &a.access_token) {
            (Some((p, TokenType::Company)), Some(t))
                if matches!(prior, Some(State::Active | State::Failing)) =>
            {
                (p.clone(), t.clone())
            }
            _ => {
                let _ = engine.store().release(id, engine.owner()).await;
                return None;
            }
        };
        let started = Instant::now();
        let outcome = rt.provider.probe(&profile, &token).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        let now = unix_now();
        let mut u = Update {
            id: a.id.clone(),
            revision: a.revision,
            from: prior,
            to: prior.unwrap_or(State::Active),
            reason: None,
            tokens: None,
            next_action_at: None,
            failures: a.failures,
            last_error: None,
            checked_at: Some(now),
            now,
        };
        let mut next_action_at = next_run(&d.revocation_schedule, now);
        let verdict = match outcome {
            ProbeOutcome::Active => {
                engine.stats.probes_ok.fetch_add(1, Ordering::Relaxed);
                u.to = State::Active;
                u.failures = 0;
                if prior != Some(State::Active) {
                    u.reason = Some("probe answered: token active".into());
                }
                Verdict::Active
            }
            ProbeOutcome::Dead(why) if confirming => {
                next_action_at = None;
                engine.stats.probes_ok.fetch_add(1, Ordering::Relaxed);
                u.to = State::Revoked;
                u.reason = Some(format!("revocation confirmed by a second probe: {why}"));
                u.last_error = u.reason.clone();
                Verdict::Revoked
            }
            ProbeOutcome::Dead(why) => {
                engine.stats.probes_ok.fetch_add(1, Ordering::Relaxed);
                u.last_error = Some(format!("probe says dead ({why}); confirming"));
                let delay = d.revocation_confirm_delay.get();
                next_action_at = Some(now + delay.as_secs() as i64);
                self.later(a.id.clone(), delay, true);
                Verdict::Suspect
            }
            ProbeOutcome::Transient {
                reason,
                retry_after,
            } => {
                engine.stats.probes_failed.fetch_add(1, Ordering::Relaxed);
                engine.stats.record_error("probe", &reason);
                u.failures = a.failures.saturating_add(1);
                u.to = State::Failing;
                u.reason = Some(reason.clone());
                u.last_error = Some(reason);
                u.checked_at = None;
                let delay = backoff(d, u.failures).max(retry_after.unwrap_or_default());
                next_action_at = Some(now + delay.as_secs() as i64);
                self.later(a.id.clone(), delay, confirming);
                Verdict::Transient
            }
            ProbeOutcome::Misconfigured(reason) => {
                engine.stats.probes_failed.fetch_add(1, Ordering::Relaxed);
                engine.stats.record_error("profile", &reason);
                u.last_error = Some(reason);
                u.checked_at = None;
                Verdict::Transient
            }
        };
        tracing::info!(account_id = %a.id, profile = %profile.name, outcome = verdict.as_str(),
            latency_ms, next_action_at, "probe");
        engine.commit(u, &self.shutdown).await;
        Some(verdict)
    }

    /// Probe `id` again after `delay` (a confirmation, or a retry after a transient failure).
    fn later(self: &Arc<Self>, id: String, delay: Duration, confirming: bool) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id.clone());
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = me.shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    if let Ok(mut p) = me.pending.lock() {
                        p.remove(&id);
                    }
                    me.check(&id, confirming).await;
                }
            }
        });
    }

    /// Wait for confirmation and retry tasks (they end at once on shutdown).
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Active,
    Suspect,
    Transient,
    Revoked,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Active => "active",
            Verdict::Suspect => "suspect",
            Verdict::Transient => "transient",
            Verdict::Revoked => "revoked",
        }
    }
}

/// The next firing of a six-field cron expression after `now` (unix seconds, UTC).
pub fn next_run(cron: &str, now: i64) -> Option<i64> {
    let schedule = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(cron)
        .ok()?;
    let start = chrono::DateTime::from_timestamp(now, 0)?;
    schedule
        .find_next_occurrence(&start, false)
        .ok()
        .map(|t| t.timestamp())
}

/// Schedule [`Checker::run_once`] on the configured cron expression (UTC). Returns the scheduler,
/// which the caller shuts down.
pub async fn schedule(
    checker: Arc<Checker>,
    cron: &str,
) -> anyhow::Result<tokio_cron_scheduler::JobScheduler> {
    let sched = tokio_cron_scheduler::JobScheduler::new().await?;
    let job = tokio_cron_scheduler::Job::new_async(cron, move |_, _| {
        let checker = checker.clone();
        Box::pin(async move {
            checker.run_once().await;
        })
    })?;
    sched.add(job).await?;
    sched.start().await?;
    Ok(sched)
}
