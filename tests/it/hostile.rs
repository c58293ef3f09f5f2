//! Hostile input: arbitrary provider answers, Retry-After values and config files never panic
//! and never yield an impossible token; garbage rows never stop the other accounts.

use std::path::Path;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use rusqlite::params;
use secrecy::ExposeSecret;
use tokend::provider::{MAX_EXPIRES_IN, classify_refresh, parse_retry_after};
use tokend_mock::MockConfig;

use crate::helpers::{Env, eventually};

/// A fixed "now" for the pure parser tests (they never read a clock).
const NOW: i64 = 1_800_000_000;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or_default()),
        (NOW - 200_000..NOW + 200_000).prop_map(serde_json::Value::from),
        (-10i64..100_000_000).prop_map(serde_json::Value::from),
        // Integral floats and numeric strings, as some servers send expires_in and created_at.
        (-10i64..100_000_000).prop_map(|i| serde_json::Value::from(i as f64)),
        (NOW - 200_000..NOW + 200_000).prop_map(|i| serde_json::Value::from(i as f64)),
        "[ \t]{0,2}-?[0-9]{1,20}(\\.[0-9]{0,2})?[ \t]{0,2}".prop_map(serde_json::Value::from),
        // Token-like strings, and ones just too long to be a token.
        "[!-~]{1,64}".prop_map(serde_json::Value::from),
        "[a-f0-9]{4096,4097}".prop_map(serde_json::Value::from),
        ".{0,80}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop::collection::vec(inner, 0..4).prop_map(serde_json::Value::Array)
    })
}

/// A number in `range` as a JSON integer, an integral float or a padded numeric string, or any
/// other JSON value.
fn number_or_not(range: std::ops::Range<i64>) -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        range.clone().prop_map(serde_json::Value::from),
        range
            .clone()
            .prop_map(|i| serde_json::Value::from(i as f64)),
        range.prop_map(|i| serde_json::Value::from(format!(" {i} "))),
        json_value(),
    ]
}

fn token_body() -> impl Strategy<Value = Vec<u8>> {
    let keys = prop::sample::select(vec![
        "access_token",
        "refresh_token",
        "expires_in",
        "created_at",
        "scope",
        "token_type",
        "error",
        "x",
    ]);
    // Near misses of a real answer: each field absent, odd, or plausible, so that usable grants
    // (and every odd shape of them) come up often, not by luck.
    let token = || {
        prop::option::of(prop_oneof![
            "[!-~]{1,64}".prop_map(serde_json::Value::from),
            json_value()
        ])
    };
    let near_miss = (
        token(),
        token(),
        prop::option::of(number_or_not(-10..40_000_000)),
        prop::option::of(number_or_not(NOW - 200_000..NOW + 200_000)),
        prop::option::of(json_value()),
    )
        .prop_map(|(access, refresh, expires_in, created_at, scope)| {
            let fields = [
                ("access_token", access),
                ("refresh_token", refresh),
                ("expires_in", expires_in),
                ("created_at", created_at),
                ("scope", scope),
            ];
            let obj: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_owned(), v?)))
                .collect();
            serde_json::to_vec(&obj).unwrap_or_default()
        });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..300),
        1 => prop::collection::btree_map(keys, json_value(), 0..7).prop_map(|m| {
            let obj: serde_json::Map<String, serde_json::Value> =
                m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            serde_json::to_vec(&obj).unwrap_or_default()
        }),
        2 => near_miss,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn token_answers_never_panic_or_yield_impossible_expiry(status in prop_oneof![Just(200u16), 100u16..600], body in token_body()) {
        if let Ok(g) = classify_refresh(status, &body, None, NOW) {
            prop_assert_eq!(status, 200);
            prop_assert!(g.access_token.is_some() || g.refresh_token.is_some(), "a grant without a token");
            for t in [&g.access_token, &g.refresh_token].into_iter().flatten() {
                let t = t.expose_secret();
                prop_assert!(!t.is_empty() && t.len() <= 4096 && t.bytes().all(|b| b.is_ascii_graphic()));
            }
            prop_assert!((g.issued_at - NOW).abs() <= 86_400, "issued_at {} not within a day", g.issued_at);
            match (g.expires_in, g.expires_at()) {
                (Some(e), Some(at)) => {
                    prop_assert!((1..=MAX_EXPIRES_IN).contains(&e), "expires_in {}", e);
                    prop_assert!(at > NOW, "expiry {} not after now", at);
                    prop_assert!(g.expiry_problem.is_none());
                }
                (None, None) => prop_assert!(g.expiry_problem.is_some(), "unknown expiry without a reason"),
                other => prop_assert!(false, "expires_in and expires_at disagree: {:?}", other),
            }
        }
    }

    #[test]
    fn retry_after_never_panics_or_exceeds_an_hour(value in ".{0,64}") {
        if let Some(d) = parse_retry_after(&value, SystemTime::now()) {
            prop_assert!(d <= Duration::from_secs(3600));
        }
    }

    #[test]
    fn config_loader_never_panics(text in ".{0,400}") {
        let _ = tokend::config::Config::parse(Path::new("fuzz.toml"), &text);
    }

    #[test]
    fn config_loader_survives_plausible_keys(lines in prop::collection::vec(
        (prop::sample::select(vec!["[daemon]", "[[profile]]", "refresh_lead", "name", "client_id", "client_secret", "base_url", "lease", "max_concurrent_refreshes", "revocation_schedule", "environment"]),
         prop_oneof![Just("\"10m\"".to_owned()), Just("0".to_owned()), Just("\"p\"".to_owned()), ".{0,20}".prop_map(|s| format!("{s:?}"))]),
        0..12)) {
        let text: String = lines.iter().map(|(k, v)| if k.starts_with('[') { format!("{k}\n") } else { format!("{k} = {v}\n") }).collect();
        let _ = tokend::config::Config::parse(Path::new("fuzz.toml"), &text);
    }
}

/// Bad rows written by other programs are refused at the door (the STRICT table's types and
/// CHECKs), whatever else is in the table.
#[tokio::test(start_paused = true)]
async fn bad_rows_are_refused_at_their_own_insert() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("good", Duration::from_secs(4000));
    let conn = env.conn();
    let refused = [
        (
            "blob scopes",
            "INSERT INTO accounts (id, token_type, refresh_token, scopes) VALUES ('b1', 'user', 'r', x'00ff')",
        ),
        (
            "text failures",
            "INSERT INTO accounts (id, token_type, refresh_token, failures) VALUES ('b2', 'user', 'r', 'x')",
        ),
        (
            "blob refresh token",
            "INSERT INTO accounts (id, token_type, refresh_token) VALUES ('b3', 'user', x'deadbeef')",
        ),
        (
            "text expiry",
            "INSERT INTO accounts (id, token_type, refresh_token, expires_at) VALUES ('b4', 'user', 'r', 'soon')",
        ),
        (
            "unknown token type",
            "INSERT INTO accounts (id, token_type, refresh_token) VALUES ('b5', 'robot', 'r')",
        ),
        (
            "empty token type",
            "INSERT INTO accounts (id, token_type, refresh_token) VALUES ('b6', '', 'r')",
        ),
        (
            "empty id",
            "INSERT INTO accounts (id, token_type, refresh_token) VALUES ('', 'user', 'r')",
        ),
        (
            "padded id",
            "INSERT INTO accounts (id, token_type, refresh_token) VALUES (' padded ', 'user', 'r')",
        ),
        (
            "unknown state",
            "INSERT INTO accounts (id, token_type, refresh_token, state) VALUES ('b7', 'user', 'r', 'zombie')",
        ),
        (
            "negative failures",
            "INSERT INTO accounts (id, token_type, refresh_token, failures) VALUES ('b8', 'user', 'r', -1)",
        ),
        (
            "real expiry",
            "INSERT INTO accounts (id, token_type, refresh_token, expires_at) VALUES ('b9', 'user', 'r', 1.5)",
        ),
    ];
    for (what, sql) in refused {
        let err = conn.execute(sql, []).expect_err(what);
        let msg = err.to_string();
        assert!(
            msg.contains("constraint") || msg.contains("cannot store") || msg.contains("CHECK"),
            "{what}: {msg}"
        );
    }
    // And an update that would make a good row bad is refused too.
    assert!(
        conn.execute("UPDATE accounts SET scopes = x'00' WHERE id = 'good'", [])
            .is_err()
    );
    let daemon = env.start();
    eventually(
        Duration::from_secs(10),
        "the good account refreshed",
        || env.mock.account("good").grants == 1,
    )
    .await;
    daemon.stop().await;
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM accounts", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 1, "only the good row got in");
}

/// Rows that pass the door but make no sense are judged one by one: `invalid` with a reason,
/// or refreshed at once when only their expiry is odd; the others never notice.
#[tokio::test(start_paused = true)]
async fn odd_rows_are_judged_and_never_stop_the_others() {
    let env = Env::new(MockConfig::default(), "").await;
    let healthy: Vec<String> = (0..15).map(|i| format!("healthy-{i:02}")).collect();
    for id in &healthy {
        env.add_user(id, Duration::from_secs(3590));
    }
    let now = env.now();
    let conn = env.conn();
    let user = |id: &str, expires: Option<i64>, access: Option<&str>| {
        let t = env.mock.issue_user(id, Duration::from_secs(100));
        conn.execute(
            "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES (?1, 'factorial', 'user', ?2, ?3, ?4)",
            params![id, access.map(str::to_owned).unwrap_or(t.access_token), t.refresh_token, expires],
        )
        .expect("insert");
    };
    user("neg-expiry", Some(-5), None);
    user("year-9999", Some(253_402_300_799), None);
    user("no-expiry", None, None);
    user("empty-access", Some(now), Some(""));
    user("Case", Some(now + 10_000_000), None);
    user("case", Some(now + 10_000_000), None);
    // Inserted with no schedule at all: evaluated anyway.
    let t = env.mock.issue_user("null-next", Duration::from_secs(3590));
    conn.execute(
        "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at, next_action_at) VALUES ('null-next', 'factorial', 'user', ?1, ?2, ?3, NULL)",
        params![t.access_token, t.refresh_token, t.expires_at],
    )
    .expect("insert");
    for (id, ty, refresh, profile) in [
        ("no-refresh", "user", None, Some("factorial")),
        ("ghost-profile", "user", Some("r"), Some("nosuch")),
    ] {
        conn.execute(
            "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES (?1, ?2, ?3, 'a', ?4, 1)",
            params![id, profile, ty, refresh],
        )
        .expect("insert");
    }
    // Text that is not UTF-8 passes SQLite's type check (CAST of a blob): unreadable as a
    // token, so the row is isolated, and the 15 rows linked beside it go on.
    conn.execute(
        "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES ('bad-utf8', 'factorial', 'user', 'a', CAST(x'fffe41' AS TEXT), 1)",
        [],
    )
    .expect("insert");
    let company = env.mock.issue_company("company-with-refresh");
    conn.execute(
        "INSERT INTO accounts (id, token_type, access_token, refresh_token) VALUES ('company-with-refresh', 'company', ?1, 'stray-refresh-token')",
        params![company.access_token],
    )
    .expect("insert");

    let daemon = env.start();
    let odd_refreshed = [
        "neg-expiry",
        "year-9999",
        "no-expiry",
        "empty-access",
        "null-next",
    ];
    eventually(Duration::from_secs(15), "every row judged", || {
        env.conn()
            .query_row(
                "SELECT COUNT(*) FROM accounts WHERE next_action_at = 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n == 0)
            && healthy.iter().all(|id| env.mock.account(id).grants == 1)
            && odd_refreshed
                .iter()
                .all(|id| env.mock.account(id).grants == 1)
    })
    .await;
    daemon.stop().await;
    assert_eq!(
        env.mock.totals().lapses,
        0,
        "the healthy accounts never lapsed"
    );
    for id in healthy
        .iter()
        .map(String::as_str)
        .chain(odd_refreshed)
        .chain(["Case", "case", "company-with-refresh"])
    {
        assert_eq!(env.state(id), "active", "{id}");
    }
    for id in ["no-refresh", "ghost-profile", "bad-utf8"] {
        assert_eq!(env.state(id), "invalid", "{id:?}");
        assert!(
            env.reason(id).is_some_and(|r| !r.is_empty()),
            "{id:?} has no reason"
        );
    }
    // Distinct ids differing by case are distinct accounts with their own tokens.
    assert_ne!(env.tokens("Case").0, env.tokens("case").0);
    // The company row's stray refresh token is never used.
    assert_eq!(
        env.mock.account("company-with-refresh").grants
            + env.mock.account("company-with-refresh").errors,
        0
    );
    let (_, _, exp) = env.tokens("year-9999");
    assert!(
        exp.is_some_and(|e| e < env.now() + 86_400 * 400),
        "year-9999 kept its absurd expiry"
    );
    // `accounts list` shows them all, the invalid ones with their reason.
    let out = env.tokend(&["accounts", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ghost-profile") && text.contains("unknown profile"),
        "{text}"
    );
    assert!(env.reason("bad-utf8").is_some_and(|r| r.contains("UTF-8")));
}
