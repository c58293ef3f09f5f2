//! The command line: `run`, `check-config`, `accounts`, `token`, `status`, `events`, `demo`.

mod events;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, rfc3339};
use crate::config::{Config, DEFAULT_CONFIG_PATH, LogFormat, LogLevel, TokenType};
use crate::daemon::{self, Control, EXIT_CONFIG, EXIT_IOERR};
use crate::health;
use crate::state::State;
use crate::store::{Linked, Store};

#[derive(Debug, Parser)]
#[command(
    name = "tokend",
    version,
    about = "Keeps Factorial HR OAuth tokens alive"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "TOKEND_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (as systemd does).
    Run,
    /// Validate the configuration file and exit (78 when invalid).
    CheckConfig,
    /// Manage linked accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Print the current access token of ACCOUNT, if it is valid.
    Token {
        account: String,
        /// Only print a token with at least this much life left (e.g. 5m).
        #[arg(long, value_parser = parse_dur, default_value = "0s")]
        min_ttl: Duration,
    },
    /// Summarise the health file: exit 0 ok, 1 degraded, 2 failing, 3 missing or stale.
    Status {
        /// Print the health file itself.
        #[arg(long)]
        json: bool,
        /// Read this health file instead of the one the config names.
        #[arg(long)]
        health_file: Option<PathBuf>,
    },
    /// Show the event log and what was notified of each event, like journalctl.
    Events(events::EventsArgs),
    /// Run the engine against a built-in mock provider with short-lived tokens.
    #[cfg(feature = "demo")]
    Demo {
        /// How long to run, e.g. 20s or 2m (default: until Ctrl-C).
        #[arg(long, value_parser = parse_dur)]
        duration: Option<Duration>,
        /// How many user accounts to create.
        #[arg(long, default_value_t = 30)]
        accounts: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Link accounts from a JSON file (`-`: standard input), all or nothing.
    Import {
        file: PathBuf,
        /// Overwrite accounts that exist (their live grants are replaced).
        #[arg(long)]
        replace: bool,
    },
    /// List accounts (never their tokens).
    List {
        #[arg(long)]
        json: bool,
        /// Only accounts in this state.
        #[arg(long)]
        state: Option<State>,
    },
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s).ok_or_else(|| format!("invalid duration {s:?} (e.g. 20s, 2m)"))
}

/// Run a command; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    match cli.command {
        Command::Run => run(&cli.config),
        Command::CheckConfig => match Config::load(&cli.config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                let n = c.profiles.len();
                println!(
                    "{}: ok ({n} {})",
                    cli.config.display(),
                    if n == 1 { "profile" } else { "profiles" }
                );
                0
            }
            Err(e) => {
                eprintln!("tokend: invalid configuration: {e}");
                EXIT_CONFIG
            }
        },
        Command::Accounts(AccountsCommand::Import { file, replace }) => {
            with_config(&cli.config, |config| async move {
                import(&config, &file, replace).await
            })
        }
        Command::Accounts(AccountsCommand::List { json, state }) => {
            with_config(&cli.config, |config| async move {
                list(&config, json, state).await
            })
        }
        Command::Token { account, min_ttl } => with_config(&cli.config, |config| async move {
            token(&config, &account, min_ttl).await
        }),
        Command::Status { json, health_file } => status(&cli.config, json, health_file),
        Command::Events(args) => events::main(&cli.config, args),
        #[cfg(feature = "demo")]
        Command::Demo { duration, accounts } => crate::demo::main(duration, accounts),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokend: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Print the one line that says why the process exits, as an error priority under journald.
fn fatal(code: i32, msg: &str) -> i32 {
    let prefix = if crate::telemetry::stderr_is_journal() {
        "<3>"
    } else {
        ""
    };
    eprintln!("{prefix}tokend: {msg}");
    code
}

fn run(path: &Path) -> i32 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fatal(EXIT_CONFIG, &format!("invalid configuration: {e}")),
    };
    let log = crate::telemetry::init(config.daemon.log_level, config.daemon.log_format);
    runtime().block_on(async {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        if let Err(e) = daemon::spawn_signal_handler(shutdown.clone(), reload_tx) {
            tracing::error!(error = %e, "cannot install signal handlers");
            return 1;
        }
        let control = Control {
            config_path: path.to_owned(),
            shutdown,
            reload: reload_rx,
            log: Some(log),
            clock: Clock::system(),
        };
        match daemon::run(config, control).await {
            Ok(()) => 0,
            Err(e) => fatal(e.exit_code(), &e.to_string()),
        }
    })
}

/// Commands that read the config without its secrets (they never talk to the provider).
fn with_config<F, Fut>(path: &Path, f: F) -> i32
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = i32>,
{
    let config = match Config::load_without_secrets(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokend: invalid configuration: {e}");
            return EXIT_CONFIG;
        }
    };
    let _ = crate::telemetry::init(LogLevel::Warn, LogFormat::Text);
    runtime().block_on(f(config))
}

fn open_read_only(config: &Config) -> Result<Store, i32> {
    Store::open_read_only(&config.daemon.database).map_err(|e| {
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
    let now = Clock::system().now();
    let n = accounts.len();
    match store.link(accounts, replace, now).await {
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

fn fmt_time(t: Option<i64>) -> String {
    t.map(rfc3339).unwrap_or_else(|| "-".into())
}

async fn list(config: &Config, json: bool, state: Option<State>) -> i32 {
    let store = match open_read_only(config) {
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
        "ID\tPROFILE\tTYPE\tSTATE\tEXPIRES AT\tLAST REFRESH\tLAST PROBE\tFAILURES\tREASON"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.id,
            r.profile.as_deref().unwrap_or("-"),
            r.token_type,
            r.state,
            fmt_time(r.expires_at),
            fmt_time(r.last_refresh_at),
            fmt_time(r.last_checked_at),
            r.failures,
            r.last_error.or(r.state_reason).unwrap_or_default()
        );
    }
    let _ = t.flush();
    0
}

async fn token(config: &Config, id: &str, min_ttl: Duration) -> i32 {
    let store = match open_read_only(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let clock = Clock::system();
    // A refresh in flight (by any tokend) rotates the token: wait for it rather than hand out
    // one that is about to be replaced.
    let deadline =
        tokio::time::Instant::now() + config.daemon.http_timeout.get() + Duration::from_secs(1);
    let account = loop {
        match store.get(id).await {
            Ok(Some(Ok(a))) => {
                let in_flight = a
                    .attempt_at
                    .is_some_and(|t| clock.now() - t <= config.daemon.http_timeout.as_secs_i64());
                if !in_flight || tokio::time::Instant::now() > deadline {
                    break a;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Some(Err(p))) => {
                eprintln!("tokend: account {id:?}: {}", p.reason);
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
                    "tokend: note: account {id:?} belongs to a paused profile; this token is still valid until {}",
                    fmt_time(account.expires_at)
                );
            }
            println!("{}", t.expose_secret());
            0
        }
        _ => {
            let expiry = match account.expires_at {
                Some(e) if e <= now => format!("expired at {}", rfc3339(e)),
                Some(e) => format!("expires at {}", rfc3339(e)),
                None => "no expiry recorded".into(),
            };
            eprintln!(
                "tokend: account {id:?} has no access token valid for {} more (state {}, {expiry})",
                humantime::format_duration(min_ttl),
                account.state,
            );
            1
        }
    }
}

fn status(config_path: &Path, json: bool, health_file: Option<PathBuf>) -> i32 {
    let path = match health_file {
        Some(p) => p,
        None => match Config::load_without_secrets(config_path) {
            Ok(c) => c.daemon.health_file,
            Err(e) => {
                eprintln!("tokend: invalid configuration: {e}");
                return 3;
            }
        },
    };
    let h = match health::read(&path) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("tokend: {e}");
            return 3;
        }
    };
    let age = Clock::system().now() - h.updated_at;
    let stale = h.stopped_at.is_none() && age > 3 * h.heartbeat_s.max(1) as i64;
    if json {
        println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
    } else {
        print!("{}", render_status(&h, age, stale));
    }
    if stale || h.stopped_at.is_some() {
        return 3;
    }
    match h.status.as_str() {
        "ok" => 0,
        "failing" => 2,
        _ => 1,
    }
}

/// The human summary `tokend status` prints.
pub fn render_status(h: &health::Health, age: i64, stale: bool) -> String {
    let mut s = String::new();
    let staleness = if stale {
        " -- STALE: the daemon is not updating it"
    } else {
        ""
    };
    s += &format!(
        "tokend {}: {} (updated {age}s ago{staleness}; pid {}, up since {})\n",
        h.version,
        h.status,
        h.pid,
        fmt_time(Some(h.started_at))
    );
    if let Some(t) = h.stopped_at {
        s += &format!("stopped cleanly at {}\n", rfc3339(t));
    }
    s += &format!(
        "accounts: {} total: {}\n",
        h.accounts.total,
        health::one_line(h)
    );
    let types: Vec<String> = h
        .accounts
        .by_token_type
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    if !types.is_empty() {
        s += &format!("by type: {}\n", types.join(", "));
    }
    match h.next_refresh_at {
        Some(t) => s += &format!("next refresh: {}\n", rfc3339(t)),
        None => s += "next refresh: none scheduled\n",
    }
    s += &format!(
        "since start: {} refreshes ok, {} failed; {} probes ok, {} failed\n",
        h.refreshes.ok, h.refreshes.failed, h.probes.ok, h.probes.failed
    );
    for (name, p) in &h.profiles {
        if p.paused {
            s += &format!(
                "profile {name}: PAUSED since {}: {}\n",
                fmt_time(p.paused_since),
                p.paused_reason.as_deref().unwrap_or("")
            );
        }
    }
    if !h.config.last_reload_ok {
        s += &format!(
            "config: last reload FAILED: {}\n",
            h.config.last_reload_error.as_deref().unwrap_or("")
        );
    }
    if !h.store.writable {
        s += &format!(
            "store: NOT WRITABLE: {}\n",
            h.store.error.as_deref().unwrap_or("")
        );
    }
    if !h.journaled.is_empty() {
        s += &format!(
            "rotated pairs waiting in the recovery journal: {}\n",
            h.journaled.join(", ")
        );
    }
    if h.lapsed.count > 0 {
        s += &format!(
            "LAPSED (access token expired, no refresh stored): {} ({})\n",
            h.lapsed.count,
            h.lapsed.accounts.join(", ")
        );
    }
    if let Some(f) = &h.oldest_failure {
        s += &format!("failing longest: {} since {}\n", f.id, rfc3339(f.since));
    }
    for (kind, e) in &h.last_errors {
        s += &format!("last {kind} error ({}): {}\n", rfc3339(e.at), e.message);
    }
    if !h.attention.is_empty() {
        s += "needs attention:\n";
        for a in &h.attention {
            s += &format!("  {:<24} {}\n", a.id, a.state);
        }
    }
    if h.at_risk.count > 0 {
        s += &format!(
            "refresh token near end of life: {} ({})\n",
            h.at_risk.count,
            h.at_risk.accounts.join(", ")
        );
    }
    s
}
