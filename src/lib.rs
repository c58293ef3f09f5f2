//! tokend keeps OAuth grants for Factorial HR alive.
//!
//! Layout, in the direction data flows:
//! - [`config`]: the TOML file, validated; connector profiles and their secrets.
//! - [`clock`]: the one clock (the system's; tokio's in tests).
//! - [`store`]: the SQLite account store; no SQL outside it. [`journal`]: rotated pairs the
//!   store could not take yet, kept durably beside it.
//! - [`provider`]: the OAuth client (refresh, probes, revocation), answers classified.
//! - [`breaker`], [`limiter`]: per-profile circuit breakers and adaptive concurrency.
//! - [`shared`]: what the tasks below share: store, clock, configuration in force, counters,
//!   and the one way to commit an outcome.
//! - [`engine`]: claims due accounts and refreshes them (`policy`: what a row and an answer
//!   mean, pure; `pauses`: misconfigured profiles; the loop).
//! - [`revocation`]: cron-scheduled revocation checks of company tokens.
//! - [`api`]: the local API (Unix socket, optional TCP): tokens, accounts, health, metrics.
//! - [`unlink`]: revoking a grant for good before its account is removed (through the engine's
//!   refresh when its access token expired, as Doorkeeper needs).
//! - [`notify`]: tells a person when a person must act: the event log read as an outbox, signed
//!   webhooks and commands, storm rules (`policy`, pure), at least once and in order.
//! - [`health`], [`metrics`], [`telemetry`]: the health file, Prometheus metrics, logs.
//! - [`daemon`]: `tokend run`: wires the above, handles signals, reload, readiness, shutdown.
//! - [`state`]: the account-state vocabulary shared by all of the above.
//! - [`cli`], [`accounts`], [`demo`]: the command line, account import, the demo (which alone
//!   uses the `tokend-mock` crate, behind the default `demo` feature).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod api;
pub mod breaker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod engine;
pub mod health;
pub mod journal;
pub mod limiter;
pub mod metrics;
pub mod notify;
pub mod provider;
pub mod revocation;
pub mod shared;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod unlink;

/// A map for keys looked up on every refresh (profile names, account ids): foldhash, seeded
/// per process, instead of SipHash (measured at a few thousand instructions per refresh).
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Lock a mutex whose data a panic elsewhere cannot leave inconsistent: a poisoned lock is
/// taken all the same.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
