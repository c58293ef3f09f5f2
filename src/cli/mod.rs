//! The command line: `run`, `check-config`, `accounts`, `token`, `status`, `events`, `demo`.
//!
//! Commands that read (`accounts list|show`, `token`, `status`) never create or migrate the
//! database; when the daemon runs, `token` and the account commands that change something ask
//! it over its socket, so they go through its leases and work for members of `socket_group`.

mod accounts;
mod events;
mod status;
mod token;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, LogFormat, LogLevel};
use crate::daemon::{self, Control, EXIT_CONFIG};
use crate::state::State;

#[derive(Debug, Parser)]
#[command(
    name = "tokend",
    version,
    about = "Keeps Factorial HR OAuth tokens alive",
    long_about = "tokend keeps Factorial HR OAuth grants alive: it refreshes user tokens before \
they expire, checks company tokens for revocation, and serves valid tokens to integrations over \
a local API.",
    after_help = "Every command exits 2 when its arguments are wrong (an unknown option, a value \
that does not parse); each command's --help lists its other exit codes.\n\nExamples:\n  \
tokend --config /etc/tokend/tokend.toml check-config\n  tokend token user-17 --min-ttl 5m\n  \
tokend status"
)]
pub struct Cli {
    /// Configuration file [default: /etc/tokend/tokend.toml].
    #[arg(long, global = true, env = "TOKEND_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (as systemd does).
    #[command(after_help = "Exit codes:
  0    stopped cleanly (SIGTERM or SIGINT)
  1    could not start (it says why)
  74   the database cannot be opened or migrated, or was replaced under the daemon
  75   stopped with rotated pairs in the recovery journal; the next start stores them
  78   the configuration is invalid
  130  a second stop signal during shutdown

Example:
  tokend --config /etc/tokend/tokend.toml run")]
    Run,
    /// Validate the configuration file, secrets included, and exit (78 when invalid).
    #[command(
        after_help = "Warnings (a secret file others can read, a long refresh_lead) go to \
stderr and do not fail the check.\n\nExit codes:\n  0   valid\n  78  invalid: the line says which file, line and key\n\nExample:\n  sudo tokend --config /etc/tokend/tokend.toml check-config"
    )]
    CheckConfig,
    /// Link, list, show, resume, refresh and remove accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Print a currently valid access token of ACCOUNT.
    #[command(
        after_help = "When the daemon runs, it is asked over its socket (api.socket): it \
refreshes the token first when it has less than --min-ttl left. Otherwise the database is read \
directly (read-only, no lease, no client secret), and a token with less than --min-ttl left is \
not printed.

Exit codes:
  0   printed
  1   no such account, or no token valid for --min-ttl (it says why: state, expiry)
  74  the database cannot be opened
  78  the configuration is invalid (and neither its database nor socket could be found)

Examples:
  TOKEN=$(tokend token user-17 --min-ttl 5m)
  tokend token user-17 --json"
    )]
    Token {
        /// The account's id.
        account: String,
        /// Least life the token must have left, e.g. 30s, 5m [default: 60s].
        #[arg(long, value_parser = parse_dur)]
        min_ttl: Option<Duration>,
        /// Print {"access_token", "token_type", "expires_at", "scopes"} instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// Summarise the health file (or, with --liveness, only whether the daemon is alive).
    #[command(after_help = "Exit codes (summary):
  0  ok
  1  degraded (an account needs attention, a profile is paused, a reload failed), or starting/stopping
  2  failing (the store cannot write, a token lapsed, a whole profile fails)
  3  the health file is missing, unreadable or stale, or the daemon stopped

Exit codes (--liveness):
  0  the daemon's engine loop turned recently (degraded or failing still count as alive)
  1  it did not: stuck, stopped, or no fresh health file

Examples:
  tokend status
  tokend status --liveness    # a systemd or Kubernetes liveness probe")]
    Status {
        /// Print the health file itself.
        #[arg(long)]
        json: bool,
        /// Read this health file instead of the one the config names.
        #[arg(long)]
        health_file: Option<PathBuf>,
        /// Only say whether the daemon is alive (exit 0) or not (exit 1).
        #[arg(long)]
        liveness: bool,
    },
    /// Show the event log and what was notified of each event, like journalctl.
    #[command(after_help = "Exit codes:
  0   shown
  74  the database cannot be opened (it is never created)

Examples:
  tokend events --account user-17 --since 1d
  tokend events --follow --json")]
    Events(events::EventsArgs),
    /// Run the engine against a built-in mock provider with short-lived tokens.
    #[cfg(feature = "demo")]
    #[command(
        after_help = "The demo uses its own configuration in a temporary directory; it \
refuses --config (and TOKEND_CONFIG).\n\nExit codes:\n  0  no token lapsed and no refresh token was presented twice\n  1  one did (or the demo could not run)\n\nExample:\n  tokend demo --duration 20s"
    )]
    Demo {
        /// How long to run, e.g. 20s or 2m (default: until Ctrl-C).
        #[arg(long, value_parser = parse_run_time)]
        duration: Option<Duration>,
        /// How many user accounts to create.
        #[arg(long, default_value_t = 30)]
        accounts: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Link accounts from a JSON file (`-`: standard input), all or nothing.
    #[command(
        after_help = "Format: {\"accounts\":[{\"id\":\"user-1\",\"profile\":\"factorial\",\
\"token_type\":\"user\",\"access_token\":\"...\",\"refresh_token\":\"...\",\"expires_at\":1795875255}]}
profile may be left out with one profile; expires_at may be null (refreshed at once).

An id that is already linked is a conflict: every conflict is listed and nothing is written,
unless --replace is given (it prints how many live grants it replaced).

Exit codes:
  0   every account linked
  1   a bad row or a conflict (listed); nothing was written
  74  the database cannot be opened or written

Examples:
  tokend accounts import accounts.json
  some-exporter | tokend accounts import -"
    )]
    Import {
        /// The file, or `-` for standard input.
        file: PathBuf,
        /// Overwrite accounts that exist (their live grants are replaced).
        #[arg(long)]
        replace: bool,
    },
    /// List accounts (never their tokens).
    #[command(
        after_help = "States: active, failing, needs_reauth, revoked, paused, invalid.

Exit codes:
  0   listed
  74  the database cannot be opened (it is never created)

Examples:
  tokend accounts list --state needs_reauth
  tokend accounts list --json"
    )]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only accounts in this state.
        #[arg(long)]
        state: Option<State>,
    },
    /// Show one account: state, expiry, last refresh, last probe, failures, recent events.
    #[command(
        after_help = "Exit codes:\n  0   shown\n  1   no such account\n  74  the database cannot be opened\n\nExample:\n  tokend accounts show user-17"
    )]
    Show {
        account: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Unlink an account (delete its row), optionally revoking its grant at the provider first.
    #[command(
        after_help = "With --revoke the grant is revoked at the provider first, for good: an \
access token that expired (Doorkeeper then ignores a revocation) is refreshed first, through the \
daemon's rules, and used once. If a step fails or is refused, nothing is removed and the message \
names the step. A grant the provider already rejects (needs_reauth) is removed, saying nothing \
was revoked.\n\nExit codes:\n  0   removed\n  1   no such account, or the revocation failed or \
was refused\n\nExample:\n  tokend accounts remove user-17 --revoke"
    )]
    Remove {
        account: String,
        /// Revoke the grant at the provider before removing it (refreshing it first if its
        /// access token expired).
        #[arg(long)]
        revoke: bool,
    },
    /// Look at an account again now, out of failing, paused, needs_reauth or revoked.
    #[command(
        after_help = "Exit codes:\n  0   resumed\n  1   no such account\n\nExample:\n  tokend accounts resume user-17"
    )]
    Resume { account: String },
    /// Refresh an account's token now, through the same lease as the daemon.
    #[command(
        after_help = "Refused (exit 1, saying until when) inside the minimum gap after \
the last refresh, at the hourly ceiling, or while the profile is paused.\n\nExit codes:\n  0   refreshed\n  1   not refreshed (it says why)\n\nExample:\n  tokend accounts refresh user-17"
    )]
    Refresh { account: String },
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s).ok_or_else(|| format!("invalid duration {s:?} (e.g. 20s, 2m)"))
}

/// A demo runs for a while or not at all.
fn parse_run_time(s: &str) -> Result<Duration, String> {
    match parse_dur(s)? {
        d if d.is_zero() => Err("a demo of 0s would show nothing (e.g. 20s, 2m)".into()),
        d => Ok(d),
    }
}

/// "1 account", "2 accounts".
pub(crate) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Cli {
    /// The configuration file in use.
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }
}

/// Run a command; returns the process exit code.
pub fn main(cli: Cli) -> i32 {
    let path = cli.config_path();
    match cli.command {
        Command::Run => run(&path),
        Command::CheckConfig => check_config(&path),
        Command::Accounts(cmd) => accounts::main(&path, cmd),
        Command::Token {
            account,
            min_ttl,
            json,
        } => token::main(&path, &account, min_ttl, json),
        Command::Status {
            json,
            health_file,
            liveness,
        } => status::main(&path, json, health_file, liveness),
        Command::Events(args) => events::main(&path, args),
        #[cfg(feature = "demo")]
        Command::Demo { duration, accounts } => {
            if let Some(c) = &cli.config {
                eprintln!(
                    "tokend: demo runs with its own configuration; it does not use {} (unset TOKEND_CONFIG or drop --config)",
                    c.display()
                );
                return 2;
            }
            crate::demo::main(duration, accounts)
        }
    }
}

fn check_config(path: &Path) -> i32 {
    match Config::load(path) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            let n = c.profiles.len();
            println!(
                "{}: ok ({n} {})",
                path.display(),
                if n == 1 { "profile" } else { "profiles" }
            );
            0
        }
        Err(e) => {
            eprintln!("tokend: invalid configuration: {e}");
            EXIT_CONFIG
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::telemetry::finish();
            eprintln!("tokend: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Print the one line that says why the process exits, as an error priority under journald.
fn fatal(code: i32, msg: &str) -> i32 {
    // After every log line before it.
    crate::telemetry::flush();
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
    // Dropped after the runtime (declared before it), also when a panic unwinds from here.
    let _batching = crate::telemetry::batch();
    let code = runtime().block_on(async {
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
    });
    crate::telemetry::finish();
    code
}

/// Where the files are, for commands that read them: from the config without its secrets, or,
/// when the config does not parse, from what can be picked out of it (saying so) or the
/// defaults. `Err` carries the exit code when not even that is possible.
pub(crate) struct Places {
    pub database: PathBuf,
    pub health_file: PathBuf,
    pub socket: Option<PathBuf>,
    pub http_timeout: Duration,
    /// The whole configuration, when it parsed.
    pub config: Option<Config>,
}

pub(crate) fn places(path: &Path) -> Places {
    match Config::load_without_secrets(path) {
        Ok(c) => Places {
            database: c.daemon.database.clone(),
            health_file: c.daemon.health_file.clone(),
            socket: c.api.socket.clone(),
            http_timeout: c.daemon.http_timeout.get(),
            config: Some(c),
        },
        Err(e) => {
            // Enough of the file may still be readable to find the files.
            let table: Option<toml::Table> = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| toml::from_str(&t).ok());
            let pick = |section: &str, key: &str| -> Option<PathBuf> {
                table
                    .as_ref()?
                    .get(section)?
                    .get(key)?
                    .as_str()
                    .map(PathBuf::from)
            };
            let defaults = crate::config::DaemonConfig::default();
            let p = Places {
                database: pick("daemon", "database").unwrap_or(defaults.database),
                health_file: pick("daemon", "health_file").unwrap_or(defaults.health_file),
                socket: Some(
                    pick("api", "socket").unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
                )
                .filter(|s| !s.as_os_str().is_empty()),
                http_timeout: defaults.http_timeout.get(),
                config: None,
            };
            eprintln!(
                "tokend: warning: the configuration does not load ({e}); using database {}, health file {}{}",
                p.database.display(),
                p.health_file.display(),
                p.socket
                    .as_ref()
                    .map(|s| format!(", socket {}", s.display()))
                    .unwrap_or_default()
            );
            p
        }
    }
}

fn quiet_logs() {
    let _ = crate::telemetry::init(LogLevel::Warn, LogFormat::Text);
}
