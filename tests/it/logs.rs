//! The logs an operator reads, from the real binary: RFC 3339 times in text, JSON with one type
//! per field at the top level, and journal entries whose fields `journalctl` can match.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tokend_mock::{Endpoint, Fault, MockConfig};

use crate::helpers::{Env, eventually};

/// A daemon with one user account to refresh and one unusable row (an ERROR line).
async fn env_with(daemon_extra: &str) -> Env {
    let env = Env::new(MockConfig::default(), daemon_extra).await;
    env.add_user("u", Duration::from_secs(4000));
    env.conn()
        .execute(
            "INSERT INTO accounts (id, token_type) VALUES ('bad', 'user')",
            [],
        )
        .expect("insert");
    env
}

pub(crate) async fn until_refreshed_and_reported(env: &Env) {
    eventually(Duration::from_secs(10), "refreshed", || {
        env.mock.account("u").grants == 1
    })
    .await;
    eventually(Duration::from_secs(5), "invalid row reported", || {
        env.state("bad") == "invalid"
    })
    .await;
}

/// Whether `s` starts with an RFC 3339 UTC time such as `2026-12-02T02:10:11.123Z`.
fn starts_with_rfc3339(s: &str) -> bool {
    let Some(end) = s.find('Z') else { return false };
    chrono::DateTime::parse_from_rfc3339(&s[..=end]).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_show_rfc3339_times_for_the_line_and_for_unix_time_fields() {
    let env = env_with("").await;
    let mut bin = env.spawn_binary(&[]);
    until_refreshed_and_reported(&env).await;
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(10)).await, Some(0));
    let text = bin.stderr();
    for line in text.lines() {
        assert!(
            starts_with_rfc3339(line),
            "no RFC 3339 time first: {line:?}"
        );
    }
    let refresh = text
        .lines()
        .find(|l| l.contains(" refresh account_id=u"))
        .unwrap_or_else(|| panic!("no refresh line in {text}"));
    let at = refresh
        .split_once("next_action_at=")
        .unwrap_or_else(|| panic!("no next_action_at in {refresh:?}"))
        .1;
    assert!(
        starts_with_rfc3339(at),
        "next_action_at not RFC 3339: {refresh:?}"
    );
}

/// Holds the daemon's flusher off for an hour: what reaches stderr was written by the rules
/// alone (README, "Logs").
const HELD: (&str, &str) = ("TOKEND_LOG_FLUSH_MS", "3600000");

/// The daemon writes its INFO lines in batches: an ERROR line goes out at once with every line
/// before it, and the exit writes what still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_line_takes_the_waiting_lines_along_and_the_exit_writes_the_rest() {
    let env = env_with("").await;
    let mut bin = env.spawn_binary(&[HELD]);
    until_refreshed_and_reported(&env).await;
    eventually(Duration::from_secs(5), "the bad row's ERROR line", || {
        bin.stderr().contains(" ERROR ")
    })
    .await;
    // Everything on stderr so far came with an urgent line: it ends with the last one, and
    // what came before it waited (DEBUG and INFO lines held for an hour otherwise).
    let running = bin.stderr();
    let last = running.lines().last().unwrap_or_default();
    assert!(
        last.contains(" ERROR ") || last.contains(" WARN "),
        "a line below WARN was written by itself while running: {last:?} in\n{running}"
    );
    assert!(
        running
            .lines()
            .any(|l| l.contains(" DEBUG ") || l.contains(" INFO ")),
        "the lines before the ERROR did not come with it:\n{running}"
    );
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(10)).await, Some(0));
    let text = bin.stderr();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.contains(" INFO tokend stopped "),
        "the last line is not the stop's: {last:?} in\n{text}"
    );
    for waited in [
        " refresh account_id=u",
        "stopping: letting in-flight refreshes finish",
    ] {
        assert!(text.contains(waited), "{waited:?} never written:\n{text}");
    }
}

/// A second stop signal exits at once, and writes the lines still waiting before its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_writes_the_waiting_lines_first() {
    let env = Env::new(
        MockConfig::default(),
        "shutdown_timeout = \"60s\"\nhttp_timeout = \"30s\"\nlease = \"60s\"",
    )
    .await;
    env.add_user("slow", Duration::from_secs(4000));
    env.mock
        .push_faults(Endpoint::Token, [Fault::Delay(Duration::from_secs(25))]);
    let mut bin = env.spawn_binary(&[HELD]);
    eventually(Duration::from_secs(10), "a refresh in flight", || {
        env.mock.in_flight() >= 1
    })
    .await;
    bin.signal("TERM");
    eventually(Duration::from_secs(5), "health says stopping", || {
        env.health()["status"] == "stopping"
    })
    .await;
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(3)).await, Some(130));
    let text = bin.stderr();
    let at = |what: &str| {
        text.lines()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("{what:?} never written:\n{text}"))
    };
    let forced = at("second stop signal, exiting at once");
    assert!(at(" INFO tokend started ") < forced);
    assert!(at("stopping: letting in-flight refreshes finish") < forced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_flat_objects_with_one_type_per_field() {
    let env = env_with("log_format = \"json\"").await;
    let mut bin = env.spawn_binary(&[]);
    until_refreshed_and_reported(&env).await;
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(10)).await, Some(0));
    let text = bin.stderr();
    let mut types: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
    let mut events = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        assert!(!obj.contains_key("fields"), "fields not flattened: {line}");
        assert!(
            !obj.contains_key("span") && !obj.contains_key("spans"),
            "{line}"
        );
        let ts = obj["timestamp"].as_str().expect("timestamp");
        assert!(starts_with_rfc3339(ts), "{line}");
        for (k, val) in obj {
            let t = match val {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "bool",
                serde_json::Value::Number(_) => "number",
                serde_json::Value::String(_) => "string",
                serde_json::Value::Array(_) => "array",
                serde_json::Value::Object(_) => "object",
            };
            types
                .entry(k.clone())
                .or_default()
                .entry(t)
                .or_insert_with(|| line.to_owned());
        }
        events.push(v);
    }
    for (field, seen) in &types {
        assert_eq!(seen.len(), 1, "{field} has several JSON types: {seen:#?}");
    }
    let refresh = events
        .iter()
        .find(|e| e["message"] == "refresh" && e["account_id"] == "u")
        .unwrap_or_else(|| panic!("no refresh event in {text}"));
    assert!(refresh["next_action_at"].is_i64(), "{refresh}");
    assert!(refresh["latency_ms"].is_u64(), "{refresh}");
    assert_eq!(refresh["level"], "INFO");
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "ERROR" && e["account_id"] == "bad"),
        "{text}"
    );
}

/// One native-protocol entry: `NAME=value` lines, or `NAME`, a 64-bit length and the value.
fn parse_entry(mut data: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !data.is_empty() {
        let nl = data.iter().position(|&b| b == b'\n').expect("newline");
        let line = &data[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            data = &data[nl + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &data[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("length")) as usize;
            fields.insert(
                name,
                String::from_utf8_lossy(&rest[8..8 + len]).into_owned(),
            );
            assert_eq!(rest[8 + len], b'\n', "value not terminated");
            data = &rest[9 + len..];
        }
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_events_are_journal_entries_with_queryable_fields() {
    let env = env_with("log_level = \"info\"").await;
    let socket_path = env.dir.path().join("journal.socket");
    let journal = UnixDatagram::bind(&socket_path).expect("bind");
    // Read as journald does, while the daemon runs: a full queue would send entries to stderr.
    journal
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut entries = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match journal.recv(&mut buf) {
                    Ok(0) => {}
                    Ok(n) => entries.push(parse_entry(&buf[..n])),
                    Err(_) if stop.load(std::sync::atomic::Ordering::SeqCst) => return entries,
                    Err(_) => {}
                }
            }
        })
    };
    // stderr is this file, and JOURNAL_STREAM says so, as systemd sets it up.
    let log = env.dir.path().join("stream.log");
    let file = std::fs::File::create(&log).expect("log");
    let meta = file.metadata().expect("meta");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["--config", env.config_path.to_str().expect("path"), "run"])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("TOKEND_JOURNAL_SOCKET", &socket_path)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stderr(file)
        .spawn()
        .expect("spawn");
    until_refreshed_and_reported(&env).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(child.wait().expect("wait").success());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let entries = reader.join().expect("reader");

    assert!(!entries.is_empty(), "nothing reached the journal socket");
    for e in &entries {
        assert_eq!(
            e.get("SYSLOG_IDENTIFIER").map(String::as_str),
            Some("tokend")
        );
        assert!(
            e.contains_key("MESSAGE") && e.contains_key("PRIORITY"),
            "{e:?}"
        );
        assert!(!e["MESSAGE"].contains('\u{1b}'), "ANSI escape in {e:?}");
    }
    let refresh = entries
        .iter()
        .find(|e| {
            e.get("TOKEND_ACCOUNT_ID").map(String::as_str) == Some("u")
                && e["MESSAGE"].contains("refresh")
        })
        .unwrap_or_else(|| panic!("no refresh entry for u in {entries:#?}"));
    assert_eq!(refresh["PRIORITY"], "6");
    assert_eq!(refresh["TOKEND_PROFILE"], "factorial");
    assert_eq!(refresh["TOKEND_OUTCOME"], "refreshed");
    // The journal field keeps unix seconds; MESSAGE, the line journalctl shows, reads as time.
    let at: i64 = refresh["TOKEND_NEXT_ACTION_AT"].parse().expect("integer");
    let shown = tokend::clock::rfc3339(at);
    assert!(
        refresh["MESSAGE"].starts_with("INFO refresh account_id=u")
            && refresh["MESSAGE"].contains(&format!("next_action_at={shown}")),
        "{refresh:?}"
    );
    assert!(
        entries.iter().any(|e| e["PRIORITY"] == "3"
            && e.get("TOKEND_ACCOUNT_ID").map(String::as_str) == Some("bad")),
        "{entries:#?}"
    );
    // Nothing went twice: the stream carries no event lines.
    let stream = std::fs::read_to_string(&log).expect("log");
    assert!(stream.is_empty(), "events also on stderr: {stream}");
}
