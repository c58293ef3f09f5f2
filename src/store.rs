//! The account store: SQLite through rusqlite, on a thread of its own.
//!
//! Everything SQL lives here. The rest of tokend talks to [`Store`] in domain terms (accounts,
//! claims, updates), so the engine never sees a connection, a row or a pragma; a Postgres-protocol
//! store would implement the same handful of calls.
//!
//! One connection serves all calls, on a dedicated thread, in order. Consecutive updates are
//! committed together in one transaction (group commit): one fsync covers many refreshes, and a
//! refreshed pair still waits no longer than one commit before it is durable.

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;

use crate::state::State;

/// The schema version this binary writes. Databases newer than this are refused.
pub const SCHEMA_VERSION: i64 = 1;

/// Most updates folded into one transaction.
const MAX_GROUP: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the database {path} has schema version {found}, newer than this tokend understands ({SCHEMA_VERSION}); upgrade tokend"
    )]
    TooNew { path: PathBuf, found: i64 },
    #[error("database migration to version {version} failed: {source}")]
    Migrate {
        version: i64,
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the store thread has stopped")]
    Closed,
    #[error("{0}")]
    Rejected(String),
}

impl StoreError {
    /// Errors that mean "cannot write right now" (locked, disk full, I/O), as opposed to a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Sql(_) | StoreError::Closed)
    }
}

/// An account row as the engine sees it. Tokens are secrets; fields written by other programs
/// are kept raw (`token_type`, `state`) so the engine can judge them and say what is wrong.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    pub profile: Option<String>,
    pub token_type: String,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<i64>,
    pub refresh_issued_at: Option<i64>,
    pub scopes: Option<String>,
    pub state: String,
    pub failures: u32,
    pub revision: i64,
}

/// What tokend writes back after acting on one account. Applied only if the row still has the
/// `revision` the engine read (a program relinking the account meanwhile wins).
#[derive(Debug, Clone)]
pub struct Update {
    pub id: String,
    pub revision: i64,
    pub from: Option<State>,
    pub to: State,
    pub reason: Option<String>,
    pub tokens: Option<NewTokens>,
    /// `None`: nothing scheduled (terminal states, company tokens).
    pub next_action_at: Option<i64>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub checked_at: Option<i64>,
    pub now: i64,
}

#[derive(Debug, Clone)]
pub struct NewTokens {
    pub access_token: SecretString,
    /// `None` when the provider did not send one: the old refresh token stays.
    pub refresh_token: Option<SecretString>,
    pub expires_at: i64,
    /// Set when the provider rotated the refresh token; `None` keeps the old issue time.
    pub refresh_issued_at: Option<i64>,
    pub scopes: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// The row changed (or disappeared) since it was claimed; nothing was written.
    Stale,
}

/// An account without its tokens, for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub id: String,
    pub profile: Option<String>,
    pub token_type: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub expires_at: Option<i64>,
    pub refresh_issued_at: Option<i64>,
    pub next_action_at: Option<i64>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub last_refresh_at: Option<i64>,
    pub last_checked_at: Option<i64>,
}

/// One account to insert or replace (import).
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub id: String,
    pub profile: Option<String>,
    pub token_type: String,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<i64>,
    pub scopes: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Count {
    pub state: String,
    pub token_type: String,
    pub profile: Option<String>,
    pub count: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub account_id: String,
    pub from_state: Option<String>,
    pub to_state: String,
    pub reason: Option<String>,
    pub at: i64,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Cmd {
    Claim {
        now: i64,
        limit: usize,
        owner: String,
        lease_until: i64,
        fresh: bool,
        reply: Reply<Vec<Account>>,
    },
    Update {
        update: Box<Update>,
        owner: String,
        reply: Reply<Applied>,
    },
    /// Anything else: a closure run on the store thread, which sends its own reply.
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// Handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: std_mpsc::Sender<Cmd>,
    /// Reads go to a second connection on a thread of its own, so a writer stuck behind a lock
    /// (busy timeout, full disk) never delays the health file or the CLI.
    rtx: std_mpsc::Sender<Cmd>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Open (creating if needed) and migrate the database, then start the store thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = open_connection(path)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        let _ = reader.busy_timeout(Duration::from_secs(5));
        let spawn = |name: &str, conn: Connection, rx: std_mpsc::Receiver<Cmd>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || serve(conn, rx))
                .map_err(|e| StoreError::Rejected(format!("cannot start the store thread: {e}")))
        };
        let (tx, rx) = std_mpsc::channel();
        spawn("tokend-store", conn, rx)?;
        let (rtx, rrx) = std_mpsc::channel();
        spawn("tokend-store-read", reader, rrx)?;
        Ok(Store {
            tx,
            rtx,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(|reply| {
            Cmd::Run(Box::new(move |c| {
                let _ = reply.send(f(c));
            }))
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Run(Box::new(move |c| {
            let _ = reply.send(f(c));
        }));
        self.rtx.send(cmd).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Claim up to `limit` accounts that no one else holds, leasing them to `owner`: with
    /// `fresh`, rows just inserted or changed by another program (waiting to be looked at);
    /// otherwise rows whose scheduled action is due at `now`.
    pub async fn claim_due(
        &self,
        now: i64,
        limit: usize,
        owner: &str,
        lease_until: i64,
        fresh: bool,
    ) -> Result<Vec<Account>, StoreError> {
        let owner = owner.to_owned();
        self.call(|reply| Cmd::Claim {
            now,
            limit,
            owner,
            lease_until,
            fresh,
            reply,
        })
        .await
    }

    /// Apply one update (grouped with others into one transaction by the store thread).
    pub async fn apply(&self, update: Update, owner: &str) -> Result<Applied, StoreError> {
        let owner = owner.to_owned();
        self.call(|reply| Cmd::Update {
            update: Box::new(update),
            owner,
            reply,
        })
        .await
    }

    /// The earliest scheduled action among accounts, if any.
    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.read(|c| next_due(c)).await
    }

    /// Changes whenever another connection commits: the cheap way to notice rows written by
    /// other programs.
    pub async fn data_version(&self) -> Result<i64, StoreError> {
        self.run(|c| Ok(c.pragma_query_value(None, "data_version", |r| r.get(0))?))
            .await
    }

    pub async fn list(&self, state: Option<State>) -> Result<Vec<Summary>, StoreError> {
        self.read(move |c| list(c, state)).await
    }

    pub async fn counts(&self) -> Result<Vec<Count>, StoreError> {
        self.read(|c| counts(c)).await
    }

    pub async fn events(&self, account: Option<String>) -> Result<Vec<Event>, StoreError> {
        self.read(move |c| events(c, account.as_deref())).await
    }

    pub async fn get(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| get(c, &id)).await
    }

    /// Insert or replace accounts, all or nothing.
    pub async fn import(&self, accounts: Vec<NewAccount>, now: i64) -> Result<(), StoreError> {
        self.run(move |c| import(c, &accounts, now)).await
    }

    /// Move every schedulable account of `profile` that is not in flight to `paused`.
    pub async fn pause_profile(
        &self,
        profile: &str,
        is_default: bool,
        reason: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let (profile, reason) = (profile.to_owned(), reason.to_owned());
        self.run(move |c| {
            set_profile_state(
                c,
                &ProfileChange {
                    profile: &profile,
                    is_default,
                    from: &[State::Active, State::Failing],
                    to: State::Paused,
                    reason: &reason,
                    next_action_at: None,
                    now,
                    limit: None,
                },
            )
        })
        .await
    }

    /// Bring the paused accounts of `profile` back (at most `limit` of them), due at once.
    pub async fn resume_profile(
        &self,
        profile: &str,
        is_default: bool,
        reason: &str,
        now: i64,
        limit: Option<usize>,
    ) -> Result<u64, StoreError> {
        let (profile, reason) = (profile.to_owned(), reason.to_owned());
        self.run(move |c| {
            set_profile_state(
                c,
                &ProfileChange {
                    profile: &profile,
                    is_default,
                    from: &[State::Paused],
                    to: State::Active,
                    reason: &reason,
                    next_action_at: Some(now),
                    now,
                    limit,
                },
            )
        })
        .await
    }

    /// Make the failing accounts of `profile` due now (its server answers again).
    pub async fn wake_failing(
        &self,
        profile: &str,
        is_default: bool,
        now: i64,
    ) -> Result<u64, StoreError> {
        let profile = profile.to_owned();
        self.run(move |c| {
            Ok(c.execute(
                "UPDATE accounts SET next_action_at = ?3
                 WHERE (profile = ?1 OR (?2 AND profile IS NULL)) AND state = 'failing'
                   AND next_action_at > ?3 AND (lease_until IS NULL OR lease_until <= ?3)",
                params![profile, is_default, now],
            )? as u64)
        })
        .await
    }

    /// Accounts in any state but `active` (at most `limit`), as `(id, state)`.
    pub async fn attention(&self, limit: usize) -> Result<Vec<(String, String)>, StoreError> {
        self.read(move |c| {
            // An IN list, not `<> 'active'`, so the state index serves it.
            Ok(c.prepare_cached(
                "SELECT id, state FROM accounts
                 WHERE state IN ('failing', 'needs_reauth', 'revoked', 'paused', 'invalid')
                 ORDER BY state, id LIMIT ?1",
            )?
            .query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<(String, String)>, _>>()?)
        })
        .await
    }

    /// User accounts whose refresh token was issued before `risk_before`: at most `limit` ids,
    /// and their count.
    pub async fn at_risk(
        &self,
        risk_before: i64,
        limit: usize,
    ) -> Result<(Vec<String>, u64), StoreError> {
        self.read(move |c| {
            let risk = c
                .prepare_cached(
                    "SELECT id FROM accounts WHERE token_type = 'user' AND refresh_issued_at < ?1
                       AND state IN ('active', 'failing') ORDER BY refresh_issued_at LIMIT ?2",
                )?
                .query_map(params![risk_before, limit as i64], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            let count: i64 = c
                .prepare_cached(
                    "SELECT COUNT(*) FROM accounts WHERE token_type = 'user' AND refresh_issued_at < ?1
                       AND state IN ('active', 'failing')",
                )?
                .query_row([risk_before], |r| r.get(0))?;
            Ok((risk, count as u64))
        })
        .await
    }

    /// Company tokens that a revocation run should probe: active or failing, not leased.
    pub async fn company_accounts(&self, now: i64) -> Result<Vec<Account>, StoreError> {
        self.read(move |c| company_accounts(c, now)).await
    }

    /// Lease one account to `owner` (for on-demand use), if no one else holds it.
    pub async fn lease_one(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<Account>, StoreError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.run(move |c| lease_one(c, &id, &owner, now, lease_until))
            .await
    }

    /// Give up a lease without writing anything else.
    pub async fn release(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.run(move |c| {
            c.execute(
                "UPDATE accounts SET lease_owner = NULL, lease_until = NULL
                 WHERE id = ?1 AND lease_owner = ?2",
                params![id, owner],
            )?;
            Ok(())
        })
        .await
    }

    /// Checkpoint the WAL so the database file stands alone, before the process exits.
    pub async fn close(&self) {
        let result = self
            .run(|c| Ok(c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?))
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "closing checkpoint failed (the WAL keeps the data safe)");
        }
    }

    /// Run `PRAGMA integrity_check`; `Ok(())` when the database is sound.
    pub async fn integrity_check(&self) -> Result<(), StoreError> {
        self.read(|c| {
            let r: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            if r == "ok" {
                Ok(())
            } else {
                Err(StoreError::Rejected(format!("integrity_check: {r}")))
            }
        })
        .await
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(open_err)?;
    // WAL lets other programs read (and link accounts) while tokend writes; FULL makes every
    // commit durable before tokend acts on the token it holds.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

const MIGRATIONS: &[&str] = &[
    // 1: accounts, their events, and the triggers that notice rows (re)linked by other programs.
    r#"
    CREATE TABLE accounts (
        id                TEXT PRIMARY KEY NOT NULL,
        profile           TEXT,
        token_type        TEXT NOT NULL DEFAULT 'user',
        access_token      TEXT,
        refresh_token     TEXT,
        expires_at        INTEGER,
        refresh_issued_at INTEGER,
        scopes            TEXT,
        state             TEXT NOT NULL DEFAULT 'active',
        state_reason      TEXT,
        next_action_at    INTEGER DEFAULT 0,
        failures          INTEGER NOT NULL DEFAULT 0,
        last_error        TEXT,
        last_error_at     INTEGER,
        last_refresh_at   INTEGER,
        last_checked_at   INTEGER,
        revision          INTEGER NOT NULL DEFAULT 0,
        lease_owner       TEXT,
        lease_until       INTEGER,
        created_at        INTEGER NOT NULL DEFAULT (unixepoch()),
        updated_at        INTEGER NOT NULL DEFAULT (unixepoch())
    );
    CREATE INDEX accounts_due ON accounts (next_action_at) WHERE next_action_at IS NOT NULL;
    CREATE INDEX accounts_state ON accounts (state, token_type, profile);
    CREATE INDEX accounts_refresh_age ON accounts (refresh_issued_at) WHERE token_type = 'user';
    CREATE TABLE account_events (
        seq        INTEGER PRIMARY KEY,
        account_id TEXT NOT NULL,
        from_state TEXT,
        to_state   TEXT NOT NULL,
        reason     TEXT,
        at         INTEGER NOT NULL
    );
    CREATE INDEX account_events_account ON account_events (account_id, seq);
    CREATE TRIGGER accounts_linked AFTER INSERT ON accounts
    WHEN NEW.refresh_issued_at IS NULL AND NEW.refresh_token IS NOT NULL
    BEGIN
        UPDATE accounts SET refresh_issued_at = unixepoch() WHERE id = NEW.id;
    END;
    CREATE TRIGGER accounts_relinked
    AFTER UPDATE OF access_token, refresh_token, expires_at, token_type, profile ON accounts
    WHEN NEW.revision = OLD.revision
    BEGIN
        UPDATE accounts SET
            revision = revision + 1,
            next_action_at = 0,
            failures = 0,
            lease_owner = NULL,
            lease_until = NULL,
            refresh_issued_at = CASE
                WHEN NEW.refresh_token IS NOT OLD.refresh_token
                     AND NEW.refresh_issued_at IS OLD.refresh_issued_at THEN unixepoch()
                ELSE NEW.refresh_issued_at END,
            updated_at = unixepoch()
        WHERE id = NEW.id;
    END;
    "#,
];

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let current: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: current,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        let err = |source| StoreError::Migrate { version, source };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

fn serve(mut conn: Connection, rx: std_mpsc::Receiver<Cmd>) {
    let mut pending: Option<Cmd> = None;
    loop {
        let cmd = match pending.take() {
            Some(c) => c,
            None => match rx.recv() {
                Ok(c) => c,
                Err(_) => break,
            },
        };
        match cmd {
            Cmd::Update {
                update,
                owner,
                reply,
            } => {
                let mut group = vec![(update, owner, reply)];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Cmd::Update {
                            update,
                            owner,
                            reply,
                        }) => group.push((update, owner, reply)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                apply_group(&mut conn, group);
            }
            Cmd::Claim {
                now,
                limit,
                owner,
                lease_until,
                fresh,
                reply,
            } => {
                let _ = reply.send(claim(&mut conn, now, limit, &owner, lease_until, fresh));
            }
            Cmd::Run(f) => f(&mut conn),
        }
    }
    // Dropping the connection checkpoints and closes the database cleanly.
    drop(conn);
}

fn apply_group(conn: &mut Connection, group: Vec<(Box<Update>, String, Reply<Applied>)>) {
    let result = (|| -> Result<Vec<Applied>, StoreError> {
        let tx = conn.transaction()?;
        let mut out = Vec::with_capacity(group.len());
        for (u, owner, _) in &group {
            out.push(apply_one(&tx, u, owner)?);
        }
        tx.commit()?;
        Ok(out)
    })();
    match result {
        Ok(applied) => {
            for ((_, _, reply), a) in group.into_iter().zip(applied) {
                let _ = reply.send(Ok(a));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (_, _, reply) in group {
                let _ = reply.send(Err(StoreError::Rejected(format!("commit failed: {msg}"))));
            }
        }
    }
}

fn apply_one(tx: &Transaction<'_>, u: &Update, owner: &str) -> Result<Applied, StoreError> {
    let changed = if let Some(t) = &u.tokens {
        tx.prepare_cached(
            "UPDATE accounts SET
                access_token = ?3, refresh_token = COALESCE(?4, refresh_token), expires_at = ?5,
                refresh_issued_at = COALESCE(?6, refresh_issued_at),
                scopes = COALESCE(?7, scopes), last_refresh_at = ?8,
                state = ?9, state_reason = ?10, next_action_at = ?11, failures = ?12,
                last_error = ?13, last_error_at = CASE WHEN ?13 IS NULL THEN last_error_at ELSE ?8 END,
                last_checked_at = COALESCE(?14, last_checked_at),
                revision = revision + 1, lease_owner = NULL, lease_until = NULL, updated_at = ?8
             WHERE id = ?1 AND revision = ?2 AND lease_owner IS ?15",
        )?
        .execute(params![
            u.id,
            u.revision,
            t.access_token.expose_secret(),
            t.refresh_token.as_ref().map(|r| r.expose_secret()),
            t.expires_at,
            t.refresh_issued_at,
            t.scopes,
            u.now,
            u.to.as_str(),
            u.reason,
            u.next_action_at,
            u.failures,
            u.last_error,
            u.checked_at,
            owner,
        ])?
    } else {
        tx.prepare_cached(
            "UPDATE accounts SET
                state = ?3, state_reason = ?4, next_action_at = ?5, failures = ?6,
                last_error = ?7, last_error_at = CASE WHEN ?7 IS NULL THEN last_error_at ELSE ?8 END,
                last_checked_at = COALESCE(?9, last_checked_at),
                revision = revision + 1, lease_owner = NULL, lease_until = NULL, updated_at = ?8
             WHERE id = ?1 AND revision = ?2 AND lease_owner IS ?10",
        )?
        .execute(params![
            u.id,
            u.revision,
            u.to.as_str(),
            u.reason,
            u.next_action_at,
            u.failures,
            u.last_error,
            u.now,
            u.checked_at,
            owner,
        ])?
    };
    if changed == 0 {
        return Ok(Applied::Stale);
    }
    if u.from != Some(u.to) {
        tx.prepare_cached(
            "INSERT INTO account_events (account_id, from_state, to_state, reason, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            u.id,
            u.from.map(State::as_str),
            u.to.as_str(),
            u.reason,
            u.now
        ])?;
    }
    Ok(Applied::Yes)
}

const ACCOUNT_COLUMNS: &str = "id, profile, token_type, access_token, refresh_token, expires_at, \
     refresh_issued_at, scopes, state, failures, revision";

fn account_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Account> {
    let secret = |i: usize| -> rusqlite::Result<Option<SecretString>> {
        Ok(r.get::<_, Option<String>>(i)?.map(SecretString::from))
    };
    Ok(Account {
        id: r.get(0)?,
        profile: r.get(1)?,
        token_type: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
        access_token: secret(3)?,
        refresh_token: secret(4)?,
        expires_at: lenient_int(r, 5)?,
        refresh_issued_at: lenient_int(r, 6)?,
        scopes: r.get(7)?,
        state: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
        failures: r.get::<_, i64>(9)?.clamp(0, u32::MAX as i64) as u32,
        revision: r.get(10)?,
    })
}

/// Other programs may write text or reals into integer columns; read what makes sense.
fn lenient_int(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<i64>> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Integer(n) => Some(n),
        ValueRef::Real(f) if f.is_finite() => Some(f as i64),
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .or(Some(i64::MIN)),
        _ => Some(i64::MIN),
    })
}

fn claim(
    conn: &mut Connection,
    now: i64,
    limit: usize,
    owner: &str,
    lease_until: i64,
    fresh: bool,
) -> Result<Vec<Account>, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let accounts = {
        let range = if fresh {
            "next_action_at = 0"
        } else {
            "next_action_at > 0 AND next_action_at <= ?1"
        };
        let mut select = tx.prepare_cached(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts
             WHERE {range} AND (lease_until IS NULL OR lease_until <= ?1)
             ORDER BY next_action_at LIMIT ?2"
        ))?;
        let rows = select
            .query_map(params![now, limit as i64], account_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let mut lease = tx.prepare_cached(
            "UPDATE accounts SET lease_owner = ?2, lease_until = ?3 WHERE id = ?1",
        )?;
        for a in &rows {
            lease.execute(params![a.id, owner, lease_until])?;
        }
        rows
    };
    tx.commit()?;
    Ok(accounts)
}

fn lease_one(
    conn: &mut Connection,
    id: &str,
    owner: &str,
    now: i64,
    lease_until: i64,
) -> Result<Option<Account>, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute(
        "UPDATE accounts SET lease_owner = ?2, lease_until = ?4
         WHERE id = ?1 AND (lease_until IS NULL OR lease_until <= ?3 OR lease_owner = ?2)",
        params![id, owner, now, lease_until],
    )?;
    let account = if n == 1 { get(&tx, id)? } else { None };
    tx.commit()?;
    Ok(account)
}

fn next_due(conn: &Connection) -> Result<Option<i64>, StoreError> {
    // Leased rows are someone's work in flight: the earliest of the first few, each counted at
    // the later of its due time and its lease's end, is when to look again.
    let mut stmt = conn.prepare_cached(
        "SELECT next_action_at, lease_until FROM accounts
         WHERE next_action_at IS NOT NULL ORDER BY next_action_at LIMIT 64",
    )?;
    let mut best: Option<i64> = None;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
    })?;
    for row in rows {
        let (due, lease) = row?;
        let at = due.max(lease.unwrap_or(i64::MIN));
        best = Some(best.map_or(at, |b| b.min(at)));
    }
    Ok(best)
}

fn get(conn: &Connection, id: &str) -> Result<Option<Account>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"
        ))?
        .query_row([id], account_from_row)
        .optional()?)
}

fn list(conn: &Connection, state: Option<State>) -> Result<Vec<Summary>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, profile, token_type, state, state_reason, expires_at, refresh_issued_at,
                next_action_at, failures, last_error, last_refresh_at, last_checked_at
         FROM accounts WHERE ?1 IS NULL OR state = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([state.map(State::as_str)], |r| {
        Ok(Summary {
            id: r.get(0)?,
            profile: r.get(1)?,
            token_type: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
            state: r.get(3)?,
            state_reason: r.get(4)?,
            expires_at: lenient_int(r, 5)?,
            refresh_issued_at: lenient_int(r, 6)?,
            next_action_at: lenient_int(r, 7)?,
            failures: r.get::<_, i64>(8)?.clamp(0, u32::MAX as i64) as u32,
            last_error: r.get(9)?,
            last_refresh_at: r.get(10)?,
            last_checked_at: r.get(11)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn counts(conn: &Connection) -> Result<Vec<Count>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT state, token_type, profile, COUNT(*) FROM accounts
         GROUP BY state, token_type, profile",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Count {
            state: r.get(0)?,
            token_type: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            profile: r.get(2)?,
            count: r.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn events(conn: &Connection, account: Option<&str>) -> Result<Vec<Event>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT account_id, from_state, to_state, reason, at FROM account_events
         WHERE ?1 IS NULL OR account_id = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([account], |r| {
        Ok(Event {
            account_id: r.get(0)?,
            from_state: r.get(1)?,
            to_state: r.get(2)?,
            reason: r.get(3)?,
            at: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn import(conn: &mut Connection, accounts: &[NewAccount], now: i64) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare(
            "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token, expires_at,
                                   refresh_issued_at, scopes, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?7, ?7)
             ON CONFLICT (id) DO UPDATE SET
                profile = excluded.profile, token_type = excluded.token_type,
                access_token = excluded.access_token, refresh_token = excluded.refresh_token,
                expires_at = excluded.expires_at, refresh_issued_at = excluded.refresh_issued_at,
                scopes = excluded.scopes, updated_at = excluded.updated_at",
        )?;
        for a in accounts {
            upsert.execute(params![
                a.id,
                a.profile,
                a.token_type,
                a.access_token
                    .as_ref()
                    .map(|s| s.expose_secret().to_owned()),
                a.refresh_token
                    .as_ref()
                    .map(|s| s.expose_secret().to_owned()),
                a.expires_at,
                now,
                a.scopes,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

struct ProfileChange<'a> {
    profile: &'a str,
    /// Rows without a profile belong to the only profile, when there is just one.
    is_default: bool,
    from: &'a [State],
    to: State,
    reason: &'a str,
    next_action_at: Option<i64>,
    now: i64,
    limit: Option<usize>,
}

fn set_profile_state(conn: &mut Connection, ch: &ProfileChange<'_>) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut total = 0;
    let limit = ch.limit.map(|l| l as i64).unwrap_or(-1);
    for f in ch.from {
        // Leased rows are in flight; their own outcome decides their state.
        let cond = format!(
            "id IN (SELECT id FROM accounts
                    WHERE (profile = ?1 OR (?2 AND profile IS NULL)) AND state = ?3
                      AND (lease_until IS NULL OR lease_until <= ?6)
                    ORDER BY id LIMIT {limit})"
        );
        tx.execute(
            &format!(
                "INSERT INTO account_events (account_id, from_state, to_state, reason, at)
                 SELECT id, state, ?4, ?5, ?6 FROM accounts WHERE {cond}"
            ),
            params![
                ch.profile,
                ch.is_default,
                f.as_str(),
                ch.to.as_str(),
                ch.reason,
                ch.now
            ],
        )?;
        total += tx.execute(
            &format!(
                "UPDATE accounts SET state = ?4, state_reason = ?5, next_action_at = ?7,
                        updated_at = ?6
                 WHERE {cond}"
            ),
            params![
                ch.profile,
                ch.is_default,
                f.as_str(),
                ch.to.as_str(),
                ch.reason,
                ch.now,
                ch.next_action_at
            ],
        )? as u64;
    }
    tx.commit()?;
    Ok(total)
}

fn company_accounts(conn: &Connection, now: i64) -> Result<Vec<Account>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts
         WHERE token_type = 'company' AND state IN ('active', 'failing')
           AND (lease_until IS NULL OR lease_until <= ?1)
         ORDER BY id"
    ))?;
    let rows = stmt.query_map([now], account_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}
