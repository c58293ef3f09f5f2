//! The command line, run as the real binary.

use std::time::Duration;

use tokend_mock::MockConfig;

use crate::helpers::{Env, SECRET, eventually};

/// `status --liveness` on health files as a daemon writes them: the one written at start has no
/// engine turn yet, and a daemon that just started is alive; one that started long ago and never
/// turned, or turned long ago, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_counts_a_daemon_that_just_started_as_alive() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::from_secs(4000));
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(10), "a health file", || {
        env.health()["pid"].is_number()
    })
    .await;
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(10)).await, Some(0));
    let written = env.health();
    let now = chrono::Utc::now().timestamp();
    let liveness = |started_ago: i64, turned_ago: Option<i64>| {
        let mut h = written.clone();
        h["stopped_at"] = serde_json::Value::Null;
        h["updated_at"] = now.into();
        h["started_at"] = (now - started_ago).into();
        h["progress_at"] = turned_ago.map_or(serde_json::Value::Null, |a| (now - a).into());
        let path = env.dir.path().join("edited-health.json");
        std::fs::write(&path, h.to_string()).expect("write");
        let p = path.to_str().expect("path");
        let out = env.tokend(&["status", "--liveness", "--health-file", p]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = liveness(1, None);
    assert_eq!(code, Some(0), "just started, no turn on file yet: {out}");
    let (code, out) = liveness(3600, None);
    assert_eq!(code, Some(1), "started an hour ago, never turned: {out}");
    assert!(out.contains("never"), "{out}");
    let (code, out) = liveness(3600, Some(2));
    assert_eq!(code, Some(0), "turned 2 s ago: {out}");
    let (code, out) = liveness(3600, Some(600));
    assert_eq!(code, Some(1), "last turned 10 minutes ago: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_is_all_or_nothing_and_names_bad_rows() {
    let env = Env::new(MockConfig::default(), "").await;
    let good = env.dir.path().join("good.json");
    std::fs::write(
        &good,
        r#"{"accounts":[
            {"id":"user-1","profile":"factorial","token_type":"user","access_token":"a1","refresh_token":"r1","expires_at":1795875255},
            {"id":"company-1","token_type":"company","access_token":"c1","refresh_token":null,"expires_at":null,"scopes":["read"]}
        ]}"#,
    )
    .expect("write");
    let out = env.tokend(&["accounts", "import", good.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.state("user-1"), "active");
    assert_eq!(env.tokens("company-1").0.as_deref(), Some("c1"));

    let bad = env.dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"accounts":[
            {"id":"user-2","token_type":"user","access_token":"a2","refresh_token":"r2","expires_at":1795875255},
            {"id":"user-3","token_type":"user","access_token":"a3","expires_at":1795875255},
            {"id":"user-4","token_type":"robot","access_token":"a4"}
        ]}"#,
    )
    .expect("write");
    let out = env.tokend(&["accounts", "import", bad.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("row 1 (id \"user-3\")") && err.contains("refresh_token"),
        "{err}"
    );
    assert!(
        err.contains("row 2 (id \"user-4\")") && err.contains("robot"),
        "{err}"
    );
    let n: i64 = env
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM accounts WHERE id = 'user-2'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 0, "a file with a bad row imported something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_is_create_only_unless_replace_is_asked_and_reads_standard_input() {
    let env = Env::new(MockConfig::default(), "").await;
    let file = env.dir.path().join("accounts.json");
    std::fs::write(
        &file,
        r#"{"accounts":[
            {"id":"a","token_type":"user","access_token":"a1","refresh_token":"r1","expires_at":1795875255},
            {"id":"b","token_type":"user","refresh_token":"r2"}
        ]}"#,
    )
    .expect("write");
    let path = file.to_str().expect("path");
    let out = env.tokend(&["accounts", "import", path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.tokens("b").1.as_deref(),
        Some("r2"),
        "a row without expires_at is taken"
    );
    // tokend rotates a's grant; re-importing the stale file must not undo that.
    env.conn()
        .execute(
            "UPDATE accounts SET refresh_token = 'rotated', revision = revision + 1 WHERE id = 'a'",
            [],
        )
        .expect("rotate");
    let again = env.tokend(&["accounts", "import", path]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already linked") && err.contains("  a\n") && err.contains("  b"),
        "{err}"
    );
    assert_eq!(
        env.tokens("a").1.as_deref(),
        Some("rotated"),
        "a live grant was overwritten"
    );
    // --replace does it, and says how many live grants it replaced.
    let replaced = env.tokend(&["accounts", "import", "--replace", path]);
    assert!(replaced.status.success());
    let said = String::from_utf8_lossy(&replaced.stdout);
    assert!(
        said.contains("2 replaced") && said.contains("2 of them live"),
        "{said}"
    );
    assert_eq!(env.tokens("a").1.as_deref(), Some("r1"));
    // `-` reads standard input.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args([
            "--config",
            env.config_path.to_str().expect("path"),
            "accounts",
            "import",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(
        child.stdin.as_mut().expect("stdin"),
        br#"{"accounts":[{"id":"c","token_type":"company","access_token":"c1"}]}"#,
    )
    .expect("write");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(env.tokens("c").0.as_deref(), Some("c1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_secret_in_logs_listings_or_health() {
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(5),
            ..MockConfig::default()
        },
        "log_level = \"trace\"",
    )
    .await;
    let mut issued = Vec::new();
    for i in 0..5 {
        env.add_user(&format!("u{i}"), Duration::from_secs(2));
        issued.push(env.tokens(&format!("u{i}")));
    }
    env.add_company("c0");
    env.conn()
        .execute(
            "INSERT INTO accounts (id, token_type, refresh_token) VALUES ('broken', 'user', NULL)",
            [],
        )
        .expect("insert");
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(20), "two rounds of refreshes", || {
        (0..5).all(|i| env.mock.account(&format!("u{i}")).grants >= 2)
    })
    .await;
    eventually(Duration::from_secs(5), "health written", || {
        env.health.exists()
    })
    .await;
    let list = env.tokend(&["accounts", "list"]);
    let list_json = env.tokend(&["accounts", "list", "--json"]);
    // Tokens fetched through the API (the CLI asks the running daemon over its socket), one of
    // them refreshed on demand: the audit lines and the API's own logs at trace level too.
    let mut served = Vec::new();
    for args in [
        &["token", "u0", "--min-ttl", "0s", "--json"][..],
        &["token", "u1", "--min-ttl", "4s", "--json"][..],
        &["token", "c0", "--min-ttl", "0s", "--json"][..],
    ] {
        let out = env.tokend(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        served.push(body["access_token"].as_str().expect("token").to_owned());
    }
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(20)).await, Some(0));

    let mut secrets: Vec<String> = vec![SECRET.to_owned()];
    secrets.extend(served);
    for (a, r, _) in issued {
        secrets.extend(a);
        secrets.extend(r);
    }
    for i in 0..5 {
        let (a, r, _) = env.tokens(&format!("u{i}"));
        secrets.extend(a);
        secrets.extend(r);
    }
    secrets.extend(env.tokens("c0").0);
    let logs = bin.stderr();
    assert!(
        logs.contains("refresh"),
        "no refresh lines captured:\n{logs}"
    );
    assert_eq!(
        logs.matches("token served").count(),
        3,
        "one audit line per fetch:\n{logs}"
    );
    let health = std::fs::read_to_string(&env.health).expect("health");
    let outputs = [
        ("logs", logs),
        ("health", health),
        (
            "accounts list",
            String::from_utf8_lossy(&list.stdout).into_owned(),
        ),
        (
            "accounts list --json",
            String::from_utf8_lossy(&list_json.stdout).into_owned(),
        ),
    ];
    for (what, text) in &outputs {
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{what} contains a secret ({}...)",
                &s[..8.min(s.len())]
            );
        }
    }
    assert!(
        outputs[2].1.contains("broken") && outputs[2].1.contains("invalid"),
        "{}",
        outputs[2].1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_a_valid_token_or_says_why_not() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::ZERO);
    env.conn()
        .execute("INSERT INTO accounts (id, token_type, access_token, refresh_token, expires_at, state) VALUES ('gone', 'user', 'stale-access-token-value', 'stale-refresh', 1, 'needs_reauth')", [])
        .expect("insert");
    let out = env.tokend(&["token", "u"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        env.tokens("u").0.expect("token")
    );
    let out = env.tokend(&["token", "gone"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs_reauth"), "{err}");
    assert!(
        out.stdout.is_empty() && !err.contains("stale-access-token-value"),
        "{err}"
    );
    let out = env.tokend(&["token", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account"));
}

#[test]
fn demo_runs_clean() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["demo", "--duration", "8s"])
        .env_remove("RUST_LOG")
        .output()
        .expect("demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" 0 lapses, 0 reuse attempts"), "{stdout}");
    let refreshes: u64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("refresh count");
    // 30 accounts on 30 s tokens of every age: a third or more are due within 8 s.
    assert!(refreshes >= 8, "{stdout}");
}
