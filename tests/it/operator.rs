//! The operator's commands (`accounts show|remove|resume|refresh`, `--help`, `demo`, `status`),
//! run as the real binary against a real database and the mock provider: what they print, what
//! they change, at the provider too, and their exit codes.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use rusqlite::params;
use tokend::clock::rfc3339;
use tokend::state::State;
use tokend_mock::{Endpoint, Fault, MockConfig};

use crate::helpers::{Env, checking, eventually};

/// Standard output, then standard error.
pub(crate) fn said(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The binary with this configuration file, whatever the environment says.
fn tokend_with(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tokend"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TOKEND_CONFIG")
        .output()
        .expect("run tokend")
}

/// One integer column of one account (`None` for NULL).
pub(crate) fn column(env: &Env, id: &str, col: &str) -> Option<i64> {
    env.conn()
        .query_row(
            &format!("SELECT {col} FROM accounts WHERE id = ?1"),
            [id],
            |r| r.get(0),
        )
        .expect("column")
}

pub(crate) fn exists(env: &Env, id: &str) -> bool {
    env.conn()
        .query_row("SELECT COUNT(*) FROM accounts WHERE id = ?1", [id], |r| {
            r.get::<_, i64>(0)
        })
        .expect("count")
        == 1
}

/// Every token the account holds now, and the ones given.
fn tokens_of(env: &Env, id: &str, earlier: &[Option<String>]) -> Vec<String> {
    let (a, r, _) = env.tokens(id);
    [a, r]
        .into_iter()
        .chain(earlier.iter().cloned())
        .flatten()
        .collect()
}

pub(crate) fn assert_no_token(what: &str, text: &str, tokens: &[String]) {
    for t in tokens {
        assert!(
            !text.contains(t.as_str()),
            "{what} printed a token ({}...):\n{text}",
            &t[..8.min(t.len())]
        );
    }
}

/// Make the account look as tokend leaves a dead grant: `needs_reauth`, nothing scheduled.
pub(crate) fn mark_needs_reauth(env: &Env, id: &str) {
    env.conn()
        .execute(
            "UPDATE accounts SET state = 'needs_reauth', state_reason = 'the provider rejected the grant',
                next_action_at = NULL, failures = 3, last_error = 'invalid_grant', last_error_at = ?2
             WHERE id = ?1",
            params![id, env.now()],
        )
        .expect("needs_reauth");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_prints_state_expiry_refresh_probe_failures_and_events_but_no_token() {
    let env = Env::new(MockConfig::default(), "").await;
    // Forty minutes into a one-hour token: refreshable now (past half its life).
    env.add_user("u", Duration::from_secs(40 * 60));
    env.add_company("c");
    let (first_access, first_refresh, _) = env.tokens("u");

    // One real failure, then one real success, both through `accounts refresh`.
    env.mock.push_faults(
        Endpoint::Token,
        [Fault::Status {
            code: 503,
            retry_after: None,
        }],
    );
    let out = env.tokend(&["accounts", "refresh", "u"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    let (failing, _) = said(&env.tokend(&["accounts", "show", "u"]));
    assert!(failing.contains("state:         failing"), "{failing}");
    assert!(failing.contains("failures:      1"), "{failing}");
    assert!(failing.contains("last error:    "), "{failing}");
    let out = env.tokend(&["accounts", "refresh", "u"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    // The company token has been probed once.
    let probed = checking(&env).await.checker.run_once().await.expect("ran");
    assert_eq!(probed.active, 1, "{probed:?}");

    let out = env.tokend(&["accounts", "show", "u"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    let (text, err) = said(&out);
    let expires = column(&env, "u", "expires_at").expect("expiry");
    let refreshed = column(&env, "u", "last_refresh_at").expect("refreshed");
    let since = column(&env, "u", "state_since").expect("since");
    for line in [
        "u (user token, profile factorial)".to_owned(),
        format!("state:         active since {}", rfc3339(since)),
        format!("access token:  expires at {} (in ", rfc3339(expires)),
        format!("last refresh:  {}", rfc3339(refreshed)),
        "last probe:    -".to_owned(),
        "failures:      0".to_owned(),
        "recent events:".to_owned(),
        "active -> failing: ".to_owned(),
        "failing -> active: refreshed".to_owned(),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
    let tokens = tokens_of(&env, "u", &[first_access, first_refresh]);
    assert_eq!(tokens.len(), 4, "two pairs to look for");
    assert_no_token("accounts show", &(text + &err), &tokens);

    let out = env.tokend(&["accounts", "show", "u", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    let (json_text, err) = said(&out);
    let v: serde_json::Value = serde_json::from_str(&json_text).expect("json");
    assert_eq!(v["account"]["state"], "active", "{v}");
    assert_eq!(v["account"]["expires_at"], expires, "{v}");
    assert_eq!(v["account"]["last_refresh_at"], refreshed, "{v}");
    assert_eq!(v["account"]["last_checked_at"], serde_json::Value::Null);
    assert_eq!(v["account"]["failures"], 0, "{v}");
    let changes: Vec<(&str, &str)> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["from_state"].as_str().unwrap_or(""),
                e["to_state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [("active", "failing"), ("failing", "active")],
        "{v}"
    );
    assert_no_token("accounts show --json", &(json_text + &err), &tokens);

    // The company token: its probe, no expiry, and no token either.
    let (text, err) = said(&env.tokend(&["accounts", "show", "c"]));
    let checked = column(&env, "c", "last_checked_at").expect("probed");
    assert!(
        text.contains(&format!("last probe:    {}", rfc3339(checked))),
        "{text}"
    );
    assert!(text.contains("access token:  no expiry"), "{text}");
    assert_no_token(
        "accounts show c",
        &(text + &err),
        &tokens_of(&env, "c", &[]),
    );

    for args in [
        &["accounts", "show", "nobody"][..],
        &["accounts", "show", "nobody", "--json"],
    ] {
        let out = env.tokend(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {:?}", said(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(said(&out).1.contains("no account \"nobody\""), "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_deletes_the_row_and_with_revoke_only_once_the_provider_revoked_the_grant() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("plain", Duration::ZERO);
    env.add_user("revoked", Duration::ZERO);

    let out = env.tokend(&["accounts", "remove", "plain"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    assert_eq!(said(&out).0.trim(), "removed plain");
    assert!(!exists(&env, "plain"));
    assert_eq!(
        env.mock.usable_refresh_tokens("plain"),
        1,
        "removed without --revoke: the grant is left alone"
    );
    assert_eq!(env.mock.account("plain").revocations, 0);

    for args in [
        &["accounts", "remove", "nobody"][..],
        &["accounts", "remove", "nobody", "--revoke"],
    ] {
        let out = env.tokend(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {:?}", said(&out));
        assert!(said(&out).1.contains("no account \"nobody\""), "{args:?}");
    }

    // The provider fails the revocation: nothing is removed.
    let before = env.tokens("revoked");
    env.mock.push_faults(
        Endpoint::Revoke,
        [Fault::Status {
            code: 503,
            retry_after: None,
        }],
    );
    let out = env.tokend(&["accounts", "remove", "revoked", "--revoke"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    assert!(said(&out).1.contains("not removed"), "{:?}", said(&out));
    assert_eq!(env.tokens("revoked"), before, "the row was changed");
    assert_eq!(env.mock.usable_refresh_tokens("revoked"), 1);
    assert_eq!(
        env.mock.revoke_log().len(),
        1,
        "the revocation was not asked"
    );

    // It works: revoked at the provider, then removed.
    let out = env.tokend(&["accounts", "remove", "revoked", "--revoke"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    assert!(said(&out).0.contains("revoked at the provider"));
    assert!(!exists(&env, "revoked"));
    assert_eq!(env.mock.account("revoked").revocations, 1);
    assert_eq!(
        env.mock.usable_refresh_tokens("revoked"),
        0,
        "the grant still works at the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_brings_an_account_back_and_the_daemon_looks_at_it_again() {
    let env = Env::new(MockConfig::default(), "").await;
    // Expired grants the daemon had given up on; one is resumed, one is left as it was.
    for id in ["resumed", "left"] {
        env.add_user(id, Duration::from_secs(2 * 3600));
        mark_needs_reauth(&env, id);
    }
    // A failing account whose next try is a day away.
    env.add_user("waiting", Duration::from_secs(2 * 3600));
    env.conn()
        .execute(
            "UPDATE accounts SET state = 'failing', failures = 5, next_action_at = ?1 WHERE id = 'waiting'",
            [env.now() + 86_400],
        )
        .expect("failing");

    let out = env.tokend(&["accounts", "resume", "nobody"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    assert!(said(&out).1.contains("no account \"nobody\""));

    for (id, was) in [("resumed", "needs_reauth"), ("waiting", "failing")] {
        let out = env.tokend(&["accounts", "resume", id]);
        assert_eq!(out.status.code(), Some(0), "{id}: {:?}", said(&out));
        assert!(
            said(&out).0.contains(&format!("resumed (was {was})")),
            "{:?}",
            said(&out)
        );
        assert_eq!(env.state(id), "active");
        assert_eq!(env.reason(id).as_deref(), Some("resumed by an operator"));
        assert_eq!(column(&env, id, "failures"), Some(0));
        assert!(
            column(&env, id, "next_action_at").is_some_and(|t| t <= env.now()),
            "{id}: not due now"
        );
        assert_eq!(
            env.events(id, "state"),
            [(
                Some("active".to_owned()),
                Some("resumed by an operator".to_owned())
            )]
        );
    }
    assert_eq!(env.state("left"), "needs_reauth");

    // The daemon refreshes the resumed accounts, and not the one left in needs_reauth.
    let daemon = env.start();
    eventually(
        Duration::from_secs(10),
        "resumed accounts refreshed",
        || env.mock.account("resumed").grants == 1 && env.mock.account("waiting").grants == 1,
    )
    .await;
    daemon.stop().await;
    assert_eq!(env.state("resumed"), "active");
    assert_eq!(
        env.tokens("resumed").1,
        env.mock.newest("resumed").expect("issued").1
    );
    assert_eq!(env.state("left"), "needs_reauth");
    assert_eq!(env.mock.account("left").grants, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_goes_through_the_lease_and_is_refused_inside_the_minimum_gap() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::from_secs(40 * 60));
    let (_, presented, _) = env.tokens("u");

    // Another tokend holds the account: no request.
    env.conn()
        .execute(
            "UPDATE accounts SET lease_owner = 'elsewhere:1:1:00000000', lease_until = ?1 WHERE id = 'u'",
            [env.now() + 60],
        )
        .expect("lease");
    let out = env.tokend(&["accounts", "refresh", "u"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    assert!(said(&out).1.contains("another tokend"), "{:?}", said(&out));
    assert_eq!(env.mock.totals().token_requests, 0);
    env.conn()
        .execute(
            "UPDATE accounts SET lease_owner = NULL, lease_until = NULL WHERE id = 'u'",
            [],
        )
        .expect("unlease");

    let out = env.tokend(&["accounts", "refresh", "u"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    let (access, refresh, expires) = env.tokens("u");
    let newest = env.mock.newest("u").expect("issued");
    assert_eq!((access, refresh.clone()), (Some(newest.0), newest.1));
    assert_ne!(refresh, presented);
    let expires = expires.expect("expiry");
    assert!(expires > env.now() + 3000, "expires at {expires}");
    assert_eq!(
        said(&out).0.trim(),
        format!("u: refreshed; expires at {}", rfc3339(expires))
    );
    assert_eq!(env.mock.account("u").grants, 1);
    assert_eq!(column(&env, "u", "lease_until"), None, "the lease is kept");
    assert_eq!(
        env.mock.usable_refresh_tokens("u"),
        1,
        "the superseded refresh token still works at the provider"
    );

    // Inside the minimum gap (half the token's life): refused, saying until when.
    let refreshed = column(&env, "u", "last_refresh_at").expect("refreshed");
    let not_before = refreshed + (expires - refreshed) / 2;
    let out = env.tokend(&["accounts", "refresh", "u"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    let (_, err) = said(&out);
    assert!(
        err.contains(&format!("not before {}", rfc3339(not_before))),
        "{err}"
    );
    assert_eq!(env.mock.account("u").grants, 1, "a request went out");
    assert_eq!(env.tokens("u").1, refresh);

    let out = env.tokend(&["accounts", "refresh", "nobody"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    assert!(said(&out).1.contains("no account \"nobody\""));
}

/// With the daemon running, the same commands ask it over its socket (its leases, its engine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_daemon_running_the_commands_go_through_its_api() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("u", Duration::from_secs(40 * 60));
    env.add_user("gone", Duration::ZERO);
    env.add_user("dead", Duration::from_secs(2 * 3600));
    mark_needs_reauth(&env, "dead");
    let old_expiry = column(&env, "dead", "expires_at").expect("expiry");
    let daemon = env.start();
    eventually(Duration::from_secs(10), "socket up", || {
        std::os::unix::net::UnixStream::connect(env.dir.path().join("api.sock")).is_ok()
    })
    .await;

    let out = env.tokend_async(&["accounts", "refresh", "u"]).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    let newest = env.mock.newest("u").expect("issued");
    assert_eq!(env.tokens("u").1, newest.1);
    assert_eq!(env.tokens("u").0, Some(newest.0));
    let out = env.tokend_async(&["accounts", "refresh", "u"]).await;
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    assert!(said(&out).1.contains("try again in"), "{:?}", said(&out));
    assert_eq!(env.mock.account("u").grants, 1);
    eventually(Duration::from_secs(10), "superseded token revoked", || {
        env.mock.usable_refresh_tokens("u") == 1
    })
    .await;

    let out = env.tokend_async(&["accounts", "resume", "dead"]).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    let (text, _) = said(&out);
    assert!(text.starts_with("dead: active"), "{text}");
    assert!(
        !text.contains(&format!("expires at {}", rfc3339(old_expiry))) && !text.contains("at -"),
        "{text}"
    );
    eventually(
        Duration::from_secs(10),
        "the resumed account refreshed",
        || env.mock.account("dead").grants == 1,
    )
    .await;
    let out = env.tokend_async(&["accounts", "resume", "nobody"]).await;
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));

    env.mock.push_faults(
        Endpoint::Revoke,
        [Fault::Status {
            code: 503,
            retry_after: None,
        }],
    );
    let out = env
        .tokend_async(&["accounts", "remove", "gone", "--revoke"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{:?}", said(&out));
    assert!(exists(&env, "gone"));
    assert_eq!(env.mock.usable_refresh_tokens("gone"), 1);
    let out = env
        .tokend_async(&["accounts", "remove", "gone", "--revoke"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    assert!(said(&out).0.contains("removed gone (its grant revoked"));
    assert!(!exists(&env, "gone"));
    assert_eq!(env.mock.usable_refresh_tokens("gone"), 0);
    daemon.stop().await;
}

/// The leaf commands clap knows, found by walking `--help` from the top.
fn commands(prefix: &[String]) -> Vec<Vec<String>> {
    let mut args = prefix.to_vec();
    args.push("--help".into());
    let out = Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(&args)
        .output()
        .expect("help");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((_, listed)) = text.split_once("\nCommands:\n") else {
        return vec![prefix.to_vec()];
    };
    listed
        .lines()
        .take_while(|l| !l.trim().is_empty())
        // A command's line; a wrapped description is indented further.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .flat_map(|name| {
            let mut p = prefix.to_vec();
            p.push(name.to_owned());
            commands(&p)
        })
        .collect()
}

#[test]
fn every_command_documents_its_exit_codes_and_an_example() {
    // The exit code every command shares (clap's, for arguments it cannot take) is said once,
    // at the top.
    let top = Command::new(env!("CARGO_BIN_EXE_tokend"))
        .arg("--help")
        .output()
        .expect("help");
    assert!(
        String::from_utf8_lossy(&top.stdout).contains("exits 2 when its arguments are wrong"),
        "{}",
        String::from_utf8_lossy(&top.stdout)
    );
    let leaves = commands(&[]);
    let names: Vec<String> = leaves.iter().map(|c| c.join(" ")).collect();
    for expected in [
        "run",
        "check-config",
        "accounts import",
        "accounts list",
        "accounts show",
        "accounts remove",
        "accounts resume",
        "accounts refresh",
        "token",
        "status",
        "events",
        "demo",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not found: {names:?}"
        );
    }
    let mut missing = Vec::new();
    for c in &leaves {
        let mut args = c.clone();
        args.push("--help".into());
        let out = Command::new(env!("CARGO_BIN_EXE_tokend"))
            .args(&args)
            .output()
            .expect("help");
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        for needed in ["Exit codes", "Example"] {
            if !text.contains(needed) {
                missing.push(format!("{}: {needed}", c.join(" ")));
            }
        }
    }
    assert!(missing.is_empty(), "--help without: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_list_help_names_every_state_it_accepts() {
    let env = Env::new(MockConfig::default(), "").await;
    let (help, _) = said(&env.tokend(&["accounts", "list", "--help"]));
    for state in State::ALL {
        assert!(help.contains(state.as_str()), "{state} not in:\n{help}");
        let out = env.tokend(&["accounts", "list", "--state", state.as_str()]);
        assert_eq!(out.status.code(), Some(0), "{state}: {:?}", said(&out));
    }
    let out = env.tokend(&["accounts", "list", "--state", "sleeping"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(said(&out).1.contains("one of: active, failing"));
}

#[test]
fn demo_refuses_a_configuration_and_options_it_does_not_have() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tokend.toml");
    std::fs::write(&config, "").expect("config");
    let config = config.to_str().expect("path");
    let demo = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokend"));
        cmd.args(args)
            .env_remove("TOKEND_CONFIG")
            .env_remove("RUST_LOG");
        if let Some(c) = env {
            cmd.env("TOKEND_CONFIG", c);
        }
        cmd.output().expect("demo")
    };
    // Each would run (for a second) if the option were taken and ignored.
    for (args, env, why) in [
        (
            &["--config", config, "demo", "--duration", "1s"][..],
            None,
            "does not use",
        ),
        (
            &["demo", "--duration", "1s", "--config", config],
            None,
            "does not use",
        ),
        (&["demo", "--duration", "1s"], Some(config), "TOKEND_CONFIG"),
        (
            &["demo", "--duration", "1s", "--json"],
            None,
            "unexpected argument",
        ),
        (&["demo", "--duration", "0s"], None, "would show nothing"),
    ] {
        let out = demo(args, env);
        let (stdout, stderr) = said(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!stdout.contains("demo:"), "{args:?} ran: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_but_import_and_run_creates_a_missing_database() {
    let env = Env::new(MockConfig::default(), "").await;
    let missing = env.dir.path().join("absent.db");
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let config = env.dir.path().join("absent.toml");
    std::fs::write(
        &config,
        text.replace(
            &env.db.display().to_string(),
            &missing.display().to_string(),
        )
        .replace(
            &env.health.display().to_string(),
            &env.dir.path().join("absent.json").display().to_string(),
        ),
    )
    .expect("config");
    let db = missing.display().to_string();
    for args in [
        &["accounts", "list"][..],
        &["accounts", "list", "--json"],
        &["accounts", "show", "u"],
        &["accounts", "resume", "u"],
        &["accounts", "remove", "u"],
        &["accounts", "remove", "u", "--revoke"],
        &["accounts", "refresh", "u"],
        &["token", "u"],
        &["events"],
    ] {
        let out = tokend_with(&config, args);
        let (stdout, stderr) = said(&out);
        assert_eq!(out.status.code(), Some(74), "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(&format!("no database at {db}"))
                || stderr.contains(&format!("the database {db}: it does not exist")),
            "{args:?} does not say {db} is missing: {stderr}"
        );
        assert!(!missing.exists(), "{args:?} created the database");
    }
    let out = tokend_with(&config, &["status"]);
    let (stdout, stderr) = said(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stderr.contains("absent.json"), "{stderr}");
    let names: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("absent.db") || n.starts_with("absent.json"))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_a_kind_is_singular_and_a_past_expiry_says_expired() {
    let env = Env::new(MockConfig::default(), "").await;
    let (out, _) = said(&env.tokend(&["check-config"]));
    assert!(out.contains("ok (1 profile)"), "{out}");

    let file = env.dir.path().join("one.json");
    std::fs::write(
        &file,
        r#"{"accounts":[{"id":"bad","token_type":"robot","access_token":"a"}]}"#,
    )
    .expect("write");
    let (_, err) = said(&env.tokend(&["accounts", "import", file.to_str().expect("path")]));
    assert!(err.contains("has 1 bad row;"), "{err}");
    std::fs::write(
        &file,
        r#"{"accounts":[{"id":"c","token_type":"company","access_token":"c1"}]}"#,
    )
    .expect("write");
    let (out, _) = said(&env.tokend(&["accounts", "import", file.to_str().expect("path")]));
    assert!(out.contains("imported 1 account:"), "{out}");
    let (_, err) = said(&env.tokend(&["accounts", "import", file.to_str().expect("path")]));
    assert!(err.contains("1 account is already linked"), "{err}");

    // One account, no user token: nothing to refresh; stopped, the summary says so.
    let daemon = env.start();
    eventually(Duration::from_secs(10), "health written", || {
        env.health()["accounts"]["total"] == 1
    })
    .await;
    daemon.stop().await;
    let (out, _) = said(&env.tokend(&["status"]));
    assert!(out.contains("accounts: 1 account: 1 active"), "{out}");
    assert!(out.contains("next refresh: none scheduled"), "{out}");
    assert!(!out.contains("- UTC") && !out.contains(": -\n"), "{out}");

    // A token that expired an hour ago is "expired", in every listing.
    env.add_user("old", Duration::from_secs(2 * 3600));
    let expired = rfc3339(column(&env, "old", "expires_at").expect("expiry"));
    for args in [
        &["accounts", "show", "old"][..],
        &["accounts", "list"],
        &["accounts", "list", "--state", "active"],
        &["token", "old"],
    ] {
        let (out, err) = said(&env.tokend(args));
        let text = out + &err;
        let line = text
            .lines()
            .find(|l| l.contains(&expired))
            .unwrap_or_else(|| panic!("{args:?}: no {expired} in:\n{text}"));
        assert!(line.contains("expired"), "{args:?}: {line}");
        assert!(
            !text.to_lowercase().contains("expires"),
            "{args:?} says expires of a past time:\n{text}"
        );
    }
}
