//! The Doorkeeper endpoints: token, token/info, introspect, revoke.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::books::{Inner, lock};
use crate::config::Rotation;
use crate::faults::{Endpoint, apply_fault};
use crate::provider::AppState;

fn params(headers: &HeaderMap, query: Option<String>, body: &Bytes) -> HashMap<String, String> {
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

const INVALID_GRANT: &str = "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client.";
const INVALID_CLIENT: &str = "Client authentication failed due to unknown client, no client authentication included, or unsupported authentication method.";

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = serde_json::json!({"error": error, "error_description": description});
    let mut r = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Bearer realm=\"Doorkeeper\", error=\"{error}\", error_description=\"{description}\""
    )) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

fn json_200(body: serde_json::Value) -> Response {
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

/// Decrements the in-flight counters however the handler ends (including a dropped connection).
struct InFlight {
    state: AppState,
    account: Option<u32>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(a) = self.account {
            let mut g = lock(&self.state.inner);
            if let Some(n) = g.in_flight_accounts.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    g.in_flight_accounts.remove(&a);
                }
            }
        }
    }
}

pub(crate) async fn token(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(&headers, query, &body);
    let n = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let mut guard = InFlight {
        state: state.clone(),
        account: None,
    };
    let fault = {
        let mut g = lock(&state.inner);
        g.totals.token_requests += 1;
        g.totals.max_in_flight = g.totals.max_in_flight.max(n);
        let account = p
            .get("refresh_token")
            .and_then(|r| g.by_refresh.get(r).and_then(|a| g.records.get(a)))
            .map(|rec| rec.account);
        if let Some(a) = account {
            let c = g.in_flight_accounts.entry(a).or_insert(0);
            *c += 1;
            if *c > 1 {
                g.totals.concurrent_same_account += 1;
            }
            guard.account = Some(a);
        }
        let f = g.take_fault(Endpoint::Token);
        if f.is_some() {
            g.totals.faults += 1;
        }
        f
    };
    let account = guard.account;
    let record = |r: Response| {
        let mut g = lock(&state.inner);
        let now = g.now_ms();
        g.log.push((now, r.status().as_u16(), account));
        r
    };
    let now_s = lock(&state.inner).now_ms() / 1000;
    if let Some(f) = fault
        && let Some(r) = apply_fault(f, now_s).await
    {
        return record(r);
    }
    let r = exchange(&state, &p);
    drop(guard);
    record(r)
}

fn exchange(state: &AppState, p: &HashMap<String, String>) -> Response {
    let mut g = lock(&state.inner);
    let client_id = p.get("client_id");
    let secret = p.get("client_secret");
    let fail = |g: &mut Inner, account: Option<u32>, r: Response| {
        g.totals.errors += 1;
        if let Some(a) = account {
            g.accounts[a as usize].1.errors += 1;
        }
        r
    };
    let Some(grant_type) = p.get("grant_type") else {
        return fail(
            &mut g,
            None,
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: grant_type.",
            ),
        );
    };
    if grant_type != "refresh_token" {
        return fail(
            &mut g,
            None,
            oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "The authorization grant type is not supported by the authorization server.",
            ),
        );
    }
    let Some(refresh) = p.get("refresh_token") else {
        return fail(
            &mut g,
            None,
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: refresh_token.",
            ),
        );
    };
    let account = g
        .by_refresh
        .get(refresh)
        .and_then(|a| g.records.get(a))
        .map(|r| r.account)
        .or_else(|| g.dead_refresh.get(refresh).copied());
    match (client_id, secret) {
        (None, None) => {
            return fail(
                &mut g,
                account,
                oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT),
            );
        }
        (Some(id), Some(s)) if *id == g.config.client_id && g.secret_ok(s) => {}
        _ => {
            return fail(
                &mut g,
                account,
                oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", INVALID_CLIENT),
            );
        }
    }
    let now = g.now_ms();
    let live = g.by_refresh.get(refresh).cloned();
    let Some(old_access) = live else {
        if let Some(a) = account {
            g.accounts[a as usize].1.reuse_attempts += 1;
        }
        return fail(
            &mut g,
            account,
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT),
        );
    };
    let refresh_ttl = g.config.refresh_ttl;
    let (idx, ttl, created, exchanged) = {
        let rec = &g.records[&old_access];
        (rec.account, rec.ttl, rec.created_ms, rec.exchanged)
    };
    if refresh_ttl.is_some_and(|t| created + t.as_millis() as i64 <= now) {
        return fail(
            &mut g,
            Some(idx),
            oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT),
        );
    }
    if exchanged {
        g.accounts[idx as usize].1.reuse_attempts += 1;
    }
    if let Some(rec) = g.records.get_mut(&old_access) {
        rec.exchanged = true;
    }
    let account_name = g.accounts[idx as usize].0.clone();
    let previous_expiry = g.accounts[idx as usize].1.current_expiry_ms;
    let rotation = g.config.rotation;
    if rotation == Rotation::Immediate {
        g.revoke_record(&old_access);
    }
    let issued = if g.config.omit_refresh_token {
        // No rotation: the same refresh token now belongs to the new access token.
        g.revoke_record(&old_access);
        g.dead_refresh.remove(refresh);
        let mut issued = g.issue(&account_name, now, ttl, false, None);
        if let Some(rec) = g.records.get_mut(&issued.access_token) {
            rec.refresh = Some(refresh.clone());
        }
        g.by_refresh
            .insert(refresh.clone(), issued.access_token.clone());
        g.newest
            .insert(idx, (issued.access_token.clone(), Some(refresh.clone())));
        issued.refresh_token = None;
        issued
    } else {
        let previous = (rotation == Rotation::RevokeOnUse).then(|| refresh.clone());
        g.issue(&account_name, now, ttl, true, previous)
    };
    let stats = &mut g.accounts[idx as usize].1;
    stats.grants += 1;
    if let Some(prev) = previous_expiry
        && now > prev
    {
        stats.lapses += 1;
        stats.worst_gap_ms = stats.worst_gap_ms.max(now - prev);
    }
    if let Some(prev) = previous_expiry {
        g.headroom_ms.push(prev - now);
    }
    g.totals.grants += 1;
    json_200(serde_json::json!({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": ttl,
        "refresh_token": issued.refresh_token,
        "scope": "read write",
        "created_at": now / 1000,
    }))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|s| s.trim().to_owned())
}

pub(crate) async fn token_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (fault, now_s) = {
        let mut g = lock(&state.inner);
        (g.take_fault(Endpoint::TokenInfo), g.now_ms() / 1000)
    };
    if let Some(f) = fault
        && let Some(r) = apply_fault(f, now_s).await
    {
        return r;
    }
    let mut g = lock(&state.inner);
    let now = g.now_ms();
    let token = bearer(&headers);
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
    let g = lock(&state.inner);
    if !p.contains_key("client_id") && !p.contains_key("client_secret") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request is missing a required parameter, includes an unsupported parameter value, or is otherwise malformed.",
        );
    }
    if !client_ok(&g, &p) {
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
    let mut g = lock(&state.inner);
    if !client_ok(&g, &p) {
        return oauth_error(
            StatusCode::FORBIDDEN,
            "unauthorized_client",
            "You are not authorized to revoke this token",
        );
    }
    let now = g.now_ms();
    let token = p.get("token").cloned().unwrap_or_default();
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
