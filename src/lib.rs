//! tokend keeps OAuth grants for Factorial HR alive.
//!
//! Layout, in the direction data flows:
//! - [`config`]: the TOML file, validated; connector profiles and their secrets.
//! - [`store`]: the SQLite account store, on its own thread; no SQL outside it.
//! - [`provider`]: the OAuth client (refresh, revocation probes), answers classified.
//! - [`breaker`]: per-profile circuit breakers for provider outages.
//! - [`engine`]: claims due accounts, refreshes them, writes outcomes back.
//! - [`revocation`]: cron-scheduled revocation checks of company tokens.
//! - [`health`]: the health file and the one-line status.
//! - [`telemetry`]: logs for terminals, journald and log shippers.
//! - [`daemon`]: `tokend run`: wires the above, handles signals, reload, readiness, shutdown.
//! - [`state`]: the account-state vocabulary shared by all of the above.
//! - [`cli`], [`accounts`], [`demo`]: the command line, account import, the demo (which alone
//!   uses the `tokend-mock` crate, behind the default `demo` feature).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod engine;
pub mod health;
pub mod provider;
pub mod revocation;
pub mod state;
pub mod store;
pub mod telemetry;
