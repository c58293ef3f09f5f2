//! Account states, revocation checks, the health file and `tokend status`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::params;
use tokend_mock::{Endpoint, Fault, MockConfig};

use crate::helpers::{Env, checking, eventually};

fn health(env: &Env) -> serde_json::Value {
    env.health()
}

#[tokio::test(start_paused = true)]
async fn a_revoked_company_token_is_revoked_only_after_a_confirming_probe() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_company("c-flaky");
    env.add_company("c-revoked");
    env.add_user("u", Duration::ZERO);
    env.mock.revoke_account("c-revoked");
    // One bad answer for the first probe (c-flaky sorts first), then the truth.
    env.mock
        .push_faults(Endpoint::TokenInfo, [Fault::InvalidToken]);
    // Linked rows are evaluated first (company rows become active, nothing else).
    let daemon = env.start();
    eventually(Duration::from_secs(5), "rows evaluated", || {
        env.conn()
            .query_row(
                "SELECT COUNT(*) FROM accounts WHERE next_action_at = 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n == 0)
    })
    .await;
    daemon.stop().await;
    let c = checking(&env).await;
    let start = env.now();
    let first = c.checker.run_once().await.expect("ran");
    assert_eq!(first.suspect, 2, "{first:?}");
    assert_eq!(env.state("c-revoked"), "active", "one answer never revokes");
    eventually(
        Duration::from_secs(60),
        "revoked after confirmation",
        || env.state("c-revoked") == "revoked",
    )
    .await;
    let revoked_at: i64 = env
        .conn()
        .query_row(
            "SELECT at FROM account_events WHERE account_id='c-revoked' AND to_state='revoked'",
            [],
            |r| r.get(0),
        )
        .expect("event");
    assert!(
        revoked_at - start >= 30,
        "revoked {}s after the first probe: not confirmed 30s later",
        revoked_at - start
    );
    // c-flaky had one 401 and then a 200: never revoked, and the next run finds it active.
    assert_eq!(env.state("c-flaky"), "active");
    // (The mock counts the probes it answers as the token's server; the injected 401 is not one.)
    assert_eq!(
        env.mock.account("c-flaky").probes,
        1,
        "the confirming probe"
    );
    let again = c.checker.run_once().await.expect("ran");
    assert_eq!(again.active, 1, "{again:?}");
    assert_eq!(env.mock.account("c-flaky").probes, 2);
    assert_eq!(env.state("c-flaky"), "active");
    let list = env.tokend(&["accounts", "list", "--state", "revoked"]);
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(
        out.contains("c-revoked") && !out.contains("c-flaky") && !out.contains("\nu "),
        "{out}"
    );
    let h = tokend::health::snapshot(&c.shared, &c.info).await;
    assert_eq!(h.accounts.by_state.get("revoked"), Some(&1), "{h:?}");
    let events: i64 = env
        .conn()
        .query_row("SELECT COUNT(*) FROM account_events WHERE account_id = 'c-flaky' AND to_state = 'revoked'", [], |r| r.get(0))
        .expect("events");
    assert_eq!(events, 0);
    let revoked_events: i64 = env
        .conn()
        .query_row("SELECT COUNT(*) FROM account_events WHERE account_id = 'c-revoked' AND to_state = 'revoked'", [], |r| r.get(0))
        .expect("events");
    assert_eq!(
        revoked_events, 1,
        "one transition, one event (and one ERROR line)"
    );
}

#[tokio::test(start_paused = true)]
async fn probe_outages_never_revoke() {
    let env = Env::new(MockConfig::default(), "http_timeout = \"1s\"").await;
    for i in 0..3 {
        env.add_company(&format!("c{i}"));
    }
    env.mock.add_random_fault(
        Endpoint::TokenInfo,
        0.4,
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    env.mock.add_random_fault(
        Endpoint::TokenInfo,
        0.3,
        Fault::Status {
            code: 429,
            retry_after: Some("1".into()),
        },
    );
    env.mock.add_random_fault(
        Endpoint::TokenInfo,
        0.2,
        Fault::Hang(Duration::from_secs(3)),
    );
    env.mock
        .add_random_fault(Endpoint::TokenInfo, 0.1, Fault::Html);
    let c = checking(&env).await;
    // A run every two seconds (as a cron would) for a while.
    for _ in 0..10 {
        c.checker.run_once().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eventually(Duration::from_secs(20), "all failing", || {
        env.count_state("failing") == 3
    })
    .await;
    assert_eq!(env.count_state("revoked"), 0);
    env.mock.clear_faults();
    for _ in 0..10 {
        if env.count_state("active") == 3 {
            break;
        }
        c.checker.run_once().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(env.count_state("active"), 3, "all active again");
    let revoked: i64 = env
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM account_events WHERE to_state = 'revoked'",
            [],
            |r| r.get(0),
        )
        .expect("events");
    assert_eq!(revoked, 0);
}

#[tokio::test(start_paused = true)]
async fn a_run_probes_each_company_token_once_and_never_overlaps() {
    let env = Env::new(MockConfig::default(), "probe_interval = \"10ms\"").await;
    for i in 0..10 {
        env.add_company(&format!("c{i}"));
    }
    // Slow answers make the run take about a second.
    env.mock.push_faults(
        Endpoint::TokenInfo,
        (0..10).map(|_| Fault::Delay(Duration::from_millis(100))),
    );
    let c = checking(&env).await;
    let checker = c.checker.clone();
    let (a, b) = tokio::join!(checker.run_once(), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        checker.run_once().await
    });
    let first = a.expect("first run ran");
    assert!(
        b.is_none(),
        "a second run started while the first was going"
    );
    assert_eq!(first.probed, 10);
    assert_eq!(first.active, 10);
    for i in 0..10 {
        assert_eq!(env.mock.account(&format!("c{i}")).probes, 1, "c{i}");
    }
    let checked: i64 = env
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM accounts WHERE last_checked_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(checked, 10);
    // The next run probes each once more.
    let again = checker.run_once().await.expect("ran");
    assert_eq!(again.probed, 10);
    assert_eq!(env.mock.account("c3").probes, 2);
}

#[tokio::test(start_paused = true)]
async fn states_show_in_health_and_listing_and_the_file_is_never_partial() {
    let env = Env::new(MockConfig::default(), "health_interval = \"60s\"").await;
    // A second profile whose server is gone (failing) and a third with a wrong secret (paused).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let wrong = env.dir.path().join("wrong");
    std::fs::write(&wrong, "wrong").expect("write");
    let mut text = std::fs::read_to_string(&env.config_path).expect("read");
    text += &format!(
        "\n[[profile]]\nname = \"down\"\nbase_url = \"http://127.0.0.1:{closed}\"\nclient_id = \"mock-client\"\nclient_secret_file = \"{}\"\n",
        env.secret_file().display()
    );
    text += &format!(
        "\n[[profile]]\nname = \"broken\"\nbase_url = \"{}\"\nclient_id = \"mock-client\"\nclient_secret_file = \"{}\"\n",
        env.mock.url(),
        wrong.display()
    );
    std::fs::write(&env.config_path, text).expect("write");

    env.add_user("ok", Duration::ZERO);
    env.add_user("dead", Duration::from_secs(4000));
    env.mock.revoke_account("dead");
    let conn = env.conn();
    let t = env.mock.issue_user("fail", Duration::from_secs(4000));
    conn.execute(
        "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES ('fail', 'down', 'user', ?1, ?2, ?3)",
        params![t.access_token, t.refresh_token, t.expires_at],
    )
    .expect("insert");
    let t = env.mock.issue_user("pause", Duration::from_secs(4000));
    conn.execute(
        "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES ('pause', 'broken', 'user', ?1, ?2, ?3)",
        params![t.access_token, t.refresh_token, t.expires_at],
    )
    .expect("insert");
    conn.execute("INSERT INTO accounts (id, profile, token_type, access_token, expires_at) VALUES ('norefresh', 'factorial', 'user', 'a', 1)", [])
        .expect("insert");
    conn.execute(
        "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES ('ghost', 'nosuch', 'user', 'a', 'r', 1)",
        [],
    )
    .expect("insert");

    // A reader that parses the file as fast as it can for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, reads, bad, path) =
            (stop.clone(), reads.clone(), bad.clone(), env.health.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    reads.fetch_add(1, Ordering::Relaxed);
                    if serde_json::from_str::<serde_json::Value>(&text).is_err() {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let daemon = env.start();
    let want = [
        ("active", 1),
        ("failing", 1),
        ("needs_reauth", 1),
        ("paused", 1),
        ("invalid", 2),
    ];
    eventually(
        Duration::from_secs(15),
        "every state in the health file",
        || {
            let h = health(&env);
            want.iter()
                .all(|(s, n)| h["accounts"]["by_state"][s] == serde_json::json!(n))
        },
    )
    .await;
    let h = health(&env);
    assert_eq!(
        h["status"], "failing",
        "a profile whose accounts all fail makes the daemon failing: {h}"
    );
    assert_eq!(h["profiles"]["broken"]["paused"], true);
    assert_eq!(h["accounts"]["by_token_type"]["user"], 6);
    let reason: String = conn
        .query_row(
            "SELECT state_reason FROM accounts WHERE id = 'ghost'",
            [],
            |r| r.get(0),
        )
        .expect("reason");
    assert!(reason.contains("unknown profile"), "{reason}");
    let reason: String = conn
        .query_row(
            "SELECT state_reason FROM accounts WHERE id = 'norefresh'",
            [],
            |r| r.get(0),
        )
        .expect("reason");
    assert!(reason.contains("refresh_token"), "{reason}");
    for (state, n) in want {
        let out = env.tokend(&["accounts", "list", "--json", "--state", state]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(rows.as_array().map(Vec::len), Some(n), "{state}: {rows}");
    }

    // A state change reaches the file within about a second of its commit.
    conn.execute(
        "INSERT INTO accounts (id, token_type, access_token) VALUES ('late', 'user', 'a')",
        [],
    )
    .expect("insert");
    eventually(
        Duration::from_secs(5),
        "the new invalid row is counted",
        || health(&env)["accounts"]["by_state"]["invalid"] == serde_json::json!(3),
    )
    .await;
    let committed: i64 = conn
        .query_row(
            "SELECT at FROM account_events WHERE account_id = 'late'",
            [],
            |r| r.get(0),
        )
        .expect("event");
    let seen = health(&env)["updated_at"].as_i64().expect("updated_at");
    assert!(
        seen - committed <= 2,
        "health updated {}s after the change",
        seen - committed
    );
    daemon.stop().await;
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    assert!(
        reads.load(Ordering::Relaxed) > 100,
        "the reader barely read"
    );
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "a reader saw a partial health file"
    );
    assert_eq!(env.mock.account("ok").grants, 0, "not due: no request");
    let h = health(&env);
    assert_eq!(h["status"], "stopped", "a clean stop says so");
    assert!(h["stopped_at"].is_i64(), "{h}");
    assert!(
        !std::fs::read_to_string(&env.health)
            .expect("read")
            .contains(&env.tokens("ok").0.expect("token"))
    );
}

#[tokio::test(start_paused = true)]
async fn status_exit_codes_follow_the_health_file() {
    let env = Env::new(MockConfig::default(), "health_interval = \"2s\"").await;
    env.add_user("ok", Duration::ZERO);
    let status = |env: &Env, file: &std::path::Path| {
        let out = env.tokend(&["status", "--health-file", file.to_str().expect("path")]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Missing.
    let (code, _) = status(&env, &env.dir.path().join("nothing.json"));
    assert_eq!(code, Some(3));

    let daemon = env.start();
    eventually(Duration::from_secs(10), "ok", || {
        health(&env)["status"] == "ok"
    })
    .await;
    let (code, out) = status(&env, &env.health);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(": ok") && out.contains("1 active") && out.contains("next refresh"),
        "{out}"
    );

    // Degraded: one account in trouble, named in the summary.
    env.conn()
        .execute(
            "INSERT INTO accounts (id, token_type) VALUES ('broken-row', 'user')",
            [],
        )
        .expect("insert");
    eventually(Duration::from_secs(10), "degraded", || {
        health(&env)["status"] == "degraded"
    })
    .await;
    let (code, out) = status(&env, &env.health);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("broken-row") && out.contains("invalid"),
        "{out}"
    );
    daemon.stop().await;

    // Stale: the same file, last updated long ago.
    let mut h = health(&env);
    h["updated_at"] = serde_json::json!(now_s() - 3600);
    h["stopped_at"] = serde_json::Value::Null;
    h["status"] = serde_json::json!("ok");
    let stale = env.dir.path().join("stale.json");
    std::fs::write(&stale, h.to_string()).expect("write");
    let (code, out) = status(&env, &stale);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("STALE"), "{out}");

    // Failing: every account of the profile failing (its server is gone).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let text = std::fs::read_to_string(&env.config_path)
        .expect("read")
        .replace(&env.mock.url(), &format!("http://127.0.0.1:{closed}"));
    std::fs::write(&env.config_path, text).expect("write");
    env.conn()
        .execute("DELETE FROM accounts WHERE id = 'broken-row'", [])
        .expect("delete");
    env.conn()
        .execute(
            "UPDATE accounts SET expires_at = ?1 WHERE id = 'ok'",
            [env.now() + 1],
        )
        .expect("update");
    let daemon = env.start();
    eventually(Duration::from_secs(15), "failing", || {
        health(&env)["status"] == "failing"
    })
    .await;
    let (code, out) = status(&env, &env.health);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("last refresh error"), "{out}");
    let json = env.tokend(&[
        "status",
        "--json",
        "--health-file",
        env.health.to_str().expect("path"),
    ]);
    let parsed: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("status --json prints the file");
    assert_eq!(parsed["status"], "failing");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refresh_token_past_its_lifetime_needs_reauth_without_a_request() {
    let env = Env::new(
        MockConfig::default(),
        "refresh_token_lifetime = \"7d\"\nrefresh_token_margin = \"1d\"",
    )
    .await;
    env.add_user("old", Duration::from_secs(4000));
    env.add_user("aging", Duration::from_secs(0));
    env.add_user("fine", Duration::from_secs(4000));
    let conn = env.conn();
    conn.execute(
        "UPDATE accounts SET refresh_issued_at = ?1 - 8*86400 WHERE id = 'old'",
        [env.now()],
    )
    .expect("update");
    conn.execute(
        "UPDATE accounts SET refresh_issued_at = ?1 - 6*86400 - 3600 WHERE id = 'aging'",
        [env.now()],
    )
    .expect("update");
    let daemon = env.start();
    eventually(Duration::from_secs(10), "needs_reauth", || {
        env.state("old") == "needs_reauth"
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the fine account refreshed",
        || env.mock.account("fine").grants == 1,
    )
    .await;
    eventually(Duration::from_secs(10), "at risk in health", || {
        health(&env)["at_risk"]["accounts"] == serde_json::json!(["aging"])
    })
    .await;
    daemon.stop().await;
    let old = env.mock.account("old");
    assert_eq!(
        old.grants + old.errors,
        0,
        "a request was spent on a dead refresh token"
    );
    assert_eq!(env.mock.totals().token_requests, 1);
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A token that expires while its server is down is a lapse: listed and counted in the health
/// file and recorded once per expiry (the daemon looks for them profile by profile along an
/// index, not through every account).
#[tokio::test(start_paused = true)]
async fn lapses_are_found_listed_and_recorded_once() {
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(120),
            ..MockConfig::default()
        },
        "refresh_lead = \"60s\"\nrefresh_jitter = \"1s\"\nmin_refresh_interval = \"10s\"\nretry_max = \"30s\"",
    )
    .await;
    env.add_user("one", Duration::from_secs(100));
    env.add_user("two", Duration::from_secs(100));
    let daemon = env.start();
    // Each refreshes once (so each is an account tokend keeps alive), then the server goes
    // down: the new tokens run out two minutes later.
    eventually(Duration::from_secs(30), "both refreshed once", || {
        env.mock.account("one").grants == 1 && env.mock.account("two").grants == 1
    })
    .await;
    env.mock.set_outage(Endpoint::Token, true);
    eventually(Duration::from_secs(300), "two lapses in health", || {
        health(&env)["lapsed"]["count"] == 2
    })
    .await;
    let mut listed: Vec<String> =
        serde_json::from_value(health(&env)["lapsed"]["accounts"].clone()).expect("ids");
    listed.sort();
    assert_eq!(listed, ["one", "two"]);
    // Later sweeps record nothing new for the same expiry.
    tokio::time::sleep(Duration::from_secs(180)).await;
    for id in ["one", "two"] {
        let events: i64 = env
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM account_events WHERE kind = 'lapse' AND account_id = ?1",
                [id],
                |r| r.get(0),
            )
            .expect("events");
        assert_eq!(events, 1, "{id}: one lapse event per expiry");
    }
    daemon.stop().await;
}
