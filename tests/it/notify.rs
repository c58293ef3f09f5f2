//! Notifications: durable, signed, in order, without storms; checked by receivers that verify
//! the signature with their own HMAC (see `receiver`).

mod receiver;

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokend_mock::{Endpoint, Fault, MockConfig};

use crate::helpers::{Env, SECRET, eventually, write_private};
use receiver::{Mode, PyReceiver, Receiver};

/// The webhook signing secret: a canary no body, log or listing may contain.
const SIGNING: &str = "CANARY-signing-secret-5d1e0c7b9a41";

fn signing_file(env: &Env) -> PathBuf {
    let path = env.dir.path().join("signing-secret");
    write_private(&path, SIGNING);
    path
}

/// Append `[[notify]]` tables to the environment's config file.
fn add_sinks(env: &Env, toml: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&env.config_path)
        .expect("config");
    writeln!(f, "\n{toml}").expect("append");
}

fn webhook(env: &Env, name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[notify]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\nsecret_file = \"{}\"\n{extra}\n",
        signing_file(env).display()
    )
}

fn store_id(env: &Env) -> String {
    env.conn()
        .query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get(0)
        })
        .expect("store id")
}

/// `(id, to_state)` of an account's state events, in order.
fn state_events(env: &Env, account: &str) -> Vec<(String, String)> {
    let sid = store_id(env);
    let c = env.conn();
    let mut s = c
        .prepare(
            "SELECT seq, to_state FROM account_events WHERE account_id = ?1 AND kind = 'state'
             ORDER BY seq",
        )
        .expect("prepare");
    s.query_map([account], |r| {
        Ok((format!("{sid}:{}", r.get::<_, i64>(0)?), r.get(1)?))
    })
    .expect("query")
    .collect::<Result<_, _>>()
    .expect("rows")
}

/// Delivery statuses recorded for `sink`, by type.
fn statuses(env: &Env, sink: &str) -> Vec<(String, String, i64)> {
    let c = env.conn();
    let mut s = c
        .prepare(
            "SELECT type, status, attempts FROM notify_deliveries WHERE sink = ?1 ORDER BY ord",
        )
        .expect("prepare");
    s.query_map([sink], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[test]
fn the_test_hmac_is_rfc_2104() {
    // Python: hmac.new(b"secret", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    let mac = receiver::hmac_sha256(b"secret", br#"1700000000.{"a":1}"#);
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
    );
    // RFC 4231 test case 6: a key longer than the block.
    let mac = receiver::hmac_sha256(
        &[0xaa; 131],
        b"Test Using Larger Than Block-Size Key - Hash Key First",
    );
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
}

/// The receiver is down for two minutes while accounts die and are relinked; once it is up,
/// every notification arrives exactly once, each account's in order, each signed, each with
/// the id of the event it reports. A captured request replayed later is refused by the
/// receiver's timestamp check, and a forged one by its signature check.
#[tokio::test(start_paused = true)]
async fn a_receiver_down_for_two_minutes_gets_every_event_once_in_order() {
    let env = Env::new(MockConfig::default(), "").await;
    let rx = Receiver::start(SIGNING, env.clock.clone()).await;
    rx.set_mode(Mode::Down);
    add_sinks(&env, &webhook(&env, "ops", &rx.url(), ""));
    let ids: Vec<String> = (0..4).map(|i| format!("u{i}")).collect();
    for id in &ids {
        env.add_user(id, Duration::from_secs(4000));
        env.mock.revoke_account(id);
    }
    let daemon = env.start();
    eventually(Duration::from_secs(30), "all needs_reauth", || {
        env.count_state("needs_reauth") == 4
    })
    .await;
    for id in &ids {
        env.relink(id, Duration::ZERO);
    }
    eventually(Duration::from_secs(30), "all active again", || {
        env.count_state("active") == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(rx.delivered().is_empty());
    assert!(rx.refused() > 0, "tokend tried while the receiver was down");
    let h = env.health();
    assert_eq!(h["notifications"]["ops"]["backlog"], 8, "{h}");
    assert!(
        h["notifications"]["ops"]["oldest_undelivered_at"].is_i64(),
        "{h}"
    );

    rx.set_mode(Mode::Status(200));
    eventually(Duration::from_secs(600), "all delivered", || {
        rx.delivered().len() >= 8
    })
    .await;
    // Nothing more comes (retries are at most 5 minutes apart).
    tokio::time::sleep(Duration::from_secs(600)).await;
    let delivered = rx.delivered();
    assert_eq!(delivered.len(), 8, "{delivered:#?}");
    let mut once = HashSet::new();
    for s in &delivered {
        assert!(once.insert(s.id.clone()), "{} delivered twice", s.id);
        let b = s.json();
        assert_eq!(
            b["id"],
            s.id.as_str(),
            "the header and the body carry one id"
        );
        assert_eq!(b["type"], s.kind.as_str());
    }
    for id in &ids {
        let got: Vec<(String, String)> = delivered
            .iter()
            .filter(|s| s.json()["account_id"] == id.as_str())
            .map(|s| (s.id.clone(), s.kind.clone()))
            .collect();
        let events = state_events(&env, id);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            got,
            [
                (events[0].0.clone(), "account.needs_reauth".to_owned()),
                (events[1].0.clone(), "account.recovered".to_owned()),
            ],
            "{id}: in order, each with its event's id"
        );
    }
    let b = delivered[0].json();
    for key in [
        "id",
        "type",
        "account_id",
        "profile",
        "from_state",
        "to_state",
        "reason",
        "occurred_at",
    ] {
        assert!(b.get(key).is_some(), "{key} missing: {b}");
    }
    assert_eq!(b["profile"], "factorial");
    assert!(chrono::DateTime::parse_from_rfc3339(b["occurred_at"].as_str().expect("text")).is_ok());
    eventually(Duration::from_secs(10), "backlog empty in health", || {
        env.health()["notifications"]["ops"]["backlog"] == 0
    })
    .await;

    // A captured request replayed later fails the receiver's timestamp check...
    let first = &delivered[0];
    tokio::time::sleep(Duration::from_secs(receiver::TOLERANCE as u64 + 60)).await;
    assert_eq!(rx.post(&first.id, &first.signature, &first.body).await, 400);
    let replayed = rx.seen().pop().expect("seen");
    assert!(
        replayed
            .verified
            .as_ref()
            .is_err_and(|e| e.contains("from now")),
        "{replayed:?}"
    );
    // ... and one with a fresh timestamp but the old signature, or another body, is a forgery.
    let t = env.now();
    let v1 = first.signature.split_once(",v1=").expect("v1").1;
    assert_eq!(
        rx.post(&first.id, &format!("t={t},v1={v1}"), &first.body)
            .await,
        400
    );
    let forged = first.body.replace("needs_reauth", "recovered");
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(first.body.as_bytes());
    let good: String = receiver::hmac_sha256(rx.secret(), &signed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        rx.post(&first.id, &format!("t={t},v1={good}"), &first.body)
            .await,
        200,
        "the receiver's own check accepts a fresh, correct signature"
    );
    assert_eq!(
        rx.post(&first.id, &format!("t={t},v1={good}"), &forged)
            .await,
        400
    );
    daemon.stop().await;
}

/// In order per account: while an account's notification waits (here its receiver asked for
/// five minutes), its later ones wait behind it; other accounts' go on.
#[tokio::test(start_paused = true)]
async fn a_later_notification_waits_for_an_earlier_one_of_its_account() {
    let env = Env::new(MockConfig::default(), "").await;
    let rx = Receiver::start(SIGNING, env.clock.clone()).await;
    rx.fail_next("slow", 503, 300);
    add_sinks(&env, &webhook(&env, "ops", &rx.url(), ""));
    for id in ["slow", "quick"] {
        env.add_user(id, Duration::from_secs(4000));
        env.mock.revoke_account(id);
    }
    let daemon = env.start();
    eventually(
        Duration::from_secs(30),
        "slow's first attempt refused",
        || rx.seen().iter().any(|s| s.status == 503),
    )
    .await;
    let refused_at = env.now();
    for id in ["slow", "quick"] {
        env.relink(id, Duration::ZERO);
    }
    eventually(Duration::from_secs(120), "quick told twice", || {
        rx.delivered()
            .iter()
            .filter(|s| s.json()["account_id"] == "quick")
            .count()
            == 2
    })
    .await;
    assert!(
        !rx.delivered()
            .iter()
            .any(|s| s.json()["account_id"] == "slow"),
        "slow's recovered overtook its needs_reauth"
    );
    eventually(Duration::from_secs(600), "slow told twice", || {
        rx.delivered()
            .iter()
            .filter(|s| s.json()["account_id"] == "slow")
            .count()
            == 2
    })
    .await;
    let slow: Vec<String> = rx
        .delivered()
        .iter()
        .filter(|s| s.json()["account_id"] == "slow")
        .map(|s| s.kind.clone())
        .collect();
    assert_eq!(slow, ["account.needs_reauth", "account.recovered"]);
    assert!(
        env.now() - refused_at >= 300,
        "Retry-After was not honoured"
    );
    daemon.stop().await;
}

/// `kill -9` after the state change and a failed attempt, before any delivery: the next start
/// delivers it, with the same id; the receiver (Python's `hmac`, the README's code) verifies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_before_delivery_delivers_after_restart_with_the_same_id() {
    let env = Env::new(MockConfig::default(), "").await;
    let py = PyReceiver::start(env.dir.path(), SIGNING);
    py.answer(503);
    add_sinks(&env, &webhook(&env, "ops", &py.url(), ""));
    env.add_user("gone", Duration::from_secs(4000));
    env.mock.revoke_account("gone");
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(30), "an attempt answered 503", || {
        py.requests().iter().any(|r| r["code"] == 503)
    })
    .await;
    bin.signal("KILL");
    bin.wait(Duration::from_secs(10)).await;
    let status = bin.child.try_wait().expect("try_wait").expect("exited");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status:?}"
    );
    assert_eq!(
        env.conn()
            .query_row(
                "SELECT COUNT(*) FROM notify_deliveries WHERE status = 'pending'",
                [],
                |r| r.get::<_, i64>(0)
            )
            .expect("count"),
        1
    );
    py.answer(200);
    let mut bin = env.spawn_binary(&[]);
    eventually(
        Duration::from_secs(30),
        "delivered after the restart",
        || py.requests().iter().any(|r| r["code"] == 200),
    )
    .await;
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
    let events = state_events(&env, "gone");
    assert_eq!(events.len(), 1, "{events:?}");
    let requests = py.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    for r in &requests {
        assert_eq!(r["id"], events[0].0.as_str(), "one id on every attempt");
        assert!(r["problem"].is_null(), "Python's check failed: {r}");
        let body: serde_json::Value =
            serde_json::from_str(r["body"].as_str().expect("body")).expect("json");
        assert_eq!(body["type"], "account.needs_reauth");
    }
    assert_eq!(
        requests.iter().filter(|r| r["code"] == 200).count(),
        1,
        "{requests:?}"
    );
    let bodies: HashSet<&str> = requests.iter().filter_map(|r| r["body"].as_str()).collect();
    assert_eq!(bodies.len(), 1, "the same body on every attempt");
}

/// A 410 (or any 4xx but 408 and 429) is the receiver's final word: not retried, recorded.
#[tokio::test(start_paused = true)]
async fn a_410_is_not_retried() {
    let env = Env::new(MockConfig::default(), "").await;
    let rx = Receiver::start(SIGNING, env.clock.clone()).await;
    rx.set_mode(Mode::Status(410));
    add_sinks(&env, &webhook(&env, "ops", &rx.url(), ""));
    env.add_user("gone", Duration::from_secs(4000));
    env.mock.revoke_account("gone");
    let daemon = env.start();
    eventually(Duration::from_secs(30), "one attempt", || {
        rx.seen().len() == 1
    })
    .await;
    // Longer than the longest wait between retries (5 minutes).
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(rx.seen().len(), 1, "a 410 was retried");
    assert_eq!(
        statuses(&env, "ops"),
        [("account.needs_reauth".into(), "rejected".into(), 1)]
    );
    let h = env.health();
    let last = h["notifications"]["ops"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(last.contains("410"), "{h}");
    assert_eq!(h["notifications"]["ops"]["dead_letters"], 0);
    let out = env.tokend(&["events", "--account", "gone"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ops: REJECTED") && text.contains("http 410"),
        "{text}"
    );
    daemon.stop().await;
}

/// An account flapping between failing and active pages nobody: each failing is held for
/// failing_after and dropped when the account recovers first, and no recovered follows. A
/// failure that outlasts failing_after is told, and then its recovery.
#[tokio::test(start_paused = true)]
async fn a_flapping_account_sends_no_failing_or_recovered_inside_failing_after() {
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(60),
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let rx = Receiver::start(SIGNING, env.clock.clone()).await;
    add_sinks(
        &env,
        &webhook(
            &env,
            "ops",
            &rx.url(),
            "events = [\"account.failing\", \"account.recovered\"]",
        ),
    );
    env.add_user("flappy", Duration::ZERO);
    let daemon = env.start();
    let count = |to: &str| {
        state_events(&env, "flappy")
            .iter()
            .filter(|(_, t)| t == to)
            .count()
    };
    let start = env.now();
    for flap in 1..=5 {
        env.mock.push_faults(
            Endpoint::Token,
            [Fault::Status {
                code: 503,
                retry_after: None,
            }],
        );
        eventually(Duration::from_secs(300), "failing, then active", || {
            count("failing") == flap && count("active") == flap
        })
        .await;
    }
    assert!(
        env.now() - start < 15 * 60,
        "the flaps took longer than failing_after"
    );
    // Well past failing_after of the last flap: nothing was sent.
    tokio::time::sleep(Duration::from_secs(16 * 60)).await;
    assert!(rx.seen().is_empty(), "{:#?}", rx.seen());
    let suppressed = statuses(&env, "ops")
        .iter()
        .filter(|(t, s, _)| t == "account.failing" && s == "suppressed")
        .count();
    assert_eq!(suppressed, 5);

    // A real outage, longer than failing_after.
    env.mock.set_outage(Endpoint::Token, true);
    eventually(Duration::from_secs(300), "failing", || {
        env.state("flappy") == "failing"
    })
    .await;
    let failing_id = state_events(&env, "flappy")
        .last()
        .expect("event")
        .0
        .clone();
    tokio::time::sleep(Duration::from_secs(14 * 60)).await;
    assert!(rx.seen().is_empty(), "failing sent before failing_after");
    eventually(Duration::from_secs(180), "failing told", || {
        rx.delivered().len() == 1
    })
    .await;
    env.mock.set_outage(Endpoint::Token, false);
    eventually(Duration::from_secs(600), "recovered told", || {
        rx.delivered().len() == 2
    })
    .await;
    let got: Vec<(String, String)> = rx
        .delivered()
        .iter()
        .map(|s| (s.id.clone(), s.kind.clone()))
        .collect();
    assert_eq!(got[0], (failing_id, "account.failing".to_owned()));
    assert_eq!(got[1].1, "account.recovered");
    assert_eq!(env.state("flappy"), "active");
    daemon.stop().await;
}

/// More than burst_threshold accounts of one profile changing at once: one summary instead of
/// one notification each (only what was queued before the burst showed goes one by one).
#[tokio::test(start_paused = true)]
async fn a_burst_over_the_threshold_yields_one_summary() {
    let env = Env::new(MockConfig::default(), "").await;
    let rx = Receiver::start(SIGNING, env.clock.clone()).await;
    add_sinks(
        &env,
        &webhook(&env, "ops", &rx.url(), "burst_threshold = 5"),
    );
    let ids: Vec<String> = (0..12).map(|i| format!("u{i:02}")).collect();
    for id in &ids {
        env.add_user(id, Duration::from_secs(4000));
        env.mock.revoke_account(id);
    }
    let daemon = env.start();
    eventually(Duration::from_secs(30), "all needs_reauth", || {
        env.count_state("needs_reauth") == 12
    })
    .await;
    eventually(Duration::from_secs(300), "a summary", || {
        rx.delivered().iter().any(|s| s.kind == "profile.summary")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    let delivered = rx.delivered();
    let summaries: Vec<_> = delivered
        .iter()
        .filter(|s| s.kind == "profile.summary")
        .collect();
    assert_eq!(summaries.len(), 1, "{delivered:#?}");
    let single: Vec<String> = delivered
        .iter()
        .filter(|s| s.kind == "account.needs_reauth")
        .map(|s| s.json()["account_id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(single.len() <= 5, "{single:?}");
    let b = summaries[0].json();
    assert_eq!(b["profile"], "factorial");
    assert!(b["account_id"].is_null());
    let n = b["summary"]["count"].as_u64().expect("count") as usize;
    assert_eq!(n + single.len(), 12, "{b}");
    assert_eq!(b["summary"]["by_type"]["account.needs_reauth"], n);
    let mut all: Vec<String> = single.clone();
    for a in b["summary"]["accounts"].as_array().expect("accounts") {
        all.push(a.as_str().expect("id").to_owned());
    }
    all.sort();
    assert_eq!(
        all, ids,
        "every account is told once, alone or in the summary"
    );
    let reason = b["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with(&format!("{n} accounts needing reauthorisation since ")),
        "{reason}"
    );
    daemon.stop().await;
}

/// A receiver that never answers well: after max_age the notification is a dead letter, seen in
/// the health file (which says degraded), in `tokend events`, and nothing is retried after.
#[tokio::test(start_paused = true)]
async fn dead_letters_after_max_age_show_in_health_and_events() {
    let env = Env::new(MockConfig::default(), "").await;
    let rx = Receiver::start(SIGNING, env.clock.clone()).await;
    rx.set_mode(Mode::Status(503));
    add_sinks(
        &env,
        &webhook(&env, "ops", &rx.url(), "max_age = \"2m\"\ntimeout = \"1s\""),
    );
    env.add_user("gone", Duration::from_secs(4000));
    env.mock.revoke_account("gone");
    let daemon = env.start();
    eventually(Duration::from_secs(30), "needs_reauth", || {
        env.state("gone") == "needs_reauth"
    })
    .await;
    env.relink("gone", Duration::ZERO);
    eventually(Duration::from_secs(30), "active", || {
        env.state("gone") == "active"
    })
    .await;
    eventually(Duration::from_secs(600), "dead letters in health", || {
        env.health()["notifications"]["ops"]["dead_letters"] == 2
    })
    .await;
    let h = env.health();
    assert_eq!(h["status"], "degraded", "dead letters degrade: {h}");
    assert_eq!(h["accounts"]["by_state"]["active"], 1);
    assert_eq!(h["notifications"]["ops"]["backlog"], 0);
    assert!(
        h["notifications"]["ops"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("http 503")),
        "{h}"
    );
    let attempts = rx.seen().len();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(rx.seen().len(), attempts, "a dead letter was retried");
    let out = env.tokend(&["events", "--since", "1h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("ops: DEAD LETTER").count(), 2, "{text}");
    let out = env.tokend(&["events", "--json", "--account", "gone"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "account.needs_reauth");
    assert_eq!(lines[1]["type"], "account.recovered");
    for l in &lines {
        assert_eq!(l["notifications"][0]["status"], "dead", "{l}");
        assert_eq!(l["notifications"][0]["sink"], "ops");
    }
    daemon.stop().await;
}

/// An exec sink gets the body on standard input and `TOKEND_EVENT_*` in an environment of its
/// own; exit 75 is retried, 65 rejected, and a command outliving its timeout is killed with its
/// children. `tokend events --follow` shows the event and then its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_sink_gets_the_event_as_json_on_stdin() {
    let env = Env::new(MockConfig::default(), "").await;
    let out = env.dir.path().join("exec");
    std::fs::create_dir(&out).expect("mkdir");
    let marker = 3000 + fastrand::u32(..900);
    add_sinks(
        &env,
        &format!(
            r#"[[notify]]
name = "script"
kind = "exec"
command = ["/bin/sh", "-c", "if [ ! -e \"$0/tried\" ]; then : > \"$0/tried\"; exit 75; fi; cat > \"$0/$TOKEND_EVENT_ID.json\"; env > \"$0/$TOKEND_EVENT_ID.env\"", "{dir}"]
timeout = "5s"

[[notify]]
name = "refuser"
kind = "exec"
command = ["/bin/sh", "-c", "cat > /dev/null; echo 'no such queue' >&2; exit 65"]

[[notify]]
name = "sleeper"
kind = "exec"
command = ["/bin/sh", "-c", "sleep {marker}; true"]
timeout = "1s"
max_age = "2s"
"#,
            dir = out.display()
        ),
    );
    env.add_user("gone", Duration::from_secs(4000));
    env.mock.revoke_account("gone");
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["--config", env.config_path.to_str().expect("path")])
        .args(["events", "--follow", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tokend events --follow");
    let followed = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    {
        let lines = followed.clone();
        let stdout = follow.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str(&l) {
                    lines.lock().expect("lock").push(v);
                }
            }
        });
    }
    let mut bin = env.spawn_binary(&[("TOKEND_TEST_LEAK", "leak-canary-77")]);
    eventually(Duration::from_secs(30), "delivered by the script", || {
        statuses(&env, "script")
            .iter()
            .any(|(_, s, _)| s == "delivered")
    })
    .await;
    eventually(Duration::from_secs(30), "the sleeper given up", || {
        statuses(&env, "sleeper")
            .iter()
            .any(|(_, s, _)| s == "dead")
    })
    .await;
    let id = state_events(&env, "gone")[0].0.clone();
    let body: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join(format!("{id}.json"))).expect("stdin captured"),
    )
    .expect("JSON on stdin");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["type"], "account.needs_reauth");
    assert_eq!(body["account_id"], "gone");
    assert_eq!(body["profile"], "factorial");
    assert_eq!(body["from_state"], "active");
    assert_eq!(body["to_state"], "needs_reauth");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("invalid_grant"))
    );
    let vars: HashMap<String, String> = std::fs::read_to_string(out.join(format!("{id}.env")))
        .expect("env captured")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(vars["TOKEND_EVENT_ID"], id);
    assert_eq!(vars["TOKEND_EVENT_TYPE"], "account.needs_reauth");
    assert_eq!(vars["TOKEND_EVENT_ACCOUNT_ID"], "gone");
    assert_eq!(vars["TOKEND_EVENT_TO_STATE"], "needs_reauth");
    assert_eq!(vars["TOKEND_EVENT_ATTEMPT"], "2", "exit 75 was retried");
    assert!(vars.contains_key("PATH"));
    assert!(
        !vars.values().any(|v| v.contains("leak-canary")),
        "the daemon's environment leaked into the command: {vars:?}"
    );
    assert_eq!(
        statuses(&env, "refuser"),
        [("account.needs_reauth".into(), "rejected".into(), 1)]
    );
    let refused: String = env
        .conn()
        .query_row(
            "SELECT last_error FROM notify_deliveries WHERE sink = 'refuser'",
            [],
            |r| r.get(0),
        )
        .expect("error");
    assert!(
        refused.contains("exit 65") && refused.contains("no such queue"),
        "{refused}"
    );
    // The sleeper's shell and its sleep were killed at each timeout.
    let orphans: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&format!("sleep {marker}")))
        .collect();
    assert!(orphans.is_empty(), "{orphans:?}");

    eventually(
        Duration::from_secs(10),
        "--follow shows the event and its delivery",
        || {
            let lines = followed.lock().expect("lock");
            lines.iter().any(|l| l["id"] == id.as_str())
                && lines.iter().any(|l| {
                    l["notification"]["sink"] == "script"
                        && l["notification"]["status"] == "delivered"
                })
        },
    )
    .await;
    let _ = follow.kill();
    let _ = follow.wait();
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
}

/// No token or secret in any body, header, command input, log line, listing or health file,
/// across needs_reauth, recovered, failing and at-risk notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_in_a_body_or_log_matches_a_token() {
    let env = Env::new(MockConfig::default(), "log_level = \"trace\"").await;
    let rx = Receiver::start(SIGNING, env.clock.clone()).await;
    let out = env.dir.path().join("exec");
    std::fs::create_dir(&out).expect("mkdir");
    add_sinks(
        &env,
        &(webhook(&env, "hook", &rx.url(), "failing_after = \"0s\"")
            + &format!(
                "[[notify]]\nname = \"script\"\nkind = \"exec\"\nfailing_after = \"0s\"\n\
                 command = [\"/bin/sh\", \"-c\", \"cat >> \\\"$0/stdin\\\"; env >> \\\"$0/env\\\"\", \"{}\"]\n",
                out.display()
            )),
    );
    let mut secrets: Vec<String> = vec![SECRET.into(), SIGNING.into()];
    let keep = |env: &Env, id: &str, secrets: &mut Vec<String>| {
        let (a, r, _) = env.tokens(id);
        secrets.extend(a);
        secrets.extend(r);
    };
    env.add_user("gone", Duration::from_secs(4000));
    env.mock.revoke_account("gone");
    env.add_user("flaky", Duration::from_secs(4000));
    env.add_user("old", Duration::ZERO);
    // A refresh token issued six and a half days ago: at risk (lifetime 7d, margin 1d).
    env.conn()
        .execute(
            "UPDATE accounts SET refresh_issued_at = refresh_issued_at - 561600 WHERE id = 'old'",
            [],
        )
        .expect("age");
    for id in ["gone", "flaky", "old"] {
        keep(&env, id, &mut secrets);
    }
    env.mock.push_faults(
        Endpoint::Token,
        [Fault::Status {
            code: 503,
            retry_after: None,
        }],
    );
    let mut bin = env.spawn_binary(&[]);
    eventually(Duration::from_secs(30), "needs_reauth", || {
        env.state("gone") == "needs_reauth"
    })
    .await;
    env.relink("gone", Duration::ZERO);
    keep(&env, "gone", &mut secrets);
    let told = |kind: &str| rx.delivered().iter().any(|s| s.kind == kind);
    eventually(Duration::from_secs(60), "every kind told", || {
        told("account.needs_reauth")
            && told("account.recovered")
            && told("account.failing")
            && told("account.refresh_token_at_risk")
    })
    .await;
    eventually(Duration::from_secs(30), "the script too", || {
        statuses(&env, "script")
            .iter()
            .filter(|(_, s, _)| s == "delivered")
            .count()
            >= 4
    })
    .await;
    let events = env.tokend(&["events", "--json"]);
    let events_text = env.tokend(&["events"]);
    bin.signal("TERM");
    assert_eq!(
        bin.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        bin.stderr()
    );
    for id in ["gone", "flaky", "old"] {
        keep(&env, id, &mut secrets);
        if let Some((a, r)) = env.mock.newest(id) {
            secrets.push(a);
            secrets.extend(r);
        }
    }
    let logs = bin.stderr();
    assert!(logs.contains("notification delivered"), "{logs}");
    let received: String = rx
        .seen()
        .iter()
        .map(|s| format!("{} {} {} {}\n", s.id, s.kind, s.signature, s.body))
        .collect();
    let outputs = [
        ("logs", logs),
        ("webhook requests", received),
        (
            "exec stdin",
            std::fs::read_to_string(out.join("stdin")).expect("stdin"),
        ),
        (
            "exec env",
            std::fs::read_to_string(out.join("env")).expect("env"),
        ),
        (
            "tokend events --json",
            String::from_utf8_lossy(&events.stdout).into_owned(),
        ),
        (
            "tokend events",
            String::from_utf8_lossy(&events_text.stdout).into_owned(),
        ),
        (
            "health",
            std::fs::read_to_string(&env.health).expect("health"),
        ),
    ];
    for (what, text) in &outputs {
        assert!(!text.is_empty(), "{what} is empty");
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{what} contains a secret ({}...)",
                &s[..8.min(s.len())]
            );
        }
    }
}

/// `[[notify]]` errors name the file, the line and the key, like the rest of the file.
#[test]
fn invalid_sinks_name_the_key_and_line() {
    let profile = "[[profile]]\nname = \"factorial\"\nclient_id = \"a\"\nclient_secret = \"s\"\n";
    let hook = "[[notify]]\nname = \"ops\"\nkind = \"webhook\"\n"; // lines 5-7
    let cases: &[(&str, &str, usize)] = &[
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\ncolour = \"red\"\n",
            "colour",
            10,
        ),
        (
            "url = \"http://hooks.example.com/h\"\nsecret = \"s\"\n",
            "url",
            8,
        ),
        ("url = \"https://u:p@x.test/h\"\nsecret = \"s\"\n", "url", 8),
        ("url = \"https://x.test/h\"\n", "secret_file", 6),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nsecret_env = \"X\"\n",
            "secret",
            9,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nevents = [\"account.exploded\"]\n",
            "events",
            10,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nevents = [\"profile.summary\"]\n",
            "events",
            10,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nprofiles = [\"other\"]\n",
            "profiles",
            10,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\ntimeout = \"1m\"\nmax_age = \"30s\"\n",
            "max_age",
            11,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nrate_per_second = 0\n",
            "rate_per_second",
            10,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nburst_threshold = 0\n",
            "burst_threshold",
            10,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nmax_concurrency = 0\n",
            "max_concurrency",
            10,
        ),
        (
            "url = \"https://x.test/h\"\nsecret = \"s\"\nfailing_after = \"soon\"\n",
            "failing_after",
            10,
        ),
    ];
    let path = std::path::Path::new("/etc/tokend/tokend.toml");
    for (extra, key, line) in cases {
        let text = format!("{profile}{hook}{extra}");
        let err = tokend::config::Config::parse(path, &text)
            .expect_err(extra)
            .to_string();
        assert!(
            err.contains(key) && err.contains(&format!("/etc/tokend/tokend.toml:{line}:")),
            "{extra}: want key {key} on line {line}, got: {err}"
        );
        assert!(!err.contains("u:p@"), "{err}");
    }
    for (text, key) in [
        ("[[notify]]\nname = \"ops\"\nkind = \"sms\"\n", "kind"),
        ("[[notify]]\nname = \"ops\"\nkind = \"exec\"\n", "command"),
        (
            "[[notify]]\nname = \"ops\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\nsecret = \"s\"\n",
            "secret",
        ),
        (
            "[[notify]]\nname = \"ops\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n\
             [[notify]]\nname = \"ops\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n",
            "duplicate",
        ),
        (
            "[[notify]]\nname = \"o p\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n",
            "name",
        ),
    ] {
        let err = tokend::config::Config::parse(path, &format!("{profile}{text}"))
            .expect_err(text)
            .to_string();
        assert!(err.contains(key) && err.contains("tokend.toml:"), "{err}");
    }
    // An inline secret never appears in a message quoting its line.
    let err = tokend::config::Config::parse(
        path,
        &format!("{profile}{hook}url = \"https://x.test/h\"\nsecret = 12\n"),
    )
    .expect_err("a number is no secret")
    .to_string();
    assert!(err.contains("secret = …"), "{err}");
}

#[test]
fn sinks_get_their_documented_defaults() {
    let c = tokend::config::Config::parse(
        std::path::Path::new("t.toml"),
        "[[profile]]\nname = \"factorial\"\nclient_id = \"a\"\nclient_secret = \"s\"\n\
         [[notify]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"0123456789abcdef0123\"\n\
         [[notify]]\nname = \"pager\"\nkind = \"exec\"\ncommand = [\"/usr/local/bin/page\", \"--team\", \"ops\"]\n\
         events = [\"account.needs_reauth\"]\nprofiles = [\"factorial\"]\ntimeout = \"3s\"\nmax_age = \"1h\"\n\
         failing_after = \"5m\"\nburst_threshold = 10\nmax_concurrency = 1\nrate_per_second = 0.5\n",
    )
    .expect("valid");
    let ops = &c.notify[0];
    assert_eq!(ops.timeout.get(), Duration::from_secs(10));
    assert_eq!(ops.max_age.get(), Duration::from_secs(86_400));
    assert_eq!(ops.failing_after.get(), Duration::from_secs(900));
    assert_eq!(
        (
            ops.burst_threshold,
            ops.max_concurrency,
            ops.rate_per_second
        ),
        (50, 4, 10.0)
    );
    assert!(ops.events.is_none() && ops.profiles.is_none());
    let debug = format!("{ops:?}");
    assert!(
        !debug.contains("0123456789abcdef") && !debug.contains("/h"),
        "{debug}"
    );
    assert!(
        c.warnings.iter().any(|w| w.contains("inline")),
        "{:?}",
        c.warnings
    );
    let pager = &c.notify[1];
    assert_eq!(pager.rate_per_second, 0.5);
    assert!(pager.wants("account.needs_reauth") && !pager.wants("account.failing"));
}

/// The commented `[[notify]]` examples in config/tokend.toml parse once uncommented.
#[test]
fn the_documented_sink_examples_parse() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tokend.toml"))
        .expect("config/tokend.toml");
    let (head, examples) = text
        .split_once("# [[notify]]")
        .expect("commented [[notify]] examples");
    let uncommented: String = format!("# [[notify]]{examples}")
        .lines()
        .filter(|l| !l.starts_with("# #"))
        .filter_map(|l| l.strip_prefix("# ").or((l == "#").then_some("")))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = format!("{head}{uncommented}")
        .replace(
            "client_secret_credential = \"factorial-client-secret\"",
            "client_secret = \"x\"",
        )
        .replace(
            "secret_credential = \"tokend-webhook-secret\"",
            "secret = \"0123456789abcdef0123456789abcdef\"",
        );
    let c = tokend::config::Config::parse(std::path::Path::new("tokend.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let names: Vec<&str> = c.notify.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["ops-webhook", "pager"]);
}
