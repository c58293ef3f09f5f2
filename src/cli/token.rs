//! `tokend token`: a currently valid access token, from the daemon when it runs (it refreshes
//! first if needed), else from the database, read-only.

use std::path::Path;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::{Places, places, quiet_logs, runtime};
use crate::api::client::{Client, Unreachable};
use crate::clock::{Clock, rfc3339};
use crate::config::TokenType;
use crate::daemon::EXIT_IOERR;
use crate::state::State;
use crate::store::Store;

const DEFAULT_MIN_TTL: Duration = Duration::from_secs(60);

pub(super) fn main(path: &Path, id: &str, min_ttl: Option<Duration>, json: bool) -> i32 {
    quiet_logs();
    let p = places(path);
    let min_ttl = min_ttl.unwrap_or(DEFAULT_MIN_TTL);
    runtime().block_on(async {
        if let Some(socket) = &p.socket {
            match Client::connect(socket) {
                Ok(c) => return from_daemon(&c, id, min_ttl, json).await,
                Err(Unreachable::Refused(e)) => {
                    eprintln!(
                        "tokend: note: the daemon's socket {} refused this user ({e}); reading the database instead",
                        socket.display()
                    );
                }
                Err(Unreachable::NotRunning) => {}
            }
        }
        from_database(&p, id, min_ttl, json).await
    })
}

async fn from_daemon(c: &Client, id: &str, min_ttl: Duration, json: bool) -> i32 {
    let path = format!(
        "/v1/accounts/{}/token?min_ttl={}",
        urlencode(id),
        min_ttl.as_secs()
    );
    match c.call(reqwest::Method::GET, &path, None).await {
        Ok(a) if a.status == 200 => {
            if a.body["state"] == "paused" {
                eprintln!(
                    "tokend: note: account {id:?} belongs to a paused profile; this token is valid until {}",
                    a.body["expires_at"].as_str().unwrap_or("it is revoked")
                );
            }
            if json {
                println!("{}", a.body);
            } else {
                println!("{}", a.body["access_token"].as_str().unwrap_or_default());
            }
            0
        }
        Ok(a) => {
            let retry = a.body["retry_after"]
                .as_u64()
                .map(|s| format!(" (try again in {s} s)"))
                .unwrap_or_default();
            eprintln!("tokend: account {id:?}: {}{retry}", a.message());
            1
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            1
        }
    }
}

async fn from_database(p: &Places, id: &str, min_ttl: Duration, json: bool) -> i32 {
    let store = match Store::open_read_only(&p.database) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tokend: {e}");
            return EXIT_IOERR;
        }
    };
    let clock = Clock::system();
    // A refresh in flight (by any tokend) rotates the token: wait for it rather than hand out
    // one that is about to be replaced.
    let deadline = tokio::time::Instant::now() + p.http_timeout + Duration::from_secs(1);
    let account = loop {
        match store.get(id).await {
            Ok(Some(Ok(a))) => {
                let in_flight = a
                    .attempt_at
                    .is_some_and(|t| clock.now() - t <= p.http_timeout.as_secs() as i64);
                if !in_flight || tokio::time::Instant::now() > deadline {
                    break a;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Some(Err(e))) => {
                eprintln!("tokend: account {id:?}: {}", e.reason);
                return 1;
            }
            Ok(None) => {
                eprintln!("tokend: no account {id:?}");
                return 1;
            }
            Err(e) => {
                eprintln!("tokend: {e}");
                return EXIT_IOERR;
            }
        }
    };
    let now = clock.now();
    let serves = matches!(
        account.state,
        State::Active | State::Failing | State::Paused
    );
    let left = match account.token_type {
        TokenType::User => account.expires_at.map(|e| e - now),
        TokenType::Company => Some(i64::MAX),
    };
    let valid = left.is_some_and(|l| l > 0 && l as u64 >= min_ttl.as_secs());
    match (&account.access_token, serves && valid) {
        (Some(t), true) => {
            if account.state == State::Paused {
                eprintln!(
                    "tokend: note: account {id:?} belongs to a paused profile; this token is valid until {}",
                    account
                        .expires_at
                        .map(rfc3339)
                        .unwrap_or_else(|| "it is revoked".into())
                );
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "access_token": t.expose_secret(),
                        "token_type": "Bearer",
                        "expires_at": match account.token_type {
                            TokenType::Company => None,
                            TokenType::User => account.expires_at.map(rfc3339),
                        },
                        "scopes": account.scopes.as_deref().unwrap_or("").split_whitespace().collect::<Vec<_>>(),
                    })
                );
            } else {
                println!("{}", t.expose_secret());
            }
            0
        }
        _ => {
            let expiry = match account.expires_at {
                Some(e) if e <= now => format!("expired at {}", rfc3339(e)),
                Some(e) => format!("expires at {}", rfc3339(e)),
                None => "no expiry recorded".into(),
            };
            eprintln!(
                "tokend: account {id:?} has no access token valid for {} more (state {}, {expiry}; the daemon is not running to refresh it)",
                humantime::format_duration(min_ttl),
                account.state,
            );
            1
        }
    }
}

/// Percent-encode an account id for a URL path.
pub(super) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
