//! The rows the token API served last, kept in memory so a fetch need not read SQLite.
//!
//! Integrations fetch the same accounts' tokens far more often than tokend refreshes them
//! (36,000 fetches a second against a few hundred refreshes in the benchmark), and a read from
//! SQLite costs a hand-off to the reader's thread and page reads the engine's commits keep
//! making cold. Every write tokend makes through the [`Store`](super::Store) forgets the rows it
//! touched on the writer's thread, once its transaction has committed and before anyone is told
//! it did; a row read while a write was under way is not kept (`seq` moved), so the cache never
//! holds a row older than one a reader could see. Writes by other programs are seen when the
//! engine next polls `data_version` (every second): the whole cache is forgotten then. Each poll
//! also vouches for the cache for [`FRESH_FOR`]: when none came that long (the engine stopping,
//! its writer waiting on another program's lock, the store closed), nothing is served from
//! memory until the next one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;

use super::{Account, lock};
use crate::FastMap;
use crate::config::TokenType;
use crate::state::State;

/// At most this many rows are kept (about 250 bytes each): past it, one is dropped for each one
/// kept, and fetches of the others read SQLite as before.
pub(super) const CAPACITY: usize = 100_000;

/// How long a `data_version` poll that found no unseen write vouches for the cache: twice the
/// engine's poll interval.
pub(super) const FRESH_FOR: Duration = Duration::from_secs(2);

/// What the token route needs of a row: its access token, expiry and state. Never its refresh
/// token, which stays in the database only.
#[derive(Debug)]
pub struct Current {
    pub token_type: TokenType,
    pub access_token: Option<SecretString>,
    pub expires_at: Option<i64>,
    pub scopes: Option<Box<str>>,
    pub state: State,
    /// When tokend last stored a refreshed pair (the access token's issue time).
    pub last_refresh_at: Option<i64>,
}

impl From<Account> for Current {
    fn from(a: Account) -> Current {
        Current {
            token_type: a.token_type,
            access_token: a.access_token,
            expires_at: a.expires_at,
            scopes: a.scopes.map(String::into_boxed_str),
            state: a.state,
            last_refresh_at: a.last_refresh_at,
        }
    }
}

#[derive(Default)]
pub(super) struct RowCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    rows: FastMap<Box<str>, Arc<Current>>,
    /// Moves on every forget: a row read before it moved may be older than the write.
    seq: u64,
    /// The last poll that accounted for every other program's write.
    vouched: Option<Instant>,
}

impl Inner {
    fn clear(&mut self) {
        self.seq += 1;
        self.rows.clear();
    }
}

impl RowCache {
    pub(super) fn get(&self, id: &str) -> Option<Arc<Current>> {
        let inner = lock(&self.inner);
        if inner.vouched.is_none_or(|at| at.elapsed() > FRESH_FOR) {
            return None;
        }
        inner.rows.get(id).cloned()
    }

    /// A `data_version` poll accounted for every other program's write (forgetting everything
    /// first when there was one).
    pub(super) fn vouch(&self, changed: bool) {
        let mut inner = lock(&self.inner);
        if changed {
            inner.clear();
        }
        inner.vouched = Some(Instant::now());
    }

    /// Serve nothing from memory again (the store is closing).
    pub(super) fn stop(&self) {
        let mut inner = lock(&self.inner);
        inner.clear();
        inner.vouched = None;
    }

    /// Taken before a read whose row may be kept with [`RowCache::keep`].
    pub(super) fn seq(&self) -> u64 {
        lock(&self.inner).seq
    }

    /// Keep a row read after [`RowCache::seq`] returned `seen`, unless something was
    /// forgotten since (the row may predate that write).
    pub(super) fn keep(&self, seen: u64, id: &str, row: Arc<Current>) {
        let mut inner = lock(&self.inner);
        if inner.seq != seen {
            return;
        }
        if inner.rows.len() >= CAPACITY && !inner.rows.contains_key(id) {
            if let Some(victim) = inner.rows.keys().next().cloned() {
                inner.rows.remove(&victim);
            }
        }
        inner.rows.insert(id.into(), row);
    }

    pub(super) fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_none() {
            // Nothing written that a reader could have read: reads under way may be kept.
            return;
        }
        let mut inner = lock(&self.inner);
        inner.seq += 1;
        for id in ids {
            inner.rows.remove(id);
        }
    }

    pub(super) fn forget_all(&self) {
        lock(&self.inner).clear();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.inner).rows.len()
    }

    /// As if the last poll were `ago` old.
    #[cfg(test)]
    pub(super) fn vouched_ago(&self, ago: Duration) {
        lock(&self.inner).vouched = Instant::now().checked_sub(ago);
    }
}
