//! The running server, and what tests ask of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::bearer::{me, token_info};
use crate::books::{AccountStats, Inner, Issued, Request, Totals, lock};
use crate::config::MockConfig;
use crate::faults::{Endpoint, Fault};
use crate::oauth::{introspect, revoke};
use crate::serve::Serial;
use crate::token::token;

pub struct MockProvider {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    stop: CancellationToken,
    in_flight: Arc<AtomicUsize>,
    serial: Arc<Serial>,
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) inner: Arc<Mutex<Inner>>,
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) serial: Arc<Serial>,
}

impl MockProvider {
    /// Start on `127.0.0.1:0` in the current tokio runtime.
    pub async fn start(config: MockConfig) -> std::io::Result<MockProvider> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let serial = Arc::new(Serial::new(config.serial));
        let inner = Arc::new(Mutex::new(Inner {
            config,
            records: HashMap::new(),
            by_refresh: HashMap::new(),
            dead_refresh: HashMap::new(),
            dead_access: HashMap::new(),
            account_ids: HashMap::new(),
            accounts: Vec::new(),
            faults: HashMap::new(),
            totals: Totals::default(),
            in_flight_accounts: HashMap::new(),
            newest: HashMap::new(),
            log: Vec::new(),
            also_accepted: None,
            headroom_ms: Vec::new(),
            requests: Vec::new(),
            revoke_log: Vec::new(),
        }));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let state = AppState {
            inner: inner.clone(),
            in_flight: in_flight.clone(),
            serial: serial.clone(),
        };
        let app = Router::new()
            .route("/oauth/token", post(token))
            .route("/oauth/token/info", get(token_info))
            .route("/oauth/introspect", post(introspect))
            .route("/oauth/revoke", post(revoke))
            .route("/api/me", get(me))
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
            serial,
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

    /// Token requests the server has received and not finished (a request whose client hung up
    /// stays in flight until its work is done).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Serial mode: requests waiting or in service now (always 0 otherwise).
    pub fn queued(&self) -> usize {
        self.serial.queued()
    }

    /// How many refresh tokens of `account` the server would exchange (with valid client
    /// credentials) right now: live records, within `refresh_ttl`.
    pub fn usable_refresh_tokens(&self, account: &str) -> usize {
        let g = self.lock();
        let Some(&idx) = g.account_ids.get(account) else {
            return 0;
        };
        let now = g.now_ms();
        g.by_refresh
            .iter()
            .filter(|(_, access)| g.records.get(*access).is_some_and(|r| r.account == idx))
            .filter(|(refresh, _)| g.refresh_usable(refresh, now))
            .count()
    }

    /// Revoke answers so far: (unix ms, status, account the token belonged to), faults included
    /// (status 0 for those that never answer).
    pub fn revoke_log(&self) -> Vec<(i64, u16, Option<String>)> {
        let g = self.lock();
        g.revoke_log
            .iter()
            .map(|(t, s, a)| (*t, *s, a.map(|i| g.accounts[i as usize].0.clone())))
            .collect()
    }

    /// Every request to every endpoint so far, in the order answered.
    pub fn requests(&self) -> Vec<Request> {
        let g = self.lock();
        g.requests
            .iter()
            .map(|(ms, endpoint, status, a)| Request {
                ms: *ms,
                endpoint: *endpoint,
                status: *status,
                account: a.map(|i| g.accounts[i as usize].0.clone()),
            })
            .collect()
    }
}
