//! The account store: SQLite through rusqlite. Everything SQL lives in this folder.
//!
//! The rest of tokend talks to [`Store`] in domain terms (accounts, claims, outcomes, events), so
//! the engine never sees a connection, a row or a pragma; a Postgres-protocol store would
//! implement the same handful of calls.
//!
//! Two connections, each served by a worker that runs on tokio's blocking pool while it has
//! work and exits when its queue is empty: a writer, which folds consecutive outcomes into one
//! transaction (group commit: one fsync covers many refreshes), and a read-only reader, so a
//! writer stuck behind a lock or a full disk never delays the health file, the API or the CLI.
//! (Running on the blocking pool also keeps tokio's paused test clock from jumping while SQLite
//! works.)
//!
//! Before every write transaction, and after every commit, the writer checks that the file at
//! the database path is still the file it opened: a database replaced under the daemon (a
//! restored backup moved over it) is refused, and the outcomes of that commit are reported as
//! not durable, so the engine journals them.

mod cache;
mod outbox;
mod schema;
mod sql;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::config::TokenType;
use crate::lock;
use crate::state::State;
pub use cache::Current;
use cache::RowCache;

pub use outbox::{
    BURST_WINDOW, Delivery, DeliveryView, Finish, PlanFn, Planned, SinkPlan, SinkStats, Step,
    SummaryDetails, Told,
};
pub use schema::SCHEMA_VERSION;
pub use sql::WINDOW_SECS;

/// Most outcomes folded into one transaction.
const MAX_GROUP: usize = 1024;
/// How long SQLite waits for another writer's lock before a statement fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong, typed so the engine can tell "cannot write now" from "replaced" from a bug.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "the database {path} has schema version {found}, newer than this tokend understands ({SCHEMA_VERSION}); upgrade tokend"
    )]
    TooNew { path: PathBuf, found: i64 },
    #[error(
        "the database {path} has schema version {found}, older than this tokend ({SCHEMA_VERSION}); start the daemon (or `tokend accounts import`) once as a user who can write it, to upgrade it"
    )]
    TooOld { path: PathBuf, found: i64 },
    #[error("database migration to version {version} failed: {message}")]
    Migrate { version: i64, message: String },
    /// SQLite refused; `kind` says whether it may pass (locked, full, I/O) or is a bug.
    #[error("database error ({kind}): {message}")]
    Sql { kind: SqlKind, message: String },
    #[error(
        "the database file {path} was replaced or removed under the running daemon (expected device {expected}, found {found}); refusing to write to the old file"
    )]
    Replaced {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("the store has been closed")]
    Closed,
}

/// The families of SQLite failure that matter to tokend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlKind {
    /// Another connection holds the lock past the busy timeout.
    Busy,
    /// The disk (or the database's page limit) is full.
    Full,
    /// A read-only file or directory, or permission denied.
    ReadOnly,
    Io,
    Corrupt,
    /// A CHECK, NOT NULL or type rule refused the write.
    Constraint,
    Other,
}

impl std::fmt::Display for SqlKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SqlKind::Busy => "locked by another connection",
            SqlKind::Full => "disk full",
            SqlKind::ReadOnly => "read-only",
            SqlKind::Io => "I/O error",
            SqlKind::Corrupt => "corrupt",
            SqlKind::Constraint => "constraint",
            SqlKind::Other => "other",
        })
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode as C;
        let kind = match e.sqlite_error_code() {
            Some(C::DatabaseBusy | C::DatabaseLocked) => SqlKind::Busy,
            Some(C::DiskFull) => SqlKind::Full,
            Some(C::ReadOnly | C::PermissionDenied | C::CannotOpen) => SqlKind::ReadOnly,
            Some(C::SystemIoFailure) => SqlKind::Io,
            Some(C::DatabaseCorrupt | C::NotADatabase) => SqlKind::Corrupt,
            Some(C::ConstraintViolation | C::TypeMismatch) => SqlKind::Constraint,
            _ => SqlKind::Other,
        };
        StoreError::Sql {
            kind,
            message: e.to_string(),
        }
    }
}

impl StoreError {
    /// "Cannot write right now": worth holding outcomes and retrying.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Sql {
                kind: SqlKind::Busy | SqlKind::Full | SqlKind::ReadOnly | SqlKind::Io,
                ..
            }
        )
    }
}

/// An account row as tokend sees it. Tokens are secrets and never appear in `Debug`.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    pub profile: Option<String>,
    pub token_type: TokenType,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<i64>,
    pub refresh_issued_at: Option<i64>,
    pub scopes: Option<String>,
    pub state: State,
    pub failures: u32,
    /// When tokend last stored a refreshed pair for it (the access token's issue time).
    pub last_refresh_at: Option<i64>,
    pub lease_owner: Option<String>,
    /// A token request left in flight by a previous claim (a crash, or another daemon).
    pub attempt: Option<i64>,
    pub attempt_at: Option<i64>,
    /// Token requests in the current hour-long window, and when the window began.
    pub window_start: Option<i64>,
    pub window_requests: u32,
    /// Set on a claimed row when another process (or a previous run) left a token request in
    /// flight on it: that owner. An `invalid_grant` then means its rotation was lost.
    pub left_in_flight_by: Option<String>,
}

/// A decision about one claimed row, made by the engine's policy inside the claim transaction.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Send a token request: lease the row and record the attempt.
    Request,
    /// Lease the row without an attempt (a revocation probe: nothing rotates).
    Probe,
    /// Write this change now, without any request.
    Write(Change),
    /// Leave the row as it is.
    Keep,
}

/// A change tokend writes to one account (no tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub to: State,
    /// Why the account is in its state (for operators; kept across unchanged states).
    pub reason: Option<String>,
    /// `None`: nothing scheduled (terminal states, paused, company tokens).
    pub next_action_at: Option<i64>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// A revocation probe found the token active at this time.
    pub checked_at: Option<i64>,
    /// Write this profile name into a row that names none (it belongs to the only profile).
    pub profile: Option<String>,
}

/// Events recorded beside a change, for operators and notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A state change (written by the store itself when the state moves).
    State,
    /// An account tokend kept alive had its access token expire before the refresh committed.
    Lapse,
    /// A rotated pair was not stored: the row holds another grant (relinked, or another daemon's).
    Superseded,
    /// A refresh left in flight by a dead process lost its rotation (`invalid_grant` on retry).
    RotationLost,
    /// The refresh token nears the end of its lifetime.
    AtRisk,
    ProfilePaused,
    ProfileResumed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Lapse => "lapse",
            EventKind::Superseded => "superseded",
            EventKind::RotationLost => "rotation_lost",
            EventKind::AtRisk => "at_risk",
            EventKind::ProfilePaused => "profile_paused",
            EventKind::ProfileResumed => "profile_resumed",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        [
            EventKind::State,
            EventKind::Lapse,
            EventKind::Superseded,
            EventKind::RotationLost,
            EventKind::AtRisk,
            EventKind::ProfilePaused,
            EventKind::ProfileResumed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// An extra event to record with an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub kind: EventKind,
    pub reason: String,
    /// Record it only if no event of this kind for the account is at or after this time
    /// (a lapse the sweep already recorded is not recorded twice).
    pub unless_since: Option<i64>,
}

/// A refreshed pair (or part of one) to store.
#[derive(Debug, Clone)]
pub struct NewTokens {
    /// `None`: the answer carried no usable access token; the stored one stays.
    pub access_token: Option<SecretString>,
    /// `None`: not rotated; the stored refresh token stays.
    pub refresh_token: Option<SecretString>,
    /// `None`: keep the stored expiry (only with `access_token: None`).
    pub expires_at: Option<i64>,
    pub scopes: Option<String>,
}

/// What makes an outcome still ours to write when it reaches the store.
#[derive(Debug, Clone)]
pub enum Guard {
    /// Compare-and-swap on the refresh token that was presented: a rotated pair wins whoever
    /// holds the lease, unless the row now holds another refresh token (relinked, or rotated by
    /// another daemon).
    Presented(SecretString),
    /// The row still carries this attempt (nobody relinked it or took it over meanwhile).
    Attempt(i64),
    /// The row is still leased to this owner (revocation probes).
    Lease(String),
    /// As `Presented`, by the hex SHA-256 of the token (a pair replayed from the journal).
    PresentedDigest(String),
}

/// The result of one request (or probe), to commit.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: String,
    pub guard: Guard,
    pub tokens: Option<NewTokens>,
    pub change: Change,
    pub notes: Vec<Note>,
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Written; the state it moved from, and whether a lapse was recorded with it.
    Applied { from: State, lapse: bool },
    /// A rotated pair not written: the row holds a different refresh token now.
    Superseded,
    /// The row no longer exists.
    Gone,
    /// A change not written: the row was relinked or taken over since it was claimed.
    Stale,
}

/// An account without its tokens, for listings and the API.
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
    pub last_error_at: Option<i64>,
    pub last_refresh_at: Option<i64>,
    pub last_checked_at: Option<i64>,
    pub scopes: Option<String>,
    /// A token request is in flight (by some tokend) since this time.
    pub refreshing_since: Option<i64>,
    pub created_at: Option<i64>,
    pub updated_at: Option<i64>,
    /// When the account entered its state (as far as tokend saw).
    pub state_since: Option<i64>,
}

/// What [`Store::remove_holding`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlinked {
    Removed,
    /// The account holds other tokens now: kept.
    Changed,
    /// No such account.
    Missing,
}

/// One account to link (import, API).
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub id: String,
    pub profile: Option<String>,
    pub token_type: TokenType,
    pub access_token: Option<SecretString>,
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<i64>,
    pub scopes: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Count {
    pub state: State,
    pub token_type: String,
    pub profile: Option<String>,
    pub count: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub seq: i64,
    pub kind: String,
    pub account_id: Option<String>,
    pub profile: Option<String>,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    pub reason: Option<String>,
    pub at: i64,
}

/// A profile paused for misconfiguration, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedProfile {
    pub name: String,
    pub reason: String,
    pub since: i64,
    /// Fingerprint of the profile settings it was paused with (a reload that changes them retries).
    pub fingerprint: String,
}

/// A row that could not be read; it is marked `invalid` and the others go on.
#[derive(Debug, Clone)]
pub struct RowProblem {
    pub id: String,
    pub reason: String,
}

/// What a claim of new rows did.
#[derive(Debug, Default, Clone)]
pub struct Evaluated {
    pub looked_at: usize,
    /// State changes written (for the health file's counts and logs).
    pub changes: Vec<(String, State, State, Option<String>)>,
    pub problems: Vec<RowProblem>,
}

/// Rows leased for token requests, and the writes decided without one.
#[derive(Debug, Default)]
pub struct Claimed {
    pub requests: Vec<Account>,
    /// How many rows each group returned (a full group may have more waiting).
    pub full_groups: usize,
    pub changes: Vec<(String, State, State, Option<String>)>,
    pub problems: Vec<RowProblem>,
}

/// One group of a due claim: the rows of one profile (`None`: rows without a profile, which
/// belong to the only profile) with room for `limit` requests.
#[derive(Debug, Clone)]
pub struct ClaimGroup {
    pub profile: Option<String>,
    pub limit: usize,
}

/// A claim's parameters that do not change per row.
#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: String,
    pub now: i64,
    pub until: i64,
    /// Another process's expired lease is taken over only this long after it expired (its
    /// request may still be in flight).
    pub grace: i64,
}

type DecideFn = Box<dyn Fn(&Account) -> Decision + Send>;
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;
type Job = Box<dyn FnOnce(&mut Conn) + Send>;

enum Cmd {
    Commit(Box<Outcome>, Reply<Committed>),
    Run(Job),
}

/// A connection and what the writer knows about the file it opened.
struct Conn {
    conn: Connection,
    identity: Option<Identity>,
    path: PathBuf,
    /// Set once the file was found replaced: every later write is refused.
    replaced: Option<StoreError>,
    /// Commit durations, for metrics.
    on_commit: Option<Arc<dyn Fn(Duration) + Send + Sync>>,
    /// Whether commits are synced now (`synchronous=FULL`), as last set; `None` when unknown.
    synced: Option<bool>,
    /// The rows the token API keeps in memory: every write forgets what it touched.
    cache: Arc<RowCache>,
    /// `data_version` as last polled: when it moves, another program wrote.
    seen_version: Option<i64>,
}

impl Conn {
    fn new(
        conn: Connection,
        identity: Option<Identity>,
        path: &Path,
        cache: Arc<RowCache>,
    ) -> Conn {
        Conn {
            conn,
            identity,
            path: path.to_owned(),
            replaced: None,
            on_commit: None,
            synced: None,
            cache,
            seen_version: None,
        }
    }

    /// Make the next commits synced to the disk before they return (`FULL`), or written to
    /// the WAL only (`NORMAL`: the OS holds them, so a crash of tokend keeps them, and the
    /// next synced commit or checkpoint puts them on the disk, the WAL being written in
    /// order). Unsynced is for claims and leases, written before each batch of requests;
    /// every outcome and every operator's change is synced. Power lost before the next
    /// synced commit loses claims, never a token: the row still holds the refresh token that
    /// was presented.
    fn sync(&mut self, full: bool) -> Result<(), StoreError> {
        if self.synced != Some(full) {
            // Unknown while the pragma runs: a failure leaves it unknown, set again next time.
            self.synced = None;
            let sql = if full {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            self.conn.execute_batch(sql)?;
            self.synced = Some(full);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
}

impl Identity {
    fn of(path: &Path) -> std::io::Result<Identity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

impl Conn {
    /// Refuse to write to a file that is no longer the one at the path.
    fn check_identity(&mut self) -> Result<(), StoreError> {
        if let Some(e) = &self.replaced {
            return Err(e.clone());
        }
        let Some(expected) = self.identity else {
            return Ok(());
        };
        let found = Identity::of(&self.path);
        if found.as_ref().ok() == Some(&expected) {
            return Ok(());
        }
        let e = StoreError::Replaced {
            path: self.path.clone(),
            expected: format!("{}:{}", expected.dev, expected.ino),
            found: match found {
                Ok(f) => format!("{}:{}", f.dev, f.ino),
                Err(e) => format!("nothing ({e})"),
            },
        };
        self.replaced = Some(e.clone());
        Err(e)
    }
}

struct Queue {
    cmds: VecDeque<Cmd>,
    running: bool,
    closed: bool,
}

/// One connection served in order by a worker on the blocking pool.
#[derive(Clone)]
struct Worker {
    queue: Arc<Mutex<Queue>>,
    conn: Arc<Mutex<Conn>>,
    name: &'static str,
}

impl Worker {
    fn new(conn: Conn, name: &'static str) -> Worker {
        Worker {
            queue: Arc::new(Mutex::new(Queue {
                cmds: VecDeque::new(),
                running: false,
                closed: false,
            })),
            conn: Arc::new(Mutex::new(conn)),
            name,
        }
    }

    fn send(&self, cmd: Cmd) -> Result<(), StoreError> {
        let mut q = lock(&self.queue);
        if q.closed {
            return Err(StoreError::Closed);
        }
        q.cmds.push_back(cmd);
        if !q.running {
            q.running = true;
            drop(q);
            let me = self.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || me.drain());
                }
                Err(_) => {
                    std::thread::Builder::new()
                        .name(self.name.into())
                        .spawn(move || me.drain())
                        .map_err(|e| StoreError::Open {
                            path: PathBuf::new(),
                            message: format!("cannot start a store thread: {e}"),
                        })?;
                }
            }
        }
        Ok(())
    }

    fn drain(&self) {
        let mut conn = lock(&self.conn);
        loop {
            let batch: Vec<Cmd> = {
                let mut q = lock(&self.queue);
                if q.cmds.is_empty() {
                    q.running = false;
                    return;
                }
                q.cmds.drain(..).collect()
            };
            let mut group: Vec<(Box<Outcome>, Reply<Committed>)> = Vec::new();
            for cmd in batch {
                match cmd {
                    Cmd::Commit(o, reply) => {
                        group.push((o, reply));
                        if group.len() == MAX_GROUP {
                            sql::commit_group(&mut conn, std::mem::take(&mut group));
                        }
                    }
                    Cmd::Run(job) => {
                        if !group.is_empty() {
                            sql::commit_group(&mut conn, std::mem::take(&mut group));
                        }
                        job(&mut conn);
                    }
                }
            }
            if !group.is_empty() {
                sql::commit_group(&mut conn, group);
            }
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Run(Box::new(move |c| {
            let _ = reply.send(f(c));
        })))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// Handle to the store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: Worker,
    reader: Worker,
    cache: Arc<RowCache>,
    path: PathBuf,
}

/// Which rows a write may change, to forget them in the cache once it committed.
enum Touches {
    /// Only other tables, or columns the token path does not read (leases).
    Nothing,
    One(String),
    Some(Vec<String>),
    All,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Findings at open time that do not stop tokend but an operator should hear about.
pub type Warnings = Vec<String>;

impl Store {
    /// Open (creating it, mode 0600, if needed) and migrate the database.
    pub fn open(path: &Path) -> Result<(Store, Warnings), StoreError> {
        Store::open_waiting(path, BUSY_TIMEOUT)
    }

    /// As [`Store::open`], with writes waiting up to `busy` for another program's lock.
    pub fn open_waiting(path: &Path, busy: Duration) -> Result<(Store, Warnings), StoreError> {
        let warnings = schema::prepare_file(path)?;
        let mut conn = schema::open_writer(path, busy)?;
        schema::migrate(&mut conn, path)?;
        schema::own_writes_without_triggers(&conn).map_err(|e| StoreError::Open {
            path: path.to_owned(),
            message: format!("cannot set up the writer's connection: {e}"),
        })?;
        let identity = Identity::of(path).ok();
        let reader = schema::open_reader(path)?;
        let cache = Arc::new(RowCache::default());
        let store = Store {
            writer: Worker::new(
                Conn::new(conn, identity, path, cache.clone()),
                "tokend-store",
            ),
            reader: Worker::new(
                Conn::new(reader, None, path, cache.clone()),
                "tokend-store-read",
            ),
            cache,
            path: path.to_owned(),
        };
        Ok((store, warnings))
    }

    /// Open an existing database for reading only: never creates, migrates or writes it.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let reader = schema::open_reader(path)?;
        schema::check_version(&reader, path)?;
        let cache = Arc::new(RowCache::default());
        let worker = Worker::new(
            Conn::new(reader, None, path, cache.clone()),
            "tokend-store-read",
        );
        Ok(Store {
            writer: worker.clone(),
            reader: worker,
            cache,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Call `f` with the duration of every group commit (for metrics).
    pub fn on_commit(&self, f: impl Fn(Duration) + Send + Sync + 'static) {
        lock(&self.writer.conn).on_commit = Some(Arc::new(f));
    }

    /// A write whose commit is synced before it returns.
    async fn write<T: Send + 'static>(
        &self,
        touches: Touches,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_synced(true, touches, f).await
    }

    /// A write of claims or leases: its commit is not synced (see [`Conn::sync`]).
    async fn write_unsynced<T: Send + 'static>(
        &self,
        touches: Touches,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_synced(false, touches, f).await
    }

    /// Run `f` on the writer's thread; then, before anyone hears of it, forget the cached rows
    /// it `touches` (also when it failed: it may have committed before failing).
    async fn write_synced<T: Send + 'static>(
        &self,
        full: bool,
        touches: Touches,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.writer
            .run(move |c| {
                c.check_identity()?;
                c.sync(full)?;
                let written = f(&mut c.conn);
                match touches {
                    Touches::Nothing => {}
                    Touches::One(id) => c.cache.forget([id.as_str()]),
                    Touches::Some(ids) => c.cache.forget(ids.iter().map(String::as_str)),
                    Touches::All => c.cache.forget_all(),
                }
                written
            })
            .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.reader.run(move |c| f(&c.conn)).await
    }

    /// Rows inserted or changed by other programs (due for evaluation): decide on each (never
    /// a request) and write the decisions, up to `limit` rows, in one transaction.
    pub async fn evaluate_new(
        &self,
        lease: Lease,
        limit: usize,
        decide: impl Fn(&Account) -> Decision + Send + 'static,
    ) -> Result<Evaluated, StoreError> {
        let decide: DecideFn = Box::new(decide);
        let cache = self.cache.clone();
        self.write_unsynced(Touches::Nothing, move |c| {
            let evaluated = sql::evaluate_new(c, &lease, limit, &decide);
            if let Ok(e) = &evaluated {
                cache.forget(e.changes.iter().map(|(id, ..)| id.as_str()));
            }
            evaluated
        })
        .await
    }

    /// Due rows, per group: decide on each; lease the ones to request (recording the attempt
    /// and counting it in the row's hourly window) and write the other decisions, in one
    /// transaction.
    pub async fn claim_due(
        &self,
        lease: Lease,
        groups: Vec<ClaimGroup>,
        decide: impl Fn(&Account) -> Decision + Send + 'static,
    ) -> Result<Claimed, StoreError> {
        let decide: DecideFn = Box::new(decide);
        let cache = self.cache.clone();
        self.write_unsynced(Touches::Nothing, move |c| {
            let claimed = sql::claim_due(c, &lease, &groups, &decide);
            if let Ok(cl) = &claimed {
                cache.forget(cl.changes.iter().map(|(id, ..)| id.as_str()));
            }
            claimed
        })
        .await
    }

    /// Claim one account by id (on-demand refresh, probes): as [`Self::claim_due`] but whatever
    /// its schedule. `Ok(None)` when it does not exist; a row leased by another live process is
    /// returned as `Decision::Keep` (not claimed).
    pub async fn claim_one(
        &self,
        id: &str,
        lease: Lease,
        decide: impl Fn(&Account) -> Decision + Send + 'static,
    ) -> Result<Option<(Account, Decision)>, StoreError> {
        let id = id.to_owned();
        let decide: DecideFn = Box::new(decide);
        self.write_unsynced(Touches::One(id.clone()), move |c| {
            sql::claim_one(c, &id, &lease, &decide)
        })
        .await
    }

    /// Commit an outcome (grouped with others into one transaction).
    pub async fn commit(&self, outcome: Outcome) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(Cmd::Commit(Box::new(outcome), reply))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Extend the leases of rows with requests in flight (so no one takes them over).
    pub async fn renew_leases(
        &self,
        owner: &str,
        ids: Vec<String>,
        until: i64,
    ) -> Result<(), StoreError> {
        let owner = owner.to_owned();
        self.write_unsynced(Touches::Nothing, move |c| {
            sql::renew_leases(c, &owner, &ids, until)
        })
        .await
    }

    /// Undo claims `(id, attempt)` whose requests were never sent.
    pub async fn release(&self, owner: &str, claims: Vec<(String, i64)>) -> Result<(), StoreError> {
        let owner = owner.to_owned();
        self.write_unsynced(Touches::Nothing, move |c| sql::release(c, &owner, &claims))
            .await
    }

    /// Owners with token requests left in flight, as `(owner, count)`.
    pub async fn in_flight_owners(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(sql::in_flight_owners).await
    }

    /// Make the rows a dead owner left in flight due first, whatever their lease says.
    pub async fn recover_dead_owner(&self, owner: &str, now: i64) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        self.write(Touches::All, move |c| {
            sql::recover_dead_owner(c, &owner, now)
        })
        .await
    }

    /// Rows whose profile is not one of `profiles` (and rows without one when `profiles` has
    /// not exactly one): look at them again (a reload removed or renamed a profile).
    pub async fn reevaluate_orphans(&self, profiles: Vec<String>) -> Result<u64, StoreError> {
        self.write(Touches::All, move |c| sql::reevaluate_orphans(c, &profiles))
            .await
    }

    /// The earliest scheduled action among `groups` (profiles; `None`: rows without one). A
    /// leased row counts at its lease's end plus `grace`; so does a row waiting for evaluation
    /// behind another process's lease.
    pub async fn next_due(
        &self,
        groups: Vec<Option<String>>,
        grace: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.read(move |c| sql::next_due(c, &groups, grace)).await
    }

    /// Changes whenever another connection commits: the cheap way to notice rows written by
    /// other programs. Also checks the file is still the one opened.
    pub async fn data_version(&self) -> Result<i64, StoreError> {
        self.writer
            .run(|c| {
                c.check_identity()?;
                let v: i64 = c
                    .conn
                    .pragma_query_value(None, "data_version", |r| r.get(0))?;
                // Another program wrote when it moved: any cached row may be older than that.
                c.cache.vouch(c.seen_version.replace(v) != Some(v));
                Ok(v)
            })
            .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<Result<Account, RowProblem>>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| sql::get(c, &id)).await
    }

    /// The token route's view of a row ([`Current`]), from memory when it was read before and
    /// nothing has written it since (see [`cache`]). Rows written by other programs are seen
    /// within a poll of [`Store::data_version`].
    /// `from_memory: false` reads the database whatever the cache holds (and keeps what it read).
    pub async fn current(
        &self,
        id: &str,
        from_memory: bool,
    ) -> Result<Option<Result<Arc<Current>, RowProblem>>, StoreError> {
        if from_memory && let Some(row) = self.cache.get(id) {
            return Ok(Some(Ok(row)));
        }
        let seen = self.cache.seq();
        let read = self.get(id).await?;
        Ok(read.map(|r| {
            r.map(|a| {
                let row = Arc::new(Current::from(a));
                self.cache.keep(seen, id, row.clone());
                row
            })
        }))
    }

    /// Accounts in `state` (all when `None`) and `profile`, ordered by id, after `after`, at most
    /// `limit` (0: no limit).
    pub async fn list(
        &self,
        state: Option<State>,
        profile: Option<String>,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<Summary>, StoreError> {
        self.read(move |c| sql::list(c, state, profile.as_deref(), after.as_deref(), limit))
            .await
    }

    pub async fn summary(&self, id: &str) -> Result<Option<Summary>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| sql::summary(c, &id)).await
    }

    pub async fn counts(&self) -> Result<Vec<Count>, StoreError> {
        self.read(sql::counts).await
    }

    /// Events after `after_seq`, optionally for one account, at most `limit`.
    pub async fn events(
        &self,
        account: Option<String>,
        after_seq: i64,
        since: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.read(move |c| sql::events(c, account.as_deref(), after_seq, since, limit))
            .await
    }

    /// The newest `limit` events of one account, oldest first.
    pub async fn recent_events(&self, id: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| sql::recent_events(c, &id, limit)).await
    }

    /// Link accounts, all or nothing. Without `replace`, an id that exists is a conflict:
    /// nothing is written and the conflicting ids are returned. With it, existing rows take the
    /// new grant; the number of rows replaced is returned.
    pub async fn link(
        &self,
        accounts: Vec<NewAccount>,
        replace: bool,
        now: i64,
    ) -> Result<Linked, StoreError> {
        let ids = accounts.iter().map(|a| a.id.clone()).collect();
        self.write(Touches::Some(ids), move |c| {
            sql::link(c, &accounts, replace, now)
        })
        .await
    }

    /// Write a new grant into an existing account (relink), as another program's UPDATE would.
    pub async fn relink(&self, account: NewAccount, now: i64) -> Result<bool, StoreError> {
        self.write(Touches::One(account.id.clone()), move |c| {
            sql::relink(c, &account, now)
        })
        .await
    }

    /// Delete an account; returns its tokens if it existed (to revoke them).
    pub async fn remove(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let id = id.to_owned();
        self.write(Touches::One(id.clone()), move |c| sql::remove(c, &id))
            .await
    }

    /// Delete an account only if it still holds these tokens (those of a grant just revoked):
    /// tokens stored since (a refresh, a relink) are a grant still alive, so the row stays.
    pub async fn remove_holding(
        &self,
        id: &str,
        access_token: Option<SecretString>,
        refresh_token: Option<SecretString>,
    ) -> Result<Unlinked, StoreError> {
        let id = id.to_owned();
        self.write(Touches::One(id.clone()), move |c| {
            sql::remove_holding(c, &id, access_token.as_ref(), refresh_token.as_ref())
        })
        .await
    }

    /// Bring an account in `failing`, `paused`, `needs_reauth` or `revoked` back for evaluation now.
    pub async fn resume(&self, id: &str, now: i64) -> Result<Option<State>, StoreError> {
        let id = id.to_owned();
        self.write(Touches::One(id.clone()), move |c| sql::resume(c, &id, now))
            .await
    }

    /// Record a pause of `profile` and move its schedulable accounts that have no request in
    /// flight to `paused`. Returns how many accounts moved.
    pub async fn pause_profile(
        &self,
        profile: PausedProfile,
        single: bool,
        now: i64,
    ) -> Result<u64, StoreError> {
        self.write(Touches::All, move |c| {
            sql::pause_profile(c, &profile, single, now)
        })
        .await
    }

    /// End the pause of `profile`: its paused accounts become due now. Returns how many.
    pub async fn resume_profile(
        &self,
        profile: &str,
        single: bool,
        reason: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let (profile, reason) = (profile.to_owned(), reason.to_owned());
        self.write(Touches::All, move |c| {
            sql::resume_profile(c, &profile, single, &reason, now)
        })
        .await
    }

    /// Make one paused user account of `profile` (one that holds a refresh token) due now, to
    /// find out whether the profile works again. `false` when it has none.
    pub async fn probe_profile(
        &self,
        profile: &str,
        single: bool,
        now: i64,
    ) -> Result<bool, StoreError> {
        let profile = profile.to_owned();
        self.write(Touches::All, move |c| {
            sql::probe_profile(c, &profile, single, now)
        })
        .await
    }

    pub async fn paused_profiles(&self) -> Result<Vec<PausedProfile>, StoreError> {
        self.read(sql::paused_profiles).await
    }

    /// Make the failing accounts of `profile` due now (its server answers again).
    pub async fn wake_failing(
        &self,
        profile: &str,
        single: bool,
        now: i64,
    ) -> Result<u64, StoreError> {
        let profile = profile.to_owned();
        self.write(Touches::All, move |c| {
            sql::wake_failing(c, &profile, single, now)
        })
        .await
    }

    /// Accounts in any state but `active` (at most `limit`), as `(id, state)`.
    pub async fn attention(&self, limit: usize) -> Result<Vec<(String, State)>, StoreError> {
        self.read(move |c| sql::attention(c, limit)).await
    }

    /// User accounts kept alive (active or failing) whose refresh token was issued before
    /// `before`: at most `limit` ids, and their count.
    pub async fn at_risk(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<(Vec<String>, u64), StoreError> {
        self.read(move |c| sql::at_risk(c, before, limit)).await
    }

    /// User accounts kept alive whose access token expired before `now` (a lapse under way):
    /// at most `limit` ids, and their count.
    pub async fn lapsed(&self, now: i64, limit: usize) -> Result<(Vec<String>, u64), StoreError> {
        self.read(move |c| sql::lapsed(c, now, limit)).await
    }

    /// The account failing the longest, and since when.
    pub async fn oldest_failure(&self) -> Result<Option<(String, i64)>, StoreError> {
        self.read(sql::oldest_failure).await
    }

    /// The least time left on any kept-alive user token, per profile (`None`: no profile).
    pub async fn min_expiry(&self) -> Result<Vec<(Option<String>, i64)>, StoreError> {
        self.read(sql::min_expiry).await
    }

    /// Company tokens a revocation run should probe: active or failing, not leased.
    pub async fn company_accounts(&self, now: i64) -> Result<Vec<Account>, StoreError> {
        self.read(move |c| sql::company_accounts(c, now)).await
    }

    /// Record at-risk events for user accounts whose refresh token was issued before `before`
    /// (once per refresh token) and lapse events for kept-alive accounts whose access token
    /// expired before `now` (once per expiry). Returns what it recorded.
    pub async fn sweep(&self, before: i64, now: i64) -> Result<Swept, StoreError> {
        // Events only: no account's token or state moves.
        self.write(Touches::Nothing, move |c| sql::sweep(c, before, now))
            .await
    }

    /// Record an event that goes with no state change.
    pub async fn note(
        &self,
        kind: EventKind,
        account: Option<String>,
        profile: Option<String>,
        reason: String,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(Touches::Nothing, move |c| {
            sql::insert_event(
                c,
                kind,
                account.as_deref(),
                profile.as_deref(),
                None,
                None,
                Some(&reason),
                now,
            )
        })
        .await
    }

    /// The id of this database, stable for its lifetime (event ids are `store_id:seq`).
    pub async fn store_id(&self) -> Result<String, StoreError> {
        self.read(sql::store_id).await
    }

    /// Checkpoint the WAL so the database file stands alone, then close both connections
    /// (SQLite removes the `-wal` and `-shm` files as the last one closes). Later calls fail
    /// with [`StoreError::Closed`].
    ///
    /// Also right when the file was replaced under us: the checkpoint goes into the old,
    /// unlinked file, and the old WAL no longer sits beside the new file, where SQLite would
    /// apply its frames to a database they do not belong to.
    pub async fn close(&self) {
        self.cache.stop();
        let checkpoint = self
            .writer
            .run(|c| {
                c.sync(true)?;
                Ok(c.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?)
            })
            .await;
        if let Err(e) = checkpoint
            && !matches!(e, StoreError::Closed)
        {
            tracing::warn!(error = %e, "closing checkpoint failed (the WAL keeps the data safe)");
        }
        for w in [&self.reader, &self.writer] {
            let _ = w
                .run(|c| {
                    // Swap in a connection to nothing; the file's connection closes as it drops.
                    let nothing = Connection::open_in_memory()?;
                    drop(std::mem::replace(&mut c.conn, nothing));
                    c.synced = None;
                    Ok(())
                })
                .await;
            lock(&w.queue).closed = true;
        }
    }
}

/// What a sweep recorded: `(account, profile)` pairs.
#[derive(Debug, Default, Clone)]
pub struct Swept {
    pub at_risk: Vec<(String, Option<String>)>,
    pub lapsed: Vec<(String, Option<String>)>,
}

/// What [`Store::link`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linked {
    /// Every account written; how many existed before and were replaced.
    Done { inserted: usize, replaced: usize },
    /// Nothing written: these ids exist (and `replace` was not asked for).
    Conflicts(Vec<String>),
}

/// Time a group commit took, for the metrics hook.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::config::DbConfig;

    async fn synchronous_in(store: &Store, unsynced: bool) -> i64 {
        let q = |c: &mut Connection| -> Result<i64, StoreError> {
            Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
        };
        if unsynced {
            store
                .write_unsynced(Touches::Nothing, q)
                .await
                .expect("pragma")
        } else {
            store.write(Touches::Nothing, q).await.expect("pragma")
        }
    }

    /// Claims are written unsynced; everything else, outcomes above all, is synced, whatever
    /// ran before it on the connection.
    #[tokio::test]
    async fn only_claims_skip_the_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(&dir.path().join("t.db")).expect("open");
        const FULL: i64 = 2;
        const NORMAL: i64 = 1;
        assert_eq!(synchronous_in(&store, false).await, FULL);
        assert_eq!(synchronous_in(&store, true).await, NORMAL);
        assert_eq!(synchronous_in(&store, false).await, FULL, "after a claim");
        assert_eq!(synchronous_in(&store, true).await, NORMAL);
        // An outcome (of an account that is not there) committed right after a claim...
        let outcome = Outcome {
            id: "nobody".into(),
            guard: Guard::Attempt(1),
            tokens: None,
            change: Change {
                to: State::Active,
                reason: None,
                next_action_at: None,
                failures: 0,
                last_error: None,
                checked_at: None,
                profile: None,
            },
            notes: Vec::new(),
            now: 0,
        };
        assert_eq!(
            store.commit(outcome).await.expect("commit"),
            Committed::Gone
        );
        // ...left the connection synced (read without setting it).
        let after = store
            .writer
            .run(|c| {
                Ok(c.conn
                    .query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))?)
            })
            .await
            .expect("pragma");
        assert_eq!(after, FULL, "a commit group after a claim");
    }
    /// A row that got other tokens since they were read (a refresh landed, a relink) stays.
    #[tokio::test]
    async fn remove_holding_deletes_only_the_tokens_it_was_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(&dir.path().join("t.db")).expect("open");
        let secret = |s: &str| Some(SecretString::from(s));
        let account = |refresh: &str| NewAccount {
            id: "u".into(),
            profile: Some("p".into()),
            token_type: TokenType::User,
            access_token: secret("a1"),
            refresh_token: secret(refresh),
            expires_at: Some(2_000_000_000),
            scopes: None,
        };
        store
            .link(vec![account("r1")], false, 0)
            .await
            .expect("link");
        assert!(store.relink(account("r2"), 1).await.expect("relink"));
        let holding = |refresh: &str| store.remove_holding("u", secret("a1"), secret(refresh));
        assert_eq!(holding("r1").await.expect("remove"), Unlinked::Changed);
        assert!(store.get("u").await.expect("get").is_some());
        assert_eq!(holding("r2").await.expect("remove"), Unlinked::Removed);
        assert_eq!(holding("r2").await.expect("remove"), Unlinked::Missing);
    }

    /// tokend's writer runs without the schema's triggers (its own writes bump `revision`, so
    /// they would do nothing), but linking and relinking write as another program would and go
    /// through them: the row is scheduled, a dead grant's state is reset, the event recorded.
    #[tokio::test]
    async fn linking_and_relinking_go_through_the_schema_triggers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let (store, _) = Store::open(&path).expect("open");
        let other = Connection::open(&path).expect("open");
        type Seen = (
            String,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<i64>,
        );
        let row = || -> Seen {
            other
                .query_row(
                    "SELECT state, next_action_at, refresh_issued_at, lease_owner, attempt_id
                     FROM accounts WHERE id = 'u'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .expect("row")
        };
        let kill = || {
            other
                .execute(
                    "UPDATE accounts SET state = 'needs_reauth', next_action_at = NULL,
                        lease_owner = 'x', lease_until = 9, attempt_id = 5, revision = revision + 1
                     WHERE id = 'u'",
                    [],
                )
                .expect("update");
        };
        let resets = || -> i64 {
            other
                .query_row(
                    "SELECT count(*) FROM account_events WHERE account_id = 'u'
                       AND from_state = 'needs_reauth' AND to_state = 'active'
                       AND reason = 'new grant written'",
                    [],
                    |r| r.get(0),
                )
                .expect("events")
        };
        store
            .link(vec![user("u", "a1", "r1")], false, 0)
            .await
            .expect("link");
        let (state, next, issued, _, _) = row();
        assert_eq!((state.as_str(), next), ("active", Some(0)));
        assert!(issued.is_some(), "accounts_linked dates the refresh token");

        kill();
        store
            .link(vec![user("u", "a2", "r2")], true, 0)
            .await
            .expect("link again");
        assert_eq!(
            row(),
            ("active".into(), Some(0), issued, None, None),
            "a replaced grant is live again, unleased, and evaluated at once"
        );
        assert_eq!(resets(), 1);

        kill();
        assert!(
            store
                .relink(user("u", "a3", "r3"), 0)
                .await
                .expect("relink")
        );
        assert_eq!(row().0, "active");
        assert_eq!(row().1, Some(0));
        assert_eq!(resets(), 2);

        let on = store
            .writer
            .run(|c| Ok(c.conn.db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER)?))
            .await
            .expect("db_config");
        assert!(!on, "the writer's own writes run without triggers");
    }

    fn user(id: &str, access: &str, refresh: &str) -> NewAccount {
        NewAccount {
            id: id.into(),
            profile: Some("p".into()),
            token_type: TokenType::User,
            access_token: Some(SecretString::from(access)),
            refresh_token: Some(SecretString::from(refresh)),
            expires_at: Some(2_000_000_000),
            scopes: None,
        }
    }

    async fn cached_access(store: &Store, id: &str) -> Option<String> {
        use secrecy::ExposeSecret;
        match store.current(id, true).await.expect("current")? {
            Ok(a) => a
                .access_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            Err(p) => panic!("bad row {id}: {}", p.reason),
        }
    }

    /// The token path's cache never answers with a row older than the store's: every write
    /// through the store forgets what it touched, and a write by another program is forgotten
    /// at the next `data_version` poll.
    #[tokio::test]
    async fn the_cache_follows_every_write_it_could_miss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let (store, _) = Store::open(&path).expect("open");
        store
            .link(vec![user("u", "a1", "r1"), user("v", "b1", "s1")], false, 0)
            .await
            .expect("link");
        store.data_version().await.expect("data_version");
        assert_eq!(cached_access(&store, "u").await.as_deref(), Some("a1"));
        assert_eq!(cached_access(&store, "v").await.as_deref(), Some("b1"));
        assert_eq!(store.cache.len(), 2, "both rows kept");

        // A refresh's outcome.
        let outcome = Outcome {
            id: "u".into(),
            guard: Guard::Presented(SecretString::from("r1")),
            tokens: Some(NewTokens {
                access_token: Some(SecretString::from("a2")),
                refresh_token: Some(SecretString::from("r2")),
                expires_at: Some(2_000_000_100),
                scopes: None,
            }),
            change: Change {
                to: State::Active,
                reason: None,
                next_action_at: Some(2_000_000_000),
                failures: 0,
                last_error: None,
                checked_at: None,
                profile: None,
            },
            notes: Vec::new(),
            now: 10,
        };
        assert!(matches!(
            store.commit(outcome).await.expect("commit"),
            Committed::Applied { .. }
        ));
        assert_eq!(cached_access(&store, "u").await.as_deref(), Some("a2"));
        assert_eq!(store.cache.len(), 2, "v stays cached");

        // A relink through the store, then a removal.
        assert!(
            store
                .relink(user("u", "a3", "r3"), 11)
                .await
                .expect("relink")
        );
        assert_eq!(cached_access(&store, "u").await.as_deref(), Some("a3"));
        store.remove("u").await.expect("remove");
        assert_eq!(cached_access(&store, "u").await, None);

        // Another program's UPDATE: seen at the next poll, as the engine polls every second.
        assert_eq!(cached_access(&store, "v").await.as_deref(), Some("b1"));
        let other = Connection::open(&path).expect("second connection");
        other
            .execute("UPDATE accounts SET access_token = 'b2' WHERE id = 'v'", [])
            .expect("foreign update");
        store.data_version().await.expect("data_version");
        assert_eq!(cached_access(&store, "v").await.as_deref(), Some("b2"));

        // No poll for longer than a poll vouches for (the engine stopped, its writer waits on a
        // lock): the cache serves nothing, so another program's write is read at once.
        other
            .execute("UPDATE accounts SET access_token = 'b3' WHERE id = 'v'", [])
            .expect("foreign update");
        assert_eq!(
            cached_access(&store, "v").await.as_deref(),
            Some("b2"),
            "not polled yet"
        );
        store
            .cache
            .vouched_ago(cache::FRESH_FOR + Duration::from_millis(1));
        assert_eq!(cached_access(&store, "v").await.as_deref(), Some("b3"));
    }

    /// Past its capacity the cache drops one row for each one it keeps.
    #[test]
    fn the_cache_holds_at_most_its_capacity() {
        let cache = RowCache::default();
        for i in 0..=cache::CAPACITY {
            let seen = cache.seq();
            let row = Arc::new(Current {
                token_type: TokenType::User,
                access_token: None,
                expires_at: None,
                scopes: None,
                state: State::Active,
                last_refresh_at: None,
            });
            cache.keep(seen, &format!("a{i}"), row);
        }
        assert_eq!(cache.len(), cache::CAPACITY);
        cache.vouch(false);
        assert!(
            cache.get(&format!("a{}", cache::CAPACITY)).is_some(),
            "the newest kept"
        );
    }

    /// A row read while a write was under way is not kept: it may be older than that write.
    #[test]
    fn a_row_read_across_a_write_is_not_kept() {
        let cache = RowCache::default();
        let row = |access: &str| {
            Arc::new(Current {
                token_type: TokenType::User,
                access_token: Some(SecretString::from(access)),
                expires_at: None,
                scopes: None,
                state: State::Active,
                last_refresh_at: None,
            })
        };
        cache.vouch(false);
        let seen = cache.seq();
        cache.forget(["u"]);
        cache.keep(seen, "u", row("old"));
        assert!(
            cache.get("u").is_none(),
            "a row older than a write was kept"
        );
        let seen = cache.seq();
        cache.keep(seen, "u", row("new"));
        assert!(cache.get("u").is_some());
    }
}
