//! Notifications: tell a person when a person must act.
//!
//! `account_events` is the outbox: every state change writes its event in its own transaction.
//! This task reads new events, plans them per `[[notify]]` sink ([`policy`]: filters and the
//! storm rules, applied by the store in one transaction with the sink's cursor), and delivers
//! what is due: at least once, in order per account, with the same id and body on every attempt
//! ([`event`]), to a signed webhook ([`webhook`]) or a command ([`exec`]). Per sink: at most
//! `max_concurrency` in flight, at most `rate_per_second`, and while the receiver fails, one
//! probe at a time. Backlog, oldest undelivered and dead letters go to the health file and the
//! metrics.
//!
//! The configuration is read on every pass, so a reload applies at once.

pub mod event;
pub mod exec;
pub mod policy;
pub mod webhook;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{NotifySink, Target};
use crate::health::{DaemonInfo, SinkInfo};
use crate::shared::{Runtime, Shared, lock};
use crate::store::{Delivery, Finish, PlanFn, SinkPlan};
use policy::Verdict;

/// How long deliveries in flight get to finish at a stop before they are abandoned (they are
/// sent again, with the same id, after the next start).
pub const STOP_WAIT: Duration = Duration::from_secs(5);
/// How often the event log is looked at for new events.
const POLL: Duration = Duration::from_secs(1);
/// Most events planned in one transaction.
const PLAN_BATCH: usize = 1000;
/// Dead letters count in the health file (and make it `degraded`) for this long.
pub const DEAD_LETTER_WINDOW: i64 = 86_400;
/// Finished notifications are kept this long (for `tokend events`), then pruned.
const KEEP: i64 = 30 * 86_400;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The queues are counted again after anything this process did to them, and at least this
/// often (for other processes' work, leases running out, dead letters ageing out of the window).
const RECOUNT_EVERY: Duration = Duration::from_secs(10);
/// A claimed notification's lease outlasts its attempt by this much.
const LEASE_SLACK: i64 = 30;

/// Pacing of one sink, in memory.
struct Pace {
    in_flight: usize,
    /// Failed attempts in a row; while above zero the sink is probed one notification at a time.
    streak: u32,
    paused_until: Option<Instant>,
    /// Token bucket for `rate_per_second`.
    tokens: f64,
    refilled: Instant,
    last_error: Option<String>,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            in_flight: 0,
            streak: 0,
            paused_until: None,
            tokens: 1.0,
            refilled: Instant::now(),
            last_error: None,
        }
    }

    /// How many attempts may start now.
    fn room(&mut self, sink: &NotifySink) -> usize {
        let now = Instant::now();
        let cap = sink.rate_per_second.max(1.0);
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * sink.rate_per_second).min(cap);
        self.refilled = now;
        if self.paused_until.is_some_and(|t| t > now) {
            return 0;
        }
        let free = if self.streak > 0 {
            usize::from(self.in_flight == 0)
        } else {
            sink.max_concurrency.saturating_sub(self.in_flight)
        };
        free.min(self.tokens.floor() as usize)
    }
}

struct Notifier {
    shared: Arc<Shared>,
    info: Arc<DaemonInfo>,
    webhook: webhook::Webhook,
    pace: Mutex<HashMap<String, Pace>>,
    /// Rung when an attempt ends.
    done: Notify,
    tracker: TaskTracker,
    /// Fired when the stop's grace is over: attempts still running are abandoned.
    abort: CancellationToken,
}

/// Run the notifier until `stop`; then give attempts in flight [`STOP_WAIT`] to finish.
pub async fn run(shared: Arc<Shared>, info: Arc<DaemonInfo>, stop: CancellationToken) {
    let webhook = match webhook::Webhook::new() {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client: no notifications will be sent");
            return;
        }
    };
    let n = Arc::new(Notifier {
        shared,
        info,
        webhook,
        pace: Mutex::new(HashMap::new()),
        done: Notify::new(),
        tracker: TaskTracker::new(),
        abort: CancellationToken::new(),
    });
    n.clone().turn(stop).await;
    n.tracker.close();
    if tokio::time::timeout(STOP_WAIT, n.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "notifications still in flight at the stop are abandoned; they are sent again (same id) after the next start"
        );
        n.abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), n.tracker.wait()).await;
    }
}

/// What the loop remembers between passes.
struct Turn {
    /// The event log's head when it was last planned (-1: plan again).
    planned_head: i64,
    /// When a held notification or an open summary is next due.
    next_wake: Option<i64>,
    /// Sinks planned so far (a sink seen for the first time after start starts from now).
    seen: HashSet<String>,
    first: bool,
    reloaded: bool,
    last_prune: Instant,
    /// The health entries last reported, to tell the health writer only of changes.
    reported: Option<String>,
    last_failure: String,
    /// When each sink's next notification is due, as last counted.
    due: Due,
    /// The queues changed since last counted (planned, claimed, an attempt ended).
    dirty: bool,
    last_count: Instant,
}

impl Notifier {
    async fn turn(self: Arc<Self>, stop: CancellationToken) {
        let s = self.shared.clone();
        self.release_dead().await;
        let mut runtime = s.runtime_changes();
        let mut turn = Turn {
            planned_head: -1,
            next_wake: None,
            seen: HashSet::new(),
            first: true,
            reloaded: false,
            last_prune: Instant::now(),
            reported: None,
            last_failure: String::new(),
            due: Due::new(),
            dirty: true,
            last_count: Instant::now(),
        };
        loop {
            if stop.is_cancelled() {
                return;
            }
            let rt = s.runtime();
            if rt.config.notify.is_empty() {
                if turn.reported.take().is_some() {
                    lock(&self.info.notifications).clear();
                }
                // Nothing to do until a reload brings a sink.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = runtime.changed() => turn.reloaded = true,
                }
                continue;
            }
            let more = self.pass(&rt, &mut turn).await;
            let wait = if more { Duration::ZERO } else { POLL };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.done.notified() => turn.dirty = true,
                _ = runtime.changed() => turn.reloaded = true,
            }
        }
    }

    /// Plan what is new, start what is due, report. Returns whether more events wait.
    async fn pass(self: &Arc<Self>, rt: &Arc<Runtime>, turn: &mut Turn) -> bool {
        let s = &self.shared;
        let now = s.clock.now();
        let mut more = false;
        let head = s.store.notify_head().await.unwrap_or(turn.planned_head);
        if turn.first
            || turn.reloaded
            || head != turn.planned_head
            || turn.next_wake.is_some_and(|w| w <= now)
        {
            let sinks = self.sink_plans(rt, &mut turn.seen, turn.first, now);
            turn.dirty = true;
            match s
                .store
                .notify_plan(sinks, now, PLAN_BATCH, plan_fn(rt))
                .await
            {
                Ok(p) => {
                    more = p.more;
                    turn.planned_head = if p.more { -1 } else { head };
                    turn.next_wake = p.next_wake;
                    turn.first = false;
                    turn.reloaded = false;
                    turn.last_failure.clear();
                    for (sink, profile, n) in &p.folded {
                        tracing::warn!(sink = %sink, profile = profile.as_deref().unwrap_or(""), notifications = n,
                            "burst: folding account notifications into one profile summary");
                    }
                    if p.suppressed > 0 {
                        tracing::info!(
                            notifications = p.suppressed,
                            "failing notifications not sent: the accounts recovered within failing_after"
                        );
                    }
                }
                Err(e) => {
                    if e.to_string() != turn.last_failure {
                        tracing::warn!(error = %e, "cannot plan notifications; retrying");
                        turn.last_failure = e.to_string();
                    }
                }
            }
        }
        if turn.dirty || turn.last_count.elapsed() >= RECOUNT_EVERY {
            turn.dirty = false;
            turn.last_count = Instant::now();
            let (infos, due) = self.report(rt, now).await;
            turn.due = due;
            let key = serde_json::to_string(&infos).unwrap_or_default();
            if turn.reported.as_ref() != Some(&key) {
                *lock(&self.info.notifications) = infos.into_iter().collect();
                turn.reported = Some(key);
                // The health file shows it without waiting for its heartbeat.
                s.changed.notify_one();
            }
        }
        for sink in &rt.config.notify {
            let due = turn.due.get(&sink.name).copied().flatten();
            if due.is_some_and(|t| t <= now) && self.dispatch(sink, now).await {
                turn.dirty = true;
            }
        }
        if turn.last_prune.elapsed() >= PRUNE_EVERY {
            turn.last_prune = Instant::now();
            if let Ok(n) = s.store.notify_prune(now - KEEP).await
                && n > 0
            {
                tracing::debug!(notifications = n, "pruned finished notifications");
            }
        }
        more
    }

    /// The sinks as the store plans them. A sink seen for the first time starts with the
    /// events of this run (present at start) or from now (added by a reload).
    fn sink_plans(
        &self,
        rt: &Runtime,
        seen: &mut HashSet<String>,
        first: bool,
        now: i64,
    ) -> Vec<SinkPlan> {
        let default_profile = rt.config.single_profile().map(|p| p.name.clone());
        rt.config
            .notify
            .iter()
            .map(|sink| {
                let new = seen.insert(sink.name.clone());
                SinkPlan {
                    name: sink.name.clone(),
                    burst_threshold: sink.burst_threshold,
                    default_profile: default_profile.clone(),
                    start_at: if new && !first {
                        now
                    } else {
                        self.info.started_at
                    },
                }
            })
            .collect()
    }

    /// Leases held by processes on this host that are gone: claimable now.
    async fn release_dead(&self) {
        let s = &self.shared;
        let Ok(owners) = s.store.notify_lease_owners().await else {
            return;
        };
        for owner in owners {
            if owner != s.owner
                && crate::shared::owner_is_dead(&owner)
                && let Ok(n) = s.store.notify_release(&owner).await
                && n > 0
            {
                tracing::info!(owner = %owner, notifications = n,
                    "notifications left in flight by a process that is gone: sending them again");
            }
        }
    }

    /// Start as many attempts for `sink` as its pacing allows. Returns whether it claimed any.
    async fn dispatch(self: &Arc<Self>, sink: &NotifySink, now: i64) -> bool {
        let s = &self.shared;
        let room = lock(&self.pace)
            .entry(sink.name.clone())
            .or_insert_with(Pace::new)
            .room(sink);
        if room == 0 {
            return false;
        }
        let until = now + sink.timeout.as_secs_i64() + LEASE_SLACK;
        let claimed = match s
            .store
            .notify_claim(&sink.name, now, room, &s.owner, until)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(sink = %sink.name, error = %e, "cannot claim notifications");
                return false;
            }
        };
        let any = !claimed.is_empty();
        for d in claimed {
            {
                let mut pace = lock(&self.pace);
                let p = pace.entry(sink.name.clone()).or_insert_with(Pace::new);
                p.in_flight += 1;
                p.tokens -= 1.0;
            }
            let me = self.clone();
            let sink = sink.clone();
            self.tracker.spawn(async move {
                me.attempt(&sink, d).await;
                if let Some(p) = lock(&me.pace).get_mut(&sink.name) {
                    p.in_flight = p.in_flight.saturating_sub(1);
                }
                me.done.notify_one();
            });
        }
        any
    }

    /// One attempt, and its result recorded.
    async fn attempt(&self, sink: &NotifySink, d: Delivery) {
        let s = &self.shared;
        let body = event::body(&d);
        let started = Instant::now();
        let verdict = match &sink.target {
            Target::Webhook { url, secret } => {
                self.webhook
                    .send(
                        url,
                        secret,
                        &d.id,
                        &d.kind,
                        &body,
                        s.clock.now(),
                        sink.timeout.get(),
                        &self.abort,
                    )
                    .await
            }
            Target::Exec { command } => {
                exec::run(command, &d, &body, sink.timeout.get(), &self.abort).await
            }
        };
        let latency_ms = started.elapsed().as_millis() as u64;
        let now = s.clock.now();
        let account = d.account_id.as_deref().unwrap_or("");
        let aborted = self.abort.is_cancelled();
        let finish = match verdict {
            Verdict::Delivered => Finish::Delivered,
            Verdict::Rejected(e) => Finish::Rejected(e),
            // Abandoned at a stop: due again at the next start, not counted as a failure.
            Verdict::Retry { error, .. } if aborted => Finish::Retry { error, at: now },
            Verdict::Retry { error, after } => policy::after_failure(
                now,
                d.queued_at,
                d.attempts,
                sink.max_age.get(),
                error,
                after,
                fastrand::f64(),
            ),
        };
        let result = match &finish {
            Finish::Delivered => {
                tracing::info!(sink = %sink.name, event_id = %d.id, r#type = %d.kind, account_id = %account,
                    attempt = d.attempts, latency_ms, "notification delivered");
                "delivered"
            }
            Finish::Rejected(e) => {
                tracing::error!(sink = %sink.name, event_id = %d.id, r#type = %d.kind, account_id = %account,
                    attempt = d.attempts, error = %e, "notification rejected by the receiver; not retried");
                "rejected"
            }
            Finish::Retry { error, at } => {
                tracing::warn!(sink = %sink.name, event_id = %d.id, r#type = %d.kind, account_id = %account,
                    attempt = d.attempts, error = %error, retry_in_s = (at - now).max(0),
                    "notification not delivered; it will be retried");
                "retried"
            }
            Finish::Dead(e) => {
                tracing::error!(sink = %sink.name, event_id = %d.id, r#type = %d.kind, account_id = %account,
                    attempt = d.attempts, error = %e,
                    "notification dead-lettered: not delivered within max_age (see tokend events)");
                "dead"
            }
        };
        s.metrics.notification(&sink.name, result);
        if !aborted {
            let mut pace = lock(&self.pace);
            let p = pace.entry(sink.name.clone()).or_insert_with(Pace::new);
            match &finish {
                Finish::Delivered => {
                    p.streak = 0;
                    p.paused_until = None;
                    p.last_error = None;
                }
                Finish::Rejected(e) => {
                    // The receiver answered: it works.
                    p.streak = 0;
                    p.paused_until = None;
                    p.last_error = Some(format!("{}: rejected: {e}", d.id));
                }
                Finish::Retry { error: e, .. } | Finish::Dead(e) => {
                    p.streak = p.streak.saturating_add(1);
                    p.paused_until =
                        Some(Instant::now() + policy::sink_pause(p.streak, fastrand::f64()));
                    p.last_error = Some(e.clone());
                }
            }
        }
        if let Err(e) = s.store.notify_finish(d.ord, &s.owner, finish, now).await {
            tracing::warn!(sink = %sink.name, event_id = %d.id, error = %e,
                "cannot record a notification's attempt; it is sent again when its lease runs out");
        }
    }

    /// Per sink: backlog, oldest undelivered, dead letters (to the metrics too); and when its
    /// next notification is due.
    async fn report(&self, rt: &Runtime, now: i64) -> (Vec<(String, SinkInfo)>, Due) {
        let s = &self.shared;
        let names: Vec<String> = rt.config.notify.iter().map(|n| n.name.clone()).collect();
        let stats = match s
            .store
            .notify_stats(names.clone(), now, now - DEAD_LETTER_WINDOW)
            .await
        {
            Ok(st) => st,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the notification queues");
                // Try every sink: the claim itself finds what is due.
                let due = names.into_iter().map(|n| (n, Some(now))).collect();
                let infos = lock(&self.info.notifications).clone().into_iter().collect();
                return (infos, due);
            }
        };
        let pace = lock(&self.pace);
        let mut due = Due::new();
        let infos = stats
            .into_iter()
            .map(|(name, st)| {
                s.metrics.notify_queue(&name, st.backlog, st.dead);
                due.insert(name.clone(), st.next_due);
                let last_error = pace.get(&name).and_then(|p| p.last_error.clone());
                let info = SinkInfo {
                    backlog: st.backlog,
                    oldest_undelivered_at: st.oldest,
                    dead_letters: st.dead,
                    last_error,
                };
                (name, info)
            })
            .collect();
        (infos, due)
    }
}

/// When each sink's next notification is due (`None`: nothing waits).
type Due = HashMap<String, Option<i64>>;

/// The policy as the store applies it, for the configuration in force.
fn plan_fn(rt: &Arc<Runtime>) -> PlanFn {
    let rt = rt.clone();
    let by_name: BTreeMap<String, usize> = rt
        .config
        .notify
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    Box::new(move |name, e, told| {
        let default_profile = rt.config.single_profile().map(|p| p.name.as_str());
        match by_name.get(name) {
            Some(&i) => policy::plan(&rt.config.notify[i], default_profile, e, told),
            None => Vec::new(),
        }
    })
}
