//! The mock over real loopback HTTP: redirects and the hostile host, faults on every endpoint,
//! work that outlives its client, the request log.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::LOCATION;
use serde_json::Value;
use tokend_mock::{Endpoint, EvilHost, Fault, MockConfig, MockProvider, Rotation};
use tokio::time::Instant;

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

/// Waits (through tokio's clock) until `cond` holds, failing after ten seconds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
    for e in [Endpoint::TokenInfo, Endpoint::Introspect, Endpoint::Revoke] {
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
        ]
    );

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

// ---- 4. Work that outlives its client --------------------------------

/// A request whose client gives up (timeout) before the answer is still processed: the grant
/// rotates once the delay has passed.
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
}

#[tokio::test]
async fn a_delay_fault_finishes_a_request_whose_client_left() {
    let takes = Duration::from_millis(800);
    let mock = immediate().await;
    mock.push_faults(Endpoint::Token, [Fault::Delay(takes)]);
    processed_after_client_left(&mock, takes).await;
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
