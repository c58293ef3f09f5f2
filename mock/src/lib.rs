//! A mock Factorial OAuth server that answers as Doorkeeper 5.5 does (tokend's README, "The mock
//! provider"), for tokend's tests, benchmarks and `tokend demo`. It is not part of the daemon.
//!
//! It keeps its own books: per account, grants, errors, **reuse attempts** (a refresh token
//! presented after it was exchanged or revoked) and **lapses** (a new access token issued after the
//! previous one had expired). It can inject faults per request or by rate.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

/// Doorkeeper's two refresh-token rotation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The old pair stays valid until the new access token is first used (Doorkeeper's default).
    RevokeOnUse,
    /// The old pair dies the moment the new one is issued.
    Immediate,
}

/// Where the mock reads unix time (milliseconds). Tests hand it the daemon's driven clock so
/// expiries, lapses and `created_at` follow the same time as the daemon.
#[derive(Clone)]
pub struct MockClock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl MockClock {
    pub fn new(now_ms: impl Fn() -> i64 + Send + Sync + 'static) -> MockClock {
        MockClock(Arc::new(now_ms))
    }
    pub fn system() -> MockClock {
        MockClock::new(system_now_ms)
    }
    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for MockClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockClock")
    }
}

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub rotation: Rotation,
    /// Lifetime of seeded user access tokens; refreshed tokens copy their predecessor's (as
    /// Doorkeeper 5.5 does).
    pub access_ttl: Duration,
    /// Factorial's refresh tokens die after a week; stock Doorkeeper's never do (`None`).
    pub refresh_ttl: Option<Duration>,
    pub client_id: String,
    pub client_secret: String,
    /// Answer refreshes without a `refresh_token` (the old one stays valid), as some servers do.
    pub omit_refresh_token: bool,
    pub clock: MockClock,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            rotation: Rotation::RevokeOnUse,
            access_ttl: Duration::from_secs(3600),
            refresh_ttl: None,
            client_id: "mock-client".into(),
            client_secret: "mock-secret".into(),
            omit_refresh_token: false,
            clock: MockClock::system(),
        }
    }
}

/// A fault the mock can answer with instead of doing its job.
#[derive(Debug, Clone)]
pub enum Fault {
    /// This status with a small body, and `Retry-After` when given (seconds or an HTTP date).
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// Wait, then answer normally (a slow but working server).
    Delay(Duration),
    /// Wait, then drop the connection without doing anything.
    Hang(Duration),
    /// Close the connection mid-response.
    Drop,
    /// `200` with an HTML body.
    Html,
    /// `200` with JSON cut in the middle.
    Truncated,
    /// `200` with JSON lacking `access_token`.
    NoAccessToken,
    /// `200` with a full-looking body whose `expires_in` is this.
    ExpiresIn(i64),
    /// `200` with a body of this many bytes.
    Huge(usize),
    /// A body sent one byte per interval.
    Trickle(Duration),
    /// `401 invalid_token`, as token/info answers for a dead token.
    InvalidToken,
}

/// Which endpoint a fault plan applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Token,
    TokenInfo,
}

#[derive(Debug, Default, Clone)]
struct FaultPlan {
    queue: VecDeque<Fault>,
    /// Each request draws once; the first entry whose cumulative probability covers the draw wins.
    random: Vec<(f64, Fault)>,
    outage: bool,
}

/// Per-account books.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AccountStats {
    pub grants: u64,
    pub errors: u64,
    pub reuse_attempts: u64,
    pub lapses: u64,
    pub worst_gap_ms: i64,
    /// Expiry (unix ms) of the newest access token issued.
    pub current_expiry_ms: Option<i64>,
    pub probes: u64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Totals {
    pub token_requests: u64,
    pub grants: u64,
    pub errors: u64,
    pub faults: u64,
    pub reuse_attempts: u64,
    pub lapses: u64,
    pub worst_gap_ms: i64,
    pub probes: u64,
    pub max_in_flight: usize,
    /// Times two token requests for one account were in flight at once.
    pub concurrent_same_account: u64,
}

#[derive(Debug)]
struct Rec {
    account: u32,
    refresh: Option<String>,
    created_ms: i64,
    ttl: Option<i64>,
    exchanged: bool,
    /// revoke_on_use: the refresh token of the record to revoke when this access token is used.
    previous: Option<String>,
}

#[derive(Debug)]
struct Inner {
    config: MockConfig,
    /// Live records by access token.
    records: HashMap<String, Rec>,
    /// Live refresh token -> access token of its record.
    by_refresh: HashMap<String, String>,
    /// Dead refresh tokens -> account, for counting reuse.
    dead_refresh: HashMap<String, u32>,
    account_ids: HashMap<String, u32>,
    accounts: Vec<(String, AccountStats)>,
    faults: HashMap<Endpoint, FaultPlan>,
    totals: Totals,
    in_flight_accounts: HashMap<u32, usize>,
    /// Newest pair per account, as issued.
    newest: HashMap<u32, (String, Option<String>)>,
    /// Every token-endpoint answer: (unix ms, status, account if known).
    log: Vec<(i64, u16, Option<u32>)>,
    /// A second client secret accepted during a rotation.
    also_accepted: Option<String>,
    /// Per grant: how long before the presented pair's access token expired it came (ms).
    headroom_ms: Vec<i64>,
}

/// A running mock server. Dropping it stops the server.
pub struct MockProvider {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    stop: CancellationToken,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A pair the mock issued, for seeding a database.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at: Option<i64>,
}

#[derive(Clone)]
struct AppState {
    inner: Arc<Mutex<Inner>>,
    in_flight: Arc<AtomicUsize>,
}

fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn random_token() -> String {
    let mut s = String::with_capacity(64);
    for _ in 0..4 {
        s.push_str(&format!("{:016x}", fastrand::u64(..)));
    }
    s
}

impl MockProvider {
    /// Start on `127.0.0.1:0` in the current tokio runtime.
    pub async fn start(config: MockConfig) -> std::io::Result<MockProvider> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            config,
            records: HashMap::new(),
            by_refresh: HashMap::new(),
            dead_refresh: HashMap::new(),
            account_ids: HashMap::new(),
            accounts: Vec::new(),
            faults: HashMap::new(),
            totals: Totals::default(),
            in_flight_accounts: HashMap::new(),
            newest: HashMap::new(),
            log: Vec::new(),
            also_accepted: None,
            headroom_ms: Vec::new(),
        }));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let state = AppState {
            inner: inner.clone(),
            in_flight: in_flight.clone(),
        };
        let app = Router::new()
            .route("/oauth/token", post(token))
            .route("/oauth/token/info", get(token_info))
            .route("/oauth/introspect", post(introspect))
            .route("/oauth/revoke", post(revoke))
            .with_state(state);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(MockProvider {
            inner,
            addr,
            stop,
            in_flight,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Issue a user grant for `account`, created `age` ago (so it may already be expired).
    pub fn issue_user(&self, account: &str, age: Duration) -> Issued {
        let mut g = self.lock();
        let ttl = g.config.access_ttl.as_secs() as i64;
        let created = g.now_ms() - age.as_millis() as i64;
        g.issue(account, created, Some(ttl), true, None)
    }

    /// Issue a company token (no expiry, no refresh token).
    pub fn issue_company(&self, account: &str) -> Issued {
        let mut g = self.lock();
        let now = g.now_ms();
        g.issue(account, now, None, false, None)
    }

    /// Revoke every token of `account`, as an administrator would.
    pub fn revoke_account(&self, account: &str) {
        let mut g = self.lock();
        let Some(&idx) = g.account_ids.get(account) else {
            return;
        };
        let access: Vec<String> = g
            .records
            .iter()
            .filter(|(_, r)| r.account == idx)
            .map(|(a, _)| a.clone())
            .collect();
        for a in access {
            g.revoke_record(&a);
        }
    }

    pub fn set_client_secret(&self, secret: &str) {
        let mut g = self.lock();
        g.config.client_secret = secret.to_owned();
        g.also_accepted = None;
    }

    /// Accept a second secret beside the current one, as during a rotation.
    pub fn also_accept_secret(&self, secret: &str) {
        self.lock().also_accepted = Some(secret.to_owned());
    }

    /// Answer the next requests to `endpoint` with these faults, in order.
    pub fn push_faults(&self, endpoint: Endpoint, faults: impl IntoIterator<Item = Fault>) {
        self.lock()
            .faults
            .entry(endpoint)
            .or_default()
            .queue
            .extend(faults);
    }

    /// Answer each request to `endpoint` with `fault` with probability `p` (after the queue).
    pub fn add_random_fault(&self, endpoint: Endpoint, p: f64, fault: Fault) {
        self.lock()
            .faults
            .entry(endpoint)
            .or_default()
            .random
            .push((p, fault));
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// While on, every request to `endpoint` answers 503.
    pub fn set_outage(&self, endpoint: Endpoint, on: bool) {
        self.lock().faults.entry(endpoint).or_default().outage = on;
    }

    pub fn totals(&self) -> Totals {
        let g = self.lock();
        let mut t = g.totals.clone();
        t.reuse_attempts = g.accounts.iter().map(|(_, s)| s.reuse_attempts).sum();
        t.lapses = g.accounts.iter().map(|(_, s)| s.lapses).sum();
        t.worst_gap_ms = g
            .accounts
            .iter()
            .map(|(_, s)| s.worst_gap_ms)
            .max()
            .unwrap_or(0);
        t.probes = g.accounts.iter().map(|(_, s)| s.probes).sum();
        t
    }

    pub fn account(&self, account: &str) -> AccountStats {
        let g = self.lock();
        g.account_ids
            .get(account)
            .map(|&i| g.accounts[i as usize].1.clone())
            .unwrap_or_default()
    }

    /// Accounts whose newest access token has expired by now (a lapse in progress).
    pub fn expired_now(&self) -> Vec<String> {
        let g = self.lock();
        let now = g.now_ms();
        g.accounts
            .iter()
            .filter(|(_, s)| s.current_expiry_ms.is_some_and(|e| e <= now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The newest pair issued for `account`.
    pub fn newest(&self, account: &str) -> Option<(String, Option<String>)> {
        let g = self.lock();
        let idx = g.account_ids.get(account)?;
        g.newest.get(idx).cloned()
    }

    /// Whether this refresh token would be accepted now.
    pub fn refresh_token_live(&self, refresh: &str) -> bool {
        let g = self.lock();
        g.by_refresh.contains_key(refresh)
    }

    /// Token-endpoint answers so far: (unix ms, status, account id if the token named one).
    pub fn token_log(&self) -> Vec<(i64, u16, Option<String>)> {
        let g = self.lock();
        g.log
            .iter()
            .map(|(t, s, a)| (*t, *s, a.map(|i| g.accounts[i as usize].0.clone())))
            .collect()
    }

    /// For each grant so far, how many ms before the previous access token's expiry it came
    /// (negative: after it, a lapse).
    pub fn headrooms(&self) -> Vec<i64> {
        self.lock().headroom_ms.clone()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn now_ms(&self) -> i64 {
        self.config.clock.now_ms()
    }

    fn secret_ok(&self, s: &str) -> bool {
        s == self.config.client_secret || self.also_accepted.as_deref() == Some(s)
    }

    fn account_index(&mut self, account: &str) -> u32 {
        if let Some(&i) = self.account_ids.get(account) {
            return i;
        }
        let i = self.accounts.len() as u32;
        self.accounts
            .push((account.to_owned(), AccountStats::default()));
        self.account_ids.insert(account.to_owned(), i);
        i
    }

    fn issue(
        &mut self,
        account: &str,
        created_ms: i64,
        ttl: Option<i64>,
        with_refresh: bool,
        previous: Option<String>,
    ) -> Issued {
        let idx = self.account_index(account);
        let access = random_token();
        let refresh = with_refresh.then(random_token);
        if let Some(r) = &refresh {
            self.by_refresh.insert(r.clone(), access.clone());
        }
        self.records.insert(
            access.clone(),
            Rec {
                account: idx,
                refresh: refresh.clone(),
                created_ms,
                ttl,
                exchanged: false,
                previous,
            },
        );
        let stats = &mut self.accounts[idx as usize].1;
        stats.current_expiry_ms = ttl.map(|t| created_ms + t * 1000);
        self.newest.insert(idx, (access.clone(), refresh.clone()));
        Issued {
            access_token: access,
            refresh_token: refresh,
            expires_at: ttl.map(|t| created_ms / 1000 + t),
        }
    }

    fn revoke_record(&mut self, access: &str) {
        if let Some(rec) = self.records.remove(access)
            && let Some(r) = rec.refresh
        {
            self.by_refresh.remove(&r);
            self.dead_refresh.insert(r, rec.account);
        }
    }

    fn access_valid(&self, access: &str, now: i64) -> Option<&Rec> {
        self.records
            .get(access)
            .filter(|r| r.ttl.is_none_or(|t| r.created_ms + t * 1000 > now))
    }

    /// A Bearer use of an access token: in revoke_on_use mode it retires the previous pair.
    fn use_access(&mut self, access: &str) {
        let previous = self.records.get_mut(access).and_then(|r| r.previous.take());
        if let Some(prev_refresh) = previous
            && let Some(prev_access) = self.by_refresh.get(&prev_refresh).cloned()
        {
            self.revoke_record(&prev_access);
        }
    }

    fn take_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
        let plan = self.faults.get_mut(&endpoint)?;
        if plan.outage {
            return Some(Fault::Status {
                code: 503,
                retry_after: None,
            });
        }
        if let Some(f) = plan.queue.pop_front() {
            return Some(f);
        }
        let draw = fastrand::f64();
        let mut acc = 0.0;
        for (p, f) in &plan.random {
            acc += p;
            if draw < acc {
                return Some(f.clone());
            }
        }
        None
    }
}

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

async fn token(
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

/// Returns the faulty response, or `None` to answer normally after a delay.
async fn apply_fault(f: Fault, now_s: i64) -> Option<Response> {
    let body_200 = |b: Body| {
        let mut r = Response::new(b);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        r
    };
    Some(match f {
        Fault::Status { code, retry_after } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = (status, "<html><body>Service Unavailable</body></html>").into_response();
            if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, ra);
            }
            r
        }
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            return None;
        }
        Fault::Hang(d) => {
            tokio::time::sleep(d).await;
            broken_body()
        }
        Fault::Drop => broken_body(),
        Fault::Html => body_200(Body::from(
            "<!DOCTYPE html><html><body>Maintenance</body></html>",
        )),
        Fault::Truncated => body_200(Body::from(r#"{"access_token":"abc","token_type":"Bea"#)),
        Fault::NoAccessToken => body_200(Body::from(
            r#"{"token_type":"Bearer","expires_in":3600,"refresh_token":"x","created_at":1}"#,
        )),
        Fault::ExpiresIn(e) => body_200(Body::from(format!(
            r#"{{"access_token":"{}","token_type":"Bearer","expires_in":{e},"refresh_token":"{}","scope":"read write","created_at":{}}}"#,
            random_token(),
            random_token(),
            now_s
        ))),
        Fault::Huge(n) => body_200(Body::from(vec![b' '; n])),
        Fault::InvalidToken => invalid_token(),
        Fault::Trickle(every) => {
            let stream = futures_util::stream::unfold(0u32, move |i| async move {
                if i > 10_000 {
                    return None;
                }
                tokio::time::sleep(every).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), i + 1))
            });
            body_200(Body::from_stream(stream))
        }
    })
}

fn broken_body() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other(
            "connection dropped by fault injection",
        ))
    });
    Response::new(Body::from_stream(stream))
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

async fn token_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
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

fn invalid_token() -> Response {
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

async fn introspect(
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

async fn revoke(
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
