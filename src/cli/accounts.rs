//! `tokend accounts`: import, list, show, remove, resume, refresh.
//!
//! Changes go through the daemon's API when it runs (its leases, its engine); otherwise they are
//! made on the database directly, as the daemon would make them.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use reqwest::Method;

use super::token::urlencode;
use super::{AccountsCommand, Places, places, quiet_logs, runtime};
use crate::api::client::{Client, Unreachable};
use crate::clock::{Clock, rfc3339};
use crate::config::Config;
use crate::daemon::{EXIT_CONFIG, EXIT_IOERR};
use crate::engine::{Engine, OnDemand};
use crate::shared::{Runtime, Shared};
use crate::state::State;
use crate::store::{Linked, Store};
use crate::unlink::{NotRevoked, Revoked};

pub(super) fn main(path: &Path, cmd: AccountsCommand) -> i32 {
    quiet_logs();
    let p = places(path);
    runtime().block_on(async move {
        match cmd {
            AccountsCommand::Import { file, replace } => match &p.config {
                Some(c) => import(c, &file, replace).await,
                None => {
                    eprintln!("tokend: import needs a configuration that loads (it checks each row against the profiles)");
                    EXIT_CONFIG
                }
            },
            AccountsCommand::List { json, state } => list(&p, json, state).await,
            AccountsCommand::Show { account, json } => show(&p, &account, json).await,
            AccountsCommand::Remove { account, revoke } => {
                let q = format!("/v1/accounts/{}?revoke={revoke}", urlencode(&account));
                match ask(&p, Method::DELETE, &q).await {
                    Some(code) => code,
                    None => remove_locally(path, &p, &account, revoke).await,
                }
            }
            AccountsCommand::Resume { account } => {
                let q = format!("/v1/accounts/{}/resume", urlencode(&account));
                match ask(&p, Method::POST, &q).await {
                    Some(code) => code,
                    None => resume_locally(&p, &account).await,
                }
            }
            AccountsCommand::Refresh { account } => {
                let q = format!("/v1/accounts/{}/refresh", urlencode(&account));
                match ask(&p, Method::POST, &q).await {
                    Some(code) => code,
                    None => refresh_locally(path, &account).await,
                }
            }
        }
    })
}

/// Ask the running daemon; `None` when it is not running (the caller acts on the database).
async fn ask(p: &Places, method: Method, path: &str) -> Option<i32> {
    let socket = p.socket.as_ref()?;
    let client = match Client::connect(socket) {
        Ok(c) => c,
        Err(Unreachable::NotRunning) => return None,
        Err(Unreachable::Refused(e)) => {
            eprintln!(
                "tokend: the daemon runs, but its socket {} refused this user ({e}); run as root or as the service user",
                socket.display()
            );
            return Some(1);
        }
    };
    Some(match client.call(method, path, None).await {
        Ok(a) if (200..300).contains(&a.status) => {
            print_account(&a.body["account"].clone().or(&a.body));
            0
        }
        Ok(a) if a.status == 403 => {
            eprintln!(
                "tokend: the daemon refused: {} (run as root or as the service user)",
                a.message()
            );
            1
        }
        Ok(a) => {
            let retry = a.body["retry_after"]
                .as_u64()
                .map(|s| format!(" (try again in {s} s)"))
                .unwrap_or_default();
            eprintln!("tokend: {}{retry}", a.message());
            1
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            1
        }
    })
}

trait OrBody {
    fn or(self, other: &serde_json::Value) -> serde_json::Value;
}

impl OrBody for serde_json::Value {
    fn or(self, other: &serde_json::Value) -> serde_json::Value {
        if self.is_null() { other.clone() } else { self }
    }
}

fn print_account(v: &serde_json::Value) {
    if let Some(id) = v["removed"].as_str() {
        println!(
            "{}",
            removed(id, v["revoked"] == true, v["not_revoked"].as_str())
        );
        return;
    }
    let field = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
    // The daemon may answer with a token that expired (a resumed account, say): say so.
    let expiry = match v["expires_at"].as_str() {
        None => "no expiry".to_owned(),
        Some(t) if humantime::parse_rfc3339(t).is_ok_and(|t| t <= std::time::SystemTime::now()) => {
            format!("expired at {t}")
        }
        Some(t) => format!("expires at {t}"),
    };
    println!(
        "{}: {} ({expiry}, last refresh {})",
        field("id"),
        field("state"),
        field("last_refresh_at")
    );
}

/// What `accounts remove` prints: whether the grant was revoked, or why nothing was.
fn removed(id: &str, revoked: bool, not_revoked: Option<&str>) -> String {
    match (revoked, not_revoked) {
        (true, _) => format!("removed {id} (its grant revoked at the provider)"),
        (false, Some(why)) => format!("removed {id} (nothing revoked: {why})"),
        (false, None) => format!("removed {id}"),
    }
}

fn open_read_only(p: &Places) -> Result<Store, i32> {
    Store::open_read_only(&p.database).map_err(|e| {
        eprintln!("tokend: {e}");
        EXIT_IOERR
    })
}

fn open_for_writing(p: &Places) -> Result<Store, i32> {
    if !p.database.exists() {
        eprintln!(
            "tokend: no database at {} (it is created by the daemon or by `accounts import`)",
            p.database.display()
        );
        return Err(EXIT_IOERR);
    }
    Store::open(&p.database).map(|(s, _)| s).map_err(|e| {
        eprintln!("tokend: {e}");
        EXIT_IOERR
    })
}

async fn import(config: &Config, file: &Path, replace: bool) -> i32 {
    let (name, text) = if file == Path::new("-") {
        let mut t = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut t) {
            eprintln!("tokend: cannot read standard input: {e}");
            return 1;
        }
        ("standard input".to_owned(), t)
    } else {
        match std::fs::read_to_string(file) {
            Ok(t) => (file.display().to_string(), t),
            Err(e) => {
                eprintln!("tokend: cannot read {}: {e}", file.display());
                return 1;
            }
        }
    };
    let accounts = match crate::accounts::parse_import(config, &text) {
        Ok(a) => a,
        Err(errors) => {
            let n = errors.len();
            eprintln!(
                "tokend: {name} has {n} bad {}; nothing was imported:",
                if n == 1 { "row" } else { "rows" }
            );
            for e in errors {
                eprintln!("  {e}");
            }
            return 1;
        }
    };
    let store = match Store::open(&config.daemon.database) {
        Ok((s, _)) => s,
        Err(e) => {
            eprintln!("tokend: {e}");
            return EXIT_IOERR;
        }
    };
    let n = accounts.len();
    let result = store.link(accounts, replace, Clock::system().now()).await;
    store.close().await;
    match result {
        Ok(Linked::Done { inserted, replaced }) => {
            println!(
                "imported {n} {}: {inserted} new, {} replaced{}",
                if n == 1 { "account" } else { "accounts" },
                n - inserted,
                if replaced > 0 {
                    format!(" ({replaced} of them live grants, now superseded by the file's)")
                } else {
                    String::new()
                }
            );
            0
        }
        Ok(Linked::Conflicts(ids)) => {
            eprintln!(
                "tokend: {} {} already linked; nothing was imported (use --replace to overwrite their grants):",
                ids.len(),
                if ids.len() == 1 {
                    "account is"
                } else {
                    "accounts are"
                }
            );
            for id in ids {
                eprintln!("  {id}");
            }
            1
        }
        Err(e) => {
            eprintln!("tokend: import failed, nothing was imported: {e}");
            EXIT_IOERR
        }
    }
}

fn when(t: Option<i64>) -> String {
    t.filter(|t| *t > 1)
        .map(rfc3339)
        .unwrap_or_else(|| "-".into())
}

/// An access token's expiry for the listing: a time already past reads "expired …".
fn expiry(t: Option<i64>, now: i64) -> String {
    match t.filter(|t| *t > 1) {
        Some(t) if t <= now => format!("expired {}", rfc3339(t)),
        t => when(t),
    }
}

async fn list(p: &Places, json: bool, state: Option<State>) -> i32 {
    let store = match open_read_only(p) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rows = match store.list(state, None, None, 0).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokend: {e}");
            return EXIT_IOERR;
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let _ = serde_json::to_writer_pretty(&mut out, &rows);
        let _ = writeln!(out);
        return 0;
    }
    let mut t = tabwriter::TabWriter::new(&mut out).padding(2);
    let _ = writeln!(
        t,
        "ID\tPROFILE\tTYPE\tSTATE\tEXPIRY\tLAST REFRESH\tLAST PROBE\tFAILURES\tREASON"
    );
    let now = Clock::system().now();
    for r in rows {
        let _ = writeln!(
            t,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.id,
            r.profile.as_deref().unwrap_or("-"),
            r.token_type,
            r.state,
            expiry(r.expires_at, now),
            when(r.last_refresh_at),
            when(r.last_checked_at),
            r.failures,
            r.last_error.or(r.state_reason).unwrap_or_default()
        );
    }
    let _ = t.flush();
    0
}

async fn show(p: &Places, id: &str, json: bool) -> i32 {
    let store = match open_read_only(p) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (account, events) = match (store.summary(id).await, store.recent_events(id, 20).await) {
        (Ok(Some(a)), Ok(e)) => (a, e),
        (Ok(None), _) => {
            eprintln!("tokend: no account {id:?}");
            return 1;
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("tokend: {e}");
            return EXIT_IOERR;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"account": account, "events": events})
            )
            .unwrap_or_default()
        );
        return 0;
    }
    let now = Clock::system().now();
    let expiry = match account.expires_at {
        Some(e) if e <= now => format!("expired at {}", rfc3339(e)),
        Some(e) => format!(
            "expires at {} (in {})",
            rfc3339(e),
            humantime::format_duration(std::time::Duration::from_secs((e - now) as u64))
        ),
        None => "no expiry".into(),
    };
    let mut out = String::new();
    out += &format!(
        "{} ({} token, profile {})\n",
        account.id,
        account.token_type,
        account.profile.as_deref().unwrap_or("-")
    );
    out += &format!(
        "  state:         {}{}\n",
        account.state,
        account
            .state_since
            .map(|t| format!(" since {}", rfc3339(t)))
            .unwrap_or_default()
    );
    if let Some(r) = &account.state_reason {
        out += &format!("  reason:        {r}\n");
    }
    out += &format!("  access token:  {expiry}\n");
    out += &format!("  next action:   {}\n", when(account.next_action_at));
    if let Some(t) = account.refreshing_since {
        out += &format!(
            "  refreshing:    a request in flight since {}\n",
            rfc3339(t)
        );
    }
    out += &format!("  last refresh:  {}\n", when(account.last_refresh_at));
    out += &format!("  last probe:    {}\n", when(account.last_checked_at));
    out += &format!(
        "  refresh token: issued {}\n",
        when(account.refresh_issued_at)
    );
    out += &format!("  failures:      {}\n", account.failures);
    if let Some(e) = &account.last_error {
        out += &format!("  last error:    {e} ({})\n", when(account.last_error_at));
    }
    if !events.is_empty() {
        out += "  recent events:\n";
        for e in &events {
            let change = match (&e.from_state, &e.to_state) {
                (Some(f), Some(t)) => format!("{f} -> {t}"),
                (None, Some(t)) => format!("-> {t}"),
                _ => e.kind.clone(),
            };
            out += &format!(
                "    {}  {change}: {}\n",
                rfc3339(e.at),
                e.reason.as_deref().unwrap_or("")
            );
        }
    }
    print!("{out}");
    0
}

async fn resume_locally(p: &Places, id: &str) -> i32 {
    let store = match open_for_writing(p) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = store.resume(id, Clock::system().now()).await;
    store.close().await;
    match result {
        Ok(Some(from)) => {
            println!("{id}: resumed (was {from}); the daemon looks at it when it next runs");
            0
        }
        Ok(None) => {
            eprintln!("tokend: no account {id:?}");
            1
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            EXIT_IOERR
        }
    }
}

/// The daemon's machinery without its loop, for a one-off action with the client secrets.
async fn local_engine(path: &Path) -> Result<(Arc<Engine>, Store), i32> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("tokend: invalid configuration: {e}");
        EXIT_CONFIG
    })?;
    let db = config.daemon.database.clone();
    if !db.exists() {
        eprintln!("tokend: no database at {}", db.display());
        return Err(EXIT_IOERR);
    }
    let (store, _) = Store::open(&db).map_err(|e| {
        eprintln!("tokend: {e}");
        EXIT_IOERR
    })?;
    let journal = crate::journal::Journal::open(&db).map_err(|e| {
        eprintln!("tokend: cannot open the recovery journal: {e}");
        EXIT_IOERR
    })?;
    let clock = Clock::system();
    let rt = Runtime::new(config, clock.now()).map_err(|e| {
        eprintln!("tokend: {e:#}");
        1
    })?;
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(rt));
    let shared = Shared::new(
        store.clone(),
        clock,
        rx,
        crate::shared::owner_id(),
        Some(journal),
    );
    let engine = Engine::new(shared, tokio_util::sync::CancellationToken::new());
    Ok((engine, store))
}

async fn refresh_locally(path: &Path, id: &str) -> i32 {
    let (engine, store) = match local_engine(path).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let outcome = engine.refresh_now(id).await;
    let now = Clock::system().now();
    let code = match outcome {
        OnDemand::Done => match store.summary(id).await {
            Ok(Some(s)) if s.state == "active" => {
                println!("{id}: refreshed; expires at {}", when(s.expires_at));
                0
            }
            Ok(Some(s)) => {
                eprintln!(
                    "tokend: {id}: not refreshed: {} ({})",
                    s.state,
                    s.last_error.or(s.state_reason).unwrap_or_default()
                );
                1
            }
            _ => 1,
        },
        OnDemand::NotBefore(t, why) => {
            eprintln!(
                "tokend: {id}: not now: {why}; not before {} (in {} s)",
                rfc3339(t),
                (t - now).max(0)
            );
            1
        }
        OnDemand::HeldElsewhere => {
            eprintln!("tokend: {id}: another tokend is refreshing it right now");
            1
        }
        OnDemand::Unknown => {
            eprintln!("tokend: no account {id:?}");
            1
        }
        OnDemand::Refused(why) => {
            eprintln!("tokend: {id}: {why}");
            1
        }
    };
    // The refresh token it replaced is revoked now, as the daemon would.
    engine.finish().await;
    store.close().await;
    code
}

async fn remove_locally(path: &Path, p: &Places, id: &str, revoke: bool) -> i32 {
    if revoke {
        let (engine, store) = match local_engine(path).await {
            Ok(x) => x,
            Err(code) => return code,
        };
        let revoked = crate::unlink::revoke_and_remove(&engine, id, None).await;
        // A refresh token that a refresh on the way replaced is revoked now, as the daemon would.
        engine.finish().await;
        let code = match revoked {
            Ok(r) => {
                let nothing = match &r {
                    Revoked::Revoked => None,
                    Revoked::Nothing(why) => Some(why.as_str()),
                };
                println!("{}", removed(id, nothing.is_none(), nothing));
                0
            }
            Err(NotRevoked::Unknown) => {
                eprintln!("tokend: no account {id:?}");
                1
            }
            Err(e @ NotRevoked::Store(_)) => {
                eprintln!("tokend: {id}: {e}");
                EXIT_IOERR
            }
            Err(e) => {
                eprintln!("tokend: {id}: {e}");
                1
            }
        };
        store.close().await;
        return code;
    }
    let store = match open_for_writing(p) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let r = store.remove(id).await;
    store.close().await;
    match r {
        Ok(Some(_)) => {
            println!("removed {id}");
            0
        }
        Ok(None) => {
            eprintln!("tokend: no account {id:?}");
            1
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            EXIT_IOERR
        }
    }
}
