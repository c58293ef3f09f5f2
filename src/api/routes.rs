//! The API's routes. Times are RFC 3339 (UTC); tokens appear only in the token route's answer,
//! and never in a log line: each token fetch writes one audit line with who, which account and
//! the expiry served.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use secrecy::ExposeSecret;
use serde::Serialize;

use super::{Api, ApiError, Caller};
use crate::clock::rfc3339;
use crate::config::TokenType;
use crate::engine::OnDemand;
use crate::state::State as AccountState;
use crate::store::{Current, Linked, NewAccount, Summary};
use crate::unlink::{NotRevoked, Revoked};

/// Default and largest `min_ttl` of a token fetch.
const DEFAULT_MIN_TTL: u64 = 60;
const MAX_MIN_TTL: u64 = 86_400;
/// Default and largest page of a listing.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// `/healthz` fails when the engine loop has not turned for this long.
const STALL: i64 = 30_000;

pub(super) fn router() -> Router<Arc<Api>> {
    Router::new()
        .route("/v1/accounts", get(list).post(link))
        .route("/v1/accounts/{id}", get(show).delete(remove))
        .route("/v1/accounts/{id}/token", get(token))
        .route("/v1/accounts/{id}/grant", put(relink))
        .route("/v1/accounts/{id}/resume", post(resume))
        .route("/v1/accounts/{id}/refresh", post(refresh))
        .route("/v1/health", get(health))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.yaml", get(openapi))
}

/// This API's OpenAPI 3.1 description, built into the binary so it always matches it.
const OPENAPI: &str = include_str!("openapi.yaml");

#[derive(Clone, Copy)]
enum Need {
    Read,
    Token,
    Admin,
}

fn require(caller: &Caller, need: Need) -> Result<(), ApiError> {
    let (ok, name) = match need {
        Need::Read => (caller.scopes.read, "read"),
        Need::Token => (caller.scopes.token, "token"),
        Need::Admin => (caller.scopes.admin, "admin"),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::Forbidden(name))
    }
}

/// Query parameters, parsed by hand so a bad one is a JSON 422 naming it.
/// A query's `name=value` pairs, borrowed from the request where nothing needed decoding.
type Pairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

fn query<'a>(raw: Option<&'a str>, allowed: &[&'static str]) -> Result<Pairs<'a>, ApiError> {
    // `form_urlencoded` is what `serde_urlencoded` decodes with; it borrows what needs no
    // decoding, so the usual `?min_ttl=300` costs no allocation but the list's.
    let pairs: Vec<_> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).collect();
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_ref())) {
        return Err(ApiError::Invalid {
            field: k.to_string(),
            message: format!("unknown parameter {k:?}; known: {}", allowed.join(", ")),
        });
    }
    Ok(pairs)
}

fn param<'a>(pairs: &'a [(Cow<'_, str>, Cow<'_, str>)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_ref())
}

/// An account as the API shows it: never its tokens.
#[derive(Debug, Serialize)]
pub struct AccountOut {
    pub id: String,
    pub profile: Option<String>,
    pub token_type: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub state_since: Option<String>,
    pub expires_at: Option<String>,
    pub next_action_at: Option<String>,
    pub refreshing_since: Option<String>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_refresh_at: Option<String>,
    pub last_checked_at: Option<String>,
    pub refresh_issued_at: Option<String>,
    pub scopes: Vec<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

fn when(t: Option<i64>) -> Option<String> {
    t.filter(|t| *t > 1).map(rfc3339)
}

fn scope_list(s: Option<&str>) -> Vec<String> {
    s.map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

impl From<Summary> for AccountOut {
    fn from(s: Summary) -> AccountOut {
        AccountOut {
            scopes: scope_list(s.scopes.as_deref()),
            id: s.id,
            profile: s.profile,
            token_type: s.token_type,
            state: s.state,
            state_reason: s.state_reason,
            state_since: when(s.state_since),
            expires_at: when(s.expires_at),
            next_action_at: when(s.next_action_at),
            refreshing_since: when(s.refreshing_since),
            failures: s.failures,
            last_error: s.last_error,
            last_error_at: when(s.last_error_at),
            last_refresh_at: when(s.last_refresh_at),
            last_checked_at: when(s.last_checked_at),
            refresh_issued_at: when(s.refresh_issued_at),
            created_at: when(s.created_at),
            updated_at: when(s.updated_at),
        }
    }
}

fn json(status: StatusCode, body: impl Serialize) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn summary(api: &Api, id: &str) -> Result<AccountOut, ApiError> {
    api.shared
        .store
        .summary(id)
        .await?
        .map(AccountOut::from)
        .ok_or_else(|| ApiError::NotFound(format!("no account {id:?}")))
}

/// `GET /v1/accounts/{id}/token?min_ttl=SECONDS`: a token with at least `min_ttl` left,
/// refreshing it now if needed (one flight with any refresh already under way).
async fn token(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    require(&caller, Need::Token)?;
    let q = query(raw.as_deref(), &["min_ttl"])?;
    let min_ttl = match param(&q, "min_ttl") {
        None => DEFAULT_MIN_TTL,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= MAX_MIN_TTL)
            .ok_or_else(|| ApiError::Invalid {
                field: "min_ttl".into(),
                message: format!("seconds, from 0 to {MAX_MIN_TTL}"),
            })?,
    } as i64;
    let s = &api.shared;
    let arrived = tokio::time::Instant::now();
    // Read only when a refresh is needed (the configuration's lock is shared by every fetch).
    let deadline = || arrived + s.runtime().config.api.max_wait.get();
    let mut asked = false;
    // A row from memory serves or is read again: what cannot be served (a state, a refresh
    // that is not allowed yet) is decided on the database's row, which another tokend may have
    // refreshed within the last second.
    let mut from_memory = true;
    loop {
        let a = match s.store.current(&id, from_memory).await? {
            None => return Err(ApiError::NotFound(format!("no account {id:?}"))),
            Some(Err(p)) => {
                return Err(ApiError::Conflict {
                    state: "invalid".into(),
                    reason: Some(p.reason),
                });
            }
            Some(Ok(a)) => a,
        };
        let now = s.clock.now();
        let left = match a.token_type {
            TokenType::Company => Some(i64::MAX),
            TokenType::User => a.expires_at.map(|e| e - now),
        };
        if !a.state.is_terminal()
            && let Some((served, expires_at)) = serve(&a, left, min_ttl)
        {
            tracing::info!(who = %caller.who, account_id = %id,
                expires_at = expires_at.as_deref().unwrap_or("never"),
                min_ttl_s = min_ttl, refreshed = asked, "token served");
            return Ok(served);
        }
        if from_memory {
            from_memory = false;
            continue;
        }
        if a.state.is_terminal() {
            let reason = s.store.summary(&id).await?.and_then(|x| x.state_reason);
            return Err(ApiError::Conflict {
                state: a.state.to_string(),
                reason,
            });
        }
        if a.token_type == TokenType::Company {
            return Err(ApiError::Conflict {
                state: a.state.to_string(),
                reason: Some("a company token without an access token".into()),
            });
        }
        if a.state == AccountState::Paused {
            let reason = s.store.summary(&id).await?.and_then(|x| x.state_reason);
            return Err(ApiError::Conflict {
                state: "paused".into(),
                reason,
            });
        }
        if asked {
            // A refresh came back and still not enough: say when trying again makes sense.
            let lifetime = a
                .expires_at
                .zip(a.last_refresh_at)
                .map(|(e, r)| e - r)
                .unwrap_or(0);
            if lifetime > 0 && lifetime < min_ttl && a.state == AccountState::Active {
                return Err(ApiError::Invalid {
                    field: "min_ttl".into(),
                    message: format!(
                        "the provider issues tokens that live {lifetime} s, less than min_ttl"
                    ),
                });
            }
            let next = s
                .store
                .summary(&id)
                .await?
                .and_then(|x| x.next_action_at)
                .unwrap_or(now + 5);
            return Err(ApiError::Unavailable {
                retry_after: (next - now).clamp(1, 3600) as u64,
                reason: format!("no token with {min_ttl} s left yet (state {})", a.state),
            });
        }
        let remaining = deadline().saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining, api.engine.refresh_now(&id)).await {
            Err(_) => {
                return Err(ApiError::Unavailable {
                    retry_after: 5,
                    reason: "the refresh did not finish in time".into(),
                });
            }
            Ok(OnDemand::Done) => asked = true,
            Ok(OnDemand::Unknown) => return Err(ApiError::NotFound(format!("no account {id:?}"))),
            Ok(OnDemand::NotBefore(t, why)) => {
                return Err(ApiError::Unavailable {
                    retry_after: (t - now).clamp(1, 3600) as u64,
                    reason: why,
                });
            }
            Ok(OnDemand::Refused(why)) => {
                return Err(ApiError::Conflict {
                    state: a.state.to_string(),
                    reason: Some(why),
                });
            }
            Ok(OnDemand::HeldElsewhere) => {
                // Another tokend has it in flight: its answer lands in the row.
                if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline() {
                    return Err(ApiError::Unavailable {
                        retry_after: 2,
                        reason: "another tokend is refreshing this account".into(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The token answer, if `a` has a token with `min_ttl` left, and the expiry it serves (RFC
/// 3339; `None` for a company token, which does not expire).
fn serve(a: &Current, left: Option<i64>, min_ttl: i64) -> Option<(Response, Option<String>)> {
    let access = a.access_token.as_ref()?;
    if left? < min_ttl.max(1) {
        return None;
    }
    #[derive(Serialize)]
    struct TokenOut<'a> {
        access_token: &'a str,
        token_type: &'static str,
        expires_at: Option<&'a str>,
        scopes: Vec<&'a str>,
        /// The account's state (a paused profile's account still serves a valid token).
        state: &'static str,
    }
    let expires_at = match a.token_type {
        TokenType::Company => None,
        TokenType::User => a.expires_at.map(rfc3339),
    };
    let answer = json(
        StatusCode::OK,
        TokenOut {
            access_token: access.expose_secret(),
            token_type: "Bearer",
            expires_at: expires_at.as_deref(),
            scopes: a
                .scopes
                .as_deref()
                .map(|s| s.split_whitespace().collect())
                .unwrap_or_default(),
            state: a.state.as_str(),
        },
    );
    Some((answer, expires_at))
}

/// `GET /v1/accounts?state=&profile=&cursor=&limit=`.
async fn list(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    require(&caller, Need::Read)?;
    let q = query(raw.as_deref(), &["state", "profile", "cursor", "limit"])?;
    let state = match param(&q, "state") {
        None => None,
        Some(v) => Some(
            v.parse::<AccountState>()
                .map_err(|message| ApiError::Invalid {
                    field: "state".into(),
                    message,
                })?,
        ),
    };
    let limit = match param(&q, "limit") {
        None => DEFAULT_PAGE,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| ApiError::Invalid {
                field: "limit".into(),
                message: format!("from 1 to {MAX_PAGE}"),
            })?,
    };
    let after = match param(&q, "cursor") {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| ApiError::Invalid {
            field: "cursor".into(),
            message: "not a cursor this API gave".into(),
        })?),
    };
    let rows = api
        .shared
        .store
        .list(state, param(&q, "profile").map(str::to_owned), after, limit)
        .await?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.last().map(|r| encode_cursor(&r.id)))
        .flatten();
    let accounts: Vec<AccountOut> = rows.into_iter().map(AccountOut::from).collect();
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"accounts": accounts, "next_cursor": next_cursor}),
    ))
}

fn encode_cursor(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(c: &str) -> Option<String> {
    if c.len() % 2 != 0 || c.len() > 4096 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..c.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(c.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// `GET /v1/accounts/{id}`: metadata and recent events.
async fn show(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, Need::Read)?;
    let account = summary(&api, &id).await?;
    let events = api.shared.store.recent_events(&id, 20).await?;
    let events: Vec<serde_json::Value> = events
        .into_iter()
        .map(|e| {
            serde_json::json!({
                "seq": e.seq, "kind": e.kind, "from_state": e.from_state,
                "to_state": e.to_state, "reason": e.reason, "at": rfc3339(e.at),
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        serde_json::json!({"account": account, "events": events}),
    ))
}

fn body_json(body: &Bytes) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        field: "body".into(),
        message: format!("not a JSON object: {e}"),
    })
}

fn invalid(e: crate::engine::policy::Invalid) -> ApiError {
    ApiError::Invalid {
        field: if e.field.is_empty() {
            "body".into()
        } else {
            e.field.into()
        },
        message: e.reason,
    }
}

/// `POST /v1/accounts`: link a new account (create-only).
async fn link(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, Need::Admin)?;
    let rt = api.shared.runtime();
    let a = crate::accounts::parse_row(&rt.config, &body_json(&body)?).map_err(invalid)?;
    // SQLite's length() stops at a NUL, so the table's CHECK refuses an id that starts with one
    // (a 500 if it got that far) and other tools would cut one short anywhere: refuse them here.
    if a.id.contains('\0') {
        return Err(ApiError::Invalid {
            field: "id".into(),
            message: "id contains a NUL character".into(),
        });
    }
    let id = a.id.clone();
    match api
        .shared
        .store
        .link(vec![a], false, api.shared.clock.now())
        .await?
    {
        Linked::Conflicts(_) => {
            let state = api
                .shared
                .store
                .summary(&id)
                .await?
                .map(|s| s.state)
                .unwrap_or_default();
            Err(ApiError::Conflict {
                state,
                reason: Some(format!(
                    "account {id:?} exists; relink it with PUT /v1/accounts/{{id}}/grant"
                )),
            })
        }
        Linked::Done { .. } => {
            tracing::info!(who = %caller.who, account_id = %id, "account linked through the API");
            api.engine.evaluate_soon();
            Ok(json(StatusCode::CREATED, summary(&api, &id).await?))
        }
    }
}

/// `PUT /v1/accounts/{id}/grant`: write a new grant (a user re-authorised), as the README's
/// `UPDATE` does.
async fn relink(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, Need::Admin)?;
    let existing = summary(&api, &id).await?;
    let mut obj = match body_json(&body)? {
        serde_json::Value::Object(m) => m,
        _ => {
            return Err(ApiError::Invalid {
                field: "body".into(),
                message: "not a JSON object".into(),
            });
        }
    };
    const GRANT: [&str; 5] = [
        "access_token",
        "refresh_token",
        "expires_at",
        "scopes",
        "scope",
    ];
    if let Some(k) = obj.keys().find(|k| !GRANT.contains(&k.as_str())) {
        return Err(ApiError::Invalid {
            field: k.clone(),
            message: format!("unknown field {k:?}; a grant has {}", GRANT.join(", ")),
        });
    }
    obj.insert("id".into(), id.clone().into());
    obj.insert("profile".into(), existing.profile.clone().into());
    obj.insert("token_type".into(), existing.token_type.clone().into());
    let rt = api.shared.runtime();
    let a: NewAccount =
        crate::accounts::parse_row(&rt.config, &serde_json::Value::Object(obj)).map_err(invalid)?;
    if !api.shared.store.relink(a, api.shared.clock.now()).await? {
        return Err(ApiError::NotFound(format!("no account {id:?}")));
    }
    tracing::info!(who = %caller.who, account_id = %id, "account relinked through the API");
    api.engine.evaluate_soon();
    Ok(json(StatusCode::OK, summary(&api, &id).await?))
}

/// `POST /v1/accounts/{id}/resume`: look at the account again now, out of any state.
async fn resume(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, Need::Admin)?;
    let Some(from) = api.shared.store.resume(&id, api.shared.clock.now()).await? else {
        return Err(ApiError::NotFound(format!("no account {id:?}")));
    };
    tracing::info!(who = %caller.who, account_id = %id, from = %from, "account resumed through the API");
    api.shared.state_changed();
    api.engine.evaluate_soon();
    Ok(json(StatusCode::OK, summary(&api, &id).await?))
}

/// `POST /v1/accounts/{id}/refresh`: refresh now, within the engine's rules.
async fn refresh(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, Need::Admin)?;
    let s = &api.shared;
    let max_wait = s.runtime().config.api.max_wait.get();
    let now = s.clock.now();
    match tokio::time::timeout(max_wait, api.engine.refresh_now(&id)).await {
        Err(_) => Err(ApiError::Unavailable {
            retry_after: 5,
            reason: "the refresh did not finish in time".into(),
        }),
        Ok(OnDemand::Done) => {
            tracing::info!(who = %caller.who, account_id = %id, "refresh asked through the API");
            Ok(json(StatusCode::OK, summary(&api, &id).await?))
        }
        Ok(OnDemand::Unknown) => Err(ApiError::NotFound(format!("no account {id:?}"))),
        Ok(OnDemand::NotBefore(t, why)) => Err(ApiError::Unavailable {
            retry_after: (t - now).clamp(1, 3600) as u64,
            reason: why,
        }),
        Ok(OnDemand::HeldElsewhere) => Err(ApiError::Unavailable {
            retry_after: 2,
            reason: "another tokend is refreshing this account".into(),
        }),
        Ok(OnDemand::Refused(why)) => Err(ApiError::Conflict {
            state: summary(&api, &id).await?.state,
            reason: Some(why),
        }),
    }
}

/// `DELETE /v1/accounts/{id}?revoke=true`: unlink, revoking the grant at the provider first
/// (refreshing it first when its access token expired: see [`crate::unlink`]).
async fn remove(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    require(&caller, Need::Admin)?;
    let q = query(raw.as_deref(), &["revoke"])?;
    let revoke = match param(&q, "revoke") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::Invalid {
                field: "revoke".into(),
                message: "true or false".into(),
            });
        }
    };
    let s = &api.shared;
    let mut nothing = None;
    if revoke {
        let wait = s.runtime().config.api.max_wait.get();
        match crate::unlink::revoke_and_remove(&api.engine, &id, Some(wait)).await {
            Ok(Revoked::Revoked) => {}
            Ok(Revoked::Nothing(why)) => nothing = Some(why),
            Err(e) => return Err(not_revoked(&id, e, s.clock.now())),
        }
    } else if s.store.remove(&id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no account {id:?}")));
    }
    let revoked = revoke && nothing.is_none();
    tracing::info!(who = %caller.who, account_id = %id, revoked, "account removed through the API");
    s.state_changed();
    let mut body = serde_json::json!({"removed": id, "revoked": revoked});
    if let Some(why) = nothing {
        body["not_revoked"] = why.into();
    }
    Ok(json(StatusCode::OK, body))
}

/// The answer when a grant was not revoked (and nothing was removed).
fn not_revoked(id: &str, e: NotRevoked, now: i64) -> ApiError {
    let reason = e.to_string();
    match e {
        NotRevoked::Unknown => ApiError::NotFound(format!("no account {id:?}")),
        NotRevoked::Unreadable(_) => ApiError::Conflict {
            state: "invalid".into(),
            reason: Some(reason),
        },
        NotRevoked::NotNow { at, .. } => ApiError::Unavailable {
            retry_after: at.map_or(5, |t| (t - now).clamp(1, 3600) as u64),
            reason,
        },
        NotRevoked::Refused { state, .. } => ApiError::Conflict {
            state: state.to_string(),
            reason: Some(reason),
        },
        NotRevoked::Failed { .. } => ApiError::Upstream(reason),
        NotRevoked::Store(e) => e.into(),
    }
}

/// `GET /v1/health`: the health snapshot (as the health file has it).
async fn health(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Need::Read)?;
    let h = crate::health::snapshot(&api.shared, &api.info).await;
    Ok(json(StatusCode::OK, h))
}

/// `GET /healthz`: the engine loop is making progress (the watchdog's notion).
async fn healthz(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Need::Read)?;
    let s = &api.shared;
    let last = s.stats.progress_ms.load(Ordering::Relaxed);
    let stalled_for = s.clock.now_ms() - last;
    if stalled_for > STALL {
        return Ok(json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "stalled", "last_progress_ms_ago": stalled_for}),
        ));
    }
    Ok(json(StatusCode::OK, serde_json::json!({"status": "alive"})))
}

/// `GET /readyz`: the store takes writes and tokend is not stopping.
async fn readyz(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Need::Read)?;
    let s = &api.shared;
    let writable = !s.stats.store_unwritable.load(Ordering::Relaxed);
    let stopping = api.info.stopping.load(Ordering::Relaxed);
    let (status, word) = match (writable, stopping) {
        (true, false) => (StatusCode::OK, "ready"),
        (_, true) => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "store not writable"),
    };
    Ok(json(
        status,
        serde_json::json!({"status": word, "store_error": s.stats.store_error()}),
    ))
}

/// `GET /metrics`: Prometheus (OpenMetrics text).
async fn metrics(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Need::Read)?;
    let s = &api.shared;
    let now = s.clock.now();
    let rt = s.runtime();
    let single = rt.config.single_profile().map(|p| p.name.clone());
    let name = |p: Option<String>| p.or_else(|| single.clone()).unwrap_or_default();
    let mut g = crate::metrics::Gauges::default();
    for c in s.counts().await? {
        g.accounts
            .push((name(c.profile), c.state.as_str(), c.count));
    }
    for (p, min) in s.store.min_expiry().await? {
        g.headroom.push((name(p), min - now));
    }
    let open = s.breakers.open();
    for p in &rt.config.profiles {
        g.profiles.push((
            p.name.clone(),
            s.pauses.is_paused(&p.name),
            open.contains(&p.name),
        ));
    }
    g.limits = s
        .limits
        .snapshot()
        .into_iter()
        .map(|(p, l, _)| (p, l))
        .collect();
    g.in_flight = s.limits.in_flight();
    let mut r = s.metrics.render(g).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(r)
}

/// `GET /v1/openapi.yaml`: the document describing these routes.
async fn openapi(Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    require(&caller, Need::Read)?;
    Ok(([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response())
}
