//! The endpoints a client calls with a Bearer access token: `GET /oauth/token/info` and an API
//! call, `GET /api/me`. Either is a use of the token (in revoke_on_use mode it retires the
//! previous pair) and a probe in the account's books.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::books::Inner;
use crate::faults::Endpoint;
use crate::oauth::{handle, invalid_token, json_200};
use crate::provider::AppState;

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|s| s.trim().to_owned())
}

pub(crate) async fn token_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let token = bearer(&headers);
    let presented = token.clone();
    handle(
        state,
        Endpoint::TokenInfo,
        presented.as_deref(),
        false,
        move |g| token_info_answer(g, token),
    )
    .await
}

fn token_info_answer(g: &mut Inner, token: Option<String>) -> Response {
    let now = g.now_ms();
    let found = token
        .as_deref()
        .and_then(|t| g.access_valid(t, now))
        .map(|r| (r.account, r.ttl, r.created_ms));
    let invalid = invalid_token;
    // Any probe counts against the account it names, valid or not.
    let named = token
        .as_deref()
        .and_then(|t| g.records.get(t))
        .map(|r| r.account);
    if let Some(a) = named {
        g.accounts[a as usize].1.probes += 1;
    }
    let Some((_, ttl, created)) = found else {
        return invalid();
    };
    if let Some(t) = &token {
        g.use_access(t);
    }
    let client = g.config.client_id.clone();
    json_200(serde_json::json!({
        "resource_owner_id": 4,
        "scope": ["read", "write"],
        "expires_in": ttl.map(|t| (created + t * 1000 - now) / 1000),
        "application": {"uid": client},
        "created_at": created / 1000,
    }))
}

/// `doorkeeper_authorize!` in front of an API action: unlike token/info it tells an expired
/// token from a revoked one, with an empty `401` body.
pub(crate) async fn me(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let token = bearer(&headers);
    let presented = token.clone();
    handle(state, Endpoint::Me, presented.as_deref(), false, move |g| {
        me_answer(g, token)
    })
    .await
}

fn me_answer(g: &mut Inner, token: Option<String>) -> Response {
    let Some(t) = token else {
        return unauthorized("The access token is invalid");
    };
    let now = g.now_ms();
    let named = g
        .records
        .get(&t)
        .map(|r| r.account)
        .or_else(|| g.dead_access.get(&t).copied());
    if let Some(a) = named {
        g.accounts[a as usize].1.probes += 1;
    }
    // Doorkeeper's order: revoked before expired before unknown.
    if g.dead_access.contains_key(&t) {
        return unauthorized("The access token was revoked");
    }
    if !g.records.contains_key(&t) {
        return unauthorized("The access token is invalid");
    }
    if g.access_valid(&t, now).is_none() {
        return unauthorized("The access token expired");
    }
    g.use_access(&t);
    let mut r = axum::Json(serde_json::json!({"id": 4})).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn unauthorized(description: &'static str) -> Response {
    let mut r = StatusCode::UNAUTHORIZED.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer realm=\"Doorkeeper\", error=\"invalid_token\", error_description=\"{description}\""
    )) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}
