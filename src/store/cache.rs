//! The rows the token API served last, kept in memory so a fetch need not read SQLite.
//!
//! Integrations fetch the same accounts' tokens far more often than tokend refreshes them
//! (36,000 fetches a second against a few hundred refreshes in the benchmark), and a read from
//! SQLite costs a hand-off to the reader's thread and page reads the engine's commits keep
//! making cold. Every write tokend makes through the [`Store`](super::Store) forgets the rows it
//! touched on the writer's thread, once its transaction has committed and before anyone is told
//! it did; a row read while a write was under way is not kept (`seq` moved), so the cache never
//! holds a row older than one a reader could see. Writes by other programs are seen when the
//! engine next polls `data_version` (every second): the whole cache is forgotten then.

use std::sync::{Arc, Mutex};

use secrecy::SecretString;

use super::{Account, lock};
use crate::FastMap;
use crate::config::TokenType;
use crate::state::State;

/// At most this many rows are kept (about 250 bytes each): past it, one is dropped for each one
/// kept, and fetches of the others read SQLite as before.
const CAPACITY: usize = 100_000;

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
}

impl RowCache {
    pub(super) fn get(&self, id: &str) -> Option<Arc<Current>> {
        lock(&self.inner).rows.get(id).cloned()
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
        let mut inner = lock(&self.inner);
        inner.seq += 1;
        for id in ids {
            inner.rows.remove(id);
        }
    }

    pub(super) fn forget_all(&self) {
        let mut inner = lock(&self.inner);
        inner.seq += 1;
        inner.rows.clear();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.inner).rows.len()
    }
}
