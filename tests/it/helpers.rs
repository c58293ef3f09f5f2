//! Shared test setup: a temp directory with a config, a real SQLite file and a mock provider on
//! 127.0.0.1:0, plus ways to run the daemon in-process or as the real binary.
//!
//! In-process tests run on tokio's paused clock (`#[tokio::test(start_paused = true)]`): the
//! daemon and the mock read time from the same driven clock, so a test ages tokens by hours in
//! milliseconds and never sleeps to wait. Process tests (signals, exit codes, kill -9) run the
//! binary in real time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use rusqlite::{Connection, params};
use tokend::clock::Clock;
use tokend::config::Config;
use tokend::daemon::{self, Control};
use tokend_mock::{Issued, MockClock, MockConfig, MockProvider};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "CANARY-client-secret-7f3a9";

fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("debug,tokio_cron_scheduler=warn,hyper=warn")
                .with_test_writer()
                .try_init();
        }
    });
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub clock: Clock,
    pub mock: MockProvider,
    pub config_path: PathBuf,
    pub db: PathBuf,
    pub health: PathBuf,
}

/// Daemon settings fast enough for tests; `extra` lines override or add.
pub fn daemon_toml(env_dir: &Path, extra: &str) -> String {
    let mut lines: Vec<String> = vec![
        "[daemon]".into(),
        format!("database = \"{}\"", env_dir.join("tokend.db").display()),
        format!(
            "health_file = \"{}\"",
            env_dir.join("health.json").display()
        ),
    ];
    let defaults = [
        ("refresh_lead", "\"3s\""),
        ("refresh_jitter", "\"1s\""),
        ("max_concurrent_refreshes", "8"),
        ("http_timeout", "\"2s\""),
        ("http_connect_timeout", "\"1s\""),
        ("retry_initial", "\"1s\""),
        ("retry_max", "\"4s\""),
        ("lease", "\"10s\""),
        ("health_interval", "\"2s\""),
        ("shutdown_timeout", "\"10s\""),
        ("min_refresh_interval", "\"1s\""),
        ("max_token_requests_per_hour", "1000"),
        ("revocation_schedule", "\"0 0 0 1 1 *\""),
        ("log_level", "\"debug\""),
    ];
    let overridden = |k: &str| {
        extra.lines().any(|l| {
            l.trim_start().starts_with(&format!("{k} "))
                || l.trim_start().starts_with(&format!("{k}="))
        })
    };
    for (k, v) in defaults {
        if !overridden(k) {
            lines.push(format!("{k} = {v}"));
        }
    }
    for l in extra.lines() {
        lines.push(l.to_owned());
    }
    // The API's socket lives in the test's directory (extra `[api]` lines can follow).
    lines.push("\n[api]".into());
    lines.push(format!(
        "socket = \"{}\"",
        env_dir.join("api.sock").display()
    ));
    lines.join("\n") + "\n"
}

pub fn profile_toml(name: &str, url: &str, secret_file: &Path) -> String {
    format!(
        "\n[[profile]]\nname = \"{name}\"\nenvironment = \"sandbox\"\nbase_url = \"{url}\"\nclient_id = \"mock-client\"\nclient_secret_file = \"{}\"\n",
        secret_file.display()
    )
}

impl Env {
    /// A fresh environment. Under a paused runtime its clock is the driven one.
    pub async fn new(mock: MockConfig, daemon_extra: &str) -> Env {
        Env::with_profile(mock, daemon_extra, "").await
    }

    /// As [`Env::new`], with extra lines appended to the `factorial` profile.
    pub async fn with_profile(mock: MockConfig, daemon_extra: &str, profile_extra: &str) -> Env {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Clock::tokio();
        let mock_clock = {
            let c = clock.clone();
            MockClock::new(move || c.now_ms())
        };
        let mock = MockProvider::start(MockConfig {
            client_secret: SECRET.into(),
            clock: mock_clock,
            ..mock
        })
        .await
        .expect("mock");
        let secret_file = dir.path().join("secret");
        write_private(&secret_file, SECRET);
        let config_path = dir.path().join("tokend.toml");
        let text = daemon_toml(dir.path(), daemon_extra)
            + &profile_toml("factorial", &mock.url(), &secret_file)
            + profile_extra;
        std::fs::write(&config_path, text).expect("config");
        let db = dir.path().join("tokend.db");
        let health = dir.path().join("health.json");
        let env = Env {
            dir,
            clock,
            mock,
            config_path,
            db,
            health,
        };
        // Create the schema up front so tests can insert rows before the daemon starts.
        tokend::store::Store::open(&env.db)
            .expect("store")
            .0
            .close()
            .await;
        env
    }

    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("config loads")
    }

    pub fn conn(&self) -> Connection {
        let c = Connection::open(&self.db).expect("open db");
        c.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        c
    }

    /// Unix seconds on the test's clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// Insert a user account with a grant issued by the mock `age` ago.
    pub fn add_user(&self, id: &str, age: Duration) {
        let t = self.mock.issue_user(id, age);
        self.conn()
            .execute(
                "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at)
                 VALUES (?1, 'factorial', 'user', ?2, ?3, ?4)",
                params![id, t.access_token, t.refresh_token, t.expires_at],
            )
            .expect("insert user");
    }

    /// A new grant for `id`, issued `age` ago, written as another program relinks (the
    /// README's `UPDATE`).
    pub fn relink(&self, id: &str, age: Duration) -> Issued {
        let t = self.mock.issue_user(id, age);
        self.conn()
            .execute(
                "UPDATE accounts SET access_token = ?1, refresh_token = ?2, expires_at = ?3 WHERE id = ?4",
                params![t.access_token, t.refresh_token, t.expires_at, id],
            )
            .expect("relink by UPDATE");
        t
    }

    pub fn add_company(&self, id: &str) {
        let t = self.mock.issue_company(id);
        self.conn()
            .execute(
                "INSERT INTO accounts (id, profile, token_type, access_token)
                 VALUES (?1, 'factorial', 'company', ?2)",
                params![id, t.access_token],
            )
            .expect("insert company");
    }

    pub fn state(&self, id: &str) -> String {
        self.conn()
            .query_row("SELECT state FROM accounts WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .expect("state")
    }

    pub fn reason(&self, id: &str) -> Option<String> {
        self.conn()
            .query_row(
                "SELECT state_reason FROM accounts WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .expect("reason")
    }

    pub fn count_state(&self, state: &str) -> i64 {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM accounts WHERE state = ?1",
                [state],
                |r| r.get(0),
            )
            .expect("count")
    }

    /// (access, refresh, expires_at) as stored.
    pub fn tokens(&self, id: &str) -> (Option<String>, Option<String>, Option<i64>) {
        self.conn()
            .query_row(
                "SELECT access_token, refresh_token, expires_at FROM accounts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("tokens")
    }

    /// Events of `kind` recorded for `id`.
    pub fn events(&self, id: &str, kind: &str) -> Vec<(Option<String>, Option<String>)> {
        let c = self.conn();
        let mut s = c
            .prepare(
                "SELECT to_state, reason FROM account_events WHERE account_id = ?1 AND kind = ?2 ORDER BY seq",
            )
            .expect("prepare");
        s.query_map(params![id, kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// Run the daemon in this process, on this environment's clock.
    pub fn start(&self) -> Running {
        self.start_with(self.config())
    }

    pub fn start_with(&self, config: Config) -> Running {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let control = Control {
            config_path: self.config_path.clone(),
            shutdown: shutdown.clone(),
            reload: reload_rx,
            log: None,
            clock: self.clock.clone(),
        };
        let task = tokio::spawn(async move { daemon::run(config, control).await });
        Running {
            shutdown,
            reload: reload_tx,
            task,
        }
    }

    /// Start the real binary with `run`, stderr into a file in the temp dir.
    pub fn spawn_binary(&self, envs: &[(&str, &str)]) -> Binary {
        let log = self
            .dir
            .path()
            .join(format!("stderr-{}.log", fastrand::u32(..)));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokend"));
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tokend");
        Binary { child, log }
    }

    pub fn tokend(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tokend"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run tokend")
    }

    /// As [`Env::tokend`], without blocking the runtime: the command may ask an in-process
    /// daemon's API, which this runtime serves.
    pub async fn tokend_async(&self, args: &[&str]) -> std::process::Output {
        let config = self.config_path.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_tokend"))
                .arg("--config")
                .arg(&config)
                .args(&args)
                .env_remove("RUST_LOG")
                .output()
                .expect("run tokend")
        })
        .await
        .expect("join")
    }

    pub fn rewrite_config(&self, daemon_extra: &str) {
        let text = daemon_toml(self.dir.path(), daemon_extra)
            + &profile_toml("factorial", &self.mock.url(), &self.secret_file());
        std::fs::write(&self.config_path, text).expect("config");
    }

    /// The health file, parsed (`Null` when missing or unreadable).
    pub fn health(&self) -> serde_json::Value {
        std::fs::read_to_string(&self.health)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// The revocation checker of a daemon-to-be, without the cron schedule: tests run its job body.
pub struct Checking {
    pub shared: std::sync::Arc<tokend::shared::Shared>,
    pub checker: std::sync::Arc<tokend::revocation::Checker>,
    pub info: tokend::health::DaemonInfo,
    /// The soft stop the checker watches (its hard stop is never fired here).
    pub stop: CancellationToken,
}

pub async fn checking(env: &Env) -> Checking {
    let (store, _) =
        tokend::store::Store::open_waiting(&env.db, env.config().daemon.store_busy_timeout.get())
            .expect("store");
    let rt = tokend::shared::Runtime::new(env.config(), env.now()).expect("runtime");
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(rt));
    let shared = tokend::shared::Shared::new(
        store,
        env.clock.clone(),
        rx,
        tokend::shared::owner_id(),
        None,
    );
    let (stop, hard_stop) = (CancellationToken::new(), CancellationToken::new());
    let checker = tokend::revocation::Checker::new(shared.clone(), stop.clone(), hard_stop.clone());
    let info = tokend::health::DaemonInfo::new(&env.config_path, env.now());
    Checking {
        shared,
        checker,
        info,
        stop,
    }
}

/// Write a file readable by its owner only (as a secret file should be).
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

pub struct Running {
    pub shutdown: CancellationToken,
    pub reload: tokio::sync::mpsc::Sender<()>,
    pub task: tokio::task::JoinHandle<Result<(), daemon::DaemonError>>,
}

impl Running {
    pub async fn stop(self) {
        let r = self.stop_result().await;
        r.expect("daemon ran cleanly");
    }

    pub async fn stop_result(self) -> Result<(), daemon::DaemonError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("daemon stops in time")
            .expect("daemon task")
    }
}

pub struct Binary {
    pub child: Child,
    pub log: PathBuf,
}

impl Binary {
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the process to exit, up to `limit`; returns its exit code.
    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `cond` every 50 ms (of the test's clock: logical under a paused runtime) until it holds
/// or `limit` passes; panics with `what` on timeout.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
