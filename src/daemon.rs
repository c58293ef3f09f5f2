//! `tokend run`: open the store, start the engine, the revocation schedule and the health writer,
//! tell systemd, and handle signals until asked to stop.
//!
//! SIGTERM/SIGINT stop new work, let in-flight refreshes finish and commit (bounded by
//! `shutdown_timeout`), write a last health file and exit 0; a second one exits at once.
//! SIGHUP reloads the config file; an invalid file is reported and the old config stays.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{Engine, Runtime, unix_now};
use crate::health::{self, DaemonInfo};
use crate::revocation::{self, Checker};
use crate::store::Store;
use crate::telemetry::LogHandle;

/// Exit codes from sysexits.h that operators and systemd can act on.
pub const EXIT_CONFIG: i32 = 78;
pub const EXIT_IOERR: i32 = 74;
/// A second SIGTERM/SIGINT during shutdown.
pub const EXIT_FORCED: i32 = 130;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl DaemonError {
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Store(_) => EXIT_IOERR,
            DaemonError::Other(_) => 1,
        }
    }
}

/// What the process hands to [`run`]: where to reload from, how to stop, how to change the log level.
pub struct Control {
    pub config_path: PathBuf,
    pub shutdown: CancellationToken,
    pub reload: mpsc::Receiver<()>,
    pub log: Option<LogHandle>,
}

/// Tell systemd (`$NOTIFY_SOCKET`), never blocking: a service manager that does not read its
/// socket must not stall the runtime (sd-notify's own `notify` blocks when the socket is full).
/// Without `NOTIFY_SOCKET` this does nothing.
fn notify(states: &[NotifyState<'_>]) {
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

/// A random id for this process, recorded in the leases it takes.
pub fn instance_id() -> String {
    format!("tokend-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// Run the daemon until `control.shutdown` fires.
pub async fn run(config: Config, mut control: Control) -> Result<(), DaemonError> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let store = Store::open(&config.daemon.database)?;
    let d = config.daemon.clone();
    let runtime = Arc::new(Runtime::new(config)?);
    let (runtime_tx, runtime_rx) = watch::channel(runtime);
    let engine = Engine::new(store.clone(), runtime_rx, instance_id());
    let info = Arc::new(DaemonInfo::new(
        &control.config_path,
        d.health_interval.get(),
        d.refresh_token_lifetime.as_secs_i64(),
        d.refresh_token_margin.as_secs_i64(),
    ));
    let health_path = Arc::new(Mutex::new(d.health_file.clone()));

    // A first health file, so monitoring sees `starting` rather than nothing. It counts
    // nothing: with a million accounts counting takes longer than starting.
    let first = health::starting(&engine, &info);
    if let Err(e) = health::write_atomic(&d.health_file, &first) {
        tracing::error!(path = %d.health_file.display(), error = %e, "cannot write the health file");
    }

    let engine_stop = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let engine_task = tokio::spawn(engine.clone().run(engine_stop.clone(), hard_stop.clone()));
    let checker = Checker::new(engine.clone(), engine_stop.clone());
    let mut scheduler = Some(revocation::schedule(checker.clone(), &d.revocation_schedule).await?);
    let mut cron = d.revocation_schedule.clone();

    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(health::run_writer(
        engine.clone(),
        info.clone(),
        health_path.clone(),
        writer_stop.clone(),
        |h| notify(&[NotifyState::Status(&health::one_line(h))]),
    ));
    let watchdog = tokio::spawn(watchdog(engine.clone(), writer_stop.clone()));

    tracing::info!(instance = engine.owner(), database = %d.database.display(),
        version = env!("CARGO_PKG_VERSION"), "tokend started");
    // Ready: the store is open and migrated, the engine and the schedule are running.
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("started; counting accounts"),
    ]);
    if let Some(h) = health::write_now(&engine, &info, &health_path).await {
        notify(&[NotifyState::Status(&health::one_line(&h))]);
    }

    loop {
        tokio::select! {
            _ = control.shutdown.cancelled() => break,
            Some(()) = control.reload.recv() => {
                notify(&[NotifyState::Reloading]);
                match Config::load(&control.config_path) {
                    Ok(new) => {
                        if new.daemon.database != d.database {
                            tracing::warn!("daemon.database changed; that takes a restart, the old database stays in use");
                        }
                        for w in &new.warnings {
                            tracing::warn!("{w}");
                        }
                        if let Some(log) = &control.log {
                            log.set_level(new.daemon.log_level);
                        }
                        if let Ok(mut p) = health_path.lock() {
                            *p = new.daemon.health_file.clone();
                        }
                        if let Ok(mut h) = info.heartbeat.lock() {
                            *h = new.daemon.health_interval.get();
                        }
                        if let Ok(mut r) = info.refresh_token_risk.lock() {
                            *r = (new.daemon.refresh_token_lifetime.as_secs_i64(), new.daemon.refresh_token_margin.as_secs_i64());
                        }
                        let new_cron = new.daemon.revocation_schedule.clone();
                        match Runtime::new(new) {
                            Ok(rt) => {
                                let _ = runtime_tx.send(Arc::new(rt));
                                if new_cron != cron {
                                    if let Some(mut s) = scheduler.take() {
                                        let _ = s.shutdown().await;
                                    }
                                    scheduler = Some(revocation::schedule(checker.clone(), &new_cron).await?);
                                    cron = new_cron;
                                }
                                if let Ok(mut c) = info.config.lock() {
                                    c.loaded_at = unix_now();
                                    c.last_reload_ok = true;
                                    c.last_reload_error = None;
                                }
                                tracing::info!(path = %control.config_path.display(), "configuration reloaded");
                                engine.poke();
                            }
                            Err(e) => reload_failed(&info, &format!("{e:#}")),
                        }
                    }
                    Err(e) => reload_failed(&info, &e.to_string()),
                }
                engine.changed.notify_one();
                notify(&[NotifyState::Ready]);
            }
        }
    }

    // Shutdown: no new work; in-flight refreshes finish and are committed.
    tracing::info!("stopping: letting in-flight refreshes finish");
    notify(&[NotifyState::Stopping]);
    info.stopping.store(true, Ordering::Relaxed);
    health::write_now(&engine, &info, &health_path).await;
    engine_stop.cancel();
    if let Some(mut s) = scheduler.take() {
        let _ = s.shutdown().await;
    }
    let timeout = d.shutdown_timeout.get();
    let mut engine_task = engine_task;
    if tokio::time::timeout(timeout, &mut engine_task)
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_s = timeout.as_secs(),
            "shutdown timeout reached; abandoning what is still in flight"
        );
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), engine_task).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), checker.wait()).await;
    writer_stop.cancel();
    let _ = writer.await;
    let _ = watchdog.await;
    health::write_now(&engine, &info, &health_path).await;
    store.close().await;
    tracing::info!(
        refreshes_ok = engine.stats.refreshes_ok.load(Ordering::Relaxed),
        refreshes_failed = engine.stats.refreshes_failed.load(Ordering::Relaxed),
        "tokend stopped"
    );
    Ok(())
}

fn reload_failed(info: &DaemonInfo, message: &str) {
    tracing::error!(
        "configuration reload failed, the previous configuration stays in force: {message}"
    );
    if let Ok(mut c) = info.config.lock() {
        c.last_reload_ok = false;
        c.last_reload_error = Some(message.to_owned());
    }
}

/// Send `WATCHDOG=1` at half of `WatchdogSec`, but only while the engine loop is turning: a
/// wedged engine lets systemd's watchdog fire.
async fn watchdog(engine: Arc<Engine>, stop: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let half = (period / 2).max(Duration::from_millis(100));
    let mut last = engine.stats.heartbeat.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(half) => {}
        }
        let now = engine.stats.heartbeat.load(Ordering::Relaxed);
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
                    // SQLite's WAL keeps the database consistent whatever moment we die at.
                    eprintln!("tokend: second stop signal, exiting at once");
                    std::process::exit(EXIT_FORCED);
                }
                _ => shutdown.cancel(),
            }
        }
    });
    Ok(())
}
