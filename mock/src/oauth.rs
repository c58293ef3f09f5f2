//! What every Doorkeeper endpoint shares (request parameters, error answers, fault handling),
//! and the two client-credential endpoints: introspect and revoke.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::books::{Inner, lock};
use crate::faults::{Endpoint, Fault, answer_fault, leaves_no_answer};
use crate::provider::AppState;
use crate::serve::carry_out;

pub(crate) fn params(
    headers: &HeaderMap,
    query: Option<String>,
    body: &Bytes,
) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = query
        .as_deref()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(body) {
            for (k, v) in m {
                if let Some(s) = v.as_str() {
                    out.insert(k, s.to_owned());
                }
            }
        }
    } else if let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body) {
        out.extend(form);
    }
    out
}

pub(crate) const INVALID_GRANT: &str = "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client.";
pub(crate) const INVALID_CLIENT: &str = "Client authentication failed due to unknown client, no client authentication included, or unsupported authentication method.";

pub(crate) fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = serde_json::json!({"error": error, "error_description": description});
    let mut r = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer realm=\"Doorkeeper\", error=\"{error}\", error_description=\"{description}\""
    )) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

pub(crate) fn json_200(body: serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// Draws `endpoint`'s fault for a request presenting `token`: answers the fault if it replaces
/// the work, else carries out `work` (serially if `queued` and the server is serial). Either way
/// the answer goes into the request log.
pub(crate) async fn handle<W>(
    state: AppState,
    endpoint: Endpoint,
    token: Option<&str>,
    queued: bool,
    work: W,
) -> Response
where
    W: FnOnce(&mut Inner) -> Response + Send + 'static,
{
    let (fault, account, now_s) = {
        let mut g = lock(&state.inner);
        let account = token.and_then(|t| g.token_account(t));
        (g.take_fault(endpoint), account, g.now_ms() / 1000)
    };
    let delay = match fault {
        Some(f) if !f.does_the_work() => {
            return answer_logged(&state, endpoint, account, f, now_s).await;
        }
        Some(Fault::Delay(d)) => Some(d),
        _ => None,
    };
    let st = state.clone();
    carry_out(&state, queued, delay, move || {
        let mut g = lock(&st.inner);
        let r = work(&mut g);
        g.log_request(endpoint, r.status().as_u16(), account);
        r
    })
    .await
}

/// Answers a fault that replaces the work, and logs it: on arrival if it will never answer
/// (the client may be gone before it would), else when answered.
pub(crate) async fn answer_logged(
    state: &AppState,
    endpoint: Endpoint,
    account: Option<u32>,
    fault: Fault,
    now_s: i64,
) -> Response {
    let silent = leaves_no_answer(&fault);
    if silent {
        lock(&state.inner).log_request(endpoint, 0, account);
    }
    let r = answer_fault(fault, now_s).await;
    if !silent {
        lock(&state.inner).log_request(endpoint, r.status().as_u16(), account);
    }
    r
}

pub(crate) fn invalid_token() -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({
            "error": "invalid_token",
            "error_description": "The access token is invalid",
            "state": "unauthorized"
        })),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            "Bearer realm=\"Doorkeeper\", error=\"invalid_token\", error_description=\"The access token is invalid\"",
        ),
    );
    r
}

fn client_ok(g: &Inner, p: &HashMap<String, String>) -> bool {
    p.get("client_id") == Some(&g.config.client_id)
        && p.get("client_secret").is_some_and(|s| g.secret_ok(s))
}

pub(crate) async fn introspect(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(&headers, query, &body);
    let token = p.get("token").cloned();
    handle(
        state,
        Endpoint::Introspect,
        token.as_deref(),
        true,
        move |g| introspect_answer(g, &p),
    )
    .await
}

fn introspect_answer(g: &Inner, p: &HashMap<String, String>) -> Response {
    if !p.contains_key("client_id") && !p.contains_key("client_secret") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request is missing a required parameter, includes an unsupported parameter value, or is otherwise malformed.",
        );
    }
    if !client_ok(g, p) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", INVALID_CLIENT);
    }
    let now = g.now_ms();
    let token = p.get("token").cloned().unwrap_or_default();
    // A refresh token introspects as its access token's record.
    let access = g.by_refresh.get(&token).cloned().unwrap_or(token);
    match g.access_valid(&access, now) {
        Some(r) => json_200(serde_json::json!({
            "active": true,
            "scope": "read write",
            "client_id": g.config.client_id,
            "token_type": "Bearer",
            "exp": r.ttl.map(|t| (r.created_ms + t * 1000) / 1000).unwrap_or(0),
            "iat": r.created_ms / 1000,
        })),
        None => json_200(serde_json::json!({"active": false})),
    }
}

pub(crate) async fn revoke(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(&headers, query, &body);
    let token = p.get("token").cloned();
    handle(state, Endpoint::Revoke, token.as_deref(), true, move |g| {
        revoke_answer(g, &p)
    })
    .await
}

fn revoke_answer(g: &mut Inner, p: &HashMap<String, String>) -> Response {
    if !client_ok(g, p) {
        return oauth_error(
            StatusCode::FORBIDDEN,
            "unauthorized_client",
            "You are not authorized to revoke this token",
        );
    }
    let now = g.now_ms();
    let token = p.get("token").cloned().unwrap_or_default();
    g.totals.revocations += 1;
    if let Some(a) = g.token_account(&token) {
        g.accounts[a as usize].1.revocations += 1;
    }
    if let Some(access) = g.by_refresh.get(&token).cloned() {
        // Doorkeeper 5.5 quirk: by refresh token, a record whose access token expired is not revoked.
        if g.access_valid(&access, now).is_some() {
            g.revoke_record(&access);
        }
    } else if g.records.contains_key(&token) {
        g.revoke_record(&token);
    }
    json_200(serde_json::json!({}))
}
