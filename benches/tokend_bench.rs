//! Benchmark harness: the real `tokend run` process (release build) against the in-crate mock
//! provider, which runs here in the harness process so the daemon's CPU and memory are its own.
//! Lapses and reuse come from the mock's books, not from the daemon.
//!
//! cargo bench --bench tokend_bench -- SCENARIO [--n N] [--duration SECS] [--lifetime SECS]
//!     [--lead SECS] [--jitter SECS] [--concurrency C] [--clients C] [--log-level LEVEL]
//!     [--json PATH]
//!
//! Scenarios: capacity, catchup, idle, scale, api, callgrind, smoke (all six, tiny), all.
//! See BENCHMARKS.md.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};
use tokend_mock::{MockConfig, MockProvider, Rotation};

const SECRET: &str = "bench-secret";

#[derive(Clone, Debug)]
struct Args {
    scenario: String,
    n: Option<usize>,
    duration: Option<u64>,
    lifetime: Option<u64>,
    lead: Option<u64>,
    jitter: Option<u64>,
    concurrency: Option<usize>,
    clients: Option<usize>,
    log_level: String,
    json: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        scenario: String::new(),
        n: None,
        duration: None,
        lifetime: None,
        lead: None,
        jitter: None,
        concurrency: None,
        clients: None,
        log_level: "info".into(),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| die(&format!("{name} needs a value")))
        };
        let num = |s: String| {
            s.parse::<u64>()
                .unwrap_or_else(|_| die(&format!("not a number: {s}")))
        };
        match a.as_str() {
            "--bench" => {} // cargo passes this to harness = false targets
            "--n" => args.n = Some(num(val("--n")) as usize),
            "--duration" => args.duration = Some(num(val("--duration"))),
            "--lifetime" => args.lifetime = Some(num(val("--lifetime"))),
            "--lead" => args.lead = Some(num(val("--lead"))),
            "--jitter" => args.jitter = Some(num(val("--jitter"))),
            "--concurrency" => args.concurrency = Some(num(val("--concurrency")) as usize),
            "--clients" => args.clients = Some(num(val("--clients")) as usize),
            "--log-level" => args.log_level = val("--log-level"),
            "--json" => args.json = Some(PathBuf::from(val("--json"))),
            s if !s.starts_with('-') && args.scenario.is_empty() => args.scenario = s.to_owned(),
            s => die(&format!("unknown argument {s}")),
        }
    }
    if args.scenario.is_empty() {
        die("name a scenario: capacity, catchup, idle, scale, api, callgrind, smoke or all");
    }
    args
}

fn die(msg: &str) -> ! {
    eprintln!("tokend_bench: {msg}");
    std::process::exit(2);
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One result: ordered (name, value, target verdict) rows.
#[derive(Default)]
struct Report {
    scenario: String,
    rows: Vec<(String, String, String)>,
    json: BTreeMap<String, serde_json::Value>,
}

impl Report {
    fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_owned(),
            ..Report::default()
        }
    }
    fn add(
        &mut self,
        key: &str,
        label: &str,
        value: impl Into<serde_json::Value> + std::fmt::Display + Clone,
        target: &str,
    ) {
        self.rows
            .push((label.to_owned(), value.to_string(), target.to_owned()));
        self.json.insert(key.to_owned(), value.into());
    }
    fn print(&self) {
        println!("\n== {} ==", self.scenario);
        let w = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
        let v = self.rows.iter().map(|r| r.1.len()).max().unwrap_or(10);
        for (label, value, target) in &self.rows {
            println!("  {label:<w$}  {value:>v$}  {target}");
        }
    }
}

fn verdict(ok: bool, target: &str) -> String {
    format!("{} (target {target})", if ok { "MEETS" } else { "MISSES" })
}

/// A temp directory with a config, a database and the mock.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    db: PathBuf,
}

fn setup(mock_url: &str, daemon: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let db = dir.path().join("tokend.db");
    let config = dir.path().join("tokend.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\ndatabase = \"{}\"\nhealth_file = \"{}\"\n{daemon}\n\n[[profile]]\nname = \"bench\"\nbase_url = \"{mock_url}\"\nclient_id = \"mock-client\"\nclient_secret_file = \"{}\"\n# The mock rotates immediately: a superseded refresh token is dead already.\nrevoke_superseded = false\n\n[api]\nsocket = \"{}\"\n",
            db.display(),
            dir.path().join("health.json").display(),
            secret.display(),
            // Not the default /run/tokend/api.sock, whose directory only systemd creates.
            dir.path().join("api.sock").display()
        ),
    )
    .expect("config");
    drop(tokend::store::Store::open(&db).expect("schema"));
    Setup { dir, config, db }
}

/// `n` user accounts with ages spread so their due times (`lead` plus up to `jitter` before
/// expiry) are uniform over the first `lifetime`, and nothing is due at start.
fn fill_spread(mock: &MockProvider, db: &Path, n: usize, lifetime: i64, lead: i64, jitter: i64) {
    let now = now_s();
    let span = (lifetime - lead - jitter - 1).max(1) as u64;
    let rows = (0..n).map(|i| {
        let id = format!("u{i:07}");
        let age = Duration::from_millis(fastrand::u64(0..span * 1000));
        let t = mock.issue_user(&id, age);
        let exp = t.expires_at.expect("expiry");
        let next = (exp - lead - fastrand::i64(0..=jitter)).max(now);
        (id, t.access_token, t.refresh_token, exp, next)
    });
    fill(db, rows);
}

/// `n` user accounts whose one-hour tokens, issued by `mock`, expired ten minutes ago.
fn fill_expired(mock: &MockProvider, db: &Path, n: usize) {
    let rows = (0..n).map(|i| {
        let id = format!("u{i:07}");
        let t = mock.issue_user(&id, Duration::from_secs(3600 + 600));
        let exp = t.expires_at.expect("expiry");
        (id, t.access_token, t.refresh_token, exp, exp - 600)
    });
    fill(db, rows);
}

/// Rows as a previous tokend run would have left them: (id, access, refresh, expires_at, next_action_at).
fn fill(
    db: &Path,
    rows: impl Iterator<Item = (String, String, Option<String>, i64, i64)>,
) -> usize {
    let mut conn = Connection::open(db).expect("db");
    conn.pragma_update(None, "synchronous", "OFF")
        .expect("pragma");
    let tx = conn.transaction().expect("tx");
    let mut n = 0;
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at,
                                       refresh_issued_at, next_action_at, state_since)
                 VALUES (?1, 'bench', 'user', ?2, ?3, ?4, strftime('%s','now'), ?5,
                         strftime('%s','now'))",
            )
            .expect("prepare");
        // Every inserted row is marked for evaluation; a previous run would have scheduled it
        // (tokend's own writes bump `revision`, which keeps the triggers quiet).
        let mut schedule = tx
            .prepare(
                "UPDATE accounts SET next_action_at = ?2, revision = revision + 1 WHERE id = ?1",
            )
            .expect("prepare");
        for (id, a, r, e, next) in rows {
            stmt.execute(params![id, a, r, e, next]).expect("insert");
            schedule.execute(params![id, next]).expect("schedule");
            n += 1;
        }
    }
    tx.commit().expect("commit");
    n
}

/// The profile's adaptive concurrency limit, as the daemon's health file last said.
fn adaptive_limit(s: &Setup) -> f64 {
    let health = std::fs::read_to_string(s.dir.path().join("health.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&health)
        .ok()
        .and_then(|h| h["profiles"]["bench"]["concurrency_limit"].as_f64())
        .unwrap_or(f64::NAN)
}

/// Rows whose pair was stored at or after `since` (unix seconds).
fn committed_since(c: &Connection, since: i64) -> u64 {
    c.query_row(
        "SELECT count(*) FROM accounts WHERE last_refresh_at >= ?1",
        [since],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |n| n as u64)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

struct Daemon {
    child: Child,
    started: Instant,
    notify: UnixDatagram,
    log: PathBuf,
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl Daemon {
    fn spawn(s: &Setup) -> Daemon {
        Daemon::spawn_under(s, &[])
    }

    /// Spawn the daemon under `wrapper` (e.g. valgrind and its options), or directly.
    fn spawn_under(s: &Setup, wrapper: &[String]) -> Daemon {
        let sock_path = s.dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let log_path = s.dir.path().join("tokend.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let started = Instant::now();
        let mut cmd = match wrapper.split_first() {
            None => Command::new(env!("CARGO_BIN_EXE_tokend")),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_tokend"));
                c
            }
        };
        let child = cmd
            .args(["--config", s.config.to_str().expect("path"), "run"])
            .env("NOTIFY_SOCKET", &sock_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tokend (built by cargo bench)");
        Daemon {
            child,
            started,
            notify,
            log: log_path,
            done: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Time from spawn to READY=1.
    fn wait_ready(&mut self, limit: Duration) -> Duration {
        let mut buf = [0u8; 4096];
        while self.started.elapsed() < limit {
            if let Ok(n) = self.notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                let ready = self.started.elapsed();
                // Keep reading the socket, as systemd does, until the daemon stops.
                if let Ok(sock) = self.notify.try_clone() {
                    let done = self.done.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 4096];
                        while !done.load(Ordering::Relaxed) {
                            let _ = sock.recv(&mut buf);
                        }
                    });
                }
                return ready;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                die(&format!("tokend exited early: {st}"));
            }
        }
        die("tokend did not become ready");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime of the whole process, in seconds.
    fn cpu_s(&self) -> f64 {
        let (user, sys) = self.cpu_split_s();
        user + sys
    }

    /// (user, system) CPU seconds so far.
    fn cpu_split_s(&self) -> (f64, f64) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // Fields 14 and 15 of stat; after "pid (comm)" they are at 11 and 12.
        (ticks(11) as f64 / 100.0, ticks(12) as f64 / 100.0)
    }

    fn status_kib(&self, key: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Context switches summed over threads: each voluntary one is a wake-up.
    fn wakeups(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .flatten()
            .map(|t| {
                std::fs::read_to_string(t.path().join("status"))
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.starts_with("voluntary_ctxt_switches"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// SIGTERM and wait; on anything but a clean exit, show the end of the daemon's log.
    fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let t0 = Instant::now();
        let mut code = None;
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(st)) = self.child.try_wait() {
                code = Some(st.code().unwrap_or(-1));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.done.store(true, Ordering::Relaxed);
        if code != Some(0) {
            let _ = self.child.kill();
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!(
                "tokend exit {code:?} after {:?}; its log ends:\n{}",
                t0.elapsed(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        code
    }
}

/// The mock, in `immediate` rotation (the stricter mode), issuing tokens that live `ttl`.
async fn start_mock(ttl: Duration) -> MockProvider {
    MockProvider::start(MockConfig {
        rotation: Rotation::Immediate,
        access_ttl: ttl,
        client_secret: SECRET.into(),
        ..MockConfig::default()
    })
    .await
    .expect("mock provider")
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn capacity(a: &Args, smoke: bool) -> Report {
    let n = a.n.unwrap_or(if smoke { 200 } else { 10_000 });
    let lifetime = a.lifetime.unwrap_or(if smoke { 12 } else { 60 }) as i64;
    let lead = a.lead.unwrap_or(if smoke { 4 } else { 15 }) as i64;
    let jitter = a.jitter.unwrap_or(if smoke { 1 } else { 5 }) as i64;
    let duration = a.duration.unwrap_or(if smoke { 20 } else { 300 });
    let conc = a.concurrency.unwrap_or(64);
    let mock = start_mock(Duration::from_secs(lifetime as u64)).await;
    let s = setup(
        &mock.url(),
        &format!(
            "refresh_lead = \"{lead}s\"\nrefresh_jitter = \"{jitter}s\"\nmax_concurrent_refreshes = {conc}\nlog_level = \"{}\"\nrevocation_schedule = \"0 0 0 1 1 *\"\nmin_refresh_interval = \"10s\"\nmax_token_requests_per_hour = 1000",
            a.log_level
        ),
    );
    fill_spread(&mock, &s.db, n, lifetime, lead, jitter);
    let mut d = Daemon::spawn(&s);
    d.wait_ready(Duration::from_secs(60));
    let cpu0 = d.cpu_s();
    let g0 = mock.totals().grants;
    let t0 = Instant::now();
    let mut peak_rss = 0;
    while t0.elapsed() < Duration::from_secs(duration) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak_rss = peak_rss.max(d.status_kib("VmRSS:"));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let expired = mock.expired_now().len() as u64;
    let cpu = d.cpu_s() - cpu0;
    let hwm = d.status_kib("VmHWM:");
    let code = d.stop();
    let t = mock.totals();
    let mut head = mock.headrooms();
    head.sort_unstable();
    // Lag past the latest possible due time (expiry - lead): <= 0 is on time.
    let mut lag: Vec<i64> = head.iter().map(|h| lead * 1000 - h).collect();
    lag.sort_unstable();
    let lapses = t.lapses + expired;
    let rate = (t.grants - g0) as f64 / elapsed;
    let mut r = Report::new("capacity");
    r.add("accounts", "accounts", n as u64, "");
    r.add("lifetime_s", "access-token lifetime (s)", lifetime, "");
    r.add("run_s", "measured for (s)", elapsed.round() as u64, "");
    r.add(
        "refreshes_per_s",
        "sustained refreshes/s",
        (rate * 10.0).round() / 10.0,
        "",
    );
    r.add(
        "lapses",
        "lapses (mock)",
        lapses,
        &verdict(lapses == 0, "0"),
    );
    r.add("worst_gap_ms", "worst gap (ms)", t.worst_gap_ms, "");
    r.add(
        "reuse_attempts",
        "reuse attempts (mock)",
        t.reuse_attempts,
        &verdict(t.reuse_attempts == 0, "0"),
    );
    r.add("errors", "token errors (mock)", t.errors, "");
    r.add(
        "lag_p50_ms",
        "lag past expiry-lead, p50 (ms)",
        percentile(&lag, 0.50),
        "",
    );
    r.add(
        "lag_p99_ms",
        "lag past expiry-lead, p99 (ms)",
        percentile(&lag, 0.99),
        "",
    );
    r.add(
        "headroom_min_ms",
        "least headroom before expiry (ms)",
        head.first().copied().unwrap_or(0),
        "",
    );
    r.add(
        "daemon_cpu_s",
        "daemon CPU (s)",
        (cpu * 100.0).round() / 100.0,
        "",
    );
    r.add(
        "daemon_cpu_per_refresh_us",
        "daemon CPU per refresh (us)",
        ((cpu * 1e6) / (t.grants.max(1) as f64)).round(),
        "",
    );
    r.add(
        "peak_rss_kib",
        "daemon peak RSS (KiB)",
        hwm.max(peak_rss),
        "",
    );
    r.add("exit_code", "daemon exit code", code.unwrap_or(-1), "");
    r
}

async fn catchup(a: &Args, smoke: bool) -> Report {
    let n = a.n.unwrap_or(if smoke { 500 } else { 50_000 });
    let conc = a.concurrency.unwrap_or(64);
    let mock = start_mock(Duration::from_secs(3600)).await;
    let s = setup(
        &mock.url(),
        &format!(
            "max_concurrent_refreshes = {conc}\nlog_level = \"{}\"\nrevocation_schedule = \"0 0 0 1 1 *\"\nmin_refresh_interval = \"10s\"\nmax_token_requests_per_hour = 1000\nhealth_interval = \"1s\"",
            a.log_level
        ),
    );
    fill_expired(&mock, &s.db, n);
    let mut d = Daemon::spawn(&s);
    d.wait_ready(Duration::from_secs(60));
    let t0 = Instant::now();
    let t0_unix = unix_now() - 1;
    let cpu0 = d.cpu_split_s();
    while mock.totals().grants < n as u64 && t0.elapsed() < Duration::from_secs(1800) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Done when the database holds every new pair (a moment after the mock issued the last).
    let reader = Connection::open_with_flags(&s.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("reader");
    while committed_since(&reader, t0_unix) < n as u64 && t0.elapsed() < Duration::from_secs(1800) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = t0.elapsed().as_secs_f64();
    let limit = adaptive_limit(&s);
    let cpu1 = d.cpu_split_s();
    let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let cpu = user + sys;
    let hwm = d.status_kib("VmHWM:");
    d.stop();
    let t = mock.totals();
    drop(mock);

    // Raw capacity: the same requests from a plain client loop, no database.
    let raw_mock = start_mock(Duration::from_secs(3600)).await;
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..n)
            .map(|i| {
                raw_mock
                    .issue_user(&format!("u{i:07}"), Duration::from_secs(4200))
                    .refresh_token
                    .expect("refresh")
            })
            .collect(),
    );
    tokend::provider::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conc)
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/oauth/token", raw_mock.url());
    let r0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, tokens, next, url) =
            (client.clone(), tokens.clone(), next.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(rt) = tokens.get(i) else { break };
                let form = [
                    ("grant_type", "refresh_token"),
                    ("refresh_token", rt.as_str()),
                    ("client_id", "mock-client"),
                    ("client_secret", SECRET),
                ];
                if let Ok(resp) = client.post(&url).form(&form).send().await {
                    let body = resp.bytes().await.unwrap_or_default();
                    let _: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let raw_took = r0.elapsed().as_secs_f64();
    let raw_grants = raw_mock.totals().grants;
    let rate = n as f64 / took;
    let raw_rate = raw_grants as f64 / raw_took;
    let ratio = rate / raw_rate;
    let mut r = Report::new("catch-up");
    r.add("accounts", "accounts, all expired at start", n as u64, "");
    r.add("concurrency", "max_concurrent_refreshes", conc as u64, "");
    r.add(
        "seconds",
        "time until all refreshed (s)",
        (took * 100.0).round() / 100.0,
        "",
    );
    r.add(
        "refreshes_per_s",
        "tokend refreshes/s (durable commits)",
        rate.round(),
        "",
    );
    r.add(
        "adaptive_limit",
        "adaptive concurrency limit at the end",
        limit,
        "",
    );
    r.add(
        "raw_per_s",
        "raw client loop against the mock (req/s)",
        raw_rate.round(),
        "",
    );
    r.add(
        "ratio",
        "tokend / raw",
        (ratio * 100.0).round() / 100.0,
        &verdict(ratio >= 0.8, ">= 0.8"),
    );
    r.add("grants", "grants (mock)", t.grants, "");
    r.add(
        "reuse_attempts",
        "reuse attempts (mock)",
        t.reuse_attempts,
        &verdict(t.reuse_attempts == 0, "0"),
    );
    r.add(
        "daemon_cpu_s",
        "daemon CPU (s)",
        (cpu * 100.0).round() / 100.0,
        "",
    );
    r.add(
        "daemon_cpu_per_refresh_us",
        "daemon CPU per refresh (us)",
        (cpu * 1e6 / n as f64).round(),
        &verdict(cpu * 1e6 / n as f64 <= 50.0, "<= 50"),
    );
    r.add(
        "daemon_user_share",
        "of which user space",
        (user / cpu.max(1e-9) * 100.0).round() / 100.0,
        "",
    );
    r.add("peak_rss_kib", "daemon peak RSS (KiB)", hwm, "");
    r
}

/// Rows with made-up tokens, expiring 30-60 minutes from now and refreshed 10-12 minutes before:
/// nothing is due for at least 18 minutes, so no request is made.
fn scheduled_far_rows(n: usize) -> Vec<(String, String, Option<String>, i64, i64)> {
    let now = now_s();
    (0..n)
        .map(|i| {
            let id = format!("u{i:07}");
            let exp = now + 1800 + fastrand::i64(0..1800);
            let a = format!("{:064x}", fastrand::u128(..));
            let r = Some(format!("{:064x}", fastrand::u128(..)));
            (id, a, r, exp, exp - 600 - fastrand::i64(0..120))
        })
        .collect()
}

/// As [`scheduled_far_rows`] with [`fill`], in two SQL statements: ten million rows in
/// minutes, not hours. Tokens are 64 hex digits of random bytes.
fn fill_far_sql(db: &Path, n: usize) {
    let conn = Connection::open(db).expect("db");
    conn.pragma_update(None, "synchronous", "OFF")
        .expect("pragma");
    let now = now_s();
    conn.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {n} - 1)
         INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at,
                               refresh_issued_at, state_since)
         SELECT printf('u%07d', i), 'bench', 'user', lower(hex(randomblob(32))),
                lower(hex(randomblob(32))), {now} + 1800 + abs(random() % 1800), {now}, {now}
         FROM s;
         -- As a previous run left them (its writes bump revision: the triggers stay quiet).
         UPDATE accounts SET next_action_at = expires_at - 600 - abs(random() % 120),
                             revision = revision + 1;
         COMMIT;"
    ))
    .expect("fill");
}

async fn idle(a: &Args, smoke: bool) -> Report {
    let n = a.n.unwrap_or(if smoke { 2_000 } else { 100_000 });
    let duration = a.duration.unwrap_or(if smoke { 5 } else { 60 });
    let mock = start_mock(Duration::from_secs(3600)).await;
    let s = setup(&mock.url(), &format!("log_level = \"{}\"", a.log_level));
    fill(&s.db, scheduled_far_rows(n).into_iter());
    let mut d = Daemon::spawn(&s);
    d.wait_ready(Duration::from_secs(60));
    // Let start-up settle (first health snapshot, first change poll).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, w0) = (d.cpu_s(), d.wakeups());
    tokio::time::sleep(Duration::from_secs(duration)).await;
    let (cpu, wakeups) = (d.cpu_s() - cpu0, d.wakeups() - w0);
    let rss = d.status_kib("VmRSS:");
    d.stop();
    let per_min = cpu * 60.0 / duration as f64;
    let mut r = Report::new("idle");
    r.add(
        "accounts",
        "accounts (none due within 20 min)",
        n as u64,
        "",
    );
    r.add("seconds", "measured for (s)", duration, "");
    r.add(
        "daemon_cpu_s",
        "daemon CPU (s)",
        (cpu * 1000.0).round() / 1000.0,
        "",
    );
    r.add(
        "cpu_s_per_min",
        "daemon CPU per minute (s)",
        (per_min * 1000.0).round() / 1000.0,
        &verdict(per_min <= 0.1, "<= 0.1"),
    );
    r.add(
        "wakeups_per_min",
        "voluntary context switches per minute",
        (wakeups as f64 * 60.0 / duration as f64).round(),
        "",
    );
    r.add(
        "token_requests",
        "token requests (mock)",
        mock.totals().token_requests,
        "",
    );
    r.add("rss_kib", "daemon RSS (KiB)", rss, "");
    r
}

async fn scale(a: &Args, smoke: bool) -> Report {
    let n = a.n.unwrap_or(if smoke { 20_000 } else { 1_000_000 });
    let mock = start_mock(Duration::from_secs(3600)).await;
    let s = setup(&mock.url(), &format!("log_level = \"{}\"", a.log_level));
    let f0 = Instant::now();
    fill_far_sql(&s.db, n);
    let fill_s = f0.elapsed().as_secs_f64();
    let db_mib = std::fs::metadata(&s.db)
        .map(|m| m.len() / (1024 * 1024))
        .unwrap_or(0);
    let mut d = Daemon::spawn(&s);
    let ready = d.wait_ready(Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(if smoke { 3 } else { 10 })).await;
    let rss = d.status_kib("VmRSS:");
    let hwm = d.status_kib("VmHWM:");
    d.stop();
    let ready_s = ready.as_secs_f64();
    let mut r = Report::new("scale");
    r.add("accounts", "accounts in the database", n as u64, "");
    r.add("db_mib", "database size (MiB)", db_mib, "");
    r.add(
        "fill_s",
        "pre-fill time (s, not tokend)",
        (fill_s * 10.0).round() / 10.0,
        "",
    );
    r.add(
        "ready_s",
        "process start to READY=1 (s)",
        (ready_s * 1000.0).round() / 1000.0,
        &verdict(ready_s <= 1.0, "<= 1 s"),
    );
    r.add(
        "rss_mib",
        "RSS once settled (MiB)",
        rss / 1024,
        &verdict(rss <= 64 * 1024, "<= 64 MiB"),
    );
    r.add("peak_rss_mib", "peak RSS (MiB)", hwm / 1024, "");
    r
}

/// What one client load measured: answers in the window, those that were not 200, and each
/// answer's latency.
struct Load {
    requests: u64,
    errors: u64,
    seconds: f64,
    latency_us: Vec<i64>,
}

impl Load {
    fn per_s(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn p(&self, q: f64) -> f64 {
        percentile(&self.latency_us, q) as f64 / 1000.0
    }
}

/// `clients` concurrent HTTP/1.1 keep-alive connections to the Unix socket at `socket`, each
/// sending GETs of `path(rng)` back to back for `seconds`, on the runtime `on`. A plain client
/// over the socket (write the request, read headers and a Content-Length body) so its own CPU,
/// which shares the two cores with the server, stays small and equal for every server measured.
async fn load(
    on: &tokio::runtime::Handle,
    socket: &Path,
    clients: usize,
    seconds: f64,
    path: Arc<dyn Fn(&mut fastrand::Rng) -> String + Send + Sync>,
) -> Load {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (socket, path) = (socket.to_owned(), path.clone());
        tasks.push(on.spawn(async move {
            let stream = tokio::net::UnixStream::connect(&socket)
                .await
                .unwrap_or_else(|e| die(&format!("connect {}: {e}", socket.display())));
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut rng = fastrand::Rng::new();
            let (mut latency, mut errors) = (Vec::new(), 0u64);
            let (mut line, mut body) = (String::new(), Vec::new());
            while Instant::now() < until {
                let req = format!("GET {} HTTP/1.1\r\nhost: tokend\r\n\r\n", path(&mut rng));
                let sent = Instant::now();
                write.write_all(req.as_bytes()).await.expect("write");
                let (mut status, mut length) = (0u16, None::<usize>);
                loop {
                    line.clear();
                    if read.read_line(&mut line).await.expect("read") == 0 {
                        die("the server closed a keep-alive connection");
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(rest) = l.strip_prefix("HTTP/1.1 ") {
                        status = rest.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                    } else if let Some((k, v)) = l.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().ok();
                    }
                }
                let length = length.unwrap_or_else(|| die("an answer without Content-Length"));
                body.resize(length, 0);
                read.read_exact(&mut body).await.expect("body");
                latency.push(sent.elapsed().as_micros() as i64);
                if status != 200 {
                    errors += 1;
                }
            }
            (latency, errors)
        }));
    }
    let (mut latency_us, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        latency_us.extend(l);
        errors += e;
    }
    let seconds = t0.elapsed().as_secs_f64();
    latency_us.sort_unstable();
    Load {
        requests: latency_us.len() as u64,
        errors,
        seconds,
        latency_us,
    }
}

/// CPU (utime + stime) this harness process has used, in seconds: the clients, the mock and the
/// hello-world server.
fn own_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The machine's 1-minute load average: other work on the shared cores shows here.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Token fetches over the Unix socket from many clients, with N accounts whose short tokens
/// the engine keeps refreshing meanwhile; beside, in the same run and under the same refresh
/// load, the same client load against tokend's `/healthz` on the same socket (the ceiling the
/// ratio is judged against: the same process, listener, peer-uid check and request counting,
/// a handler that does nothing) and against a hello-world axum server on a Unix socket in this
/// process (the HTTP stack alone, for scale).
async fn api(a: &Args, smoke: bool) -> Report {
    let n = a.n.unwrap_or(if smoke { 2_000 } else { 100_000 });
    // Five-minute tokens: 100,000 accounts make ~350 refreshes/s, the work of a million
    // one-hour tokens. (`--lifetime 60`, capacity's 2,400/s, leaves the engine no headroom on
    // two cores once clients saturate them; BENCHMARKS.md shows that run too.)
    let lifetime = a.lifetime.unwrap_or(if smoke { 12 } else { 300 }) as i64;
    let lead = a.lead.unwrap_or(if smoke { 4 } else { 15 }) as i64;
    let jitter = a.jitter.unwrap_or(if smoke { 1 } else { 5 }) as i64;
    let seconds = a.duration.unwrap_or(if smoke { 2 } else { 20 }) as f64;
    let clients = a.clients.unwrap_or(if smoke { 8 } else { 32 });
    let conc = a.concurrency.unwrap_or(64);
    // A stored token always has about `lead` seconds left; ask for a third of that, so fetches
    // are served from the store (the common case) and none forces a refresh.
    let min_ttl = (lead / 3).max(1);
    let mock = start_mock(Duration::from_secs(lifetime as u64)).await;
    let s = setup(
        &mock.url(),
        &format!(
            "refresh_lead = \"{lead}s\"\nrefresh_jitter = \"{jitter}s\"\nmax_concurrent_refreshes = {conc}\nlog_level = \"{}\"\nrevocation_schedule = \"0 0 0 1 1 *\"\nmin_refresh_interval = \"10s\"\nmax_token_requests_per_hour = 1000",
            a.log_level
        ),
    );
    let socket = s.dir.path().join("api.sock");
    fill_spread(&mock, &s.db, n, lifetime, lead, jitter);

    // The clients, and the hello-world server, each on two threads of their own, as they would
    // be other processes: on the harness's runtime they would queue the mock's answers to
    // tokend behind their own work.
    let runtime = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let (client_rt, hello_rt) = (runtime("bench-clients"), runtime("bench-hello"));
    let on = client_rt.handle().clone();
    // The hello-world ceiling: a fixed body shaped like the token answer.
    let hello = s.dir.path().join("hello.sock");
    let listener = std::os::unix::net::UnixListener::bind(&hello).expect("hello socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let body = format!(
        "{{\"access_token\":\"{:064x}\",\"token_type\":\"Bearer\",\"expires_at\":\"2026-11-28T10:00:00Z\",\"scopes\":[],\"state\":\"active\"}}",
        fastrand::u128(..)
    );
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body,
            )
        }
    });
    hello_rt.spawn(async move {
        let listener = tokio::net::UnixListener::from_std(listener).expect("hello listener");
        axum::serve(listener, app).await
    });

    let mut d = Daemon::spawn(&s);
    d.wait_ready(Duration::from_secs(60));
    let token_path: Arc<dyn Fn(&mut fastrand::Rng) -> String + Send + Sync> =
        Arc::new(move |rng| {
            format!(
                "/v1/accounts/u{:07}/token?min_ttl={min_ttl}",
                rng.usize(0..n)
            )
        });
    // Warm up: connections, the store's page cache, the engine's first claims.
    load(&on, &socket, clients, seconds / 4.0, token_path.clone()).await;
    // Then, each for `seconds`: no API load (what the engine does on this machine right now),
    // token fetches, /healthz, and the hello-world server. What each phase cost and what the
    // engine managed meanwhile is taken at its edges.
    let mark = |d: &Daemon| {
        let t = mock.totals();
        let lapsing = mock.expired_now().len() as u64;
        (
            Instant::now(),
            d.cpu_s(),
            own_cpu_s(),
            t.grants,
            t.lapses,
            lapsing,
        )
    };
    let m0 = mark(&d);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let m1 = mark(&d);
    let token = load(&on, &socket, clients, seconds, token_path).await;
    let m2 = mark(&d);
    let healthz = load(
        &on,
        &socket,
        clients,
        seconds,
        Arc::new(|_| "/healthz".to_owned()),
    )
    .await;
    let m3 = mark(&d);
    let raw = load(
        &on,
        &hello,
        clients,
        seconds,
        Arc::new(|_| "/hello".to_owned()),
    )
    .await;
    let m4 = mark(&d);
    let expired = mock.expired_now().len() as u64;
    let code = d.stop();
    client_rt.shutdown_background();
    hello_rt.shutdown_background();
    let t = mock.totals();
    let lapses = t.lapses + expired;
    let ratio = token.per_s() / healthz.per_s();
    let mut r = Report::new("api");
    r.add("accounts", "accounts", n as u64, "");
    r.add("lifetime_s", "access-token lifetime (s)", lifetime, "");
    r.add(
        "clients",
        "concurrent clients (connections)",
        clients as u64,
        "",
    );
    r.add("seconds", "measured per phase (s)", seconds, "");
    r.add("min_ttl_s", "min_ttl asked (s)", min_ttl, "");
    r.add(
        "loadavg",
        "machine load average at the end (1 min)",
        loadavg(),
        "",
    );
    let round = |x: f64, k: f64| (x * k).round() / k;
    type Mark = (Instant, f64, f64, u64, u64, u64);
    let phase = |r: &mut Report, key: &str, label: &str, l: Option<&Load>, a: Mark, b: Mark| {
        let secs = (b.0 - a.0).as_secs_f64();
        if let Some(l) = l {
            let per = |cpu: f64| round(cpu * 1e6 / l.requests.max(1) as f64, 1.0);
            r.add(
                &format!("{key}_per_s"),
                &format!("{label}: requests/s"),
                round(l.per_s(), 1.0),
                "",
            );
            r.add(
                &format!("{key}_p50_ms"),
                &format!("{label}: p50 (ms)"),
                round(l.p(0.50), 1000.0),
                "",
            );
            let p99 = l.p(0.99);
            let target = if key == "token" {
                verdict(p99 < 5.0, "< 5 ms")
            } else {
                String::new()
            };
            r.add(
                &format!("{key}_p99_ms"),
                &format!("{label}: p99 (ms)"),
                round(p99, 1000.0),
                &target,
            );
            r.add(
                &format!("{key}_errors"),
                &format!("{label}: answers not 200"),
                l.errors,
                "",
            );
            r.add(
                &format!("{key}_daemon_cpu_us"),
                &format!("{label}: tokend CPU per request (us)"),
                per(b.1 - a.1),
                "",
            );
            r.add(
                &format!("{key}_harness_cpu_us"),
                &format!("{label}: harness CPU per request (us)"),
                per(b.2 - a.2),
                "",
            );
        }
        r.add(
            &format!("{key}_daemon_cores"),
            &format!("{label}: tokend CPU (cores)"),
            round((b.1 - a.1) / secs, 100.0),
            "",
        );
        r.add(
            &format!("{key}_refreshes_per_s"),
            &format!("{label}: refreshes/s meanwhile (mock)"),
            round((b.3 - a.3) as f64 / secs, 1.0),
            "",
        );
        r.add(
            &format!("{key}_lapses"),
            &format!("{label}: lapses meanwhile (mock)"),
            b.4 - a.4,
            "",
        );
        r.add(
            &format!("{key}_lapsing_at_end"),
            &format!("{label}: tokens expired at its end (mock)"),
            b.5,
            "",
        );
    };
    phase(&mut r, "quiet", "no API load", None, m0, m1);
    phase(&mut r, "token", "token fetches", Some(&token), m1, m2);
    phase(
        &mut r,
        "healthz",
        "ceiling: tokend /healthz",
        Some(&healthz),
        m2,
        m3,
    );
    phase(
        &mut r,
        "hello",
        "hello-world axum, harness",
        Some(&raw),
        m3,
        m4,
    );
    r.add(
        "ratio",
        "token / /healthz ceiling",
        round(ratio, 100.0),
        &verdict(ratio >= 0.7, ">= 0.7"),
    );
    r.add(
        "ratio_hello",
        "token / hello-world",
        round(token.per_s() / raw.per_s(), 100.0),
        "",
    );
    r.add(
        "lapses",
        "lapses, whole run (mock)",
        lapses,
        &verdict(lapses == 0, "0"),
    );
    r.add(
        "reuse_attempts",
        "reuse attempts (mock)",
        t.reuse_attempts,
        &verdict(t.reuse_attempts == 0, "0"),
    );
    r.add("exit_code", "daemon exit code", code.unwrap_or(-1), "");
    r
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let smoke = args.scenario == "smoke";
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "smoke" | "all" => vec!["capacity", "catchup", "idle", "scale", "api", "callgrind"],
        s => vec![s],
    };
    let mut out = BTreeMap::new();
    for sc in scenarios {
        let report = rt.block_on(async {
            match sc {
                "capacity" => capacity(&args, smoke).await,
                "catchup" => catchup(&args, smoke).await,
                "idle" => idle(&args, smoke).await,
                "scale" => scale(&args, smoke).await,
                "callgrind" => callgrind(&args, smoke).await,
                "api" => api(&args, smoke).await,
                other => die(&format!("unknown scenario {other}")),
            }
        });
        report.print();
        out.insert(
            report.scenario.clone(),
            serde_json::Value::Object(report.json.into_iter().collect()),
        );
    }
    let path = args.json.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("target/bench-{}.json", args.scenario))
    });
    let machine = serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())),
    });
    let doc = serde_json::json!({"machine": machine, "results": out});
    if let Err(e) = std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap_or_default()) {
        eprintln!("tokend_bench: cannot write {}: {e}", path.display());
    } else {
        println!("\nresults written to {}", path.display());
    }
    if smoke {
        // The smoke run checks the harness works end to end, with tiny sizes; figures not judged.
        let lapses = doc["results"]["capacity"]["lapses"].as_u64().unwrap_or(1);
        let reuse = doc["results"]["capacity"]["reuse_attempts"]
            .as_u64()
            .unwrap_or(1);
        if lapses != 0 || reuse != 0 {
            eprintln!("tokend_bench smoke: {lapses} lapses, {reuse} reuse attempts in a tiny run");
            std::process::exit(1);
        }
        let api = &doc["results"]["api"];
        let served = api["token_per_s"].as_f64().unwrap_or(0.0);
        let refused = api["token_errors"].as_u64().unwrap_or(1);
        if served <= 0.0 || refused != 0 {
            eprintln!(
                "tokend_bench smoke: the api scenario served {served}/s, {refused} answers not 200"
            );
            std::process::exit(1);
        }
    }
}

/// Instructions per refresh, counted by valgrind's callgrind: deterministic where times are
/// not. Two catch-up runs under callgrind (N/5 and N expired accounts); the difference of their
/// instruction totals over the difference of their refreshes is the marginal cost of one
/// refresh, start-up and shutdown cancelled out. The larger run's functions, by instructions
/// spent in them (self cost), go to `target/callgrind-top.txt`.
async fn callgrind(a: &Args, smoke: bool) -> Report {
    let big = a.n.unwrap_or(if smoke { 300 } else { 2_500 });
    let small = big / 5;
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let mut totals = Vec::new();
    for n in [small, big] {
        let mock = start_mock(Duration::from_secs(3600)).await;
        let s = setup(
            &mock.url(),
            &format!(
                "max_concurrent_refreshes = 64\nlog_level = \"{}\"\nrevocation_schedule = \"0 0 0 1 1 *\"\nmin_refresh_interval = \"10s\"\nmax_token_requests_per_hour = 1000\nhttp_timeout = \"60s\"\nlease = \"120s\"\nshutdown_timeout = \"120s\"",
                a.log_level
            ),
        );
        fill_expired(&mock, &s.db, n);
        let out = s.dir.path().join("callgrind.out");
        let wrapper: Vec<String> = vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}", out.display()),
        ];
        let mut d = Daemon::spawn_under(&s, &wrapper);
        d.wait_ready(Duration::from_secs(300));
        let t0 = Instant::now();
        while mock.totals().grants < n as u64 && t0.elapsed() < Duration::from_secs(1800) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let grants = mock.totals().grants;
        if d.stop() != Some(0) {
            die("tokend under callgrind did not stop cleanly");
        }
        let text = std::fs::read_to_string(&out)
            .unwrap_or_else(|e| die(&format!("no callgrind output: {e}")));
        let ir: u64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("totals: ")
                    .or_else(|| l.strip_prefix("summary: "))
            })
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| die("no instruction total in the callgrind output"));
        if n == big {
            let top = Command::new("callgrind_annotate")
                .args(["--inclusive=no", "--threshold=99"])
                .arg(&out)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let path = out_dir.join("callgrind-top.txt");
            let _ = std::fs::write(&path, &top);
            let _ = std::fs::copy(&out, out_dir.join("callgrind.out.tokend"));
        } else {
            // Kept so a function's marginal cost can be read as (big - small) / (n2 - n1).
            let _ = std::fs::copy(&out, out_dir.join("callgrind.small.out.tokend"));
        }
        totals.push((n as u64, grants, ir));
    }
    let (n1, _, ir1) = totals[0];
    let (n2, g2, ir2) = totals[1];
    let per = (ir2.saturating_sub(ir1)) as f64 / (n2 - n1) as f64;
    let mut r = Report::new("callgrind");
    r.add("small_run", "accounts in the small run", n1, "");
    r.add("big_run", "accounts in the big run", n2, "");
    r.add("grants", "grants in the big run (mock)", g2, "");
    r.add("ir_small", "instructions, small run", ir1, "");
    r.add("ir_big", "instructions, big run", ir2, "");
    r.add(
        "instructions_per_refresh",
        "instructions per refresh (marginal)",
        per.round(),
        "",
    );
    r.add(
        "top",
        "functions by self cost",
        "target/callgrind-top.txt".to_owned(),
        "",
    );
    r
}
