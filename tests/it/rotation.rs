//! Rotation safety I: what comes back from the provider is never lost, never leaked, never a
//! flood. Each test plays the hostile or unlucky provider an outside tester would.

use std::time::Duration;

use rusqlite::params;
use tokend_mock::{Endpoint, EvilHost, Fault, MockConfig, OddShape, Rotation};

use crate::helpers::{Env, checking, eventually};

const REDIRECTS: [u16; 5] = [301, 302, 303, 307, 308];

/// Append lines to the (last) profile of the environment's config.
fn profile_lines(env: &Env, lines: &str) {
    let mut text = std::fs::read_to_string(&env.config_path).expect("read");
    text.push_str(lines);
    std::fs::write(&env.config_path, text).expect("write");
}

#[tokio::test(start_paused = true)]
async fn a_redirect_from_the_token_endpoint_is_refused_and_pauses_the_profile() {
    for status in REDIRECTS {
        let evil = EvilHost::start().await.expect("evil host");
        let env = Env::new(MockConfig::default(), "").await;
        env.add_user("u", Duration::from_secs(4000));
        let before = env.tokens("u");
        env.mock.push_faults(
            Endpoint::Token,
            [Fault::Redirect {
                status,
                location: format!("{}/oauth/token", evil.url()),
            }],
        );
        let daemon = env.start();
        eventually(Duration::from_secs(10), "paused", || {
            env.state("u") == "paused"
        })
        .await;
        daemon.stop().await;
        assert_eq!(
            evil.count(),
            0,
            "{status}: the other host received {:?}",
            evil.requests()
        );
        assert_eq!(
            env.tokens("u"),
            before,
            "{status}: the stored tokens changed"
        );
        let reason = env.reason("u").unwrap_or_default();
        let host = evil.url().trim_start_matches("http://").to_owned();
        assert!(
            reason.contains(&format!("http {status}")) && reason.contains(&host),
            "{status}: the reason names neither the status nor the host: {reason}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_redirect_from_any_probe_is_refused_and_never_counts_as_active() {
    for (kind, endpoint) in [
        ("token_info", Endpoint::TokenInfo),
        ("introspect", Endpoint::Introspect),
        ("url", Endpoint::Me),
    ] {
        for status in REDIRECTS {
            let evil = EvilHost::start().await.expect("evil host");
            let env = Env::new(MockConfig::default(), "").await;
            let mut lines = format!("probe = \"{kind}\"\n");
            if kind == "url" {
                lines += &format!("probe_url = \"{}/api/me\"\n", env.mock.url());
            }
            profile_lines(&env, &lines);
            env.add_company("c");
            env.mock.push_faults(
                endpoint,
                [Fault::Redirect {
                    status,
                    location: format!("{}/anything", evil.url()),
                }],
            );
            let c = checking(&env).await;
            let run = c.checker.run_once().await.expect("ran");
            assert_eq!(run.active, 0, "{kind} {status}: counted as active: {run:?}");
            assert_eq!(evil.count(), 0, "{kind} {status}: {:?}", evil.requests());
            let (checked, error): (Option<i64>, Option<String>) = env
                .conn()
                .query_row(
                    "SELECT last_checked_at, last_error FROM accounts WHERE id = 'c'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .expect("row");
            assert_eq!(
                checked, None,
                "{kind} {status}: a redirect counted as a check"
            );
            assert!(
                error
                    .as_deref()
                    .is_some_and(|e| e.contains(&format!("http {status}"))),
                "{kind} {status}: {error:?}"
            );
            assert_ne!(env.state("c"), "revoked");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_redirect_from_the_revocation_endpoint_sends_nothing_elsewhere() {
    for status in REDIRECTS {
        let evil = EvilHost::start().await.expect("evil host");
        let env = Env::new(MockConfig::default(), "").await;
        env.add_user("u", Duration::from_secs(4000));
        env.mock.push_faults(
            Endpoint::Revoke,
            [Fault::Redirect {
                status,
                location: format!("{}/oauth/revoke", evil.url()),
            }],
        );
        let daemon = env.start();
        eventually(Duration::from_secs(10), "refreshed", || {
            env.mock.account("u").grants == 1
        })
        .await;
        eventually(Duration::from_secs(10), "revocation attempted", || {
            !env.mock.revoke_log().is_empty()
        })
        .await;
        daemon.stop().await;
        assert_eq!(evil.count(), 0, "{status}: {:?}", evil.requests());
        assert_eq!(
            env.state("u"),
            "active",
            "a failed revocation never touches the account"
        );
        let (access, refresh, _) = env.tokens("u");
        let (a, r) = env.mock.newest("u").expect("issued");
        assert_eq!((access, refresh), (Some(a), r));
    }
}

#[tokio::test(start_paused = true)]
async fn whatever_an_odd_200_rotated_is_stored_under_strict_rotation() {
    for shape in [
        OddShape::ExpiresInMissing,
        OddShape::ExpiresInString,
        OddShape::ExpiresInZero,
        OddShape::ExpiresInNegative,
        OddShape::ExpiresInHuge,
        OddShape::NoAccessToken,
        OddShape::EmptyAccessToken,
    ] {
        // A minimum gap of 10 s: the refresh after an answer without an access token comes
        // 9-10 s later, well after the test has looked at the first answer. (With 1 s it could
        // come within milliseconds, when the first was issued late in a second.)
        let env = Env::new(
            MockConfig {
                rotation: Rotation::Immediate,
                ..MockConfig::default()
            },
            "min_refresh_interval = \"10s\"",
        )
        .await;
        env.add_user("u", Duration::from_secs(3599));
        let (old_access, _, _) = env.tokens("u");
        env.mock
            .push_faults(Endpoint::Token, [Fault::Odd200(shape)]);
        let daemon = env.start();
        eventually(Duration::from_secs(10), "answered", || {
            env.mock.account("u").grants == 1
        })
        .await;
        let (_, newest_refresh) = env.mock.newest("u").expect("issued");
        eventually(
            Duration::from_secs(10),
            "the rotated refresh token stored",
            || env.tokens("u").1 == newest_refresh,
        )
        .await;
        let (access, _, expires_at) = env.tokens("u");
        match shape {
            OddShape::NoAccessToken | OddShape::EmptyAccessToken => {
                assert_eq!(access, old_access, "{shape:?}: the old access token stays");
                assert_eq!(env.state("u"), "failing", "{shape:?}");
                // Refreshed again after the minimum gap, normally this time.
                eventually(Duration::from_secs(30), "refreshed again", || {
                    env.mock.account("u").grants == 2 && env.state("u") == "active"
                })
                .await;
            }
            OddShape::ExpiresInString => {
                assert_eq!(env.state("u"), "active");
                let e = expires_at.expect("expiry");
                assert!((e - env.now() - 3600).abs() <= 2, "{shape:?}: expiry {e}");
            }
            _ => {
                assert_eq!(env.state("u"), "active", "{shape:?}");
                // Expiry unknown: the profile's default lifetime (1 h) stands in.
                let e = expires_at.expect("expiry");
                assert!((e - env.now() - 3600).abs() <= 2, "{shape:?}: expiry {e}");
            }
        }
        daemon.stop().await;
        // The chain is alive: the stored refresh token is the provider's current one.
        let t = env.mock.totals();
        assert_eq!(t.reuse_attempts, 0, "{shape:?}: {t:?}");
        assert_eq!(
            t.errors, 0,
            "{shape:?}: an invalid_grant means a lost grant: {t:?}"
        );
        let (_, stored, _) = env.tokens("u");
        assert!(
            env.mock
                .refresh_token_live(stored.as_deref().expect("refresh")),
            "{shape:?}: the stored refresh token is dead"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn short_lived_tokens_never_make_a_refresh_flood() {
    // Production lead and jitter (10 m + 2 m) against 5-second tokens: without the minimum
    // gap every refresh would be due at once.
    let env = Env::new(
        MockConfig {
            access_ttl: Duration::from_secs(5),
            ..MockConfig::default()
        },
        "refresh_lead = \"10m\"\nrefresh_jitter = \"2m\"\nmin_refresh_interval = \"60s\"\nmax_token_requests_per_hour = 30",
    )
    .await;
    for i in 0..3 {
        env.add_user(&format!("u{i}"), Duration::from_secs(10));
    }
    let daemon = env.start();
    tokio::time::sleep(Duration::from_secs(600)).await;
    daemon.stop().await;
    for i in 0..3 {
        let n = env.mock.account(&format!("u{i}")).grants;
        // One at start, then one a minute.
        assert!((9..=11).contains(&n), "u{i}: {n} refreshes in 10 minutes");
    }
}

#[tokio::test(start_paused = true)]
async fn the_hourly_ceiling_holds_whatever_the_provider_answers() {
    // Every answer rotates but carries no access token: tokend keeps each new refresh token and
    // retries after the minimum gap (1 s here). The ceiling, not the provider, ends it.
    let env = Env::new(
        MockConfig::default(),
        "min_refresh_interval = \"1s\"\nmax_token_requests_per_hour = 20",
    )
    .await;
    env.add_user("u", Duration::from_secs(3599));
    env.mock
        .add_random_fault(Endpoint::Token, 1.0, Fault::Odd200(OddShape::NoAccessToken));
    let start_ms = env.clock.now_ms();
    let daemon = env.start();
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    daemon.stop().await;
    let times: Vec<i64> = env
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::Token)
        .map(|r| r.ms - start_ms)
        .collect();
    // In every hour-long window from the first request: at most 20.
    for (i, t) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|u| **u < t + 3_600_000)
            .count();
        assert!(
            within <= 20,
            "{within} token requests within an hour of {t} ms"
        );
    }
    assert!(
        times.len() >= 20,
        "the ceiling was never reached: {}",
        times.len()
    );
    assert_eq!(env.mock.totals().errors, 0, "no grant was lost meanwhile");
    let (_, stored, _) = env.tokens("u");
    assert!(
        env.mock
            .refresh_token_live(stored.as_deref().expect("refresh"))
    );
}

/// The lease owner string of a process that is gone (its pid exited) on this host.
fn dead_owner() -> String {
    let mut child = std::process::Command::new("sleep")
        .arg("10")
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let start = stat[stat.rfind(')').expect(")") + 1..]
        .split_whitespace()
        .nth(19)
        .expect("field")
        .to_owned();
    child.kill().expect("kill");
    child.wait().expect("wait");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned();
    format!("{host}:{pid}:{start}:0badc0de")
}

/// Leave `id` as a process killed mid-refresh would: leased far into the future, an attempt
/// recorded.
fn left_in_flight(env: &Env, id: &str, owner: &str) {
    env.conn()
        .execute(
            "UPDATE accounts SET lease_owner = ?2, lease_until = ?3, attempt_id = 42, attempt_at = ?4 WHERE id = ?1",
            params![id, owner, env.now() + 3600, env.now()],
        )
        .expect("update");
}

/// What the dead process's request did at the server after it died: rotate the grant.
async fn rotate_behind_tokends_back(env: &Env, id: &str) {
    let (_, refresh, _) = env.tokens(id);
    let client = reqwest::Client::new();
    tokend::provider::install_crypto_provider();
    let r = client
        .post(format!("{}/oauth/token", env.mock.url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_deref().expect("refresh")),
            ("client_id", "mock-client"),
            ("client_secret", crate::helpers::SECRET),
        ])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_left_in_flight_by_a_dead_process_is_retried_first() {
    // revoke_on_use: the old refresh token still works, so the retry recovers the grant.
    let env = Env::new(MockConfig::default(), "lease = \"60s\"").await;
    env.add_user("u", Duration::from_secs(60));
    env.add_user("calm", Duration::from_secs(60));
    let daemon = env.start();
    eventually(Duration::from_secs(5), "evaluated", || {
        env.conn()
            .query_row(
                "SELECT COUNT(*) FROM accounts WHERE next_action_at > 1000",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n == 2)
    })
    .await;
    daemon.stop().await;
    rotate_behind_tokends_back(&env, "u").await;
    left_in_flight(&env, "u", &dead_owner());
    let daemon = env.start();
    // Retried at once, though its lease has an hour to run and it is not due for ~58 minutes.
    eventually(Duration::from_secs(3), "retried", || {
        env.mock.account("u").grants == 2
    })
    .await;
    daemon.stop().await;
    assert_eq!(env.state("u"), "active");
    assert_eq!(
        env.mock.account("calm").grants,
        0,
        "only the row left in flight"
    );
    let (_, stored, _) = env.tokens("u");
    assert!(
        env.mock
            .refresh_token_live(stored.as_deref().expect("refresh"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_rotation_lost_in_a_crash_is_named_as_such() {
    // immediate: the dead process's request rotated the grant and nobody heard the answer.
    let env = Env::new(
        MockConfig {
            rotation: Rotation::Immediate,
            ..MockConfig::default()
        },
        "lease = \"60s\"",
    )
    .await;
    env.add_user("crashed", Duration::from_secs(60));
    env.add_user("revoked", Duration::from_secs(60));
    let daemon = env.start();
    eventually(Duration::from_secs(5), "evaluated", || {
        env.conn()
            .query_row(
                "SELECT COUNT(*) FROM accounts WHERE next_action_at > 1000",
                [],
                |r| r.get::<_, i64>(0),
            )
            .is_ok_and(|n| n == 2)
    })
    .await;
    daemon.stop().await;
    rotate_behind_tokends_back(&env, "crashed").await;
    left_in_flight(&env, "crashed", &dead_owner());
    env.mock.revoke_account("revoked");
    // The revoked one is due now (as if its time came).
    env.conn()
        .execute(
            "UPDATE accounts SET expires_at = ?1 WHERE id = 'revoked'",
            [env.now() + 1],
        )
        .expect("due");
    let daemon = env.start();
    eventually(Duration::from_secs(5), "both need reauthorisation", || {
        env.state("crashed") == "needs_reauth" && env.state("revoked") == "needs_reauth"
    })
    .await;
    daemon.stop().await;
    let crashed = env.reason("crashed").unwrap_or_default();
    assert!(crashed.contains("rotation was lost"), "{crashed}");
    assert!(crashed.contains("0badc0de"), "names the process: {crashed}");
    assert_eq!(env.events("crashed", "rotation_lost").len(), 1);
    let revoked = env.reason("revoked").unwrap_or_default();
    assert!(!revoked.contains("rotation was lost"), "{revoked}");
    assert!(env.events("revoked", "rotation_lost").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_live_owners_lease_is_taken_over_only_after_the_lease_and_a_request_timeout() {
    let env = Env::new(
        MockConfig::default(),
        "lease = \"30s\"\nhttp_timeout = \"5s\"",
    )
    .await;
    env.add_user("u", Duration::from_secs(60));
    // Leased by a process that is alive (pid 1, with its own start time) for 20 more seconds.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned();
    let stat = std::fs::read_to_string("/proc/1/stat").expect("stat");
    let start = stat[stat.rfind(')').expect(")") + 1..]
        .split_whitespace()
        .nth(19)
        .expect("field")
        .to_owned();
    let owner = format!("{host}:1:{start}:11111111");
    let daemon = env.start();
    eventually(Duration::from_secs(2), "evaluated", || {
        env.conn()
            .query_row(
                "SELECT next_action_at FROM accounts WHERE id = 'u'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .is_ok_and(|n| n.is_some_and(|n| n > 1))
    })
    .await;
    // Now it expires in two seconds (a relink, as another program would write it), and another
    // live process holds it for 20 more seconds with a request in flight.
    let t0 = env.clock.now_ms();
    let lease_until = env.now() + 20;
    env.conn()
        .execute(
            "UPDATE accounts SET expires_at = ?1 WHERE id = 'u'",
            [env.now() + 2],
        )
        .expect("relink");
    left_in_flight(&env, "u", &owner);
    env.conn()
        .execute("UPDATE accounts SET lease_until = ?1", [lease_until])
        .expect("lease");
    eventually(Duration::from_secs(60), "taken over", || {
        env.mock.account("u").grants == 1
    })
    .await;
    daemon.stop().await;
    let at = env.mock.token_log()[0].0;
    assert!(
        at >= (lease_until + 5) * 1000,
        "presented {} ms after start, before the lease ({lease_until}) and a request timeout passed",
        at - t0
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_concurrency_keeps_a_serial_servers_queue_short_at_full_speed() {
    let service = Duration::from_millis(20);
    let env = Env::new(
        MockConfig {
            serial: Some(service),
            ..MockConfig::default()
        },
        "max_concurrent_refreshes = 32",
    )
    .await;
    const N: usize = 200;
    for i in 0..N {
        env.add_user(&format!("u{i:03}"), Duration::from_secs(3599));
    }
    let daemon = env.start();
    let t0 = tokio::time::Instant::now();
    eventually(Duration::from_secs(60), "all refreshed", || {
        env.mock.totals().grants as usize == N
    })
    .await;
    let took = t0.elapsed();
    daemon.stop().await;
    let t = env.mock.totals();
    let best = service * N as u32;
    eprintln!(
        "serial server, {N} refreshes: {took:?} (one at a time: {best:?}); at most {} queued there",
        t.max_queued
    );
    assert!(
        t.max_queued <= 6,
        "queued up to {} at a one-at-a-time server",
        t.max_queued
    );
    // Within 10 % of the best any fixed limit can do: a server that serves one at a time
    // finishes N requests in N service times at best, whatever is queued there.
    assert!(
        took.as_secs_f64() <= best.as_secs_f64() * 1.10,
        "took {took:?}; a server that serves one at a time needs {best:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn superseded_refresh_tokens_do_not_linger() {
    for revoke in [true, false] {
        let env = Env::with_profile(
            MockConfig {
                access_ttl: Duration::from_secs(6),
                ..MockConfig::default()
            },
            "",
            &format!("revoke_superseded = {revoke}\n"),
        )
        .await;
        for i in 0..5 {
            env.add_user(
                &format!("u{i}"),
                Duration::from_millis(fastrand::u64(0..5000)),
            );
        }
        let daemon = env.start();
        eventually(Duration::from_secs(60), "five rotations each", || {
            (0..5).all(|i| env.mock.account(&format!("u{i}")).grants >= 5)
        })
        .await;
        daemon.stop().await;
        // Background revocations have had their turn (they never block the account).
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..5 {
            let id = format!("u{i}");
            let usable = env.mock.usable_refresh_tokens(&id);
            if revoke {
                assert_eq!(usable, 1, "{id}: {usable} refresh tokens still usable");
            } else {
                assert!(
                    usable >= 5,
                    "{id}: without revocation the chain lingers ({usable})"
                );
            }
        }
        assert_eq!(env.mock.totals().errors, 0);
    }
}
