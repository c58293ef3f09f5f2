//! `tokend run`: open the store, replay the recovery journal, start the engine, the revocation
//! schedule, the health writer and the notifier, tell systemd, and handle signals until asked
//! to stop.
//!
//! SIGTERM/SIGINT stop new work, let in-flight refreshes finish and commit (bounded by
//! `shutdown_timeout`), write a last health file and exit 0 — or 75 when a rotated pair could
//! only be journaled, naming the accounts; a second signal exits at once. SIGHUP reloads the
//! config file; an invalid file is reported and the old config stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::engine::{Ended, Engine};
use crate::health::{self, DaemonInfo};
use crate::journal::Journal;
use crate::revocation::{self, Checker};
use crate::shared::{Runtime, Shared, lock};
use crate::state::State;
use crate::store::{Change, Committed, Guard, NewTokens, Outcome, Store, StoreError};
use crate::telemetry::LogHandle;

/// Exit codes from sysexits.h that operators and systemd can act on.
pub const EXIT_CONFIG: i32 = 78;
pub const EXIT_IOERR: i32 = 74;
/// Rotated pairs are in the recovery journal, not the store: the next start stores them.
pub const EXIT_TEMPFAIL: i32 = 75;
/// A second SIGTERM/SIGINT during shutdown.
pub const EXIT_FORCED: i32 = 130;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error(
        "stopped with rotated pairs in the recovery journal {journal}, not in the store, for accounts: {accounts}; the next start stores them"
    )]
    Unsaved { journal: String, accounts: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl DaemonError {
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Store(StoreError::Sql { .. }) => EXIT_TEMPFAIL,
            DaemonError::Store(_) => EXIT_IOERR,
            DaemonError::Unsaved { .. } => EXIT_TEMPFAIL,
            DaemonError::Other(_) => 1,
        }
    }
}

/// What the process hands to [`run`]: where to reload from, how to stop, how to change the log
/// level, and the clock (the system's, or a test's).
pub struct Control {
    pub config_path: PathBuf,
    pub shutdown: CancellationToken,
    pub reload: mpsc::Receiver<()>,
    pub log: Option<LogHandle>,
    pub clock: Clock,
}

/// Tell systemd (`$NOTIFY_SOCKET`), never blocking: a service manager that does not read its
/// socket must not stall the runtime (sd-notify's own `notify` blocks when the socket is full).
/// Without `NOTIFY_SOCKET` this does nothing.
pub fn notify(states: &[NotifyState<'_>]) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let send = || -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        sock.send_to_addr(msg.as_bytes(), &addr)?;
        Ok(())
    };
    if let Err(e) = send() {
        tracing::debug!(error = %e, "sd_notify message not sent");
    }
}

/// Store the pairs a previous run left in the recovery journal, each only where the account
/// still holds the refresh token that was presented. Returns how many were stored.
pub async fn replay_journal(
    store: &Store,
    journal: &Journal,
    now: i64,
) -> Result<usize, StoreError> {
    let records = journal.records().map_err(|e| StoreError::Open {
        path: journal.path().to_owned(),
        message: format!("cannot read the recovery journal: {e}"),
    })?;
    if records.is_empty() {
        return Ok(0);
    }
    let mut stored = 0;
    for r in &records {
        let outcome = Outcome {
            id: r.account.clone(),
            guard: Guard::PresentedDigest(r.presented_sha256.clone()),
            tokens: Some(NewTokens {
                access_token: r.access_token.clone(),
                refresh_token: r.refresh_token.clone(),
                expires_at: r.expires_at,
                scopes: r.scopes.clone(),
            }),
            // Evaluated again at once: scheduled by the stored expiry.
            change: Change {
                to: State::Active,
                reason: Some("rotated pair recovered from the journal".into()),
                next_action_at: Some(0),
                failures: 0,
                last_error: None,
                checked_at: None,
                profile: None,
            },
            notes: Vec::new(),
            now,
        };
        match store.commit(outcome).await? {
            Committed::Applied { .. } => {
                stored += 1;
                tracing::warn!(account_id = %r.account, "rotated pair recovered from the journal and stored");
            }
            Committed::Superseded | Committed::Gone | Committed::Stale => {
                tracing::info!(account_id = %r.account,
                    "journaled pair not needed: the account no longer holds the refresh token it replaced");
            }
        }
    }
    journal.clear().map_err(|e| StoreError::Open {
        path: journal.path().to_owned(),
        message: format!("cannot empty the recovery journal: {e}"),
    })?;
    Ok(stored)
}

/// Run the daemon until `control.shutdown` fires (or the database file is replaced).
pub async fn run(config: Config, mut control: Control) -> Result<(), DaemonError> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let clock = control.clock.clone();
    let (store, warnings) = Store::open_waiting(
        &config.daemon.database,
        config.daemon.store_busy_timeout.get(),
    )?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let journal = Journal::open(&config.daemon.database).map_err(|e| StoreError::Open {
        path: Journal::path_for(&config.daemon.database),
        message: format!("cannot open the recovery journal: {e}"),
    })?;
    // Before anything else: pairs a previous run could not store.
    let recovered = replay_journal(&store, &journal, clock.now()).await?;
    if recovered > 0 {
        tracing::warn!(pairs = recovered, "recovery journal replayed");
    }
    let d = config.daemon.clone();
    let runtime = Arc::new(Runtime::new(config, clock.now())?);
    let (runtime_tx, runtime_rx) = watch::channel(runtime);
    let shared = Shared::new(
        store.clone(),
        clock.clone(),
        runtime_rx,
        crate::shared::owner_id(),
        Some(journal),
    );
    {
        // Weak: the store lives inside `shared`.
        let weak = Arc::downgrade(&shared);
        store.on_commit(move |took| {
            if let Some(s) = weak.upgrade() {
                s.metrics.commit_duration(took);
            }
        });
    }
    let hard_stop = CancellationToken::new();
    let engine = Engine::new(shared.clone(), hard_stop.clone());
    engine.recover().await?;
    let info = Arc::new(DaemonInfo::new(&control.config_path, clock.now()));

    // A first health file, so monitoring sees `starting` rather than nothing. It counts
    // nothing: with millions of accounts counting takes longer than starting.
    if let Err(e) = health::write_atomic(&d.health_file, &health::starting(&shared, &info)) {
        tracing::error!(path = %d.health_file.display(), error = %e, "cannot write the health file");
    }

    // The API's listeners are bound before READY: a socket that cannot be made stops the start.
    let listeners = crate::api::bind(&shared.runtime().config.api).await?;
    {
        let rt = shared.runtime();
        let mut a = lock(&info.api);
        a.socket = rt
            .config
            .api
            .socket
            .as_ref()
            .map(|p| p.display().to_string());
        a.listen = listeners.tcp_addr().map(|a| a.to_string());
    }
    let api_stop = CancellationToken::new();
    let api_tasks = crate::api::serve(
        crate::api::Api::new(shared.clone(), engine.clone(), info.clone()),
        listeners,
        api_stop.clone(),
    );

    let engine_stop = CancellationToken::new();
    let engine_task = tokio::spawn(engine.clone().run(engine_stop.clone()));
    let checker = Checker::new(shared.clone(), engine_stop.clone(), hard_stop.clone());
    *lock(&info.checker) = Some(checker.clone());
    let mut scheduler = Some(revocation::schedule(checker.clone(), &d.revocation_schedule).await?);
    let mut cron = d.revocation_schedule.clone();

    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(health::run_writer(
        shared.clone(),
        info.clone(),
        writer_stop.clone(),
        |h| notify(&[NotifyState::Status(&health::one_line(h))]),
    ));
    let watchdog = tokio::spawn(watchdog(shared.clone(), writer_stop.clone()));
    let notifier_stop = CancellationToken::new();
    let notifier = tokio::spawn(crate::notify::run(
        shared.clone(),
        info.clone(),
        notifier_stop.clone(),
    ));

    // Ready: the store is open and migrated, the journal replayed, the engine running.
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("started; counting accounts"),
    ]);
    if let Some(h) = health::write_now(&shared, &info).await {
        notify(&[NotifyState::Status(&health::one_line(&h))]);
        log_start(&shared, &h);
    }

    let mut engine_task = engine_task;
    let mut ended: Option<Ended> = None;
    loop {
        tokio::select! {
            _ = control.shutdown.cancelled() => break,
            e = &mut engine_task => {
                ended = e.ok();
                break;
            }
            Some(()) = control.reload.recv() => {
                notify(&[NotifyState::Reloading]);
                reload(&control, &shared, &info, &runtime_tx, &checker, &mut scheduler, &mut cron).await;
                engine.poke();
                shared.changed.notify_one();
                notify(&[NotifyState::Ready]);
            }
        }
    }

    // Shutdown: no new work; in-flight refreshes finish and are committed.
    tracing::info!("stopping: letting in-flight refreshes finish");
    notify(&[NotifyState::Stopping]);
    info.stopping.store(true, Ordering::Relaxed);
    health::write_now(&shared, &info).await;
    engine_stop.cancel();
    notifier_stop.cancel();
    if let Some(mut s) = scheduler.take() {
        let _ = s.shutdown().await;
    }
    let timeout = shared.runtime().config.daemon.shutdown_timeout.get();
    if ended.is_none() {
        match tokio::time::timeout(timeout, &mut engine_task).await {
            Ok(e) => ended = e.ok(),
            Err(_) => {
                tracing::warn!(
                    timeout_s = timeout.as_secs(),
                    "shutdown timeout reached: abandoning what is still in flight (rotated pairs go to the recovery journal)"
                );
                hard_stop.cancel();
                ended = tokio::time::timeout(Duration::from_secs(5), engine_task)
                    .await
                    .ok()
                    .and_then(|e| e.ok());
            }
        }
    }
    hard_stop.cancel();
    // The API served tokens while refreshes drained; it stops now.
    api_stop.cancel();
    for t in api_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), checker.wait()).await;
    // Bounded: deliveries in flight get notify::STOP_WAIT, then are sent again after a start.
    let _ = tokio::time::timeout(crate::notify::STOP_WAIT * 2, notifier).await;
    writer_stop.cancel();
    let _ = writer.await;
    let _ = watchdog.await;
    let unsaved = shared.journaled();
    let replaced = match ended {
        Some(Ended::StoreReplaced(e)) => Some(e),
        _ => shared.fatal(),
    };
    if replaced.is_none() && unsaved.is_empty() {
        *lock(&info.stopped_at) = Some(shared.clock.now());
    }
    health::write_now(&shared, &info).await;
    store.close().await;
    tracing::info!(
        refreshes_ok = shared.stats.refreshes_ok.load(Ordering::Relaxed),
        refreshes_failed = shared.stats.refreshes_failed.load(Ordering::Relaxed),
        "tokend stopped"
    );
    if let Some(e) = replaced {
        return Err(DaemonError::Store(e));
    }
    if !unsaved.is_empty() {
        return Err(DaemonError::Unsaved {
            journal: shared
                .journal
                .as_ref()
                .map(|j| j.path().display().to_string())
                .unwrap_or_default(),
            accounts: unsaved.join(", "),
        });
    }
    Ok(())
}

/// One line an operator can read at start: what runs, against what, where things are.
fn log_start(shared: &Shared, h: &health::Health) {
    let rt = shared.runtime();
    let d = &rt.config.daemon;
    let profiles: Vec<String> = rt
        .config
        .profiles
        .iter()
        .map(|p| format!("{} ({})", p.name, p.base_url))
        .collect();
    let states: Vec<String> = h
        .accounts
        .by_state
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        instance = %shared.owner,
        profiles = %profiles.join(", "),
        accounts_by_state = %if states.is_empty() { "none".to_owned() } else { states.join(", ") },
        refresh_lead = %humantime::format_duration(d.refresh_lead.get()),
        revocation_schedule = %d.revocation_schedule,
        database = %d.database.display(),
        health_file = %d.health_file.display(),
        "tokend started"
    );
}

#[allow(clippy::too_many_arguments)]
async fn reload(
    control: &Control,
    shared: &Arc<Shared>,
    info: &DaemonInfo,
    runtime_tx: &watch::Sender<Arc<Runtime>>,
    checker: &Arc<Checker>,
    scheduler: &mut Option<tokio_cron_scheduler::JobScheduler>,
    cron: &mut String,
) {
    let failed = |message: &str| {
        tracing::error!(
            "configuration reload failed, the previous configuration stays in force: {message}"
        );
        let mut c = lock(&info.config);
        c.last_reload_ok = false;
        c.last_reload_error = Some(message.to_owned());
    };
    let new = match Config::load(&control.config_path) {
        Ok(c) => c,
        Err(e) => return failed(&e.to_string()),
    };
    if new.daemon.database != shared.runtime().config.daemon.database {
        tracing::warn!(
            "daemon.database changed; that takes a restart, the old database stays in use"
        );
    }
    for w in &new.warnings {
        tracing::warn!("{w}");
    }
    if let Some(log) = &control.log {
        log.set_level(new.daemon.log_level);
    }
    let new_cron = new.daemon.revocation_schedule.clone();
    let rt = match Runtime::new(new, shared.clock.now()) {
        Ok(rt) => rt,
        Err(e) => return failed(&format!("{e:#}")),
    };
    if new_cron != *cron {
        match revocation::schedule(checker.clone(), &new_cron).await {
            Ok(s) => {
                if let Some(mut old) = scheduler.replace(s) {
                    let _ = old.shutdown().await;
                }
                *cron = new_cron;
            }
            Err(e) => return failed(&format!("revocation_schedule: {e:#}")),
        }
    }
    let _ = runtime_tx.send(Arc::new(rt));
    let mut c = lock(&info.config);
    c.loaded_at = shared.clock.now();
    c.last_reload_ok = true;
    c.last_reload_error = None;
    tracing::info!(path = %control.config_path.display(), "configuration reloaded");
}

/// Send `WATCHDOG=1` at half of `WatchdogSec`, but only while the engine loop is turning: a
/// wedged engine lets systemd's watchdog fire.
async fn watchdog(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let half = (period / 2).max(Duration::from_millis(100));
    let mut last = shared.stats.heartbeat.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(half) => {}
        }
        let now = shared.stats.heartbeat.load(Ordering::Relaxed);
        if now != last {
            notify(&[NotifyState::Watchdog]);
            last = now;
        } else {
            tracing::warn!("engine made no progress for {half:?}; withholding the watchdog ping");
        }
    }
}

/// Turn SIGTERM/SIGINT into `shutdown` (a second one exits at once) and SIGHUP into a reload.
pub fn spawn_signal_handler(
    shutdown: CancellationToken,
    reload: mpsc::Sender<()>,
) -> std::io::Result<()> {
    use futures_util::StreamExt;
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => {
                    let _ = reload.try_send(());
                }
                _ if shutdown.is_cancelled() => {
                    // SQLite's WAL keeps the database consistent whatever moment we die at, and
                    // the journal holds every rotated pair not yet stored.
                    crate::telemetry::finish();
                    eprintln!("tokend: second stop signal, exiting at once");
                    std::process::exit(EXIT_FORCED);
                }
                _ => shutdown.cancel(),
            }
        }
    });
    Ok(())
}
