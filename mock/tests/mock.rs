//! The mock over real loopback HTTP: redirects and the hostile host, odd 200s that rotate, the
//! serial queue and work that outlives its client, revocation books, `/api/me`, the request log.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{LOCATION, WWW_AUTHENTICATE};
use serde_json::Value;
use tokend_mock::{
    Endpoint, EvilHost, Fault, MockClock, MockConfig, MockProvider, OddShape, Rotation,
};
use tokio::time::Instant;

const HOUR: Duration = Duration::from_secs(3600);

async fn start(config: MockConfig) -> MockProvider {
    MockProvider::start(config).await.expect("start mock")
}

async fn immediate() -> MockProvider {
    start(MockConfig {
        rotation: Rotation::Immediate,
        ..MockConfig::default()
    })
    .await
}

/// A client builder for plain http on loopback.
fn builder() -> reqwest::ClientBuilder {
    // Only needed when the workspace build gives reqwest tokend's `rustls-no-provider` feature.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy()
}

/// A client that shows redirects instead of following them.
fn client() -> reqwest::Client {
    builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn refresh_request(
    client: &reqwest::Client,
    mock: &MockProvider,
    refresh: &str,
) -> reqwest::RequestBuilder {
    client.post(format!("{}/oauth/token", mock.url())).form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh),
        ("client_id", "mock-client"),
        ("client_secret", "mock-secret"),
    ])
}

async fn refresh(mock: &MockProvider, refresh: &str) -> (StatusCode, Value) {
    let r = refresh_request(&client(), mock, refresh)
        .send()
        .await
        .expect("refresh request");
    let status = r.status();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn revoke(mock: &MockProvider, token: &str, secret: &str) -> (StatusCode, String) {
    let r = client()
        .post(format!("{}/oauth/revoke", mock.url()))
        .form(&[
            ("token", token),
            ("client_id", "mock-client"),
            ("client_secret", secret),
        ])
        .send()
        .await
        .expect("revoke request");
    (r.status(), r.text().await.expect("revoke body"))
}

/// `GET /api/me`: (status, WWW-Authenticate, body).
async fn me(mock: &MockProvider, access: Option<&str>) -> (StatusCode, Option<String>, String) {
    let mut req = client().get(format!("{}/api/me", mock.url()));
    if let Some(a) = access {
        req = req.bearer_auth(a);
    }
    let r = req.send().await.expect("me request");
    let status = r.status();
    let auth = r
        .headers()
        .get(WWW_AUTHENTICATE)
        .map(|v| v.to_str().expect("ascii header").to_owned());
    (status, auth, r.text().await.expect("me body"))
}

/// Waits (through tokio's clock) until `cond` holds, failing after ten seconds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Under a paused clock: lets other tasks and I/O run, without letting time move, until `cond`
/// holds. (A task that yields is never idle, so tokio does not auto-advance the clock.)
async fn settle(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1_000_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never settled: {what}");
}

/// A mock clock that follows tokio's (possibly paused) clock.
fn tokio_clock() -> MockClock {
    let base = Instant::now();
    MockClock::new(move || 1_700_000_000_000 + base.elapsed().as_millis() as i64)
}

fn seeded_refresh(mock: &MockProvider, account: &str, age: Duration) -> String {
    mock.issue_user(account, age)
        .refresh_token
        .expect("user grants have a refresh token")
}

// ---- 1. Redirects -------------------------------------------------------------------------

#[tokio::test]
async fn a_redirect_carries_location_and_exchanges_nothing() {
    let mock = immediate().await;
    let evil = EvilHost::start().await.expect("evil host");
    let rt = seeded_refresh(&mock, "u", Duration::ZERO);
    let location = format!("{}/oauth/token", evil.url());
    for status in [301u16, 302, 303, 307, 308] {
        mock.push_faults(
            Endpoint::Token,
            [Fault::Redirect {
                status,
                location: location.clone(),
            }],
        );
        let r = refresh_request(&client(), &mock, &rt)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), status);
        assert_eq!(
            r.headers().get(LOCATION).and_then(|v| v.to_str().ok()),
            Some(location.as_str())
        );
        assert_eq!(
            r.bytes().await.expect("body").len(),
            0,
            "{status}: empty body"
        );
    }
    assert_eq!(mock.account("u").grants, 0);
    assert!(mock.refresh_token_live(&rt), "no exchange happened");
    assert_eq!(evil.count(), 0);
    let statuses: Vec<u16> = mock.token_log().iter().map(|l| l.1).collect();
    assert_eq!(statuses, vec![301, 302, 303, 307, 308]);
}

#[tokio::test]
async fn every_endpoint_takes_faults() {
    let mock = immediate().await;
    let issued = mock.issue_user("u", Duration::ZERO);
    let rt = issued.refresh_token.clone().expect("refresh");
    let location = "http://127.0.0.1:9/elsewhere".to_owned();
    for e in [
        Endpoint::TokenInfo,
        Endpoint::Introspect,
        Endpoint::Revoke,
        Endpoint::Me,
    ] {
        mock.push_faults(
            e,
            [Fault::Redirect {
                status: 302,
                location: location.clone(),
            }],
        );
    }
    let c = client();
    let url = mock.url();
    let creds = [
        ("token", rt.as_str()),
        ("client_id", "mock-client"),
        ("client_secret", "mock-secret"),
    ];
    let answers = [
        c.get(format!("{url}/oauth/token/info"))
            .bearer_auth(&issued.access_token)
            .send()
            .await,
        c.post(format!("{url}/oauth/introspect"))
            .form(&creds)
            .send()
            .await,
        c.post(format!("{url}/oauth/revoke"))
            .form(&creds)
            .send()
            .await,
        c.get(format!("{url}/api/me"))
            .bearer_auth(&issued.access_token)
            .send()
            .await,
    ];
    for r in answers {
        let r = r.expect("send");
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(
            r.headers().get(LOCATION).and_then(|v| v.to_str().ok()),
            Some(location.as_str())
        );
    }
    // The faulted revoke revoked nothing, and the faulted probes used nothing.
    assert!(mock.refresh_token_live(&rt));
    assert_eq!(mock.totals().revocations, 0);
    assert_eq!(mock.account("u").probes, 0);
    let logged: Vec<(Endpoint, u16)> = mock
        .requests()
        .iter()
        .map(|r| (r.endpoint, r.status))
        .collect();
    assert_eq!(
        logged,
        vec![
            (Endpoint::TokenInfo, 302),
            (Endpoint::Introspect, 302),
            (Endpoint::Revoke, 302),
            (Endpoint::Me, 302),
        ]
    );
    assert_eq!(mock.revoke_log().len(), 1);

    // Status faults too, and the endpoint works again once the queue is spent.
    mock.push_faults(
        Endpoint::Introspect,
        [Fault::Status {
            code: 503,
            retry_after: None,
        }],
    );
    let introspect = || {
        c.post(format!("{url}/oauth/introspect"))
            .form(&creds)
            .send()
    };
    assert_eq!(introspect().await.expect("send").status(), 503);
    let ok = introspect().await.expect("send");
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.expect("json");
    assert_eq!(body["active"], true);
}

// ---- 2. The hostile host ------------------------------------------------------------------

#[tokio::test]
async fn the_evil_host_answers_anything_and_records_it() {
    let mock = immediate().await;
    let evil = EvilHost::start().await.expect("evil host");
    let rt = seeded_refresh(&mock, "u", Duration::ZERO);
    mock.push_faults(
        Endpoint::Token,
        [Fault::Redirect {
            status: 307,
            location: format!("{}/oauth/token?from=mock", evil.url()),
        }],
    );
    // A careless client follows a 307 and re-sends its form, secret and all.
    let careless = builder().build().expect("client");
    let r = refresh_request(&careless, &mock, &rt)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["access_token"], "evil-access-1");
    assert_eq!(body["refresh_token"], "evil-refresh-1");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["active"], true);
    assert!(
        body["created_at"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000)
    );

    // Any method, any path.
    let r = careless
        .delete(format!("{}/some/where?x=1", evil.url()))
        .header("X-Probe", "yes")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["access_token"], "evil-access-2");

    assert_eq!(evil.count(), 2);
    let seen = evil.requests();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/oauth/token?from=mock");
    assert!(seen[0].body.contains(&format!("refresh_token={rt}")));
    assert!(seen[0].body.contains("client_secret=mock-secret"));
    assert!(
        seen[0]
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "application/x-www-form-urlencoded")
    );
    assert_eq!(seen[1].method, "DELETE");
    assert_eq!(seen[1].path, "/some/where?x=1");
    assert!(
        seen[1]
            .headers
            .iter()
            .any(|(k, v)| k == "x-probe" && v == "yes")
    );
    assert_eq!(seen[1].body, "");
    // The mock itself exchanged nothing.
    assert_eq!(mock.account("u").grants, 0);
}

// ---- 3. Odd 200s that really rotate -------------------------------------------------------

#[tokio::test]
async fn odd_200s_rotate_and_alter_one_thing() {
    let shapes = [
        OddShape::ExpiresInMissing,
        OddShape::ExpiresInString,
        OddShape::ExpiresInZero,
        OddShape::ExpiresInNegative,
        OddShape::ExpiresInHuge,
        OddShape::NoAccessToken,
        OddShape::EmptyAccessToken,
        OddShape::NoRefreshToken,
    ];
    for shape in shapes {
        let mock = immediate().await;
        // Seeded already expired: the grant is a lapse, booked as for a normal 200.
        let rt = seeded_refresh(&mock, "u", Duration::from_secs(4000));
        mock.push_faults(Endpoint::Token, [Fault::Odd200(shape)]);
        let (status, body) = refresh(&mock, &rt).await;
        assert_eq!(status, 200, "{shape:?}");
        let stats = mock.account("u");
        assert_eq!(stats.grants, 1, "{shape:?}");
        assert_eq!(stats.lapses, 1, "{shape:?}");
        assert_eq!(mock.totals().faults, 1, "{shape:?}");
        // Immediate mode: the presented refresh token is spent.
        assert!(!mock.refresh_token_live(&rt), "{shape:?}");
        assert_eq!(refresh(&mock, &rt).await.0, 400, "{shape:?}");

        let (new_access, new_refresh) = mock.newest("u").expect("newest");
        let new_refresh = new_refresh.expect("rotated");
        assert_ne!(new_refresh, rt);
        let expect_access = !matches!(shape, OddShape::NoAccessToken | OddShape::EmptyAccessToken);
        if expect_access {
            assert_eq!(body["access_token"], new_access.as_str(), "{shape:?}");
        }
        if shape != OddShape::NoRefreshToken {
            assert_eq!(body["refresh_token"], new_refresh.as_str(), "{shape:?}");
        }
        let map = body.as_object().expect("object");
        match shape {
            OddShape::ExpiresInMissing => assert!(!map.contains_key("expires_in")),
            OddShape::ExpiresInString => assert_eq!(body["expires_in"], "3600"),
            OddShape::ExpiresInZero => assert_eq!(body["expires_in"], 0),
            OddShape::ExpiresInNegative => assert_eq!(body["expires_in"], -5),
            OddShape::ExpiresInHuge => assert_eq!(body["expires_in"], 1_000_000_000_000i64),
            OddShape::NoAccessToken => assert!(!map.contains_key("access_token")),
            OddShape::EmptyAccessToken => assert_eq!(body["access_token"], ""),
            OddShape::NoRefreshToken => {
                assert!(!map.contains_key("refresh_token"));
                // The server did rotate: the new token exists, unknown to the client.
                assert!(mock.refresh_token_live(&new_refresh));
                assert_eq!(mock.usable_refresh_tokens("u"), 1);
            }
        }
        let alters_expiry = matches!(
            shape,
            OddShape::ExpiresInMissing
                | OddShape::ExpiresInString
                | OddShape::ExpiresInZero
                | OddShape::ExpiresInNegative
                | OddShape::ExpiresInHuge
        );
        if !alters_expiry {
            assert_eq!(body["expires_in"], 3600, "{shape:?}: untouched");
        }
        assert_eq!(body["token_type"], "Bearer", "{shape:?}: untouched");
    }
}

#[tokio::test]
async fn garbage_faults_still_answer_without_exchanging() {
    let mock = immediate().await;
    let rt = seeded_refresh(&mock, "u", Duration::ZERO);
    mock.push_faults(Endpoint::Token, [Fault::NoAccessToken, Fault::ExpiresIn(0)]);
    for _ in 0..2 {
        assert_eq!(refresh(&mock, &rt).await.0, 200);
    }
    assert_eq!(mock.account("u").grants, 0);
    assert!(mock.refresh_token_live(&rt));
}

// ---- 4. One request at a time; work that outlives its client --------------------------------

/// A request whose client gives up (timeout) before the answer is still processed: the grant
/// rotates once the service time has passed.
async fn processed_after_client_left(mock: &MockProvider, takes: Duration) {
    let rt = seeded_refresh(mock, "u", Duration::ZERO);
    let impatient = builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let sent = Instant::now();
    let err = refresh_request(&impatient, mock, &rt)
        .send()
        .await
        .expect_err("the client gives up first");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(mock.account("u").grants, 0, "not before the service time");
    eventually("the abandoned request to rotate", || {
        mock.account("u").grants == 1
    })
    .await;
    assert!(
        sent.elapsed() >= takes,
        "rotated after {:?}",
        sent.elapsed()
    );
    assert!(!mock.refresh_token_live(&rt));
    assert_eq!(mock.token_log().last().map(|l| l.1), Some(200));
    eventually("the request to leave the books", || mock.in_flight() == 0).await;
    assert_eq!(mock.queued(), 0);
}

#[tokio::test]
async fn serial_mode_finishes_a_request_whose_client_left() {
    let takes = Duration::from_millis(800);
    let mock = start(MockConfig {
        rotation: Rotation::Immediate,
        serial: Some(takes),
        ..MockConfig::default()
    })
    .await;
    processed_after_client_left(&mock, takes).await;
    assert_eq!(mock.totals().max_queued, 1);
}

#[tokio::test]
async fn a_delay_fault_finishes_a_request_whose_client_left() {
    let takes = Duration::from_millis(800);
    let mock = immediate().await;
    mock.push_faults(Endpoint::Token, [Fault::Delay(takes)]);
    processed_after_client_left(&mock, takes).await;
    assert_eq!(mock.totals().max_queued, 0, "not serial");
}

#[tokio::test(start_paused = true)]
async fn serial_mode_serves_token_revoke_and_introspect_one_at_a_time_in_arrival_order() {
    let clock = tokio_clock();
    let t0 = clock.now_ms();
    let mock = std::sync::Arc::new(
        start(MockConfig {
            serial: Some(Duration::from_secs(1)),
            clock,
            ..MockConfig::default()
        })
        .await,
    );
    let a = seeded_refresh(&mock, "a", Duration::ZERO);
    let b = seeded_refresh(&mock, "b", Duration::ZERO);
    let c = seeded_refresh(&mock, "c", Duration::ZERO);
    let url = mock.url();
    let form = |token: &str| {
        vec![
            ("token".to_owned(), token.to_owned()),
            ("client_id".to_owned(), "mock-client".to_owned()),
            ("client_secret".to_owned(), "mock-secret".to_owned()),
        ]
    };
    let token = tokio::spawn({
        let m = mock.clone();
        async move { refresh(&m, &a).await.0 }
    });
    settle("first queued", || mock.queued() == 1).await;
    let revoke = tokio::spawn({
        let (url, form) = (url.clone(), form(&b));
        async move {
            let r = client().post(format!("{url}/oauth/revoke")).form(&form);
            r.send().await.expect("revoke").status()
        }
    });
    settle("second queued", || mock.queued() == 2).await;
    let introspect = tokio::spawn({
        let (url, form) = (url.clone(), form(&c));
        async move {
            let r = client().post(format!("{url}/oauth/introspect")).form(&form);
            r.send().await.expect("introspect").status()
        }
    });
    settle("third queued", || mock.queued() == 3).await;
    // Nothing served yet: each takes a second of (paused) time.
    assert!(mock.requests().is_empty());
    assert_eq!(token.await.expect("join"), 200);
    assert_eq!(revoke.await.expect("join"), 200);
    assert_eq!(introspect.await.expect("join"), 200);
    assert_eq!(mock.totals().max_queued, 3);
    assert_eq!(mock.queued(), 0);

    let served: Vec<(Endpoint, Option<String>, i64)> = mock
        .requests()
        .into_iter()
        .map(|r| (r.endpoint, r.account, r.ms - t0))
        .collect();
    assert_eq!(
        served
            .iter()
            .map(|s| (s.0, s.1.clone()))
            .collect::<Vec<_>>(),
        vec![
            (Endpoint::Token, Some("a".to_owned())),
            (Endpoint::Revoke, Some("b".to_owned())),
            (Endpoint::Introspect, Some("c".to_owned())),
        ]
    );
    for (i, s) in served.iter().enumerate() {
        let due = 1000 * (i as i64 + 1);
        assert!(
            (due..due + 50).contains(&s.2),
            "request {i} served at +{} ms, not +{due}",
            s.2
        );
    }
}

// ---- 5. /api/me -----------------------------------------------------------------------------

fn invalid_token(description: &str) -> Option<String> {
    Some(format!(
        "Bearer realm=\"Doorkeeper\", error=\"invalid_token\", error_description=\"{description}\""
    ))
}

#[tokio::test]
async fn api_me_tells_valid_expired_revoked_and_unknown_apart() {
    let mock = start(MockConfig::default()).await;
    let live = mock.issue_user("live", Duration::ZERO);
    let (status, auth, body) = me(&mock, Some(&live.access_token)).await;
    assert_eq!(status, 200);
    assert_eq!(auth, None);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        serde_json::json!({"id": 4})
    );
    assert_eq!(mock.account("live").probes, 1);

    let expired = mock.issue_user("expired", HOUR + Duration::from_secs(1));
    assert_eq!(
        me(&mock, Some(&expired.access_token)).await,
        (
            StatusCode::UNAUTHORIZED,
            invalid_token("The access token expired"),
            String::new()
        )
    );
    assert_eq!(mock.account("expired").probes, 1);

    let revoked = mock.issue_user("revoked", Duration::ZERO);
    mock.revoke_account("revoked");
    assert_eq!(
        me(&mock, Some(&revoked.access_token)).await,
        (
            StatusCode::UNAUTHORIZED,
            invalid_token("The access token was revoked"),
            String::new()
        )
    );
    assert_eq!(mock.account("revoked").probes, 1);

    assert_eq!(
        me(&mock, Some("no-such-token")).await,
        (
            StatusCode::UNAUTHORIZED,
            invalid_token("The access token is invalid"),
            String::new()
        )
    );
    assert_eq!(
        me(&mock, None).await,
        (
            StatusCode::UNAUTHORIZED,
            invalid_token("The access token is invalid"),
            String::new()
        )
    );
    let logged: Vec<(u16, Option<String>)> = mock
        .requests()
        .into_iter()
        .inspect(|r| assert_eq!(r.endpoint, Endpoint::Me))
        .map(|r| (r.status, r.account))
        .collect();
    assert_eq!(
        logged,
        vec![
            (200, Some("live".to_owned())),
            (401, Some("expired".to_owned())),
            (401, Some("revoked".to_owned())),
            (401, None),
            (401, None),
        ]
    );
}

#[tokio::test]
async fn api_me_is_a_use_that_retires_the_previous_pair() {
    let mock = start(MockConfig::default()).await;
    let old = mock.issue_user("u", Duration::ZERO);
    let old_refresh = old.refresh_token.clone().expect("refresh");
    let (status, body) = refresh(&mock, &old_refresh).await;
    assert_eq!(status, 200);
    // Revoke on use: until the new access token is used, the old pair lives on.
    assert!(mock.refresh_token_live(&old_refresh));
    assert_eq!(me(&mock, Some(&old.access_token)).await.0, 200);
    let new_access = body["access_token"].as_str().expect("access");
    assert_eq!(me(&mock, Some(new_access)).await.0, 200);
    assert!(!mock.refresh_token_live(&old_refresh));
    assert_eq!(
        me(&mock, Some(&old.access_token)).await.1,
        invalid_token("The access token was revoked")
    );
    assert_eq!(refresh(&mock, &old_refresh).await.0, 400);
}

// ---- 6. Revocation books --------------------------------------------------------------------

/// Rotates `account` `n` times, each time with the newest refresh token, never using the new
/// access tokens. Returns the refresh tokens it superseded, oldest first.
async fn rotate(mock: &MockProvider, account: &str, first: &str, n: usize) -> Vec<String> {
    let mut superseded = Vec::new();
    let mut current = first.to_owned();
    for _ in 0..n {
        let (status, body) = refresh(mock, &current).await;
        assert_eq!(status, 200);
        superseded.push(current);
        current = body["refresh_token"].as_str().expect("refresh").to_owned();
    }
    assert_eq!(mock.newest(account).and_then(|n| n.1), Some(current));
    superseded
}

#[tokio::test]
async fn revoke_on_use_keeps_every_unused_rotation_usable_until_revoked() {
    let mock = start(MockConfig::default()).await;
    let first = seeded_refresh(&mock, "u", Duration::ZERO);
    let other = seeded_refresh(&mock, "other", Duration::ZERO);
    assert_eq!(mock.usable_refresh_tokens("u"), 1);
    let superseded = rotate(&mock, "u", &first, 3).await;
    assert_eq!(mock.usable_refresh_tokens("u"), 4);
    assert_eq!(mock.usable_refresh_tokens("other"), 1);
    assert_eq!(mock.usable_refresh_tokens("nobody"), 0);

    for old in &superseded {
        assert_eq!(
            revoke(&mock, old, "mock-secret").await,
            (StatusCode::OK, "{}".to_owned())
        );
    }
    assert_eq!(mock.usable_refresh_tokens("u"), 1);
    for old in &superseded {
        assert_eq!(refresh(&mock, old).await.0, 400, "revoked");
    }
    assert_eq!(mock.account("u").revocations, 3);

    // Wrong client: refused, not counted, still logged.
    assert_eq!(
        revoke(&mock, &other, "wrong").await.0,
        StatusCode::FORBIDDEN
    );
    assert!(mock.refresh_token_live(&other));
    // An unknown token: 200 all the same, counted in the totals only.
    assert_eq!(revoke(&mock, "no-such-token", "mock-secret").await.0, 200);
    assert_eq!(mock.account("other").revocations, 0);
    assert_eq!(mock.totals().revocations, 4);
    let log: Vec<(u16, Option<String>)> = mock
        .revoke_log()
        .into_iter()
        .map(|(_, s, a)| (s, a))
        .collect();
    let u = Some("u".to_owned());
    assert_eq!(
        log,
        vec![
            (200, u.clone()),
            (200, u.clone()),
            (200, u),
            (403, Some("other".to_owned())),
            (200, None),
        ]
    );
}

#[tokio::test]
async fn revoke_on_use_a_use_retires_only_the_pair_before() {
    let mock = start(MockConfig::default()).await;
    let first = seeded_refresh(&mock, "u", Duration::ZERO);
    rotate(&mock, "u", &first, 2).await;
    assert_eq!(mock.usable_refresh_tokens("u"), 3);
    let (newest_access, _) = mock.newest("u").expect("newest");
    assert_eq!(me(&mock, Some(&newest_access)).await.0, 200);
    assert_eq!(mock.usable_refresh_tokens("u"), 2);
    assert!(
        mock.refresh_token_live(&first),
        "two rotations back: still live"
    );
}

#[tokio::test]
async fn immediate_rotation_leaves_one_usable_token() {
    let mock = immediate().await;
    let first = seeded_refresh(&mock, "u", Duration::ZERO);
    rotate(&mock, "u", &first, 3).await;
    assert_eq!(mock.usable_refresh_tokens("u"), 1);
    let (_, newest) = mock.newest("u").expect("newest");
    let newest = newest.expect("refresh");
    assert_eq!(revoke(&mock, &newest, "mock-secret").await.0, 200);
    assert_eq!(mock.usable_refresh_tokens("u"), 0);
    assert_eq!(mock.account("u").revocations, 1);
}

#[tokio::test]
async fn usable_refresh_tokens_respects_refresh_ttl() {
    let week = Duration::from_secs(7 * 24 * 3600);
    let mock = start(MockConfig {
        refresh_ttl: Some(week),
        ..MockConfig::default()
    })
    .await;
    let stale = seeded_refresh(&mock, "stale", week + Duration::from_secs(60));
    let fresh = seeded_refresh(&mock, "fresh", week - Duration::from_secs(60));
    assert_eq!(mock.usable_refresh_tokens("stale"), 0);
    assert_eq!(mock.usable_refresh_tokens("fresh"), 1);
    assert_eq!(refresh(&mock, &stale).await.0, 400);
    assert_eq!(refresh(&mock, &fresh).await.0, 200);
}

#[tokio::test]
async fn revoking_by_refresh_token_after_its_access_token_expired_revokes_nothing() {
    let mock = start(MockConfig::default()).await;
    let rt = seeded_refresh(&mock, "u", HOUR + Duration::from_secs(1));
    assert_eq!(
        revoke(&mock, &rt, "mock-secret").await,
        (StatusCode::OK, "{}".to_owned())
    );
    // Doorkeeper 5.5: 200, counted as a call, but the refresh token still works.
    assert_eq!(mock.account("u").revocations, 1);
    assert_eq!(mock.usable_refresh_tokens("u"), 1);
    assert_eq!(refresh(&mock, &rt).await.0, 200);
}

// ---- 7. The request log ---------------------------------------------------------------------

#[tokio::test]
async fn the_request_log_names_endpoint_status_and_account() {
    let mock = immediate().await;
    let a = mock.issue_user("a", Duration::ZERO);
    let b_refresh = seeded_refresh(&mock, "b", Duration::ZERO);
    let a_refresh = a.refresh_token.clone().expect("refresh");
    let c = client();
    let info = c
        .get(format!("{}/oauth/token/info", mock.url()))
        .bearer_auth(&a.access_token)
        .send()
        .await
        .expect("info");
    assert_eq!(info.status(), 200);
    assert_eq!(refresh(&mock, &a_refresh).await.0, 200);
    // The spent token still names its account.
    assert_eq!(refresh(&mock, &a_refresh).await.0, 400);
    mock.push_faults(Endpoint::Token, [Fault::Drop]);
    let dropped = match refresh_request(&c, &mock, &b_refresh).send().await {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(dropped, "the answer was cut");
    assert_eq!(mock.account("b").grants, 0);
    assert_eq!(revoke(&mock, &b_refresh, "mock-secret").await.0, 200);
    let log: Vec<(Endpoint, u16, Option<String>)> = mock
        .requests()
        .into_iter()
        .map(|r| (r.endpoint, r.status, r.account))
        .collect();
    let (a, b) = (Some("a".to_owned()), Some("b".to_owned()));
    assert_eq!(
        log,
        vec![
            (Endpoint::TokenInfo, 200, a.clone()),
            (Endpoint::Token, 200, a.clone()),
            (Endpoint::Token, 400, a),
            (Endpoint::Token, 0, b.clone()),
            (Endpoint::Revoke, 200, b),
        ]
    );
    let times: Vec<i64> = mock.requests().iter().map(|r| r.ms).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // token_log keeps its old shape: the dead token is not attributed there.
    let token_log: Vec<(u16, Option<String>)> = mock
        .token_log()
        .into_iter()
        .map(|(_, s, a)| (s, a))
        .collect();
    assert_eq!(token_log[1], (400, None));
}
