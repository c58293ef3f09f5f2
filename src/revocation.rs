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
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TokenType;
use crate::engine::policy::{self, Cx};
use crate::provider::ProbeOutcome;
use crate::shared::{Shared, lock};
use crate::state::State;
use crate::store::{Account, Change, Committed, Decision, Guard, Lease, Outcome};

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
    shared: Arc<Shared>,
    running: AtomicBool,
    /// Accounts with a confirmation or retry pending: runs leave them to it.
    pending: Mutex<HashSet<String>>,
    tasks: TaskTracker,
    /// Stops new probes and pending confirmations.
    stop: CancellationToken,
    /// Only this abandons a probe result the store cannot take yet.
    hard_stop: CancellationToken,
    last_run: Mutex<Option<(i64, RunSummary)>>,
}

impl Checker {
    pub fn new(
        shared: Arc<Shared>,
        stop: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Arc<Checker> {
        Arc::new(Checker {
            shared,
            running: AtomicBool::new(false),
            pending: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
            stop,
            hard_stop,
            last_run: Mutex::new(None),
        })
    }

    /// When the last run ended, and what it did.
    pub fn last_run(&self) -> Option<(i64, RunSummary)> {
        lock(&self.last_run).clone()
    }

    /// One revocation run. Returns `None` when a previous run is still going.
    pub async fn run_once(self: &Arc<Self>) -> Option<RunSummary> {
        if self.running.swap(true, Ordering::SeqCst) {
            tracing::warn!("previous revocation run still going; this one is skipped");
            return None;
        }
        let summary = self.run_inner().await;
        self.running.store(false, Ordering::SeqCst);
        *lock(&self.last_run) = Some((self.shared.clock.now(), summary.clone()));
        tracing::info!(
            probed = summary.probed,
            active = summary.active,
            suspect = summary.suspect,
            transient = summary.transient,
            "revocation run done"
        );
        self.shared.changed.notify_one();
        Some(summary)
    }

    async fn run_inner(self: &Arc<Self>) -> RunSummary {
        let s = &self.shared;
        let mut summary = RunSummary::default();
        let now = s.clock.now();
        let accounts = match s.store.company_accounts(now).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "revocation run cannot read accounts");
                return summary;
            }
        };
        // One lane per profile, each spaced by the profile's interval; lanes run side by side.
        let mut lanes: BTreeMap<String, Vec<Account>> = BTreeMap::new();
        let rt = s.runtime();
        for a in accounts {
            let Ok(p) = policy::check(&rt.config, &policy::Fields::of(&a)) else {
                continue;
            };
            if a.token_type == TokenType::Company {
                lanes.entry(p.name.clone()).or_default().push(a);
            }
        }
        let mut handles = Vec::new();
        for (profile, accounts) in lanes {
            let me = self.clone();
            handles.push(tokio::spawn(async move {
                me.lane(profile.as_str(), accounts).await
            }));
        }
        for h in handles {
            if let Ok(l) = h.await {
                summary.probed += l.probed;
                summary.active += l.active;
                summary.suspect += l.suspect;
                summary.transient += l.transient;
                summary.skipped += l.skipped;
            }
        }
        summary
    }

    async fn lane(self: &Arc<Self>, profile: &str, accounts: Vec<Account>) -> RunSummary {
        let mut s = RunSummary::default();
        let spacing = self.shared.runtime().config.daemon.probe_interval.get();
        let mut tick = tokio::time::interval(spacing.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for a in accounts {
            if lock(&self.pending).contains(&a.id) {
                s.skipped += 1;
                continue;
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
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
    pub async fn check(self: &Arc<Self>, id: &str, confirming: bool) -> Option<Verdict> {
        let s = &self.shared;
        let rt = s.runtime();
        let d = &rt.config.daemon;
        let now = s.clock.now();
        let lease = Lease {
            owner: s.owner.clone(),
            now,
            until: now + d.lease.as_secs_i64(),
            grace: 0,
        };
        let config = rt.clone();
        let claimed = s
            .store
            .claim_one(id, lease, move |a| {
                policy::plan_probe(
                    &Cx {
                        config: &config.config,
                        now,
                    },
                    a,
                )
            })
            .await
            .ok()
            .flatten();
        let a = match claimed {
            Some((a, Decision::Probe)) => a,
            _ => return None,
        };
        let profile = rt.config.profile_for(a.profile.as_deref())?.clone();
        let token = a.access_token.clone()?;
        let started = Instant::now();
        let outcome = rt.provider.probe(&profile, &token, now).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        let now = s.clock.now();
        let mut ch = Change {
            to: a.state,
            reason: None,
            next_action_at: None,
            failures: a.failures,
            last_error: None,
            checked_at: Some(now),
            profile: None,
        };
        let verdict = match outcome {
            ProbeOutcome::Active => {
                s.stats.probes_ok.fetch_add(1, Ordering::Relaxed);
                ch.to = State::Active;
                ch.failures = 0;
                if a.state != State::Active {
                    ch.reason = Some("probe answered: token active".into());
                }
                Verdict::Active
            }
            ProbeOutcome::Dead(why) if confirming => {
                s.stats.probes_ok.fetch_add(1, Ordering::Relaxed);
                ch.to = State::Revoked;
                ch.reason = Some(format!("revocation confirmed by a second probe: {why}"));
                ch.last_error = ch.reason.clone();
                Verdict::Revoked
            }
            ProbeOutcome::Dead(why) => {
                s.stats.probes_ok.fetch_add(1, Ordering::Relaxed);
                ch.last_error = Some(format!("probe says dead ({why}); confirming"));
                self.later(a.id.clone(), d.revocation_confirm_delay.get(), true);
                Verdict::Suspect
            }
            ProbeOutcome::Transient {
                reason,
                retry_after,
            } => {
                s.stats.probes_failed.fetch_add(1, Ordering::Relaxed);
                s.record_error("probe", &reason);
                ch.failures = a.failures.saturating_add(1);
                ch.to = State::Failing;
                ch.reason = Some(reason.clone());
                ch.last_error = Some(reason);
                ch.checked_at = None;
                let delay = policy::backoff(d, ch.failures).max(retry_after.unwrap_or_default());
                self.later(a.id.clone(), delay, confirming);
                Verdict::Transient
            }
            ProbeOutcome::Misconfigured(reason) => {
                s.stats.probes_failed.fetch_add(1, Ordering::Relaxed);
                s.record_error("profile", &reason);
                ch.last_error = Some(reason);
                ch.checked_at = None;
                Verdict::Transient
            }
        };
        s.metrics.probe(&profile.name, verdict.as_str());
        tracing::info!(account_id = %a.id, profile = %profile.name, outcome = verdict.as_str(),
            latency_ms, "probe");
        let outcome = Outcome {
            id: a.id.clone(),
            guard: Guard::Lease(s.owner.clone()),
            tokens: None,
            change: ch.clone(),
            notes: Vec::new(),
            now,
        };
        // The hard stop, not the soft one: a probe result meeting a locked store during
        // shutdown is still committed if the store frees up before the deadline.
        if let Some(Committed::Applied { from, .. }) = s.commit(outcome, &self.hard_stop).await
            && from != ch.to
        {
            crate::engine::log_transition(&a.id, from, ch.to, ch.reason.as_deref());
            s.state_changed();
        }
        Some(verdict)
    }

    /// Probe `id` again after `delay` (a confirmation, or a retry after a transient failure).
    fn later(self: &Arc<Self>, id: String, delay: Duration, confirming: bool) {
        lock(&self.pending).insert(id.clone());
        let me = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = me.stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    lock(&me.pending).remove(&id);
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
pub enum Verdict {
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
        .dom_and_dow(true)
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
