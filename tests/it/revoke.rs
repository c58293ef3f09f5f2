//! `accounts remove --revoke` (and the daemon's `DELETE /v1/accounts/{id}?revoke=true`, which
//! the command asks when the daemon runs) against Doorkeeper 5.5's revocation: a refresh token
//! whose access token has expired is "revoked" with `200 {}` and keeps working, and under
//! `revoke_on_use` a refreshed pair's predecessor works until the new access token is used.
//! Afterwards the mock must count no usable refresh token for the account, in both rotation
//! modes, or nothing is removed.

use std::time::Duration;

use rusqlite::params;
use tokend_mock::{Endpoint, Fault, MockConfig, Rotation};

use crate::helpers::{Env, eventually};
use crate::operator::{assert_no_token, column, exists, mark_needs_reauth, said};

const ROTATIONS: [Rotation; 2] = [Rotation::Immediate, Rotation::RevokeOnUse];

/// Old enough that its one-hour access token expired an hour ago.
const EXPIRED: Duration = Duration::from_secs(2 * 3600);

fn mock(rotation: Rotation) -> MockConfig {
    MockConfig {
        rotation,
        ..MockConfig::default()
    }
}

/// Every token the mock issued for `id` that the row or the mock's newest pair names, and `seen`.
fn all_tokens(env: &Env, id: &str, seen: &[Option<String>]) -> Vec<String> {
    let newest = env.mock.newest(id).map(|(a, r)| [Some(a), r]);
    seen.iter()
        .cloned()
        .chain(newest.into_iter().flatten())
        .flatten()
        .collect()
}

/// `remove u --revoke` said it revoked the grant, the row is gone, the refresh made first was
/// the only one, no refresh token of `u` works at the provider, and no token was printed.
fn assert_removed_after_one_refresh(
    env: &Env,
    rotation: Rotation,
    out: &std::process::Output,
    seen: &[Option<String>],
) {
    let (stdout, stderr) = said(out);
    assert_eq!(out.status.code(), Some(0), "{rotation:?}: {stdout}{stderr}");
    assert_eq!(
        stdout.trim(),
        "removed u (its grant revoked at the provider)"
    );
    assert!(!exists(env, "u"));
    assert_eq!(
        env.mock.usable_refresh_tokens("u"),
        0,
        "{rotation:?}: a refresh token of the removed account still works at the provider"
    );
    assert_eq!(env.mock.account("u").grants, 1, "{rotation:?}: one refresh");
    assert_no_token(
        "remove --revoke",
        &(stdout + &stderr),
        &all_tokens(env, "u", seen),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_daemon_an_expired_grant_is_refreshed_used_and_revoked() {
    for rotation in ROTATIONS {
        let env = Env::new(mock(rotation), "").await;
        env.add_user("u", EXPIRED);
        let (a, r, _) = env.tokens("u");
        assert_eq!(env.mock.usable_refresh_tokens("u"), 1);

        let out = env.tokend(&["accounts", "remove", "u", "--revoke"]);
        assert_removed_after_one_refresh(&env, rotation, &out, &[a, r]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_daemon_an_expired_grant_is_refreshed_used_and_revoked() {
    for rotation in ROTATIONS {
        // A token endpoint that failed while the access token expired (the account is left
        // `failing`, with its expired pair); the long backoff keeps the daemon from retrying it
        // before the operator removes it.
        let env = Env::new(mock(rotation), "retry_initial = \"1h\"\nretry_max = \"1h\"").await;
        env.add_user("u", EXPIRED);
        let (a, r, _) = env.tokens("u");
        env.mock.push_faults(
            Endpoint::Token,
            [Fault::Status {
                code: 503,
                retry_after: None,
            }],
        );
        let daemon = env.start();
        eventually(
            Duration::from_secs(10),
            "the daemon's refresh failed",
            || env.state("u") == "failing",
        )
        .await;
        eventually(Duration::from_secs(10), "socket up", || {
            std::os::unix::net::UnixStream::connect(env.dir.path().join("api.sock")).is_ok()
        })
        .await;
        assert_eq!(env.tokens("u").1, r, "the daemon stored a new pair");

        let out = env
            .tokend_async(&["accounts", "remove", "u", "--revoke"])
            .await;
        assert_removed_after_one_refresh(&env, rotation, &out, &[a, r]);
        daemon.stop().await;
    }
}

/// Under `revoke_on_use`, a pair whose rotation was not followed by a revocation of its
/// predecessor (`revoke_superseded = false` here; a failed revocation does the same) leaves two
/// usable refresh tokens: revoking the stored one alone leaves the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_grant_whose_predecessor_still_works_is_used_before_it_is_revoked() {
    let env = Env::with_profile(
        mock(Rotation::RevokeOnUse),
        "",
        "revoke_superseded = false\n",
    )
    .await;
    env.add_user("u", Duration::from_secs(40 * 60));
    let out = env.tokend(&["accounts", "refresh", "u"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    assert_eq!(env.mock.usable_refresh_tokens("u"), 2);

    let out = env.tokend(&["accounts", "remove", "u", "--revoke"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    assert!(!exists(&env, "u"));
    assert_eq!(env.mock.usable_refresh_tokens("u"), 0);
    assert_eq!(env.mock.account("u").grants, 1, "no second refresh");
}

/// A grant the provider already rejects leaves nothing to revoke: the row goes, and the answer
/// says that nothing was revoked, and why, instead of claiming a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_the_provider_already_rejects_is_removed_saying_nothing_was_revoked() {
    let env = Env::new(MockConfig::default(), "").await;
    // Revoked by an administrator at the provider; tokend finds out with the refresh it needs.
    env.add_user("dead", EXPIRED);
    env.mock.revoke_account("dead");
    let out = env.tokend(&["accounts", "remove", "dead", "--revoke"]);
    let (stdout, stderr) = said(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!exists(&env, "dead"));
    assert!(
        stdout.starts_with("removed dead (nothing revoked: ") && stdout.contains("invalid_grant"),
        "{stdout}"
    );
    assert!(!stdout.contains("revoked at the provider"), "{stdout}");
    assert_eq!(env.mock.account("dead").revocations, 0);

    // Already known dead (needs_reauth): nothing is asked of the provider at all.
    env.add_user("reauth", EXPIRED);
    env.mock.revoke_account("reauth");
    mark_needs_reauth(&env, "reauth");
    let requests = env.mock.requests().len();
    let out = env.tokend(&["accounts", "remove", "reauth", "--revoke"]);
    let (stdout, stderr) = said(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!exists(&env, "reauth"));
    assert!(
        stdout.starts_with("removed reauth (nothing revoked: ") && stdout.contains("needs_reauth"),
        "{stdout}"
    );
    assert_eq!(env.mock.requests().len(), requests, "a request went out");
}

/// The refresh a revocation needs is refused, or a step after it fails: nothing is removed, the
/// message says which step, and a pair already received stays stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_or_a_failed_step_removes_nothing_and_says_which() {
    let env = Env::new(MockConfig::default(), "max_token_requests_per_hour = 1").await;
    env.add_user("capped", EXPIRED);
    env.conn()
        .execute(
            "UPDATE accounts SET window_start = ?1, window_requests = 1 WHERE id = 'capped'",
            params![env.now()],
        )
        .expect("window");
    let before = env.tokens("capped");
    let out = env.tokend(&["accounts", "remove", "capped", "--revoke"]);
    let (stdout, stderr) = said(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("not removed")
            && stderr.contains("refresh")
            && stderr.contains("not before"),
        "{stderr}"
    );
    assert!(exists(&env, "capped"));
    assert_eq!(env.tokens("capped"), before);
    assert_eq!(env.mock.totals().token_requests, 0);
    assert!(env.mock.revoke_log().is_empty(), "a revocation was sent");

    // The new access token cannot be used (the provider fails): the refreshed pair is stored,
    // nothing is revoked or removed; the next try starts from the stored pair.
    env.add_user("u", EXPIRED);
    let (a, r, _) = env.tokens("u");
    env.mock.push_faults(
        Endpoint::TokenInfo,
        [Fault::Status {
            code: 503,
            retry_after: None,
        }],
    );
    let out = env.tokend(&["accounts", "remove", "u", "--revoke"]);
    let (stdout, stderr) = said(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("not removed") && stderr.contains("access token") && stderr.contains("503"),
        "{stderr}"
    );
    assert!(exists(&env, "u"));
    let newest = env.mock.newest("u").expect("refreshed");
    assert_eq!(env.tokens("u").1, newest.1, "the new pair is not stored");
    assert!(column(&env, "u", "expires_at").is_some_and(|e| e > env.now()));
    assert!(
        env.mock
            .refresh_token_live(newest.1.as_deref().expect("rotated")),
        "the stored refresh token was revoked"
    );
    assert_no_token(
        "remove --revoke",
        &(stdout + &stderr),
        &all_tokens(&env, "u", &[a, r]),
    );

    let out = env.tokend(&["accounts", "remove", "u", "--revoke"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", said(&out));
    assert!(!exists(&env, "u"));
    assert_eq!(env.mock.usable_refresh_tokens("u"), 0);
    assert_eq!(env.mock.account("u").grants, 1, "refreshed again");
}

/// Another program relinks the account while its grant is being revoked: the row no longer holds
/// the revoked pair, so it is not deleted yet; the new grant is revoked in turn, then the row
/// goes. No grant of the account is left usable at the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relink_during_the_revocation_is_revoked_in_turn() {
    let env = Env::new(MockConfig::default(), "").await;
    // A live pair: no refresh first; the use, then the revocation (held 1 s at the provider,
    // within the 2 s request timeout).
    env.add_user("u", Duration::ZERO);
    env.mock
        .push_faults(Endpoint::Revoke, [Fault::Delay(Duration::from_secs(1))]);
    let remove = env.tokend_async(&["accounts", "remove", "u", "--revoke"]);
    let relink = async {
        eventually(Duration::from_secs(10), "the access token used", || {
            env.mock
                .requests()
                .iter()
                .any(|r| r.endpoint == Endpoint::TokenInfo && r.account.as_deref() == Some("u"))
        })
        .await;
        // While the revocation is held: a new grant, written as another program would.
        env.relink("u", Duration::ZERO);
        assert_eq!(env.mock.usable_refresh_tokens("u"), 2, "two grants live");
    };
    let (out, ()) = tokio::join!(remove, relink);
    let (stdout, stderr) = said(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!exists(&env, "u"));
    assert_eq!(
        env.mock.usable_refresh_tokens("u"),
        0,
        "a grant of the removed account still works at the provider"
    );
    assert_eq!(
        env.mock.revoke_log().len(),
        2,
        "one revocation per grant: {:?}",
        env.mock.revoke_log()
    );
}
