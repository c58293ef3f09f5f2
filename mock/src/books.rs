//! The server's records (which tokens are live) and its books (what happened to each account).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::config::MockConfig;
use crate::faults::{Endpoint, Fault, FaultPlan};

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
    /// Revoke calls (valid client, answered `200`) naming a token of this account, whether or
    /// not they revoked anything (Doorkeeper answers the same either way).
    pub revocations: u64,
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
    /// Revoke calls with valid client credentials (all answered `200`, whatever the token).
    pub revocations: u64,
    /// Serial mode: most requests waiting or in service at once.
    pub max_queued: usize,
}

/// One answered request, any endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Request {
    /// Unix ms (of the mock's clock) when it was answered; for faults that never answer
    /// (`Hang`, `Drop`), when it arrived.
    pub ms: i64,
    pub endpoint: Endpoint,
    /// `0` when no complete answer was sent (`Fault::Hang`, `Fault::Drop`).
    pub status: u16,
    /// The account the presented token (refresh or access, live or dead) belongs to.
    pub account: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Rec {
    pub(crate) account: u32,
    pub(crate) refresh: Option<String>,
    pub(crate) created_ms: i64,
    pub(crate) ttl: Option<i64>,
    pub(crate) exchanged: bool,
    /// revoke_on_use: the refresh token of the record to revoke when this access token is used.
    pub(crate) previous: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: MockConfig,
    /// Live records by access token.
    pub(crate) records: HashMap<String, Rec>,
    /// Live refresh token -> access token of its record.
    pub(crate) by_refresh: HashMap<String, String>,
    /// Dead refresh tokens -> account, for counting reuse.
    pub(crate) dead_refresh: HashMap<String, u32>,
    /// Revoked access tokens -> account (`/api/me` tells them from unknown ones).
    pub(crate) dead_access: HashMap<String, u32>,
    pub(crate) account_ids: HashMap<String, u32>,
    pub(crate) accounts: Vec<(String, AccountStats)>,
    pub(crate) faults: HashMap<Endpoint, FaultPlan>,
    pub(crate) totals: Totals,
    pub(crate) in_flight_accounts: HashMap<u32, usize>,
    /// Newest pair per account, as issued.
    pub(crate) newest: HashMap<u32, (String, Option<String>)>,
    /// Every token-endpoint answer: (unix ms, status, account if known).
    pub(crate) log: Vec<(i64, u16, Option<u32>)>,
    /// A second client secret accepted during a rotation.
    pub(crate) also_accepted: Option<String>,
    /// Per grant: how long before the presented pair's access token expired it came (ms).
    pub(crate) headroom_ms: Vec<i64>,
    /// Every answer of every endpoint: (unix ms, endpoint, status, account).
    pub(crate) requests: Vec<(i64, Endpoint, u16, Option<u32>)>,
    /// Every revoke answer: (unix ms, status, account).
    pub(crate) revoke_log: Vec<(i64, u16, Option<u32>)>,
}

#[derive(Debug, Clone)]
pub struct Issued {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at: Option<i64>,
}

pub(crate) fn random_token() -> String {
    let mut s = String::with_capacity(64);
    for _ in 0..4 {
        s.push_str(&format!("{:016x}", fastrand::u64(..)));
    }
    s
}

pub(crate) fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn now_ms(&self) -> i64 {
        self.config.clock.now_ms()
    }

    pub(crate) fn secret_ok(&self, s: &str) -> bool {
        s == self.config.client_secret || self.also_accepted.as_deref() == Some(s)
    }

    pub(crate) fn account_index(&mut self, account: &str) -> u32 {
        if let Some(&i) = self.account_ids.get(account) {
            return i;
        }
        let i = self.accounts.len() as u32;
        self.accounts
            .push((account.to_owned(), AccountStats::default()));
        self.account_ids.insert(account.to_owned(), i);
        i
    }

    pub(crate) fn issue(
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

    pub(crate) fn revoke_record(&mut self, access: &str) {
        let Some(rec) = self.records.remove(access) else {
            return;
        };
        self.dead_access.insert(access.to_owned(), rec.account);
        if let Some(r) = rec.refresh {
            self.by_refresh.remove(&r);
            self.dead_refresh.insert(r, rec.account);
        }
    }

    /// The account a token (access or refresh, live or dead) belongs to.
    pub(crate) fn token_account(&self, token: &str) -> Option<u32> {
        let live = |access: &str| self.records.get(access).map(|r| r.account);
        live(token)
            .or_else(|| self.by_refresh.get(token).and_then(|a| live(a)))
            .or_else(|| self.dead_refresh.get(token).copied())
            .or_else(|| self.dead_access.get(token).copied())
    }

    /// Enters one answer in the request log (and the revoke log, for revocations).
    pub(crate) fn log_request(&mut self, endpoint: Endpoint, status: u16, account: Option<u32>) {
        let now = self.now_ms();
        self.requests.push((now, endpoint, status, account));
        if endpoint == Endpoint::Revoke {
            self.revoke_log.push((now, status, account));
        }
    }

    /// Whether this refresh token would be exchanged (with valid client credentials) now.
    pub(crate) fn refresh_usable(&self, refresh: &str, now: i64) -> bool {
        let ttl = self.config.refresh_ttl;
        self.by_refresh
            .get(refresh)
            .and_then(|a| self.records.get(a))
            .is_some_and(|r| ttl.is_none_or(|t| r.created_ms + t.as_millis() as i64 > now))
    }

    pub(crate) fn access_valid(&self, access: &str, now: i64) -> Option<&Rec> {
        self.records
            .get(access)
            .filter(|r| r.ttl.is_none_or(|t| r.created_ms + t * 1000 > now))
    }

    /// A Bearer use of an access token: in revoke_on_use mode it retires the previous pair.
    pub(crate) fn use_access(&mut self, access: &str) {
        let previous = self.records.get_mut(access).and_then(|r| r.previous.take());
        if let Some(prev_refresh) = previous
            && let Some(prev_access) = self.by_refresh.get(&prev_refresh).cloned()
        {
            self.revoke_record(&prev_access);
        }
    }

    pub(crate) fn take_fault(&mut self, endpoint: Endpoint) -> Option<Fault> {
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
