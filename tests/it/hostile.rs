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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_rows_are_judged_and_never_stop_the_others() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("good", Duration::from_secs(4000));
    let conn = env.conn();
    let user = |id: &str, expires: rusqlite::types::Value, access: Option<&str>| {
        let t = env.mock.issue_user(id, Duration::from_secs(100));
        conn.execute(
            "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at) VALUES (?1, 'factorial', 'user', ?2, ?3, ?4)",
            params![id, access.map(str::to_owned).unwrap_or(t.access_token), t.refresh_token, expires],
        )
        .expect("insert");
    };
    use rusqlite::types::Value::{Integer, Text};
    user("neg-expiry", Integer(-5), None);
    user("year-9999", Integer(253_402_300_799), None);
    user("text-expiry", Text("soon".into()), None);
    user("empty-access", Integer(NOW), Some(""));
    user("Case", Integer(4_000_000_000), None);
    user("case", Integer(4_000_000_000), None);
    for (id, ty) in [
        ("", "user"),
        (" padded ", "user"),
        ("robot", "robot"),
        ("blank-type", ""),
    ] {
        conn.execute(
            "INSERT INTO accounts (id, token_type, access_token, refresh_token, expires_at) VALUES (?1, ?2, 'a', 'r', 1)",
            params![id, ty],
        )
        .expect("insert");
    }
    let company = env.mock.issue_company("company-with-refresh");
    conn.execute(
        "INSERT INTO accounts (id, token_type, access_token, refresh_token) VALUES ('company-with-refresh', 'company', ?1, 'stray-refresh-token')",
        params![company.access_token],
    )
    .expect("insert");

    let daemon = env.start();
    eventually(Duration::from_secs(15), "every row judged", || {
        env.conn()
            .query_row(
                "SELECT COUNT(*) FROM accounts WHERE next_action_at = 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n == 0)
            && env.mock.account("good").grants == 1
            && ["neg-expiry", "year-9999", "text-expiry", "empty-access"]
                .iter()
                .all(|id| env.mock.account(id).grants == 1)
    })
    .await;
    daemon.stop().await;
    for id in [
        "good",
        "neg-expiry",
        "year-9999",
        "text-expiry",
        "empty-access",
        "Case",
        "case",
        "company-with-refresh",
    ] {
        assert_eq!(env.state(id), "active", "{id}");
    }
    for id in ["", " padded ", "robot", "blank-type"] {
        assert_eq!(env.state(id), "invalid", "{id:?}");
        let reason: Option<String> = env
            .conn()
            .query_row(
                "SELECT state_reason FROM accounts WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .expect("reason");
        assert!(
            reason.is_some_and(|r| !r.is_empty()),
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
        exp.is_some_and(|e| e < NOW + 86_400 * 400),
        "year-9999 kept its absurd expiry"
    );
}
