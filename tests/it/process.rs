//! The daemon as a process: signals, reload, readiness, journald logs, exit codes.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use rusqlite::Connection;
use tokend_mock::{Endpoint, Fault, MockConfig, Rotation};

use crate::helpers::{Env, eventually};

fn health_json(env: &Env) -> serde_json::Value {
    std::fs::read_to_string(&env.health)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_refreshes_commit() {
    let env = Env::new(
        MockConfig {
            rotation: Rotation::Immediate,
            access_ttl: Duration::from_secs(8),
            ..MockConfig::default()
        },
        "max_concurrent_refreshes = 10\nshutdown_timeout = \"10s\"\nhttp_timeout = \"5s\"",
    )
    .await;
    for i in 0..10 {
        env.add_user(&format!("u{i}"), Duration::from_secs(60));
    }
    env.mock.push_faults(
        Endpoint::Token,
        (0..10).map(|_| Fault::Delay(Duration::from_secs(2))),
    );
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "refreshes held in flight", || {
        env.mock.in_flight() >= 3
    })
    .await;
    let t0 = std::time::Instant::now();
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(12)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
    let took = t0.elapsed();
    assert!(env.mock.totals().grants >= 3);
    for i in 0..10 {
        let id = format!("u{i}");
        if env.mock.account(&id).grants == 0 {
            continue;
        }
        let (access, refresh, _) = env.tokens(&id);
        let (a, r) = env.mock.newest(&id).expect("issued");
        assert_eq!(
            access.as_deref(),
            Some(a.as_str()),
            "{id}: answered refresh not committed"
        );
        assert_eq!(refresh, r, "{id}");
    }
    eprintln!("drained and exited in {took:?}");

    // A restart carries on from the committed pairs: no refresh token is presented twice.
    let mut bin = env.spawn_binary(&[]);
    eventually(
        Duration::from_secs(20),
        "every account refreshed after restart",
        || (0..10).all(|i| env.mock.account(&format!("u{i}")).grants >= 2),
    )
    .await;
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(12)).await, Some(0));
    let t = env.mock.totals();
    assert_eq!(t.reuse_attempts, 0, "{t:?}");
    assert_eq!(t.errors, 0, "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once_and_the_database_stays_sound() {
    let env = Env::new(
        MockConfig::default(),
        "shutdown_timeout = \"60s\"\nhttp_timeout = \"30s\"\nlease = \"60s\"",
    )
    .await;
    for i in 0..4 {
        env.add_user(&format!("u{i}"), Duration::from_secs(4000));
    }
    env.mock.push_faults(
        Endpoint::Token,
        (0..4).map(|_| Fault::Delay(Duration::from_secs(25))),
    );
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "refreshes in flight", || {
        env.mock.in_flight() >= 4
    })
    .await;
    bin.signal("TERM");
    eventually(Duration::from_secs(5), "drain started", || {
        bin.stderr().contains("stopping")
    })
    .await;
    let t0 = std::time::Instant::now();
    bin.signal("TERM");
    let code = bin.wait(Duration::from_secs(3)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "second SIGTERM: exit {code:?}"
    );
    eprintln!("second SIGTERM exit after {:?}", t0.elapsed());
    let conn = Connection::open(&env.db).expect("open");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
}

/// A reload (what SIGHUP triggers) applies a new lead time and a rotated client secret
/// without losing a schedule; the clock is driven, so cycles of 10 s tokens take no time.
#[tokio::test(start_paused = true)]
async fn a_reload_applies_a_new_lead_time_and_a_rotated_secret() {
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(10),
            ..MockConfig::default()
        },
        "refresh_lead = \"2s\"\nrefresh_jitter = \"0s\"",
    )
    .await;
    env.add_user("u", Duration::from_secs(100));
    let daemon = env.start();
    eventually(
        Duration::from_secs(30),
        "two refreshes with the old lead",
        || env.mock.account("u").grants >= 2,
    )
    .await;
    let loaded_before = health_json(&env)["config"]["loaded_at"].as_i64();

    // Lead 5s of a 10s lifetime, and a rotated client secret: the provider accepts both
    // secrets during the rotation, then only the new one.
    env.mock.also_accept_secret("rotated-secret-value");
    crate::helpers::write_private(&env.secret_file(), "rotated-secret-value");
    env.rewrite_config("refresh_lead = \"5s\"\nrefresh_jitter = \"0s\"");
    daemon.reload.send(()).await.expect("reload");
    eventually(Duration::from_secs(5), "reload applied", || {
        health_json(&env)["config"]["loaded_at"].as_i64() > loaded_before
    })
    .await;
    env.mock.set_client_secret("rotated-secret-value");
    let start = env.mock.account("u").grants;
    eventually(
        Duration::from_secs(40),
        "three refreshes with the new lead",
        || env.mock.account("u").grants >= start + 3,
    )
    .await;
    daemon.stop().await;
    let log: Vec<i64> = env
        .mock
        .token_log()
        .iter()
        .filter(|l| l.1 == 200)
        .map(|l| l.0)
        .collect();
    let gaps: Vec<i64> = log.windows(2).map(|w| w[1] - w[0]).collect();
    // Old lead: a refresh every ~8s; new lead: every ~5s (after the one scheduled before it).
    assert!(gaps[0] >= 7_000, "gaps between refreshes {gaps:?}");
    let last = gaps[gaps.len() - 1];
    assert!(
        (4_000..=6_500).contains(&last),
        "gaps between refreshes {gaps:?}"
    );
    assert_eq!(health_json(&env)["config"]["last_reload_ok"], true);
    assert_eq!(env.state("u"), "active");
    assert_eq!(
        env.mock.totals().errors,
        0,
        "requests failed around the secret rotation"
    );
}

/// SIGHUP with a broken file: the old config stays in force, the error is logged (as
/// `check-config` says it) and shown in the health file; the daemon keeps refreshing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_the_old_config() {
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(6),
            ..MockConfig::default()
        },
        "refresh_lead = \"2s\"\nrefresh_jitter = \"0s\"",
    )
    .await;
    env.add_user("u", Duration::from_secs(100));
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "refreshed", || {
        env.mock.account("u").grants >= 1
    })
    .await;
    std::fs::write(&env.config_path, "[daemon\nthis is not toml").expect("write");
    bin.signal("HUP");
    eventually(Duration::from_secs(5), "reload failure logged", || {
        bin.stderr().contains("configuration reload failed")
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "health shows the failed reload",
        || health_json(&env)["config"]["last_reload_ok"] == serde_json::Value::Bool(false),
    )
    .await;
    let before = env.mock.account("u").grants;
    eventually(Duration::from_secs(10), "still refreshing", || {
        env.mock.account("u").grants > before
    })
    .await;
    assert!(
        bin.child.try_wait().expect("wait").is_none(),
        "process died"
    );
    let check = env.tokend(&["check-config"]);
    let check_err = String::from_utf8_lossy(&check.stderr);
    let first_line = check_err
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("tokend: invalid configuration: ");
    assert!(
        bin.stderr().contains(first_line),
        "reload error differs from check-config: {first_line}"
    );
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_readiness_status_reload_stop_and_watchdog() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::ZERO);
    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut bin = env.spawn_binary(&[
        ("NOTIFY_SOCKET", sock_path.to_str().expect("path")),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    let mut got: Vec<String> = Vec::new();
    let recv_until = |want: &str, got: &mut Vec<String>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l.starts_with(want));
                got.push(msg);
                if hit {
                    return;
                }
            }
        }
        panic!("no {want} among {got:?}");
    };
    recv_until("READY=1", &mut got);
    assert!(got.iter().any(|m| m.contains("STATUS=")), "{got:?}");
    recv_until("WATCHDOG=1", &mut got);
    bin.signal("HUP");
    recv_until("RELOADING=1", &mut got);
    recv_until("READY=1", &mut got);
    bin.signal("TERM");
    recv_until("STOPPING=1", &mut got);
    assert_eq!(bin.wait(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journald_lines_carry_priorities_without_timestamps_or_colour() {
    let env = Env::new(MockConfig::default(), "log_level = \"info\"").await;
    env.add_user("u", Duration::from_secs(4000));
    env.conn()
        .execute(
            "INSERT INTO accounts (id, token_type) VALUES ('bad', 'user')",
            [],
        )
        .expect("insert");
    // The binary's stderr is this file: tell it so the way systemd does.
    let log = env.dir.path().join("journal.log");
    let file = std::fs::File::create(&log).expect("log");
    let meta = file.metadata().expect("meta");
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    drop(file);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"));
    cmd.args(["--config", env.config_path.to_str().expect("path"), "run"])
        .env("JOURNAL_STREAM", &stream)
        // No journal socket: the fallback, lines on stderr (also where journald runs).
        .env(
            "TOKEND_JOURNAL_SOCKET",
            env.dir.path().join("no-journal-here"),
        )
        .env_remove("RUST_LOG")
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("open"),
        );
    let mut child = cmd.spawn().expect("spawn");
    crate::logs::until_refreshed_and_reported(&env).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success());
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(
            line.starts_with("<3>")
                || line.starts_with("<4>")
                || line.starts_with("<6>")
                || line.starts_with("<7>"),
            "no priority prefix: {line:?}"
        );
        assert!(!line.contains('\u{1b}'), "ANSI escape in {line:?}");
        // journald stamps each line; the level comes first (fields such as next_action_at
        // still read as RFC 3339 further on).
        let start: String = line.chars().take(24).collect();
        assert!(!has_timestamp(&start), "timestamp in {line:?}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6>") && l.contains("refresh")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("<3>") && l.contains("invalid")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_what_went_wrong() {
    let env = Env::new(MockConfig::default(), "").await;
    // 78: invalid configuration.
    std::fs::write(&env.config_path, "[daemon]\nrefresh_lead = \"soon\"\n").expect("write");
    let out = env.tokend(&["run"]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("refresh_lead"), "{err}");

    // 74: a database newer than this binary.
    env.rewrite_config("");
    env.conn()
        .pragma_update(None, "user_version", 99)
        .expect("pragma");
    let out = env.tokend(&["run"]);
    assert_eq!(out.status.code(), Some(74));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer"), "{err}");

    // 74: a database that cannot be opened at all.
    let text = std::fs::read_to_string(&env.config_path).expect("read");
    let text = text.replace(env.db.to_str().expect("path"), "/nonexistent-dir/tokend.db");
    std::fs::write(&env.config_path, text).expect("write");
    let out = env.tokend(&["run"]);
    assert_eq!(out.status.code(), Some(74));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the database"), "{err}");
}

/// Whether `line` holds an RFC 3339 date-time such as `2026-11-28T14:00`.
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(13).any(|w| {
        let d = |i: usize| w[i].is_ascii_digit();
        d(0) && d(1)
            && d(2)
            && d(3)
            && w[4] == b'-'
            && d(5)
            && d(6)
            && w[7] == b'-'
            && d(8)
            && d(9)
            && w[10] == b'T'
            && d(11)
            && d(12)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_socket_nobody_reads_never_stalls_the_daemon() {
    // Found by the capacity benchmark: with a full notify socket, a blocking send stalled the
    // runtime and SIGTERM went unanswered. The test fills the socket's queue before the daemon
    // starts, so every notification it sends meets a full queue.
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(4),
            ..MockConfig::default()
        },
        "health_interval = \"1s\"\nrefresh_lead = \"2s\"\nrefresh_jitter = \"0s\"",
    )
    .await;
    for i in 0..5 {
        env.add_user(&format!("u{i}"), Duration::from_secs(3));
    }
    let sock_path = env.dir.path().join("deaf.sock");
    let _sock = UnixDatagram::bind(&sock_path).expect("bind");
    let filler = UnixDatagram::unbound().expect("socket");
    filler.set_nonblocking(true).expect("nonblocking");
    let mut queued = 0;
    while filler.send_to(b"STATUS=filler", &sock_path).is_ok() {
        queued += 1;
        assert!(queued < 100_000, "the socket never filled");
    }
    let mut bin = env.spawn_binary(&[("NOTIFY_SOCKET", sock_path.to_str().expect("path"))]);
    // Two rounds of refreshes and several heartbeats, each with a STATUS= the socket refuses.
    eventually(Duration::from_secs(15), "still refreshing", || {
        (0..5).all(|i| env.mock.account(&format!("u{i}")).grants >= 2)
    })
    .await;
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
    eprintln!("the notify socket held {queued} datagrams, all from the filler");
}
