//! The health file: a JSON snapshot of the daemon and its accounts, written atomically
//! (temporary file in the same directory, fsync, rename) so a reader never sees half a file.
//! It never contains a token: accounts appear by id only.
//!
//! `status` is `starting` until the first snapshot after start-up, `stopping` during shutdown,
//! `failing` when the store cannot write or every account of some profile is failing or paused,
//! `degraded` when any account is not `active`, a profile is paused or the last reload failed,
//! and `ok` otherwise.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, unix_now};

/// Most account ids listed in each attention list.
const LIST_LIMIT: usize = 50;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub updated_at: i64,
    pub started_at: i64,
    pub pid: u32,
    pub version: String,
    pub instance: String,
    pub heartbeat_s: u64,
    pub config: ConfigInfo,
    pub store: StoreInfo,
    pub accounts: AccountCounts,
    pub profiles: BTreeMap<String, ProfileInfo>,
    pub next_refresh_at: Option<i64>,
    pub refreshes: Done,
    pub probes: Done,
    pub last_errors: BTreeMap<String, LastError>,
    pub at_risk: AtRisk,
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
    /// Most requests to this profile fail; it is being probed, not hammered.
    #[serde(default)]
    pub circuit_open: bool,
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
pub struct AtRisk {
    pub count: u64,
    pub accounts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attention {
    pub id: String,
    pub state: String,
}

/// What the daemon around the engine knows: start time, config reloads, stopping.
#[derive(Debug)]
pub struct DaemonInfo {
    pub started_at: i64,
    pub config: Mutex<ConfigInfo>,
    pub stopping: std::sync::atomic::AtomicBool,
    pub heartbeat: Mutex<Duration>,
    pub refresh_token_risk: Mutex<(i64, i64)>,
    writing: tokio::sync::Mutex<()>,
    /// The last account count, with the engine generation it was taken at.
    counted: Mutex<Option<(u64, Counted)>>,
}

impl DaemonInfo {
    pub fn new(config_path: &Path, heartbeat: Duration, lifetime: i64, margin: i64) -> DaemonInfo {
        let now = unix_now();
        DaemonInfo {
            started_at: now,
            config: Mutex::new(ConfigInfo {
                path: config_path.display().to_string(),
                loaded_at: now,
                last_reload_ok: true,
                last_reload_error: None,
            }),
            stopping: std::sync::atomic::AtomicBool::new(false),
            heartbeat: Mutex::new(heartbeat),
            refresh_token_risk: Mutex::new((lifetime, margin)),
            writing: tokio::sync::Mutex::new(()),
            counted: Mutex::new(None),
        }
    }
}

/// The health file written at start-up, before anything is counted.
pub fn starting(engine: &Engine, info: &DaemonInfo) -> Health {
    let now = unix_now();
    Health {
        status: "starting".into(),
        updated_at: now,
        started_at: info.started_at,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        instance: engine.owner().to_owned(),
        heartbeat_s: info.heartbeat.lock().map(|d| d.as_secs()).unwrap_or(30),
        config: info.config.lock().map(|c| c.clone()).unwrap_or_default(),
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
        at_risk: AtRisk::default(),
        attention: Vec::new(),
    }
}

/// Build a snapshot from the store and the engine's counters.
pub async fn snapshot(engine: &Engine, info: &DaemonInfo) -> Health {
    let now = unix_now();
    let store = engine.store();
    let stats = &engine.stats;
    let mut store_error = stats.store_error.lock().ok().and_then(|e| e.clone());
    // Counting every account is the costly part; do it only when something changed.
    let generation = stats.generation.load(Ordering::Relaxed);
    let cached = info
        .counted
        .lock()
        .ok()
        .and_then(|c| c.clone())
        .filter(|c| c.0 == generation);
    let (accounts, mut profiles, attention) = match cached {
        Some((_, counted)) => counted,
        None => match count(store).await {
            Ok(counted) => {
                if let Ok(mut c) = info.counted.lock() {
                    *c = Some((generation, counted.clone()));
                }
                counted
            }
            Err(e) => {
                store_error = Some(e.to_string());
                (AccountCounts::default(), BTreeMap::new(), Vec::new())
            }
        },
    };
    for (name, reason) in engine.paused_profiles() {
        let p = profiles.entry(name).or_default();
        p.paused = true;
        p.paused_reason = Some(reason);
    }
    for name in engine.open_circuits() {
        profiles.entry(name).or_default().circuit_open = true;
    }
    let (lifetime, margin) = info.refresh_token_risk.lock().map(|g| *g).unwrap_or((0, 0));
    let risk_before = now - (lifetime - margin);
    let at_risk = match store.at_risk(risk_before, LIST_LIMIT).await {
        Ok((accounts, count)) => AtRisk { count, accounts },
        Err(e) => {
            store_error = Some(e.to_string());
            AtRisk::default()
        }
    };
    let next_refresh_at = store.next_due().await.ok().flatten();
    let last_errors = stats
        .last_errors
        .lock()
        .map(|m| {
            m.iter()
                .map(|(k, (message, at))| {
                    (
                        (*k).to_owned(),
                        LastError {
                            message: message.clone(),
                            at: *at,
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let writable = !stats.store_unwritable.load(Ordering::Relaxed);
    let config = info.config.lock().map(|c| c.clone()).unwrap_or_default();
    let mut health = Health {
        status: String::new(),
        updated_at: now,
        config,
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
        attention,
        // pid, version, instance, start time, heartbeat: as at start-up.
        ..starting(engine, info)
    };
    health.status = if info.stopping.load(Ordering::Relaxed) {
        "stopping".into()
    } else {
        overall_status(&health).into()
    };
    health
}

type Counted = (AccountCounts, BTreeMap<String, ProfileInfo>, Vec<Attention>);

async fn count(store: &crate::store::Store) -> Result<Counted, crate::store::StoreError> {
    let mut accounts = AccountCounts::default();
    let mut profiles: BTreeMap<String, ProfileInfo> = BTreeMap::new();
    for c in store.counts().await? {
        accounts.total += c.count;
        *accounts.by_state.entry(c.state.clone()).or_default() += c.count;
        *accounts
            .by_token_type
            .entry(c.token_type.clone())
            .or_default() += c.count;
        let p = profiles
            .entry(c.profile.clone().unwrap_or_else(|| "(default)".into()))
            .or_default();
        p.accounts += c.count;
        *p.by_state.entry(c.state).or_default() += c.count;
    }
    let attention = store
        .attention(LIST_LIMIT)
        .await?
        .into_iter()
        .map(|(id, state)| Attention { id, state })
        .collect();
    Ok((accounts, profiles, attention))
}

/// `failing`, `degraded` or `ok`, as documented in the module header and the README.
pub fn overall_status(h: &Health) -> &'static str {
    let schedulable = |p: &ProfileInfo| {
        ["active", "failing", "paused"]
            .iter()
            .map(|s| p.by_state.get(*s).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let stuck = |p: &ProfileInfo| {
        ["failing", "paused"]
            .iter()
            .map(|s| p.by_state.get(*s).copied().unwrap_or(0))
            .sum::<u64>()
    };
    if !h.store.writable
        || h.profiles
            .values()
            .any(|p| schedulable(p) > 0 && stuck(p) == schedulable(p))
    {
        return "failing";
    }
    let not_active = h.accounts.total - h.accounts.by_state.get("active").copied().unwrap_or(0);
    if not_active > 0
        || h.profiles.values().any(|p| p.paused)
        || !h.config.last_reload_ok
        || h.at_risk.count > 0
    {
        return "degraded";
    }
    "ok"
}

/// Write `health` to `path` atomically, mode 0644.
pub fn write_atomic(path: &Path, health: &Health) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp: PathBuf = dir.join(format!(".{name}.{}.{seq}.tmp", std::process::id()));
    let body = serde_json::to_vec_pretty(health).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable; failure here is not worth failing the write over.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Keep the health file current: on every state change (at most once a second) and every
/// heartbeat, until `shutdown`.
pub async fn run_writer(
    engine: Arc<Engine>,
    info: Arc<DaemonInfo>,
    path: Arc<Mutex<PathBuf>>,
    shutdown: CancellationToken,
    on_write: impl Fn(&Health) + Send + 'static,
) {
    let changed = engine.changed.clone();
    let mut last_write = tokio::time::Instant::now() - Duration::from_secs(1);
    loop {
        let heartbeat = info
            .heartbeat
            .lock()
            .map(|d| *d)
            .unwrap_or(Duration::from_secs(30));
        let since = last_write.elapsed();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(heartbeat.saturating_sub(since)) => {}
            _ = changed.notified() => {
                // Coalesce bursts of changes into one write a second.
                let wait = Duration::from_secs(1).saturating_sub(last_write.elapsed());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        if let Some(h) = write_now(&engine, &info, &path).await {
            on_write(&h);
        }
        last_write = tokio::time::Instant::now();
    }
}

/// Take a snapshot and write it; a failed write is logged, not fatal. Writes are serialised so
/// an older snapshot never replaces a newer one.
pub async fn write_now(
    engine: &Engine,
    info: &DaemonInfo,
    path: &Mutex<PathBuf>,
) -> Option<Health> {
    let _turn = info.writing.lock().await;
    let h = snapshot(engine, info).await;
    let p = path.lock().map(|p| p.clone()).ok()?;
    let (h2, p2) = (h.clone(), p.clone());
    match tokio::task::spawn_blocking(move || write_atomic(&p2, &h2)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(path = %p.display(), error = %e, "cannot write the health file")
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
    let next = h
        .next_refresh_at
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| format!("; next refresh {}", t.format("%H:%M:%S")))
        .unwrap_or_default();
    format!("{}{next}", parts.join(", "))
}
