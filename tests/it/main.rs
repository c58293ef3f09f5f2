//! One integration-test crate: real SQLite files, a mock provider over loopback HTTP, and the
//! real binary where the behaviour is the process's. `TEST_LOG=1` shows the in-process logs.

mod api;
mod cli;
mod config;
mod crash;
mod durability;
mod faults;
mod helpers;
mod hostile;
mod logs;
mod notify;
mod operator;
mod process;
mod refresh;
mod revoke;
mod rotation;
mod states;
