//! The endpoint a client calls with a Bearer access token: `GET /oauth/token/info`. It is a
//! use of the token (in revoke_on_use mode it retires the previous pair) and a probe in the
//! account's books.

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::Response;

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
