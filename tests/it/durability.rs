//! Rotation safety II: what the store holds survives full disks, locks, stops, races, a file
//! replaced under the daemon, and operators.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tokend_mock::{Endpoint, Fault, MockConfig, Rotation};

use crate::helpers::{Env, checking, eventually, write_private};

/// Records in the recovery journal beside the database (lines before the zero-filled reserve).
fn journal_records(env: &Env) -> usize {
    let path = format!("{}.recovery", env.db.display());
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    bytes[..end]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count()
}

fn assert_stored_is_newest(env: &Env, ids: &[String]) {
    for id in ids {
        let (access, refresh, _) = env.tokens(id);
        let (a, r) = env.mock.newest(id).expect("issued");
        assert_eq!(
            access.as_deref(),
            Some(a.as_str()),
            "{id}: access token is not the newest"
        );
        assert_eq!(refresh, r, "{id}: refresh token is not the newest");
    }
}

/// A write lock held across SIGTERM: the rotated pairs cannot be stored by the deadline, so they
/// go to the recovery journal, tokend exits 75 naming the accounts, and the next start stores
/// them before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_held_at_a_stop_are_journaled_and_stored_at_the_next_start() {
    let env = Env::new(
        MockConfig {
            rotation: Rotation::Immediate,
            ..MockConfig::default()
        },
        "store_busy_timeout = \"100ms\"\nshutdown_timeout = \"3s\"\nhttp_timeout = \"2s\"\nlog_level = \"info\"",
    )
    .await;
    let ids: Vec<String> = (0..4).map(|i| format!("u{i}")).collect();
    for id in &ids {
        env.add_user(id, Duration::from_secs(3599));
    }
    env.mock.push_faults(
        Endpoint::Token,
        (0..4).map(|_| Fault::Delay(Duration::from_millis(800))),
    );
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "refreshes in flight", || {
        env.mock.in_flight() >= 4
    })
    .await;
    let locker = env.conn();
    locker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    eventually(Duration::from_secs(10), "answers journaled", || {
        env.mock.totals().grants == 4 && journal_records(&env) == 4
    })
    .await;
    bin.signal("TERM");
    let code = bin.wait(Duration::from_secs(15)).await;
    let stderr = bin.stderr();
    assert_eq!(code, Some(75), "{stderr}");
    for id in &ids {
        assert!(
            stderr.contains(id.as_str()),
            "the exit line names {id}: {stderr}"
        );
    }
    locker.execute_batch("COMMIT").expect("unlock");
    drop(locker);
    // Nothing reached the store: under strict rotation those pairs exist only in the journal.
    for id in &ids {
        assert_ne!(env.tokens(id).1, env.mock.newest(id).expect("issued").1);
    }
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "replayed", || {
        ids.iter()
            .all(|id| env.tokens(id).1 == env.mock.newest(id).expect("issued").1)
    })
    .await;
    assert_eq!(
        journal_records(&env),
        0,
        "the journal is emptied once stored"
    );
    // And the chains go on: refresh again, no invalid_grant.
    env.conn()
        .execute("UPDATE accounts SET expires_at = expires_at - 3590", [])
        .expect("make due");
    eventually(Duration::from_secs(10), "refreshed again", || {
        ids.iter().all(|id| env.mock.account(id).grants >= 2)
    })
    .await;
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
    let t = env.mock.totals();
    assert_eq!((t.errors, t.reuse_attempts), (0, 0), "{t:?}");
    assert_stored_is_newest(&env, &ids);
}

/// The same with a full disk instead of a lock: the journal's reserve was written at start, so
/// a record fits where SQLite cannot write a page. Needs a small filesystem: a tmpfs mounted as
/// root (CI runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_across_a_stop_loses_no_rotated_pair() {
    let env = Env::new(
        MockConfig {
            rotation: Rotation::Immediate,
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let mount = env.dir.path().join("small");
    std::fs::create_dir(&mount).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&mount)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "this test mounts a 4 MiB tmpfs and needs root (or CAP_SYS_ADMIN); CI runs as root"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let db = mount.join("tokend.db");
    let text = std::fs::read_to_string(&env.config_path)
        .expect("config")
        .replace(&env.db.display().to_string(), &db.display().to_string())
        .replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"3s\"");
    std::fs::write(&env.config_path, text).expect("config");
    // Link the accounts on the small disk.
    tokend::store::Store::open(&db)
        .expect("store")
        .0
        .close()
        .await;
    let ids: Vec<String> = (0..4).map(|i| format!("u{i}")).collect();
    {
        let c = rusqlite::Connection::open(&db).expect("open");
        for id in &ids {
            let t = env.mock.issue_user(id, Duration::from_secs(3599));
            c.execute(
                "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES (?1, 'factorial', 'user', ?2, ?3, ?4)",
                rusqlite::params![id, t.access_token, t.refresh_token, t.expires_at],
            )
            .expect("insert");
        }
    }
    env.mock.push_faults(
        Endpoint::Token,
        (0..4).map(|_| Fault::Delay(Duration::from_millis(800))),
    );
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "refreshes in flight", || {
        env.mock.in_flight() >= 4
    })
    .await;
    // Fill the disk while the answers are on their way.
    let filler = mount.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    eventually(Duration::from_secs(10), "answered", || {
        env.mock.totals().grants == 4
    })
    .await;
    bin.signal("TERM");
    let code = bin.wait(Duration::from_secs(15)).await;
    let stderr = bin.stderr();
    assert_eq!(code, Some(75), "{stderr}");
    // Space again (an operator cleared the disk); the next start stores the pairs.
    std::fs::remove_file(&filler).expect("free space");
    let mut bin = env.spawn_binary(&[]);
    let stored = |id: &String| -> Option<String> {
        rusqlite::Connection::open(&db)
            .ok()?
            .query_row(
                "SELECT refresh_token FROM accounts WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .ok()
    };
    eventually(Duration::from_secs(10), "replayed", || {
        ids.iter()
            .all(|id| stored(id) == env.mock.newest(id).expect("issued").1)
    })
    .await;
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
    assert_eq!(env.mock.totals().errors, 0);
}

/// Two daemons, the database locked longer than the lease while refreshes are in flight: the
/// second may present the old refresh token once the first's lease is gone, but the first's
/// rotated pair wins by compare-and-swap. Nothing is lost, nobody needs reauthorisation.
#[tokio::test(start_paused = true)]
async fn two_daemons_and_a_lock_longer_than_the_lease_lose_no_grant() {
    let env = Env::new(
        MockConfig {
            rotation: Rotation::Immediate,
            ..MockConfig::default()
        },
        "lease = \"3s\"\nhttp_timeout = \"2s\"\nshutdown_timeout = \"5s\"\nstore_busy_timeout = \"20ms\"",
    )
    .await;
    let ids: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    for id in &ids {
        env.add_user(id, Duration::from_secs(3599));
    }
    env.mock.push_faults(
        Endpoint::Token,
        (0..6).map(|_| Fault::Delay(Duration::from_millis(500))),
    );
    let mut config_b = env.config();
    config_b.daemon.health_file = env.dir.path().join("health-b.json");
    config_b.api.socket = Some(env.dir.path().join("api-b.sock"));
    let a = env.start();
    let b = env.start_with(config_b);
    eventually(Duration::from_secs(10), "refreshes in flight", || {
        env.mock.in_flight() >= 4
    })
    .await;
    let locker = env.conn();
    locker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    // Twenty seconds: several leases (3 s, plus a 2 s request timeout) run out meanwhile.
    tokio::time::sleep(Duration::from_secs(20)).await;
    locker.execute_batch("COMMIT").expect("unlock");
    drop(locker);
    eventually(
        Duration::from_secs(30),
        "every grant stored and alive",
        || {
            ids.iter().all(|id| {
                let stored = env.tokens(id).1;
                stored
                    .as_deref()
                    .is_some_and(|r| env.mock.refresh_token_live(r))
                    && env.state(id) == "active"
            })
        },
    )
    .await;
    a.stop().await;
    b.stop().await;
    assert_eq!(env.count_state("needs_reauth"), 0);
    assert_stored_is_newest(&env, &ids);
    eprintln!(
        "two daemons, 20 s lock: {} grants, {} presentations of a replaced refresh token (refused, harmless)",
        env.mock.totals().grants,
        env.mock.totals().reuse_attempts
    );
}

/// A relink written by another program while a refresh is in flight wins; the rotated pair is
/// recorded as superseded and revoked.
#[tokio::test(start_paused = true)]
async fn a_relink_during_a_refresh_wins_and_the_rotated_pair_is_recorded_superseded() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::from_secs(3599));
    env.mock
        .push_faults(Endpoint::Token, [Fault::Delay(Duration::from_secs(1))]);
    let daemon = env.start();
    eventually(Duration::from_secs(5), "in flight", || {
        env.mock.in_flight() == 1
    })
    .await;
    let fresh = env.relink("u", Duration::ZERO);
    eventually(Duration::from_secs(5), "answered", || {
        env.mock.account("u").grants == 1 && env.mock.in_flight() == 0
    })
    .await;
    eventually(Duration::from_secs(5), "recorded", || {
        !env.events("u", "superseded").is_empty()
    })
    .await;
    daemon.stop().await;
    assert_eq!(env.tokens("u").1, fresh.refresh_token, "the relink wins");
    assert_eq!(env.state("u"), "active");
}

/// The database file replaced under the running daemon (a restored backup moved over it): it
/// stops writing to the old file at once, says so, and exits 74 for systemd to restart it on
/// the file now at the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_replaced_under_the_daemon_stops_it() {
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(4),
            ..MockConfig::default()
        },
        "refresh_lead = \"2s\"\nrefresh_jitter = \"0s\"\nlog_level = \"info\"\nhealth_interval = \"1s\"",
    )
    .await;
    env.add_user("u", Duration::from_secs(2));
    let backup = env.dir.path().join("backup.db");
    env.conn()
        .execute("VACUUM INTO ?1", [backup.to_str().expect("path")])
        .expect("backup");
    // Log lines held back (README "Logs"): only the fatal exit's flush writes the last INFO ones.
    let mut bin = env.spawn_binary(&[("TOKEND_LOG_FLUSH_MS", "3600000")]);
    eventually(Duration::from_secs(10), "refreshed", || {
        env.mock.account("u").grants >= 1
    })
    .await;
    std::fs::rename(&backup, &env.db).expect("restore over the live file");
    let code = bin.wait(Duration::from_secs(10)).await;
    let stderr = bin.stderr();
    assert_eq!(code, Some(74), "{stderr}");
    assert!(stderr.contains("replaced or removed"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let stopped = lines
        .iter()
        .position(|l| l.contains(" INFO tokend stopped "));
    assert!(
        stopped.is_some_and(|i| i + 1 == lines.len() - 1)
            && lines.last().is_some_and(|l| l.starts_with("tokend: ")),
        "the exit's own line is not last, right after the INFO lines before it:\n{stderr}"
    );
    assert_eq!(env.health()["status"], "failing", "{}", env.health());
    // Restarted (as systemd would), it runs on the restored file.
    let mut bin = env.spawn_binary(&[]);
    let pid = bin.child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = env.health();
        if h["pid"] == pid && h["status"] != "failing" && h["status"] != "starting" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not running on the new file: {h}\n{}",
            bin.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
}

/// Files that hold tokens are private whatever the umask; a readable database is warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_holding_tokens_are_private_whatever_the_umask() {
    let env = Env::new(MockConfig::default(), "log_level = \"info\"").await;
    std::fs::remove_file(&env.db).expect("remove");
    let run = |env: &Env| {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask 022; exec '{}' --config '{}' run",
                env!("CARGO_BIN_EXE_tokend"),
                env.config_path.display()
            ))
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::fs::File::create(env.dir.path().join("umask.log")).expect("log"))
            .spawn()
            .expect("spawn")
    };
    let mut child = run(&env);
    eventually(Duration::from_secs(10), "started", || {
        env.health()["status"] == "ok" || env.health()["status"] == "degraded"
    })
    .await;
    for suffix in ["", "-wal", "-shm", ".recovery"] {
        let p = format!("{}{suffix}", env.db.display());
        let mode = std::fs::metadata(&p).expect(&p).permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{p} is {mode:o}");
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().expect("wait").success());
    // An existing database others can read is reported.
    std::fs::set_permissions(&env.db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut child = run(&env);
    eventually(Duration::from_secs(10), "warned", || {
        std::fs::read_to_string(env.dir.path().join("umask.log"))
            .is_ok_and(|l| l.contains("readable or writable by others"))
    })
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().expect("wait").success());
}

/// A pause survives a restart, shows in the health file and the listing, resumes once the
/// provider takes the client again whichever rows the profile holds (company rows sort first
/// here), and `tokend token` still serves a valid token of a paused account.
#[tokio::test(start_paused = true)]
async fn a_paused_profile_survives_a_restart_and_resumes_whichever_rows_it_holds() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_company("a-company-1");
    env.add_company("a-company-2");
    env.add_user("u-due", Duration::from_secs(3599));
    env.add_user("u-valid", Duration::from_secs(60));
    write_private(&env.secret_file(), "wrong-secret");
    let daemon = env.start();
    eventually(Duration::from_secs(10), "paused", || {
        env.state("u-due") == "paused" && env.state("u-valid") == "paused"
    })
    .await;
    daemon.stop().await;
    assert_eq!(env.state("a-company-1"), "paused");

    // After a restart: still paused, and the health file says so from the start.
    let daemon = env.start();
    eventually(Duration::from_secs(5), "health shows the pause", || {
        env.health()["profiles"]["factorial"]["paused"] == true
    })
    .await;
    let requests = env.mock.totals().token_requests;
    // The retry after the pause's backoff finds it still refused.
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(
        env.mock.totals().token_requests,
        requests + 1,
        "one retry per backoff period"
    );
    assert_eq!(env.state("u-due"), "paused");
    // The listing shows it; `tokend token` still serves the valid access token.
    let list = env.tokend_async(&["accounts", "list"]).await;
    assert!(String::from_utf8_lossy(&list.stdout).contains("paused"));
    let token = env.tokend_async(&["token", "u-valid"]).await;
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&token.stdout).trim(),
        env.tokens("u-valid").0.expect("token")
    );
    assert!(String::from_utf8_lossy(&token.stderr).contains("paused"));

    // The secret is fixed: the next retry (here, at once after a reload) resumes everything.
    write_private(&env.secret_file(), crate::helpers::SECRET);
    daemon.reload.send(()).await.expect("reload");
    eventually(Duration::from_secs(10), "resumed", || {
        ["a-company-1", "a-company-2", "u-due", "u-valid"]
            .iter()
            .all(|id| env.state(id) == "active")
    })
    .await;
    eventually(Duration::from_secs(10), "the due account refreshed", || {
        env.mock.account("u-due").grants == 1
    })
    .await;
    eventually(Duration::from_secs(5), "health shows no pause", || {
        env.health()["profiles"]["factorial"]["paused"] == false
    })
    .await;
    daemon.stop().await;
}

/// A probe whose answer meets a locked store while the daemon is stopping is still committed
/// once the store frees up before the hard deadline (the soft stop does not drop it).
#[tokio::test(start_paused = true)]
async fn a_probe_result_meeting_a_locked_store_at_a_stop_is_still_committed() {
    let env = Env::new(MockConfig::default(), "store_busy_timeout = \"20ms\"").await;
    env.add_company("c");
    env.mock.push_faults(
        Endpoint::TokenInfo,
        [Fault::Delay(Duration::from_millis(500))],
    );
    let c = checking(&env).await;
    let locker = env.conn();
    let checker = c.checker.clone();
    let run = tokio::spawn(async move { checker.run_once().await });
    // The row is leased for its probe; the answer comes 500 ms later.
    eventually(Duration::from_secs(5), "probe under way", || {
        env.conn()
            .query_row(
                "SELECT lease_owner IS NOT NULL FROM accounts WHERE id = 'c'",
                [],
                |r| r.get::<_, bool>(0),
            )
            .unwrap_or(false)
    })
    .await;
    locker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    // The daemon is stopping: no new probes. The hard deadline has not come.
    c.stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    locker.execute_batch("COMMIT").expect("unlock");
    drop(locker);
    let summary = run.await.expect("run").expect("ran");
    assert_eq!(summary.active, 1);
    let checked: Option<i64> = env
        .conn()
        .query_row(
            "SELECT last_checked_at FROM accounts WHERE id = 'c'",
            [],
            |r| r.get(0),
        )
        .expect("row");
    assert!(checked.is_some(), "the probe's answer was dropped");
}

/// Claims run a limit ahead of the requests: at a stop, what was claimed and not yet sent is
/// given back (lease, attempt and its place under the hourly ceiling), so the next start sees no
/// request in flight for it and the ceiling counts only requests that went out.
#[tokio::test(start_paused = true)]
async fn claimed_accounts_not_yet_sent_are_given_back_at_a_stop() {
    // One request at a time, 200 ms each, and at most 4 in flight: 8 due accounts are all
    // claimed at once (4 sent, 4 waiting) long before the first answer.
    let env = Env::new(
        MockConfig {
            serial: Some(Duration::from_millis(200)),
            ..MockConfig::default()
        },
        "max_concurrent_refreshes = 4",
    )
    .await;
    let ids: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    for id in &ids {
        env.add_user(id, Duration::from_secs(3599));
    }
    let claimed = |env: &Env| -> i64 {
        env.conn()
            .query_row(
                "SELECT COUNT(*) FROM accounts WHERE attempt_id IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .expect("count")
    };
    let daemon = env.start();
    eventually(Duration::from_secs(5), "all eight claimed", || {
        claimed(&env) == 8
    })
    .await;
    daemon.stop().await;
    let rows: Vec<(String, Option<String>, Option<i64>, i64)> = {
        let conn = env.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, lease_owner, attempt_id, window_requests FROM accounts ORDER BY id",
            )
            .expect("prepare");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    let mut given_back = 0;
    for (id, owner, attempt, window) in rows {
        let sent = env.mock.account(&id).grants;
        assert_eq!(
            attempt, None,
            "{id}: an attempt is left recorded after a clean stop"
        );
        assert_eq!(owner, None, "{id}: a lease is left after a clean stop");
        assert_eq!(
            window, sent as i64,
            "{id}: the hourly window counts {window} requests, {sent} went out"
        );
        if sent == 0 {
            given_back += 1;
        }
    }
    assert!(
        given_back >= 1,
        "every claimed account was sent before the stop: nothing was given back"
    );
    eprintln!("{given_back} claimed accounts given back at the stop");
}

/// The same when the profile pauses (its client secret refused) while claimed accounts wait:
/// they are given back, not sent, and not counted under the hourly ceiling.
#[tokio::test(start_paused = true)]
async fn claimed_accounts_not_yet_sent_are_given_back_when_the_profile_pauses() {
    let env = Env::new(
        MockConfig {
            serial: Some(Duration::from_millis(200)),
            ..MockConfig::default()
        },
        "max_concurrent_refreshes = 4",
    )
    .await;
    let ids: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    for id in &ids {
        env.add_user(id, Duration::from_secs(3599));
    }
    std::fs::write(env.secret_file(), "wrong-secret").expect("secret");
    let daemon = env.start();
    eventually(Duration::from_secs(10), "all paused", || {
        env.count_state("paused") == 8
    })
    .await;
    let sent = |id: &str| {
        env.mock
            .requests()
            .iter()
            .filter(|r| r.endpoint == Endpoint::Token && r.account.as_deref() == Some(id))
            .count() as i64
    };
    let mut given_back = 0;
    for id in &ids {
        let (owner, attempt, window): (Option<String>, Option<i64>, i64) = env
            .conn()
            .query_row(
                "SELECT lease_owner, attempt_id, window_requests FROM accounts WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("row");
        let sent = sent(id);
        assert_eq!((owner, attempt), (None, None), "{id}: still claimed");
        assert_eq!(window, sent, "{id}: {window} counted, {sent} sent");
        if sent == 0 {
            given_back += 1;
        }
    }
    daemon.stop().await;
    assert!(
        given_back >= 1,
        "nothing was waiting when the profile paused"
    );
    eprintln!("{given_back} claimed accounts given back at the pause");
}
