//! The refresh engine against the mock provider (issue: tokend core).

use std::time::Duration;

use rusqlite::params;
use tokend_mock::{Endpoint, Fault, MockConfig, Rotation};

use crate::helpers::{Env, eventually};

async fn keeps_tokens_alive(rotation: Rotation) {
    let env = Env::new(
        MockConfig {
            rotation,
            access_ttl: Duration::from_secs(6),
            ..MockConfig::default()
        },
        "",
    )
    .await;
    for i in 0..20 {
        env.add_user(
            &format!("u{i}"),
            Duration::from_millis(fastrand::u64(0..5000)),
        );
    }
    let daemon = env.start();
    // Three and a half lifetimes.
    tokio::time::sleep(Duration::from_secs(21)).await;
    daemon.stop().await;

    let t = env.mock.totals();
    assert_eq!(t.reuse_attempts, 0, "{t:?}");
    assert_eq!(t.lapses, 0, "{t:?}");
    assert!(
        env.mock.expired_now().is_empty(),
        "accounts left expired: {:?}",
        env.mock.expired_now()
    );
    for i in 0..20 {
        let id = format!("u{i}");
        let stats = env.mock.account(&id);
        assert!(
            stats.grants >= 3,
            "{id} refreshed only {} times",
            stats.grants
        );
        let (access, refresh, expires_at) = env.tokens(&id);
        let (mock_access, mock_refresh) = env.mock.newest(&id).expect("issued");
        assert_eq!(
            access.as_deref(),
            Some(mock_access.as_str()),
            "{id} access token"
        );
        assert_eq!(refresh, mock_refresh, "{id} refresh token");
        let exp = expires_at.expect("expiry");
        let stats_exp = stats.current_expiry_ms.expect("mock expiry") / 1000;
        assert!(
            (exp - stats_exp).abs() <= 1,
            "{id}: stored expiry {exp}, mock {stats_exp}"
        );
        assert_eq!(env.state(&id), "active");
    }
    // No request failed or went unattributed.
    for (_, status, account) in env.mock.token_log() {
        assert_eq!(status, 200);
        assert!(account.is_some());
    }
    let issued: i64 = env
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM accounts WHERE refresh_issued_at >= ?1 - 10",
            [env.now()],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(issued, 20, "refresh_issued_at follows each rotation");
}

#[tokio::test(start_paused = true)]
async fn keeps_tokens_alive_revoke_on_use() {
    keeps_tokens_alive(Rotation::RevokeOnUse).await;
}

#[tokio::test(start_paused = true)]
async fn keeps_tokens_alive_immediate() {
    keeps_tokens_alive(Rotation::Immediate).await;
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_inside_the_lead_window() {
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(8),
            ..MockConfig::default()
        },
        "refresh_lead = \"3s\"\nrefresh_jitter = \"1s\"",
    )
    .await;
    env.add_user("u", Duration::ZERO);
    let (_, _, first_expiry) = env.tokens("u");
    let daemon = env.start();
    eventually(Duration::from_secs(15), "first refresh", || {
        env.mock.account("u").grants >= 1
    })
    .await;
    daemon.stop().await;
    let (at_ms, status, _) = env.mock.token_log()[0];
    assert_eq!(status, 200);
    let expiry_ms = first_expiry.expect("expiry") * 1000;
    let before = expiry_ms - at_ms;
    // due = expiry - 3s - (0..=1s); the engine wakes at the start of that second.
    assert!(
        (1_000..=4_500).contains(&before),
        "refreshed {before} ms before expiry"
    );
}

#[tokio::test(start_paused = true)]
async fn rows_written_by_other_programs_are_picked_up_within_5s() {
    let env = Env::new(MockConfig::default(), "").await;
    let daemon = env.start();
    // Let the daemon settle into its idle sleep (nothing due for an hour).
    env.add_user("early", Duration::ZERO);
    eventually(Duration::from_secs(5), "early row scheduled", || {
        env.conn()
            .query_row(
                "SELECT next_action_at FROM accounts WHERE id='early'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n > 0)
    })
    .await;

    // A new row whose token has already expired.
    env.add_user("linked-later", Duration::from_secs(4000));
    let t0 = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), "new row refreshed", || {
        env.mock.account("linked-later").grants == 1
    })
    .await;
    let new_row = t0.elapsed();
    assert!(
        new_row <= Duration::from_millis(1_600),
        "a new row waited {new_row:?} (the README promises about a second)"
    );

    // An existing row updated with a grant that is about to expire.
    env.relink("early", Duration::from_secs(3597));
    let t0 = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), "updated row refreshed", || {
        env.mock.account("early").grants == 1
    })
    .await;
    let updated_row = t0.elapsed();
    assert!(
        updated_row <= Duration::from_millis(1_600),
        "an updated row waited {updated_row:?}"
    );
    daemon.stop().await;
    assert_eq!(env.mock.totals().reuse_attempts, 0);
    eprintln!("picked up a new row in {new_row:?}, an updated row in {updated_row:?}");
}

#[tokio::test(start_paused = true)]
async fn two_hundred_due_at_once_respect_the_concurrency_limit() {
    let env = Env::new(MockConfig::default(), "max_concurrent_refreshes = 8").await;
    {
        let conn = env.conn();
        for i in 0..200 {
            let id = format!("u{i:03}");
            let t = env.mock.issue_user(&id, Duration::from_secs(4000));
            conn.execute(
                "INSERT INTO accounts (id, token_type, access_token, refresh_token, expires_at)
                 VALUES (?1, 'user', ?2, ?3, ?4)",
                params![id, t.access_token, t.refresh_token, t.expires_at],
            )
            .expect("insert");
        }
    }
    // Hold each request a little so the limit is actually reached.
    env.mock.push_faults(
        Endpoint::Token,
        (0..200).map(|_| Fault::Delay(Duration::from_millis(40))),
    );
    let daemon = env.start();
    eventually(Duration::from_secs(30), "all 200 refreshed", || {
        env.mock.totals().grants >= 200
    })
    .await;
    daemon.stop().await;
    let t = env.mock.totals();
    assert_eq!(t.grants, 200, "{t:?}");
    assert!(t.max_in_flight <= 8, "max in flight {}", t.max_in_flight);
    assert!(
        t.max_in_flight >= 4,
        "the limit was never approached: {}",
        t.max_in_flight
    );
    assert_eq!(t.concurrent_same_account, 0);
    assert_eq!(t.reuse_attempts, 0);
    for i in 0..200 {
        assert_eq!(env.mock.account(&format!("u{i:03}")).grants, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn invalid_grant_needs_reauth_until_a_new_grant_is_written() {
    let env = Env::new(MockConfig::default(), "").await;
    env.add_user("dead", Duration::from_secs(4000));
    env.add_user("alive", Duration::from_secs(4000));
    env.mock.revoke_account("dead");
    let daemon = env.start();
    eventually(Duration::from_secs(10), "needs_reauth", || {
        env.state("dead") == "needs_reauth"
    })
    .await;
    eventually(Duration::from_secs(10), "other account refreshed", || {
        env.mock.account("alive").grants == 1
    })
    .await;
    let requests = env.mock.totals().token_requests;
    // No further attempts for the dead grant across several retry periods.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        env.mock.totals().token_requests,
        requests,
        "a dead grant was retried"
    );
    let (next, failures, last_error): (Option<i64>, i64, Option<String>) = env
        .conn()
        .query_row(
            "SELECT next_action_at, failures, last_error FROM accounts WHERE id='dead'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("row");
    assert_eq!(next, None, "nothing scheduled for a dead grant");
    assert_eq!(
        failures, 0,
        "a dead grant is not a run of transient failures"
    );
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("invalid_grant")),
        "{last_error:?}"
    );
    let events: i64 = env
        .conn()
        .query_row("SELECT COUNT(*) FROM account_events WHERE account_id='dead' AND to_state='needs_reauth'", [], |r| r.get(0))
        .expect("events");
    assert_eq!(events, 1);

    // Relink: a new grant written by another program brings it back.
    env.relink("dead", Duration::from_secs(3595));
    eventually(
        Duration::from_secs(10),
        "active again and refreshed",
        || env.state("dead") == "active" && env.mock.account("dead").grants == 1,
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn invalid_client_pauses_the_profile_and_a_fixed_secret_resumes_it() {
    let env = Env::new(MockConfig::default(), "").await;
    for i in 0..5 {
        env.add_user(&format!("u{i}"), Duration::from_secs(4000));
    }
    std::fs::write(env.secret_file(), "wrong-secret").expect("secret");
    let daemon = env.start();
    eventually(Duration::from_secs(10), "all paused", || {
        env.count_state("paused") == 5
    })
    .await;
    assert_eq!(env.count_state("needs_reauth"), 0);
    let requests = env.mock.totals().token_requests;
    assert!(requests <= 8, "a paused profile kept sending: {requests}");

    // Fix the secret and reload: one account probes, then all resume.
    std::fs::write(env.secret_file(), crate::helpers::SECRET).expect("secret");
    daemon.reload.send(()).await.expect("reload");
    eventually(Duration::from_secs(10), "all refreshed", || {
        env.mock.totals().grants == 5
    })
    .await;
    eventually(Duration::from_secs(5), "all active", || {
        env.count_state("active") == 5
    })
    .await;
    daemon.stop().await;
    assert_eq!(env.mock.totals().reuse_attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_retry_as_told_and_never_overwrite_a_good_token() {
    let env = Env::new(
        MockConfig::default(),
        "retry_initial = \"1s\"\nretry_max = \"2s\"",
    )
    .await;
    env.add_user("u", Duration::from_secs(3597));
    let before = env.tokens("u");
    let dated_ms = env.clock.now_ms() + 12_000;
    let dated = std::time::UNIX_EPOCH + Duration::from_millis(dated_ms as u64);
    env.mock.push_faults(
        Endpoint::Token,
        [
            Fault::Status {
                code: 503,
                retry_after: None,
            },
            Fault::Status {
                code: 429,
                retry_after: Some("3".into()),
            },
            Fault::Status {
                code: 503,
                retry_after: Some(httpdate::fmt_http_date(dated)),
            },
        ],
    );
    let daemon = env.start();
    eventually(Duration::from_secs(5), "failing after a 503", || {
        env.state("u") == "failing"
    })
    .await;
    assert_eq!(
        env.tokens("u"),
        before,
        "a failure overwrote the stored token"
    );
    eventually(
        Duration::from_secs(25),
        "refreshed after the faults",
        || env.mock.account("u").grants == 1,
    )
    .await;
    eventually(Duration::from_secs(5), "active", || {
        env.state("u") == "active"
    })
    .await;
    daemon.stop().await;
    let log = env.mock.token_log();
    assert_eq!(
        log.iter().map(|l| l.1).collect::<Vec<_>>(),
        vec![503, 429, 503, 200]
    );
    // The request after the 429 waited at least its Retry-After of 3 s.
    assert!(
        log[2].0 - log[1].0 >= 2_900,
        "retry after 429 came {} ms later",
        log[2].0 - log[1].0
    );
    // And the one after the HTTP-date Retry-After waited until (about) that date.
    // (An HTTP date has whole seconds.)
    let dated_whole = dated_ms / 1000 * 1000;
    assert!(
        log[3].0 >= dated_whole,
        "retry came {} ms before the Retry-After date",
        dated_whole - log[3].0
    );
    assert_eq!(env.mock.totals().reuse_attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_response_without_refresh_token_keeps_the_old_one() {
    let env = Env::new(
        MockConfig {
            omit_refresh_token: true,
            ..MockConfig::default()
        },
        "",
    )
    .await;
    env.add_user("u", Duration::from_secs(4000));
    let (old_access, old_refresh, _) = env.tokens("u");
    let daemon = env.start();
    eventually(Duration::from_secs(10), "refreshed", || {
        env.mock.account("u").grants == 1
    })
    .await;
    eventually(Duration::from_secs(5), "stored", || {
        env.tokens("u").0 != old_access
    })
    .await;
    daemon.stop().await;
    let (_, refresh, _) = env.tokens("u");
    assert_eq!(refresh, old_refresh);
    assert!(
        env.mock
            .refresh_token_live(refresh.as_deref().expect("refresh"))
    );
}
