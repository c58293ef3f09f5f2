//! The command line: `run`, `check-config`, `accounts`, `token`, `status`, `demo`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_CONFIG_PATH, LogFormat, LogLevel, TokenType};
use crate::daemon::{self, Control, EXIT_CONFIG, EXIT_IOERR};
use crate::engine::unix_now;
use crate::health;
use crate::state::State;
use crate::store::Store;

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
    Token { account: String },
    /// Summarise the health file: exit 0 ok, 1 degraded, 2 failing, 3 missing or stale.
    Status {
        /// Print the health file itself.
        #[arg(long)]
        json: bool,
        /// Read this health file instead of the one the config names.
        #[arg(long)]
        health_file: Option<PathBuf>,
    },
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
    /// Import accounts from a JSON file, all or nothing.
    Import { file: PathBuf },
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
                println!(
                    "{}: ok ({} profiles)",
                    cli.config.display(),
                    c.profiles.len()
                );
                0
            }
            Err(e) => {
                eprintln!("tokend: invalid configuration: {e}");
                EXIT_CONFIG
            }
        },
        Command::Accounts(cmd) => with_store(&cli.config, |config, store| async move {
            match cmd {
                AccountsCommand::Import { file } => import(&config, &store, &file).await,
                AccountsCommand::List { json, state } => list(&store, json, state).await,
            }
        }),
        Command::Token { account } => with_store(&cli.config, |config, store| async move {
            token(&config, &store, &account).await
        }),
        Command::Status { json, health_file } => status(&cli.config, json, health_file),
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
        };
        match daemon::run(config, control).await {
            Ok(()) => 0,
            Err(e) => fatal(e.exit_code(), &e.to_string()),
        }
    })
}

fn with_store<F, Fut>(path: &Path, f: F) -> i32
where
    F: FnOnce(Config, Store) -> Fut,
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
    runtime().block_on(async {
        let store = match Store::open(&config.daemon.database) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tokend: {e}");
                return EXIT_IOERR;
            }
        };
        f(config, store).await
    })
}

async fn import(config: &Config, store: &Store, file: &Path) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tokend: cannot read {}: {e}", file.display());
            return 1;
        }
    };
    let accounts = match crate::accounts::parse_import(config, &text) {
        Ok(a) => a,
        Err(errors) => {
            eprintln!(
                "tokend: {} has {} bad rows; nothing was imported:",
                file.display(),
                errors.len()
            );
            for e in errors {
                eprintln!("  {e}");
            }
            return 1;
        }
    };
    let n = accounts.len();
    match store.import(accounts, unix_now()).await {
        Ok(()) => {
            println!("imported {n} accounts");
            0
        }
        Err(e) => {
            eprintln!("tokend: import failed, nothing was imported: {e}");
            EXIT_IOERR
        }
    }
}

fn fmt_time(t: Option<i64>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

async fn list(store: &Store, json: bool, state: Option<State>) -> i32 {
    let rows = match store.list(state).await {
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
    let _ = writeln!(
        out,
        "{:<24} {:<12} {:<8} {:<13} {:<19} {:<19} {:>8}  LAST ERROR",
        "ID", "PROFILE", "TYPE", "STATE", "EXPIRES (UTC)", "LAST CHECK (UTC)", "FAILURES"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:<8} {:<13} {:<19} {:<19} {:>8}  {}",
            r.id,
            r.profile.as_deref().unwrap_or("-"),
            r.token_type,
            r.state,
            fmt_time(r.expires_at),
            fmt_time(r.last_checked_at.or(r.last_refresh_at)),
            r.failures,
            r.last_error.or(r.state_reason).unwrap_or_default()
        );
    }
    0
}

async fn token(config: &Config, store: &Store, id: &str) -> i32 {
    // Take the same lease the daemons take, so the token cannot rotate under us while we read it.
    let owner = format!("cli-{}", std::process::id());
    let lease = config.daemon.lease.as_secs_i64();
    let deadline =
        tokio::time::Instant::now() + config.daemon.http_timeout.get() + Duration::from_secs(2);
    let account = loop {
        let now = unix_now();
        match store.lease_one(id, &owner, now, now + lease).await {
            Ok(Some(a)) => break a,
            Ok(None) => match store.get(id).await {
                Ok(None) => {
                    eprintln!("tokend: no account {id:?}");
                    return 1;
                }
                _ if tokio::time::Instant::now() > deadline => {
                    eprintln!("tokend: account {id:?} is held by a refresh in progress; try again");
                    return 1;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            },
            Err(e) => {
                eprintln!("tokend: {e}");
                return EXIT_IOERR;
            }
        }
    };
    let _ = store.release(id, &owner).await;
    let now = unix_now();
    let state = State::parse(&account.state);
    let usable_state = matches!(state, Some(State::Active | State::Failing));
    let valid = match TokenType::parse(&account.token_type) {
        Some(TokenType::User) => account.expires_at.is_some_and(|e| e > now),
        Some(TokenType::Company) => true,
        None => false,
    };
    match (&account.access_token, usable_state && valid) {
        (Some(t), true) if !t.expose_secret().is_empty() => {
            println!("{}", t.expose_secret());
            0
        }
        _ => {
            eprintln!(
                "tokend: account {id:?} has no valid access token (state {}, expires {})",
                account.state,
                fmt_time(account.expires_at)
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
    let age = unix_now() - h.updated_at;
    let stale = age > 3 * h.heartbeat_s.max(1) as i64;
    if json {
        println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
    } else {
        print!("{}", render_status(&h, age, stale));
    }
    if stale {
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
    s += &format!("next refresh: {} UTC\n", fmt_time(h.next_refresh_at));
    s += &format!(
        "since start: {} refreshes ok, {} failed; {} probes ok, {} failed\n",
        h.refreshes.ok, h.refreshes.failed, h.probes.ok, h.probes.failed
    );
    for (name, p) in &h.profiles {
        if p.paused {
            s += &format!(
                "profile {name}: PAUSED ({}): {}\n",
                p.accounts,
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
    for (kind, e) in &h.last_errors {
        s += &format!(
            "last {kind} error ({} UTC): {}\n",
            fmt_time(Some(e.at)),
            e.message
        );
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
