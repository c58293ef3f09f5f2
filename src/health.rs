//! The health file: a JSON snapshot of the daemon and its accounts, written atomically
//! (a temporary file in the same directory, fsync, rename) so a reader never sees half a file.
//! It never contains a token: accounts appear by id only.
//!
//! `status` is `starting` until the first snapshot after start-up, `stopping` during shutdown,
//! `stopped` after a clean stop; `failing` when the store cannot write, a kept-alive token has
//! lapsed, or every account of some profile is failing or paused; `degraded` when any account is
//! not `active`, a profile is paused, a refresh token is at risk or the last reload failed; and
//! `ok` otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::shared::{Shared, lock};
use crate::state::State;

/// Most account ids listed in each list.
const LIST_LIMIT: usize = 50;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub updated_at: i64,
    pub started_at: i64,
    /// Set once the daemon stopped cleanly.
    #[serde(default)]
    pub stopped_at: Option<i64>,
    pub pid: u32,
    pub version: String,
    pub instance: String,
    pub heartbeat_s: u64,
    pub database: String,
    pub config: ConfigInfo,
    pub store: StoreInfo,
    pub accounts: AccountCounts,
    pub profiles: BTreeMap<String, ProfileInfo>,
    pub next_refresh_at: Option<i64>,
    pub refreshes: Done,
    pub probes: Done,
    pub last_errors: BTreeMap<String, LastError>,
    pub at_risk: IdList,
    /// Kept-alive user accounts whose access token has expired (a lapse under way).
    #[serde(default)]
    pub lapsed: IdList,
    /// The account failing the longest, and since when.
    #[serde(default)]
    pub oldest_failure: Option<Since>,
    #[serde(default)]
    pub revocation: RevocationInfo,
    /// Accounts whose rotated pair waits in the recovery journal.
    #[serde(default)]
    pub journaled: Vec<String>,
    /// Notification sinks: backlog, oldest undelivered, dead letters.
    #[serde(default)]
    pub notifications: BTreeMap<String, SinkInfo>,
    /// Where the local API listens.
    #[serde(default)]
    pub api: ApiInfo,
    /// When the engine loop last turned (liveness: `tokend status --liveness`).
    #[serde(default)]
    pub progress_at: Option<i64>,
    /// Accounts not `active`, by id, with their state (at most 50).
    pub attention: Vec<Attention>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigInfo {
    pub path: String,
    pub loaded_at: i64,
    pub last_reload_ok: bool,
    pub last_reload_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreInfo {
    pub writable: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountCounts {
    pub total: u64,
    pub by_state: BTreeMap<String, u64>,
    pub by_token_type: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProfileInfo {
    pub accounts: u64,
    pub by_state: BTreeMap<String, u64>,
    pub paused: bool,
    pub paused_reason: Option<String>,
    #[serde(default)]
    pub paused_since: Option<i64>,
    /// Most requests to this profile fail; it is being probed, not hammered.
    #[serde(default)]
    pub circuit_open: bool,
    /// The adaptive limit of requests in flight to this profile.
    #[serde(default)]
    pub concurrency_limit: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Done {
    pub ok: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastError {
    pub message: String,
    pub at: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdList {
    pub count: u64,
    pub accounts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Since {
    pub id: String,
    pub since: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevocationInfo {
    pub schedule: String,
    pub last_run_at: Option<i64>,
    pub last_run_probed: Option<u64>,
    pub next_run_at: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SinkInfo {
    pub backlog: u64,
    pub oldest_undelivered_at: Option<i64>,
    pub dead_letters: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiInfo {
    pub socket: Option<String>,
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attention {
    pub id: String,
    pub state: String,
}

/// What the daemon around the engine knows: start time, reloads, stopping, and parts of the
/// snapshot other tasks provide.
pub struct DaemonInfo {
    pub started_at: i64,
    pub config: Mutex<ConfigInfo>,
    pub stopping: AtomicBool,
    pub stopped_at: Mutex<Option<i64>>,
    /// The revocation checker, for its last run.
    pub checker: Mutex<Option<Arc<crate::revocation::Checker>>>,
    /// Notification sinks, as the notifier reports them.
    pub notifications: Mutex<BTreeMap<String, SinkInfo>>,
    /// Where the API listens, once bound.
    pub api: Mutex<ApiInfo>,
    writing: tokio::sync::Mutex<()>,
}

impl DaemonInfo {
    pub fn new(config_path: &Path, now: i64) -> DaemonInfo {
        DaemonInfo {
            started_at: now,
            config: Mutex::new(ConfigInfo {
                path: config_path.display().to_string(),
                loaded_at: now,
                last_reload_ok: true,
                last_reload_error: None,
            }),
            stopping: AtomicBool::new(false),
            stopped_at: Mutex::new(None),
            checker: Mutex::new(None),
            notifications: Mutex::new(BTreeMap::new()),
            api: Mutex::new(ApiInfo::default()),
            writing: tokio::sync::Mutex::new(()),
        }
    }
}

/// The health file written at start-up, before anything is counted.
pub fn starting(shared: &Shared, info: &DaemonInfo) -> Health {
    let rt = shared.runtime();
    Health {
        status: "starting".into(),
        updated_at: shared.clock.now(),
        started_at: info.started_at,
        stopped_at: None,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        instance: shared.owner.clone(),
        heartbeat_s: rt.config.daemon.health_interval.get().as_secs(),
        database: shared.store.path().display().to_string(),
        config: lock(&info.config).clone(),
        store: StoreInfo {
            writable: true,
            error: None,
        },
        accounts: AccountCounts::default(),
        profiles: BTreeMap::new(),
        next_refresh_at: None,
        refreshes: Done::default(),
        probes: Done::default(),
        last_errors: BTreeMap::new(),
        at_risk: IdList::default(),
        lapsed: IdList::default(),
        oldest_failure: None,
        revocation: RevocationInfo::default(),
        journaled: Vec::new(),
        notifications: BTreeMap::new(),
        api: lock(&info.api).clone(),
        progress_at: None,
        attention: Vec::new(),
    }
}

type Counted = (AccountCounts, BTreeMap<String, ProfileInfo>, Vec<Attention>);

async fn count(shared: &Shared) -> Result<Counted, crate::store::StoreError> {
    let mut accounts = AccountCounts::default();
    let mut profiles: BTreeMap<String, ProfileInfo> = BTreeMap::new();
    let single = shared
        .runtime()
        .config
        .single_profile()
        .map(|p| p.name.clone());
    for c in shared.counts().await? {
        accounts.total += c.count;
        *accounts
            .by_state
            .entry(c.state.as_str().to_owned())
            .or_default() += c.count;
        *accounts
            .by_token_type
            .entry(c.token_type.clone())
            .or_default() += c.count;
        let name = c
            .profile
            .clone()
            .or_else(|| single.clone())
            .unwrap_or_else(|| "(none)".into());
        let p = profiles.entry(name).or_default();
        p.accounts += c.count;
        *p.by_state.entry(c.state.as_str().to_owned()).or_default() += c.count;
    }
    let attention = shared
        .store
        .attention(LIST_LIMIT)
        .await?
        .into_iter()
        .map(|(id, state)| Attention {
            id,
            state: state.as_str().to_owned(),
        })
        .collect();
    Ok((accounts, profiles, attention))
}

/// Build a snapshot from the store and the shared counters.
pub async fn snapshot(shared: &Shared, info: &DaemonInfo) -> Health {
    let now = shared.clock.now();
    let rt = shared.runtime();
    let d = &rt.config.daemon;
    let store = &shared.store;
    let stats = &shared.stats;
    let mut store_error = stats.store_error();
    // Counting every account is the costly part: `Shared::counts` does it only when something
    // changed (and at most so often).
    let (accounts, mut profiles, attention) = match count(shared).await {
        Ok(counted) => counted,
        Err(e) => {
            store_error = Some(e.to_string());
            (AccountCounts::default(), BTreeMap::new(), Vec::new())
        }
    };
    for (name, reason, since) in shared.pauses.list() {
        let p = profiles.entry(name).or_default();
        p.paused = true;
        p.paused_reason = Some(reason);
        p.paused_since = Some(since);
    }
    for name in shared.breakers.open() {
        profiles.entry(name).or_default().circuit_open = true;
    }
    for (name, limit, _) in shared.limits.snapshot() {
        if let Some(p) = profiles.get_mut(&name) {
            p.concurrency_limit = Some((limit * 10.0).round() / 10.0);
        }
    }
    let risk_before =
        now - (d.refresh_token_lifetime.get() - d.refresh_token_margin.get()).as_secs() as i64;
    let mut list = |r: Result<(Vec<String>, u64), crate::store::StoreError>| match r {
        Ok((accounts, count)) => IdList { count, accounts },
        Err(e) => {
            store_error = Some(e.to_string());
            IdList::default()
        }
    };
    let at_risk = list(store.at_risk(risk_before, LIST_LIMIT).await);
    let lapsed = list(store.lapsed(now, LIST_LIMIT).await);
    let oldest_failure = store
        .oldest_failure()
        .await
        .ok()
        .flatten()
        .map(|(id, since)| Since { id, since });
    let groups = rt
        .config
        .profiles
        .iter()
        .map(|p| Some(p.name.clone()))
        .collect();
    let grace = d.http_timeout.as_secs_i64() + 1;
    let next_refresh_at = store.next_due(groups, grace).await.ok().flatten();
    let last_errors = stats
        .last_errors()
        .into_iter()
        .map(|(k, message, at)| (k.to_owned(), LastError { message, at }))
        .collect();
    let writable = !stats.store_unwritable.load(Ordering::Relaxed);
    let last_run = lock(&info.checker).as_ref().and_then(|c| c.last_run());
    let (last_run_at, last_run_probed) = match last_run {
        Some((at, summary)) => (Some(at), Some(summary.probed)),
        None => (None, None),
    };
    let mut health = Health {
        status: String::new(),
        updated_at: now,
        stopped_at: *lock(&info.stopped_at),
        store: StoreInfo {
            writable,
            error: if writable { None } else { store_error },
        },
        accounts,
        profiles,
        next_refresh_at,
        refreshes: Done {
            ok: stats.refreshes_ok.load(Ordering::Relaxed),
            failed: stats.refreshes_failed.load(Ordering::Relaxed),
        },
        probes: Done {
            ok: stats.probes_ok.load(Ordering::Relaxed),
            failed: stats.probes_failed.load(Ordering::Relaxed),
        },
        last_errors,
        at_risk,
        lapsed,
        oldest_failure,
        revocation: RevocationInfo {
            schedule: d.revocation_schedule.clone(),
            last_run_at,
            last_run_probed,
            next_run_at: crate::revocation::next_run(&d.revocation_schedule, now),
        },
        journaled: shared.journaled(),
        notifications: lock(&info.notifications).clone(),
        progress_at: Some(stats.progress_ms.load(Ordering::Relaxed).div_euclid(1000))
            .filter(|t| *t > 0),
        attention,
        // pid, version, instance, start time, heartbeat, config: as at start-up.
        ..starting(shared, info)
    };
    let status = overall_status(&health);
    health.status = if health.stopped_at.is_some() {
        "stopped".into()
    } else if info.stopping.load(Ordering::Relaxed) && status != "failing" {
        // Failing outranks stopping: a stop that leaves pairs in the journal, or one forced by
        // a replaced database, says so.
        "stopping".into()
    } else {
        status.into()
    };
    health
}

/// `failing`, `degraded` or `ok`, as documented in the module header and the README.
pub fn overall_status(h: &Health) -> &'static str {
    let sum = |p: &ProfileInfo, states: &[State]| {
        states
            .iter()
            .map(|s| p.by_state.get(s.as_str()).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let schedulable = |p: &ProfileInfo| sum(p, &[State::Active, State::Failing, State::Paused]);
    let stuck = |p: &ProfileInfo| sum(p, &[State::Failing, State::Paused]);
    if !h.store.writable
        || h.lapsed.count > 0
        || !h.journaled.is_empty()
        || h.profiles
            .values()
            .any(|p| schedulable(p) > 0 && stuck(p) == schedulable(p))
    {
        return "failing";
    }
    let active = h.accounts.by_state.get("active").copied().unwrap_or(0);
    if h.accounts.total > active
        || h.profiles.values().any(|p| p.paused)
        || !h.config.last_reload_ok
        || h.at_risk.count > 0
        || h.notifications.values().any(|n| n.dead_letters > 0)
    {
        return "degraded";
    }
    "ok"
}

/// Write `health` to `path` atomically (temporary file in the same directory, fsync, rename),
/// mode 0644: it holds no secret, and monitoring running as another user reads it.
pub fn write_atomic(path: &Path, health: &Health) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let body = serde_json::to_vec_pretty(health).map_err(std::io::Error::other)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".health.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(&body)?;
    tmp.write_all(b"\n")?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable; failure here is not worth failing the write over.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Keep the health file current: on every state change (at most once a second) and every
/// heartbeat, until `stop`. The path and heartbeat come from the configuration in force.
pub async fn run_writer(
    shared: Arc<Shared>,
    info: Arc<DaemonInfo>,
    stop: CancellationToken,
    on_write: impl Fn(&Health) + Send + 'static,
) {
    let mut last_write = tokio::time::Instant::now() - Duration::from_secs(1);
    loop {
        let heartbeat = shared.runtime().config.daemon.health_interval.get();
        let since = last_write.elapsed();
        // A count reused although something changed (counting is slow here): write again
        // once it may run.
        let recount = shared
            .counts_stale_until()
            .map(|ms| Duration::from_millis((ms - shared.clock.now_ms()).max(0) as u64));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(heartbeat.saturating_sub(since)) => {}
            _ = tokio::time::sleep(recount.unwrap_or_default()), if recount.is_some() => {}
            _ = shared.changed.notified() => {
                // Coalesce bursts of changes into one write a second.
                let wait = Duration::from_secs(1).saturating_sub(last_write.elapsed());
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        if let Some(h) = write_now(&shared, &info).await {
            on_write(&h);
        }
        last_write = tokio::time::Instant::now();
    }
}

/// Take a snapshot and write it; a failed write is logged, not fatal. Writes are serialised so
/// an older snapshot never replaces a newer one.
pub async fn write_now(shared: &Shared, info: &DaemonInfo) -> Option<Health> {
    let _turn = info.writing.lock().await;
    let h = snapshot(shared, info).await;
    let path = shared.runtime().config.daemon.health_file.clone();
    let (h2, p2) = (h.clone(), path.clone());
    match tokio::task::spawn_blocking(move || write_atomic(&p2, &h2)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(path = %path.display(), error = %e, "cannot write the health file")
        }
        Err(e) => tracing::error!(error = %e, "health writer task failed"),
    }
    Some(h)
}

/// Read a health file (for `tokend status`).
pub fn read(path: &Path) -> Result<Health, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a tokend health file: {e}", path.display()))
}

/// One-line summary for `STATUS=` and `tokend status`.
pub fn one_line(h: &Health) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (state, n) in &h.accounts.by_state {
        if *n > 0 {
            parts.push(format!("{n} {}", state.replace('_', " ")));
        }
    }
    if parts.is_empty() {
        parts.push("no accounts".into());
    }
    if h.lapsed.count > 0 {
        parts.push(format!("{} LAPSED", h.lapsed.count));
    }
    let next = h
        .next_refresh_at
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| format!("; next refresh {}", t.format("%H:%M:%S UTC")))
        .unwrap_or_default();
    format!("{}{next}", parts.join(", "))
}
