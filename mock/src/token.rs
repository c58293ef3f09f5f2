//! `POST /oauth/token`: the refresh-token exchange, with its in-flight and per-account books.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::books::{Inner, lock};
use crate::config::Rotation;
use crate::faults::{Endpoint, Fault, OddShape, answer_fault, leaves_no_answer};
use crate::oauth::{INVALID_CLIENT, INVALID_GRANT, json_200, oauth_error, params};
use crate::provider::AppState;
use crate::serve::carry_out;

/// Decrements the in-flight counters however the request ends: when its work is done, or, for a
/// fault that replaces the work, when the handler ends (including on a dropped connection).
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
    let (fault, named, now_s) = {
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
        // The request log names dead refresh tokens' accounts too; the token log (kept as it
        // was) only live ones.
        let named = p.get("refresh_token").and_then(|r| g.token_account(r));
        (f, named, g.now_ms() / 1000)
    };
    let account = guard.account;
    let (delay, odd) = match fault {
        Some(f) if !f.does_the_work() => {
            let silent = leaves_no_answer(&f);
            if silent {
                lock(&state.inner).log_request(Endpoint::Token, 0, named);
            }
            let r = answer_fault(f, now_s).await;
            let mut g = lock(&state.inner);
            let now = g.now_ms();
            let status = r.status().as_u16();
            g.log.push((now, status, account));
            if !silent {
                g.log_request(Endpoint::Token, status, named);
            }
            return r;
        }
        Some(Fault::Delay(d)) => (Some(d), None),
        Some(Fault::Odd200(shape)) => (None, Some(shape)),
        _ => (None, None),
    };
    let st = state.clone();
    carry_out(&state, true, delay, move || {
        let r = {
            let mut g = lock(&st.inner);
            let r = exchange(&mut g, &p, odd);
            let now = g.now_ms();
            let status = r.status().as_u16();
            g.log.push((now, status, account));
            g.log_request(Endpoint::Token, status, named);
            r
        };
        // Outside the lock: dropping the guard takes it.
        drop(guard);
        r
    })
    .await
}

/// The exchange itself; `odd` alters a successful answer's body (the books are those of a
/// normal `200`).
fn exchange(g: &mut Inner, p: &HashMap<String, String>, odd: Option<OddShape>) -> Response {
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
            g,
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
            g,
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
            g,
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
                g,
                account,
                oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", INVALID_GRANT),
            );
        }
        (Some(id), Some(s)) if *id == g.config.client_id && g.secret_ok(s) => {}
        _ => {
            return fail(
                g,
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
            g,
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
            g,
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
    let mut body = serde_json::json!({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": ttl,
        "refresh_token": issued.refresh_token,
        "scope": "read write",
        "created_at": now / 1000,
    });
    if let (Some(shape), Some(map)) = (odd, body.as_object_mut()) {
        shape.reshape(map);
    }
    json_200(body)
}
