//! Opening the database file and migrating its schema.
//!
//! Migrations are numbered by `PRAGMA user_version`; each runs in its own transaction and a
//! database newer than this binary is refused. The file is created private (0600), and SQLite
//! gives its `-wal` and `-shm` files the database file's mode.

use std::path::Path;

use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, Transaction};

use super::{BUSY_TIMEOUT, StoreError};
use std::time::Duration;

/// Prepared statements kept per connection.
const STATEMENTS: usize = 128;

/// Keeps each statement's query plan once prepared. The bundled SQLite is built with STAT4,
/// which otherwise prepares a statement again whenever a bound value might change its plan:
/// every bind, for tokend's statements (a sixth of the work of a refresh, measured).
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map(drop)
}

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = 3;

fn open_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Open {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Create the database file 0600 if it does not exist; warn when an existing one (or its WAL)
/// is readable by others: it holds every refresh token.
pub(super) fn prepare_file(path: &Path) -> Result<Vec<String>, StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut warnings = Vec::new();
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            for suffix in ["", "-wal", "-shm"] {
                let p = format!("{}{suffix}", path.display());
                if let Ok(m) = std::fs::metadata(&p) {
                    let mode = m.permissions().mode() & 0o777;
                    if mode & 0o077 != 0 {
                        warnings.push(format!(
                            "{p} is readable or writable by others (mode {mode:04o}); it holds refresh tokens: chmod 600 {p}"
                        ));
                    }
                }
            }
        }
        Err(e) => {
            return Err(StoreError::Open {
                path: path.to_owned(),
                message: e.to_string(),
            });
        }
    }
    Ok(warnings)
}

pub(super) fn open_writer(path: &Path, busy: Duration) -> Result<Connection, StoreError> {
    let err = open_err(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&err)?;
    conn.busy_timeout(busy).map_err(&err)?;
    // Every statement tokend runs stays prepared (rusqlite keeps 16 by default: fewer than
    // tokend has, so they were prepared again and again).
    conn.set_prepared_statement_cache_capacity(STATEMENTS);
    stable_plans(&conn).map_err(&err)?;
    // WAL lets other programs read (and link accounts) while tokend writes; FULL makes every
    // commit durable before tokend acts on the token it holds.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&err)?;
    // The writer reads the rows it claims and commits, scattered over the table: a page
    // cache of 16 MiB (SQLite's default is 2) keeps them off the disk for a few hundred
    // thousand accounts. It only grows with pages read.
    conn.pragma_update(None, "cache_size", -16 * 1024)
        .map_err(&err)?;
    Ok(conn)
}

/// Turn the schema's triggers off on tokend's writer. They are there for other programs'
/// writes (a new grant, a state changed by hand); every write of tokend's bumps `revision`,
/// so their `WHEN` is false for it. SQLite still codes them into each UPDATE that names their
/// columns, allocates and zeroes a frame for every row and keeps a statement journal: about a
/// sixth of a refresh's instructions (callgrind). `link` and `relink`, which write as another
/// program would, turn them on for their transaction ([`with_triggers`]).
pub(super) fn own_writes_without_triggers(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false)?;
    Ok(())
}

/// Run `f` with the schema's triggers on (see [`own_writes_without_triggers`]), then off again.
/// Turning them on or off makes SQLite prepare each statement again at its next use: a cost
/// paid once per link, never per refresh.
pub(super) fn with_triggers<T>(
    c: &mut Connection,
    f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let was_on = c.db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER)?;
    if !was_on {
        c.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, true)?;
    }
    let written = f(c);
    if !was_on {
        // Left on, they cost time, never correctness.
        let _ = c.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false);
    }
    written
}

pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    // SQLite would say only "unable to open database file".
    if let Err(e) = std::fs::metadata(path)
        && e.kind() == std::io::ErrorKind::NotFound
    {
        return Err(StoreError::Open {
            path: path.to_owned(),
            message: "it does not exist (the daemon or `tokend accounts import` creates it)".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err(path))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err(path))?;
    conn.set_prepared_statement_cache_capacity(STATEMENTS);
    stable_plans(&conn).map_err(open_err(path))?;
    Ok(conn)
}

fn version(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(open_err(path))
}

pub(super) fn check_version(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = version(conn, path)?;
    match found.cmp(&SCHEMA_VERSION) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
        }),
        std::cmp::Ordering::Less => Err(StoreError::TooOld {
            path: path.to_owned(),
            found,
        }),
    }
}

type Migration = fn(&Transaction<'_>) -> Result<(), String>;

const MIGRATIONS: &[Migration] = &[v1, v2, v3];

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let current = version(conn, path)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: current,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        let version = i as i64 + 1;
        let err = |message: String| StoreError::Migrate { version, message };
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(e.to_string()))?;
        step(&tx).map_err(err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(|e| err(e.to_string()))?;
        tx.commit().map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// 1: accounts, their events, and the triggers that notice rows (re)linked by other programs.
fn v1(tx: &Transaction<'_>) -> Result<(), String> {
    tx.execute_batch(
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
    )
    .map_err(|e| e.to_string())
}

/// The v2 accounts table: STRICT, with CHECKs, so another program's bad write fails at its own
/// INSERT; attempt columns (a request in flight), the hourly request window; every inserted
/// row is evaluated; events carry a kind and a profile; pauses and the store id are recorded.
const V2_TABLES: &str = r#"
    CREATE TABLE accounts_v2 (
        id                TEXT PRIMARY KEY NOT NULL CHECK (length(id) > 0 AND id = trim(id)),
        profile           TEXT,
        token_type        TEXT NOT NULL DEFAULT 'user' CHECK (token_type IN ('user', 'company')),
        access_token      TEXT,
        refresh_token     TEXT,
        expires_at        INTEGER,
        refresh_issued_at INTEGER,
        scopes            TEXT,
        state             TEXT NOT NULL DEFAULT 'active' CHECK (state IN
                              ('active', 'failing', 'needs_reauth', 'revoked', 'paused', 'invalid')),
        state_reason      TEXT,
        state_since       INTEGER,
        next_action_at    INTEGER DEFAULT 0,
        failures          INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0),
        last_error        TEXT,
        last_error_at     INTEGER,
        last_refresh_at   INTEGER,
        last_checked_at   INTEGER,
        revision          INTEGER NOT NULL DEFAULT 0,
        lease_owner       TEXT,
        lease_until       INTEGER,
        attempt_id        INTEGER,
        attempt_at        INTEGER,
        window_start      INTEGER,
        window_requests   INTEGER NOT NULL DEFAULT 0 CHECK (window_requests >= 0),
        created_at        INTEGER NOT NULL DEFAULT (unixepoch()),
        updated_at        INTEGER NOT NULL DEFAULT (unixepoch())
    ) STRICT;
"#;

const V2_AFTER: &str = r#"
    CREATE INDEX accounts_due ON accounts (profile, next_action_at) WHERE next_action_at > 0;
    CREATE INDEX accounts_fresh ON accounts (next_action_at) WHERE next_action_at = 0;
    CREATE INDEX accounts_state ON accounts (state, token_type, profile);
    CREATE INDEX accounts_state_since ON accounts (state, state_since);
    CREATE INDEX accounts_refresh_age ON accounts (refresh_issued_at)
        WHERE token_type = 'user' AND state IN ('active', 'failing');
    CREATE INDEX accounts_expiry ON accounts (profile, expires_at)
        WHERE token_type = 'user' AND state IN ('active', 'failing');
    CREATE INDEX accounts_in_flight ON accounts (lease_owner) WHERE attempt_id IS NOT NULL;

    CREATE TABLE account_events_v2 (
        seq        INTEGER PRIMARY KEY,
        kind       TEXT NOT NULL DEFAULT 'state',
        account_id TEXT,
        profile    TEXT,
        from_state TEXT,
        to_state   TEXT,
        reason     TEXT,
        at         INTEGER NOT NULL
    ) STRICT;
    INSERT INTO account_events_v2 (seq, kind, account_id, from_state, to_state, reason, at)
        SELECT seq, 'state', CAST(account_id AS TEXT), CAST(from_state AS TEXT),
               CAST(to_state AS TEXT), CAST(reason AS TEXT), CAST(at AS INTEGER)
        FROM account_events;
    DROP TABLE account_events;
    ALTER TABLE account_events_v2 RENAME TO account_events;
    CREATE INDEX account_events_account ON account_events (account_id, seq);
    CREATE INDEX account_events_at ON account_events (at);

    CREATE TABLE profiles (
        name          TEXT PRIMARY KEY NOT NULL,
        paused_reason TEXT NOT NULL,
        paused_at     INTEGER NOT NULL,
        fingerprint   TEXT NOT NULL
    ) STRICT;

    CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) STRICT;
    INSERT INTO meta (key, value) VALUES ('store_id', lower(hex(randomblob(8))));

    -- Every inserted row is evaluated at once, whatever next_action_at it was given.
    CREATE TRIGGER accounts_linked AFTER INSERT ON accounts
    BEGIN
        UPDATE accounts SET
            next_action_at = 0,
            refresh_issued_at = COALESCE(NEW.refresh_issued_at,
                CASE WHEN NEW.refresh_token IS NOT NULL THEN unixepoch() END),
            lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_at = NULL,
            revision = NEW.revision + 1
        WHERE rowid = NEW.rowid;
    END;
    -- A new grant written by another program (tokend's own writes bump revision): evaluate it
    -- at once, drop any claim on the old grant, and bring the account out of a state only a new
    -- grant can leave (recorded as an event, like every state change).
    CREATE TRIGGER accounts_relinked
    AFTER UPDATE OF access_token, refresh_token, expires_at, token_type, profile ON accounts
    WHEN NEW.revision = OLD.revision
    BEGIN
        INSERT INTO account_events (kind, account_id, profile, from_state, to_state, reason, at)
            SELECT 'state', NEW.id, NEW.profile, OLD.state, 'active', 'new grant written',
                   unixepoch()
            WHERE OLD.state IN ('needs_reauth', 'revoked', 'invalid');
        UPDATE accounts SET
            revision = revision + 1,
            next_action_at = 0,
            failures = 0,
            lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_at = NULL,
            state = CASE WHEN OLD.state IN ('needs_reauth', 'revoked', 'invalid')
                         THEN 'active' ELSE NEW.state END,
            state_reason = CASE WHEN OLD.state IN ('needs_reauth', 'revoked', 'invalid')
                                THEN 'new grant written' ELSE NEW.state_reason END,
            state_since = CASE WHEN OLD.state IN ('needs_reauth', 'revoked', 'invalid')
                               THEN unixepoch() ELSE NEW.state_since END,
            refresh_issued_at = CASE
                WHEN NEW.refresh_token IS NOT OLD.refresh_token
                     AND NEW.refresh_issued_at IS OLD.refresh_issued_at THEN unixepoch()
                ELSE NEW.refresh_issued_at END,
            updated_at = unixepoch()
        WHERE rowid = NEW.rowid;
    END;
    -- Another program changed the state or the schedule: evaluate the row again.
    CREATE TRIGGER accounts_touched
    AFTER UPDATE OF state, next_action_at, failures ON accounts
    WHEN NEW.revision = OLD.revision
    BEGIN
        UPDATE accounts SET revision = revision + 1, next_action_at = 0, updated_at = unixepoch()
        WHERE rowid = NEW.rowid;
    END;
"#;

const TEXT_COLUMNS: &[&str] = &[
    "profile",
    "access_token",
    "refresh_token",
    "scopes",
    "state_reason",
    "last_error",
    "lease_owner",
];
const INT_COLUMNS: &[&str] = &[
    "expires_at",
    "refresh_issued_at",
    "next_action_at",
    "failures",
    "last_error_at",
    "last_refresh_at",
    "last_checked_at",
    "revision",
    "lease_until",
    "created_at",
    "updated_at",
];

/// Whether a v1 cell can go into a STRICT INTEGER column: `Some(value)` if so.
fn as_integer(v: ValueRef<'_>) -> Result<Option<i64>, String> {
    match v {
        ValueRef::Null => Ok(None),
        ValueRef::Integer(n) => Ok(Some(n)),
        ValueRef::Real(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9e18 => {
            Ok(Some(f as i64))
        }
        ValueRef::Text(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .map(Some)
            .ok_or_else(|| format!("text {:?}", String::from_utf8_lossy(t))),
        ValueRef::Real(f) => Err(format!("the real number {f}")),
        ValueRef::Blob(b) => Err(format!("a {}-byte blob", b.len())),
    }
}

fn v2(tx: &Transaction<'_>) -> Result<(), String> {
    let sql = |e: rusqlite::Error| e.to_string();
    // Check every row before moving it, so the refusal names them all (up to a point).
    let mut problems: Vec<String> = Vec::new();
    {
        let cols = std::iter::once("id")
            .chain(std::iter::once("token_type"))
            .chain(std::iter::once("state"))
            .chain(TEXT_COLUMNS.iter().copied())
            .chain(INT_COLUMNS.iter().copied())
            .collect::<Vec<_>>();
        let mut stmt = tx
            .prepare(&format!("SELECT {} FROM accounts", cols.join(", ")))
            .map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while let Some(r) = rows.next().map_err(sql)? {
            let cell = |i: usize| r.get_ref(i).unwrap_or(ValueRef::Null);
            let id = match cell(0) {
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                other => format!("{other:?}"),
            };
            let mut bad = Vec::new();
            if id.is_empty() || id.trim() != id {
                bad.push("id is empty or has leading/trailing whitespace".to_owned());
            }
            match cell(1) {
                ValueRef::Text(b"user" | b"company") => {}
                other => bad.push(format!(
                    "token_type is {} (not \"user\" or \"company\")",
                    describe(other)
                )),
            }
            match cell(2) {
                ValueRef::Text(t)
                    if crate::state::State::parse(&String::from_utf8_lossy(t)).is_some() => {}
                other => bad.push(format!("state is {} (not a tokend state)", describe(other))),
            }
            for (k, name) in TEXT_COLUMNS.iter().enumerate() {
                match cell(3 + k) {
                    ValueRef::Null => {}
                    ValueRef::Text(t) if std::str::from_utf8(t).is_ok() => {}
                    other => bad.push(format!("{name} holds {}", describe(other))),
                }
            }
            for (k, name) in INT_COLUMNS.iter().enumerate() {
                match as_integer(cell(3 + TEXT_COLUMNS.len() + k)) {
                    Ok(Some(n)) if *name == "failures" && n < 0 => {
                        bad.push(format!("failures is {n}"))
                    }
                    Ok(_) => {}
                    Err(what) => bad.push(format!("{name} holds {what}, not a whole number")),
                }
            }
            if !bad.is_empty() && problems.len() < 20 {
                problems.push(format!("account {id:?}: {}", bad.join("; ")));
            } else if !bad.is_empty() {
                problems.push(String::new());
            }
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        let listed: Vec<String> = problems.into_iter().filter(|p| !p.is_empty()).collect();
        return Err(format!(
            "{n} account rows cannot be carried into the checked v2 table, and nothing was changed:\n  {}\nfix or delete these rows (sqlite3 on the database, as the service user), then start tokend again",
            listed.join("\n  ")
        ));
    }
    tx.execute_batch(V2_TABLES).map_err(sql)?;
    let int = |c: &str| {
        format!(
            "CASE WHEN typeof({c}) IN ('text', 'real') THEN CAST(trim({c}) AS INTEGER) ELSE {c} END"
        )
    };
    let copy = format!(
        "INSERT INTO accounts_v2 (id, profile, token_type, access_token, refresh_token, expires_at,
            refresh_issued_at, scopes, state, state_reason, next_action_at, failures, last_error,
            last_error_at, last_refresh_at, last_checked_at, revision, lease_owner, lease_until,
            created_at, updated_at)
         SELECT id, profile, token_type, access_token, refresh_token, {}, {}, scopes, state,
            state_reason,
            CASE WHEN next_action_at IS NULL AND state IN ('active', 'failing') THEN 0 ELSE {} END,
            {}, last_error, {}, {}, {}, {}, {}, lease_owner, {}, {}
         FROM accounts",
        int("expires_at"),
        int("refresh_issued_at"),
        int("next_action_at"),
        int("failures"),
        int("last_error_at"),
        int("last_refresh_at"),
        int("last_checked_at"),
        int("revision"),
        int("lease_until"),
        int("created_at"),
        int("updated_at"),
    );
    tx.execute_batch(&format!(
        "DROP TRIGGER IF EXISTS accounts_linked;
         DROP TRIGGER IF EXISTS accounts_relinked;
         {copy};
         DROP TABLE accounts;
         ALTER TABLE accounts_v2 RENAME TO accounts;"
    ))
    .map_err(sql)?;
    tx.execute_batch(V2_AFTER).map_err(sql)?;
    Ok(())
}

fn describe(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(n) => format!("the integer {n}"),
        ValueRef::Real(f) => format!("the real number {f}"),
        ValueRef::Text(t) => format!("{:?}", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => format!("a {}-byte blob", b.len()),
    }
}

/// 3: notification delivery state. `account_events` is the outbox (written with each change);
/// these tables record, per sink, how far events were planned, failing notifications waiting
/// out `failing_after`, and each notification's delivery (see `outbox.rs`).
fn v3(tx: &Transaction<'_>) -> Result<(), String> {
    tx.execute_batch(
        r#"
    CREATE TABLE notify_sinks (
        name     TEXT PRIMARY KEY NOT NULL,
        cursor   INTEGER NOT NULL,
        added_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE notify_held (
        sink       TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        due_at     INTEGER NOT NULL,
        PRIMARY KEY (sink, seq)
    ) STRICT;
    CREATE INDEX notify_held_account ON notify_held (sink, account_id);
    CREATE INDEX notify_held_due ON notify_held (due_at);
    CREATE TABLE notify_deliveries (
        ord              INTEGER PRIMARY KEY,
        sink             TEXT NOT NULL,
        id               TEXT NOT NULL,
        seq              INTEGER NOT NULL,
        type             TEXT NOT NULL,
        okey             TEXT NOT NULL,
        account_id       TEXT,
        profile          TEXT,
        from_state       TEXT,
        to_state         TEXT,
        reason           TEXT,
        occurred_at      INTEGER NOT NULL,
        details          TEXT,
        status           TEXT NOT NULL CHECK (status IN
                             ('open', 'pending', 'delivered', 'rejected', 'dead', 'summarised', 'suppressed')),
        summary          TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        queued_at        INTEGER NOT NULL,
        first_attempt_at INTEGER,
        next_attempt_at  INTEGER,
        last_error       TEXT,
        done_at          INTEGER,
        lease_owner      TEXT,
        lease_until      INTEGER,
        UNIQUE (sink, id)
    ) STRICT;
    CREATE INDEX notify_due ON notify_deliveries (sink, next_attempt_at) WHERE status = 'pending';
    CREATE INDEX notify_open ON notify_deliveries (next_attempt_at) WHERE status = 'open';
    CREATE INDEX notify_order ON notify_deliveries (sink, okey, ord);
    CREATE INDEX notify_unfinished ON notify_deliveries (sink, okey, ord)
        WHERE status IN ('pending', 'open', 'summarised');
    CREATE INDEX notify_window ON notify_deliveries (sink, profile, queued_at)
        WHERE account_id IS NOT NULL;
    CREATE INDEX notify_event ON notify_deliveries (seq);
    CREATE INDEX notify_done ON notify_deliveries (status, done_at);
    CREATE INDEX notify_folded ON notify_deliveries (sink, summary) WHERE summary IS NOT NULL;
    CREATE INDEX notify_leased ON notify_deliveries (lease_owner) WHERE lease_owner IS NOT NULL;
    "#,
    )
    .map_err(|e| e.to_string())
}
