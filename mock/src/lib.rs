//! A mock Factorial OAuth server that answers as Doorkeeper 5.5 does (tokend's README, "The mock
//! provider"), for tokend's tests, benchmarks and `tokend demo`. It is not part of the daemon.
//!
//! It keeps its own books: per account, grants, errors, **reuse attempts** (a refresh token
//! presented after it was exchanged or revoked) and **lapses** (a new access token issued after the
//! previous one had expired). It can inject faults per request or by rate.
//!
//! Layout: `config` (modes, clock), `books` (the server's records and its accounting), `faults`
//! (what can go wrong and how it is answered), `serve` (work that outlives the client, the
//! one-at-a-time queue), the endpoints (`token`, `oauth` for introspect and revoke, `bearer` for
//! token/info and `/api/me`), `provider` (the running server and what tests ask of it), and
//! `evil` (a hostile other host, for redirect tests).

#![forbid(unsafe_code)]

mod bearer;
mod books;
mod config;
mod evil;
mod faults;
mod oauth;
mod provider;
mod serve;
mod token;

pub use books::{AccountStats, Issued, Request, Totals};
pub use config::{MockClock, MockConfig, Rotation};
pub use evil::{EvilHost, SeenRequest};
pub use faults::{Endpoint, Fault, OddShape};
pub use provider::MockProvider;
