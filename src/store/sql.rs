//! The statements, run on a store worker. Every function here is one transaction or a read.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, Row, params};
use secrecy::{ExposeSecret, SecretString};

use super::{
    Account, Change, ClaimGroup, Claimed, Committed, Conn, Count, DecideFn, Decision, Evaluated,
    Event, EventKind, Guard, Lease, Linked, NewAccount, Outcome, PausedProfile, Reply, RowProblem,
    StoreError, Summary, Swept, Unlinked, timed,
};
use crate::config::TokenType;
use crate::state::State;

/// An account row's columns, in the order [`read_account`] expects.
const ACCOUNT_COLUMNS: &str = "rowid, id, profile, token_type, access_token, refresh_token, \
     expires_at, refresh_issued_at, scopes, state, failures, last_refresh_at, lease_owner, \
     attempt_id, attempt_at, window_start, window_requests";

/// How long a request window lasts for the hourly ceiling.
pub const WINDOW_SECS: i64 = 3600;

/// A write transaction (synced or not as the worker set the connection: see `Conn::sync`),
/// rolled back unless committed. Its `BEGIN` and `COMMIT` stay prepared, where rusqlite's
/// `Transaction` prepares both anew each time (a few thousand instructions per transaction,
/// measured, and tokend runs several per batch of refreshes).
pub(super) fn immediate(c: &mut Connection) -> Result<Tx<'_>, StoreError> {
    c.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(Tx {
        conn: c,
        open: true,
    })
}

pub(super) struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl Tx<'_> {
    pub(super) fn commit(mut self) -> Result<(), StoreError> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        // A failed COMMIT (SQLITE_BUSY, a full disk) leaves the transaction open: end it.
        if self.open || !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Read one account row, tolerating what other programs may have written: a row that cannot
/// be read is a [`RowProblem`] (it becomes `invalid`), never an error for the whole query.
fn read_account(r: &Row<'_>) -> (i64, Result<Account, RowProblem>) {
    let rowid: i64 = r.get(0).unwrap_or(0);
    let id = match r.get_ref(1) {
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        _ => format!("(rowid {rowid})"),
    };
    let parsed = (|| -> Result<Account, String> {
        let text = |i: usize, name: &str| -> Result<Option<String>, String> {
            match r.get_ref(i).map_err(|e| e.to_string())? {
                ValueRef::Null => Ok(None),
                ValueRef::Text(t) => std::str::from_utf8(t)
                    .map(|s| Some(s.to_owned()))
                    .map_err(|_| format!("{name} is not valid UTF-8")),
                _ => Err(format!("{name} is not text")),
            }
        };
        let int = |i: usize, name: &str| -> Result<Option<i64>, String> {
            match r.get_ref(i).map_err(|e| e.to_string())? {
                ValueRef::Null => Ok(None),
                ValueRef::Integer(n) => Ok(Some(n)),
                _ => Err(format!("{name} is not an integer")),
            }
        };
        let id = text(1, "id")?.ok_or("id is NULL")?;
        let token_type = text(3, "token_type")?
            .as_deref()
            .and_then(TokenType::parse)
            .ok_or("token_type is not \"user\" or \"company\"")?;
        let state = text(9, "state")?
            .as_deref()
            .and_then(State::parse)
            .ok_or("state is not a tokend state")?;
        let secret = |i: usize, name: &str| -> Result<Option<SecretString>, String> {
            Ok(text(i, name)?
                .filter(|s| !s.trim().is_empty())
                .map(SecretString::from))
        };
        let attempt = int(13, "attempt_id")?;
        let lease_owner = text(12, "lease_owner")?;
        Ok(Account {
            id,
            profile: text(2, "profile")?.filter(|p| !p.is_empty()),
            token_type,
            access_token: secret(4, "access_token")?,
            refresh_token: secret(5, "refresh_token")?,
            expires_at: int(6, "expires_at")?,
            refresh_issued_at: int(7, "refresh_issued_at")?,
            scopes: text(8, "scopes")?,
            state,
            failures: int(10, "failures")?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
            last_refresh_at: int(11, "last_refresh_at")?,
            lease_owner,
            attempt,
            attempt_at: int(14, "attempt_at")?,
            window_start: int(15, "window_start")?,
            window_requests: int(16, "window_requests")?
                .unwrap_or(0)
                .clamp(0, u32::MAX as i64) as u32,
            left_in_flight_by: None,
        })
    })();
    (
        rowid,
        parsed.map_err(|reason| RowProblem {
            id,
            reason: format!("the row cannot be read: {reason}"),
        }),
    )
}

/// A row read by rowid: the account, or why it cannot be read.
type ReadRow = (i64, Result<Account, RowProblem>);

fn select_accounts(
    tx: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<ReadRow>, StoreError> {
    let mut stmt = tx.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_account(r));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn insert_event(
    c: &Connection,
    kind: EventKind,
    account: Option<&str>,
    profile: Option<&str>,
    from: Option<State>,
    to: Option<State>,
    reason: Option<&str>,
    at: i64,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO account_events (kind, account_id, profile, from_state, to_state, reason, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        kind.as_str(),
        account,
        profile,
        from.map(State::as_str),
        to.map(State::as_str),
        reason,
        at
    ])?;
    Ok(())
}

/// Write a change decided without a request (clearing any lease or attempt), and its event.
fn apply_change(
    tx: &Connection,
    rowid: i64,
    a: &Account,
    ch: &Change,
    now: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE accounts SET
            state_since = CASE WHEN state IS ?2 AND state_since IS NOT NULL THEN state_since
                               ELSE ?7 END,
            state_reason = CASE WHEN ?3 IS NULL AND state IS ?2 THEN state_reason ELSE ?3 END,
            state = ?2, next_action_at = ?4, failures = ?5,
            last_error = COALESCE(?6, last_error),
            last_error_at = CASE WHEN ?6 IS NULL THEN last_error_at ELSE ?7 END,
            last_checked_at = COALESCE(?8, last_checked_at),
            profile = COALESCE(profile, ?9),
            lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_at = NULL,
            revision = revision + 1, updated_at = ?7
         WHERE rowid = ?1",
    )?
    .execute(params![
        rowid,
        ch.to.as_str(),
        ch.reason,
        ch.next_action_at,
        ch.failures,
        ch.last_error,
        now,
        ch.checked_at,
        ch.profile,
    ])?;
    if a.state != ch.to {
        insert_event(
            tx,
            EventKind::State,
            Some(&a.id),
            a.profile.as_deref(),
            Some(a.state),
            Some(ch.to),
            ch.reason.as_deref(),
            now,
        )?;
    }
    Ok(())
}

/// Mark a row that cannot be read `invalid`, by rowid.
fn mark_unreadable(
    tx: &Connection,
    rowid: i64,
    p: &RowProblem,
    now: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE accounts SET state_since = CASE WHEN state = 'invalid' THEN state_since ELSE ?3 END,
            state = 'invalid', state_reason = ?2, last_error = ?2,
            last_error_at = ?3, next_action_at = NULL, lease_owner = NULL, lease_until = NULL,
            attempt_id = NULL, attempt_at = NULL, revision = revision + 1, updated_at = ?3
         WHERE rowid = ?1",
    )?
    .execute(params![rowid, p.reason, now])?;
    insert_event(
        tx,
        EventKind::State,
        Some(&p.id),
        None,
        None,
        Some(State::Invalid),
        Some(&p.reason),
        now,
    )
}

type Changes = Vec<(String, State, State, Option<String>)>;

/// Apply one decision to a claimed row. Returns the account if it is to be requested.
fn decide_row(
    tx: &Connection,
    rowid: i64,
    mut a: Account,
    decision: Decision,
    lease: &Lease,
    changes: &mut Changes,
) -> Result<Option<Account>, StoreError> {
    match decision {
        Decision::Keep => Ok(None),
        Decision::Write(ch) => {
            apply_change(tx, rowid, &a, &ch, lease.now)?;
            if a.state != ch.to {
                changes.push((a.id.clone(), a.state, ch.to, ch.reason.clone()));
            }
            Ok(None)
        }
        Decision::Request => {
            let attempt = fastrand::i64(1..i64::MAX);
            tx.prepare_cached(
                "UPDATE accounts SET lease_owner = ?2, lease_until = ?3, attempt_id = ?4,
                    attempt_at = ?5,
                    window_start = CASE WHEN window_start IS NULL OR ?5 - window_start >= ?6
                                        OR window_start > ?5 THEN ?5 ELSE window_start END,
                    window_requests = CASE WHEN window_start IS NULL OR ?5 - window_start >= ?6
                                        OR window_start > ?5 THEN 1 ELSE window_requests + 1 END
                 WHERE rowid = ?1",
            )?
            .execute(params![
                rowid,
                lease.owner,
                lease.until,
                attempt,
                lease.now,
                WINDOW_SECS
            ])?;
            // Remember who left a request in flight before us, for crash recovery.
            if a.attempt.is_some() && a.lease_owner.as_deref() != Some(lease.owner.as_str()) {
                a.left_in_flight_by = a.lease_owner.clone();
            }
            a.lease_owner = Some(lease.owner.clone());
            a.attempt = Some(attempt);
            Ok(Some(a))
        }
        Decision::Probe => {
            tx.prepare_cached(
                "UPDATE accounts SET lease_owner = ?2, lease_until = ?3 WHERE rowid = ?1",
            )?
            .execute(params![rowid, lease.owner, lease.until])?;
            Ok(Some(a))
        }
    }
}

pub(super) fn evaluate_new(
    c: &mut Connection,
    lease: &Lease,
    limit: usize,
    decide: &DecideFn,
) -> Result<Evaluated, StoreError> {
    // Mostly there is nothing new: find that out with a read, not a write transaction.
    let any = c
        .prepare_cached("SELECT 1 FROM accounts WHERE next_action_at = 0 LIMIT 1")?
        .exists([])?;
    if !any {
        return Ok(Evaluated::default());
    }
    let tx = immediate(c)?;
    let rows = select_accounts(
        &tx,
        &format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE next_action_at = 0
               AND (lease_until IS NULL OR lease_until + ?2 <= ?1) LIMIT ?3"
        ),
        params![lease.now, lease.grace, limit as i64],
    )?;
    let mut out = Evaluated {
        looked_at: rows.len(),
        ..Evaluated::default()
    };
    for (rowid, row) in rows {
        match row {
            Err(p) => {
                mark_unreadable(&tx, rowid, &p, lease.now)?;
                out.problems.push(p);
            }
            Ok(a) => {
                // New rows are only scheduled here, never requested.
                let d = match decide(&a) {
                    Decision::Request | Decision::Probe | Decision::Keep => {
                        // A policy bug must not leave the row at 0 for ever: look again later.
                        Decision::Write(Change {
                            to: a.state,
                            reason: None,
                            next_action_at: Some(lease.now),
                            failures: a.failures,
                            last_error: None,
                            checked_at: None,
                            profile: None,
                        })
                    }
                    w => w,
                };
                decide_row(&tx, rowid, a, d, lease, &mut out.changes)?;
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

pub(super) fn claim_due(
    c: &mut Connection,
    lease: &Lease,
    groups: &[ClaimGroup],
    decide: &DecideFn,
) -> Result<Claimed, StoreError> {
    let tx = immediate(c)?;
    let mut out = Claimed::default();
    let sql = format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts
         WHERE profile IS ?1 AND next_action_at > 0 AND next_action_at <= ?2
           AND (lease_until IS NULL OR lease_until + ?3 <= ?2)
         ORDER BY next_action_at LIMIT ?4"
    );
    for g in groups {
        if g.limit == 0 {
            continue;
        }
        let rows = select_accounts(
            &tx,
            &sql,
            params![g.profile, lease.now, lease.grace, g.limit as i64],
        )?;
        if rows.len() == g.limit {
            out.full_groups += 1;
        }
        for (rowid, row) in rows {
            match row {
                Err(p) => {
                    mark_unreadable(&tx, rowid, &p, lease.now)?;
                    out.problems.push(p);
                }
                Ok(a) => {
                    let d = decide(&a);
                    if let Some(a) = decide_row(&tx, rowid, a, d, lease, &mut out.changes)? {
                        out.requests.push(a);
                    }
                }
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

pub(super) fn claim_one(
    c: &mut Connection,
    id: &str,
    lease: &Lease,
    decide: &DecideFn,
) -> Result<Option<(Account, Decision)>, StoreError> {
    let tx = immediate(c)?;
    let rows = select_accounts(
        &tx,
        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"),
        [id],
    )?;
    let lease_until: Option<i64> = tx
        .prepare_cached("SELECT lease_until FROM accounts WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?
        .flatten();
    let Some((rowid, row)) = rows.into_iter().next() else {
        return Ok(None);
    };
    let out = match row {
        Err(p) => {
            mark_unreadable(&tx, rowid, &p, lease.now)?;
            None
        }
        Ok(a) => {
            // Leased (by another process, or by this one's loop a moment ago): not claimed.
            let held = lease_until.is_some_and(|u| u + lease.grace > lease.now);
            let d = if held { Decision::Keep } else { decide(&a) };
            let mut changes = Vec::new();
            let claimed = decide_row(&tx, rowid, a.clone(), d.clone(), lease, &mut changes)?;
            Some((claimed.unwrap_or(a), d))
        }
    };
    tx.commit()?;
    Ok(out)
}

pub(super) fn commit_group(conn: &mut Conn, group: Vec<(Box<Outcome>, Reply<Committed>)>) {
    let on_commit = conn.on_commit.clone();
    let (result, took) = timed(|| write_group(conn, &group));
    if let Some(f) = on_commit {
        f(took);
    }
    let results = match result {
        Ok(results) => results,
        // One outcome SQLite refuses for good (a bug, a constraint) must not sink the others:
        // write each on its own. A lock or a full disk fails them all, to be retried.
        Err(e) if !e.is_transient() && group.len() > 1 => group
            .iter()
            .map(|one| {
                write_group(conn, std::slice::from_ref(one))
                    .and_then(|mut r| r.pop().unwrap_or(Err(StoreError::Closed)))
            })
            .collect(),
        Err(e) => {
            // Not committed, most likely; forgotten all the same (cheap, and certain).
            conn.cache.forget(group.iter().map(|(o, _)| o.id.as_str()));
            for (_, reply) in group {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
    };
    conn.cache.forget(group.iter().map(|(o, _)| o.id.as_str()));
    for ((_, reply), r) in group.into_iter().zip(results) {
        let _ = reply.send(r);
    }
}

/// One transaction for a group of outcomes (one fsync for all).
fn write_group(
    conn: &mut Conn,
    group: &[(Box<Outcome>, Reply<Committed>)],
) -> Result<Vec<Result<Committed, StoreError>>, StoreError> {
    conn.check_identity()?;
    conn.sync(true)?;
    let tx = immediate(&mut conn.conn)?;
    let mut out = Vec::with_capacity(group.len());
    for (o, _) in group {
        out.push(Ok(commit_one(&tx, o)?));
    }
    tx.commit()?;
    // Committed to the file we opened; if that is no longer the file at the path, these
    // outcomes are not durable where the next start will look.
    conn.check_identity()?;
    Ok(out)
}

/// What an outcome with tokens writes, besides the state (`?7`, the new one).
macro_rules! refreshed_columns {
    () => {
        "
        access_token = COALESCE(?2, access_token),
        refresh_token = COALESCE(?3, refresh_token),
        expires_at = COALESCE(?4, expires_at),
        refresh_issued_at = CASE WHEN ?3 IS NOT NULL THEN ?5 ELSE refresh_issued_at END,
        scopes = COALESCE(?6, scopes),
        last_refresh_at = CASE WHEN ?2 IS NOT NULL THEN ?5 ELSE last_refresh_at END,
        state_reason = CASE WHEN ?8 IS NULL AND state IS ?7 THEN state_reason ELSE ?8 END,
        next_action_at = ?9, failures = ?10,
        last_error = COALESCE(?11, last_error),
        last_error_at = CASE WHEN ?11 IS NULL THEN last_error_at ELSE ?5 END,
        lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_at = NULL,
        revision = revision + 1, updated_at = ?5
        WHERE rowid = ?1"
    };
}

/// What an outcome without tokens writes, besides the state (`?2`, the new one).
macro_rules! answered_columns {
    () => {
        "
        state_reason = CASE WHEN ?3 IS NULL AND state IS ?2 THEN state_reason ELSE ?3 END,
        next_action_at = ?4, failures = ?5,
        last_error = COALESCE(?6, last_error),
        last_error_at = CASE WHEN ?6 IS NULL THEN last_error_at ELSE ?7 END,
        last_checked_at = COALESCE(?8, last_checked_at),
        lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_at = NULL,
        revision = revision + 1, updated_at = ?7
        WHERE rowid = ?1"
    };
}

fn commit_one(tx: &Connection, o: &Outcome) -> Result<Committed, StoreError> {
    type Current = (
        i64,
        String,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
        bool,
    );
    let current: Option<Current> = tx
        .prepare_cached(
            "SELECT rowid, state, profile, refresh_token, attempt_id, lease_owner,
                    state_since IS NOT NULL
             FROM accounts WHERE id = ?1",
        )?
        .query_row([&o.id], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .optional()?;
    let Some((rowid, state, profile, refresh, attempt, owner, dated)) = current else {
        return Ok(Committed::Gone);
    };
    let from = State::parse(&state).unwrap_or(State::Invalid);
    let ours = match &o.guard {
        Guard::Presented(p) => refresh.as_deref() == Some(p.expose_secret()),
        Guard::Attempt(a) => attempt == Some(*a),
        Guard::Lease(l) => owner.as_deref() == Some(l.as_str()),
        Guard::PresentedDigest(d) => refresh
            .as_ref()
            .is_some_and(|r| crate::journal::digest(&SecretString::from(r.clone())) == *d),
    };
    if !ours {
        if o.tokens.is_some() {
            insert_event(
                tx,
                EventKind::Superseded,
                Some(&o.id),
                profile.as_deref(),
                None,
                None,
                Some(
                    "a rotated pair was not stored: the account holds another grant now (relinked, or rotated by another tokend)",
                ),
                o.now,
            )?;
            return Ok(Committed::Superseded);
        }
        return Ok(Committed::Stale);
    }
    let ch = &o.change;
    // The state's columns are written only when the state changes: each write of an indexed
    // column rewrites its index entries, on pages as scattered as the accounts.
    let moves = state != ch.to.as_str() || !dated;
    match &o.tokens {
        Some(t) => {
            tx.prepare_cached(if moves {
                concat!(
                    "UPDATE accounts SET state = ?7, state_since = ?5,",
                    refreshed_columns!()
                )
            } else {
                concat!("UPDATE accounts SET", refreshed_columns!())
            })?
            .execute(params![
                rowid,
                t.access_token.as_ref().map(|s| s.expose_secret()),
                t.refresh_token.as_ref().map(|s| s.expose_secret()),
                t.expires_at,
                o.now,
                t.scopes,
                ch.to.as_str(),
                ch.reason,
                ch.next_action_at,
                ch.failures,
                ch.last_error,
            ])?;
        }
        None => {
            tx.prepare_cached(if moves {
                concat!(
                    "UPDATE accounts SET state = ?2, state_since = ?7,",
                    answered_columns!()
                )
            } else {
                concat!("UPDATE accounts SET", answered_columns!())
            })?
            .execute(params![
                rowid,
                ch.to.as_str(),
                ch.reason,
                ch.next_action_at,
                ch.failures,
                ch.last_error,
                o.now,
                ch.checked_at,
            ])?;
        }
    }
    if from != ch.to {
        insert_event(
            tx,
            EventKind::State,
            Some(&o.id),
            profile.as_deref(),
            Some(from),
            Some(ch.to),
            ch.reason.as_deref(),
            o.now,
        )?;
    }
    let mut lapse = false;
    for n in &o.notes {
        if let Some(since) = n.unless_since {
            let seen = tx
                .prepare_cached(
                    "SELECT 1 FROM account_events WHERE account_id = ?1 AND kind = ?2 AND at >= ?3",
                )?
                .exists(params![o.id, n.kind.as_str(), since])?;
            if seen {
                continue;
            }
        }
        lapse |= n.kind == EventKind::Lapse;
        insert_event(
            tx,
            n.kind,
            Some(&o.id),
            profile.as_deref(),
            None,
            None,
            Some(&n.reason),
            o.now,
        )?;
    }
    Ok(Committed::Applied { from, lapse })
}

pub(super) fn renew_leases(
    c: &mut Connection,
    owner: &str,
    ids: &[String],
    until: i64,
) -> Result<(), StoreError> {
    let tx = immediate(c)?;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE accounts SET lease_until = ?3 WHERE id = ?1 AND lease_owner = ?2",
        )?;
        for id in ids {
            stmt.execute(params![id, owner, until])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Undo claims whose requests were never sent: the lease, the attempt, and the request it
/// counted towards the hourly ceiling.
pub(super) fn release(
    c: &mut Connection,
    owner: &str,
    claims: &[(String, i64)],
) -> Result<(), StoreError> {
    let tx = immediate(c)?;
    {
        let mut stmt = tx.prepare_cached(
            "UPDATE accounts SET lease_owner = NULL, lease_until = NULL, attempt_id = NULL,
                attempt_at = NULL, window_requests = max(window_requests - 1, 0)
             WHERE id = ?1 AND lease_owner = ?2 AND attempt_id = ?3",
        )?;
        for (id, attempt) in claims {
            stmt.execute(params![id, owner, attempt])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn in_flight_owners(c: &Connection) -> Result<Vec<(String, u64)>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT lease_owner, COUNT(*) FROM accounts
         WHERE attempt_id IS NOT NULL AND lease_owner IS NOT NULL GROUP BY lease_owner",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn recover_dead_owner(
    c: &mut Connection,
    owner: &str,
    _now: i64,
) -> Result<u64, StoreError> {
    // Due first (next_action_at 1 sorts before any real time) and claimable at once; the owner
    // stays recorded so the retry can tell a rotation lost in a crash from a revoked grant.
    let n = c.execute(
        "UPDATE accounts SET lease_until = 0, next_action_at = 1, revision = revision + 1
         WHERE lease_owner = ?1 AND attempt_id IS NOT NULL",
        [owner],
    )?;
    Ok(n as u64)
}

/// The distinct profiles among scheduled rows, by index seeks (cheap with millions of rows).
fn scheduled_profiles(c: &Connection) -> Result<(bool, Vec<String>), StoreError> {
    let has_null = c
        .prepare_cached(
            "SELECT 1 FROM accounts WHERE profile IS NULL AND next_action_at > 0 LIMIT 1",
        )?
        .exists([])?;
    let mut names = Vec::new();
    let mut stmt = c.prepare_cached(
        "SELECT profile FROM accounts WHERE profile > ?1 AND next_action_at > 0
         ORDER BY profile LIMIT 1",
    )?;
    let mut after = String::new();
    while let Some(p) = stmt
        .query_row([&after], |r| r.get::<_, String>(0))
        .optional()?
    {
        names.push(p.clone());
        after = p;
    }
    Ok((has_null, names))
}

pub(super) fn reevaluate_orphans(
    c: &mut Connection,
    profiles: &[String],
) -> Result<u64, StoreError> {
    let tx = immediate(c)?;
    let (has_null, names) = scheduled_profiles(&tx)?;
    let mut n = 0;
    // Rows without a profile are looked at again whatever the config: the evaluation writes the
    // only profile's name into them (or finds them invalid when there are several).
    if has_null {
        n += tx.execute(
            "UPDATE accounts SET next_action_at = 0, revision = revision + 1
             WHERE profile IS NULL AND next_action_at > 0",
            [],
        )?;
    }
    for name in names.iter().filter(|n| !profiles.contains(n)) {
        n += tx.execute(
            "UPDATE accounts SET next_action_at = 0, revision = revision + 1
             WHERE profile = ?1 AND next_action_at > 0",
            [name],
        )?;
    }
    tx.commit()?;
    Ok(n as u64)
}

pub(super) fn next_due(
    c: &Connection,
    groups: &[Option<String>],
    grace: i64,
) -> Result<Option<i64>, StoreError> {
    // Leased rows are someone's work in flight: the earliest of the first few, each counted at
    // the later of its due time and its lease's end, is when to look again.
    let mut stmt = c.prepare_cached(
        "SELECT next_action_at, lease_until FROM accounts
         WHERE profile IS ?1 AND next_action_at > 0 ORDER BY next_action_at LIMIT 64",
    )?;
    let mut best: Option<i64> = None;
    for g in groups {
        let rows = stmt.query_map([g], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        for row in rows {
            let (due, lease) = row?;
            let at = due.max(lease.map_or(i64::MIN, |l| l + grace));
            best = Some(best.map_or(at, |b| b.min(at)));
        }
    }
    // New rows held by someone's lease are looked at when it runs out.
    let fresh: Option<i64> = c
        .prepare_cached("SELECT MIN(lease_until) FROM accounts WHERE next_action_at = 0")?
        .query_row([], |r| r.get(0))?;
    if let Some(l) = fresh {
        let at = l + grace;
        best = Some(best.map_or(at, |b| b.min(at)));
    }
    Ok(best)
}

pub(super) fn get(
    c: &Connection,
    id: &str,
) -> Result<Option<Result<Account, RowProblem>>, StoreError> {
    Ok(select_accounts(
        c,
        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"),
        [id],
    )?
    .into_iter()
    .next()
    .map(|(_, a)| a))
}

const SUMMARY_COLUMNS: &str = "id, profile, token_type, state, state_reason, expires_at, \
     refresh_issued_at, next_action_at, failures, last_error, last_error_at, last_refresh_at, \
     last_checked_at, scopes, attempt_at, created_at, updated_at, state_since";

/// A listing row, read leniently: whatever cannot be read shows as absent, never an error.
fn read_summary(r: &Row<'_>) -> Summary {
    let text = |i: usize| -> Option<String> {
        match r.get_ref(i).ok()? {
            ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Integer(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let int = |i: usize| -> Option<i64> {
        match r.get_ref(i).ok()? {
            ValueRef::Integer(n) => Some(n),
            _ => None,
        }
    };
    Summary {
        id: text(0).unwrap_or_default(),
        profile: text(1),
        token_type: text(2).unwrap_or_default(),
        state: text(3).unwrap_or_default(),
        state_reason: text(4),
        expires_at: int(5),
        refresh_issued_at: int(6),
        next_action_at: int(7),
        failures: int(8).unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        last_error: text(9),
        last_error_at: int(10),
        last_refresh_at: int(11),
        last_checked_at: int(12),
        scopes: text(13),
        refreshing_since: int(14),
        created_at: int(15),
        updated_at: int(16),
        state_since: int(17),
    }
}

pub(super) fn list(
    c: &Connection,
    state: Option<State>,
    profile: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Summary>, StoreError> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM accounts
         WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR profile = ?2)
           AND (?3 IS NULL OR id > ?3)
         ORDER BY id LIMIT ?4"
    ))?;
    let limit = if limit == 0 { -1 } else { limit as i64 };
    let mut rows = stmt.query(params![state.map(State::as_str), profile, after, limit])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_summary(r));
    }
    Ok(out)
}

pub(super) fn summary(c: &Connection, id: &str) -> Result<Option<Summary>, StoreError> {
    Ok(c.prepare_cached(&format!(
        "SELECT {SUMMARY_COLUMNS} FROM accounts WHERE id = ?1"
    ))?
    .query_row([id], |r| Ok(read_summary(r)))
    .optional()?)
}

pub(super) fn counts(c: &Connection) -> Result<Vec<Count>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT state, token_type, profile, COUNT(*) FROM accounts
         GROUP BY state, token_type, profile",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (state, token_type, profile, count) = row?;
        out.push(Count {
            state: State::parse(&state).unwrap_or(State::Invalid),
            token_type,
            profile,
            count: count as u64,
        });
    }
    Ok(out)
}

pub(super) fn read_event(r: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        seq: r.get(0)?,
        kind: r.get(1)?,
        account_id: r.get(2)?,
        profile: r.get(3)?,
        from_state: r.get(4)?,
        to_state: r.get(5)?,
        reason: r.get(6)?,
        at: r.get(7)?,
    })
}

/// An event row's columns, in the order [`read_event`] expects.
pub(super) const EVENT_COLUMNS: &str =
    "seq, kind, account_id, profile, from_state, to_state, reason, at";

pub(super) fn events(
    c: &Connection,
    account: Option<&str>,
    after_seq: i64,
    since: Option<i64>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM account_events
         WHERE seq > ?1 AND (?2 IS NULL OR account_id = ?2) AND (?3 IS NULL OR at >= ?3)
         ORDER BY seq LIMIT ?4"
    ))?;
    let limit = if limit == 0 { -1 } else { limit as i64 };
    let rows = stmt.query_map(params![after_seq, account, since, limit], read_event)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn recent_events(
    c: &Connection,
    id: &str,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM account_events WHERE account_id = ?1
         ORDER BY seq DESC LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![id, limit as i64], read_event)?;
    let mut out: Vec<Event> = rows.collect::<Result<_, _>>()?;
    out.reverse();
    Ok(out)
}

/// Link accounts through the schema's triggers, as another program's INSERT or UPDATE would
/// (they schedule the row, reset a grant's state, record the event).
pub(super) fn link(
    c: &mut Connection,
    accounts: &[NewAccount],
    replace: bool,
    now: i64,
) -> Result<Linked, StoreError> {
    super::schema::with_triggers(c, |c| link_rows(c, accounts, replace, now))
}

fn link_rows(
    c: &mut Connection,
    accounts: &[NewAccount],
    replace: bool,
    now: i64,
) -> Result<Linked, StoreError> {
    let tx = immediate(c)?;
    let mut existing = Vec::new();
    let mut live = 0;
    {
        let mut find = tx.prepare_cached("SELECT state FROM accounts WHERE id = ?1")?;
        for a in accounts {
            if let Some(state) = find
                .query_row([&a.id], |r| r.get::<_, String>(0))
                .optional()?
            {
                existing.push(a.id.clone());
                if State::parse(&state).is_some_and(|s| !s.is_terminal()) {
                    live += 1;
                }
            }
        }
    }
    if !replace && !existing.is_empty() {
        return Ok(Linked::Conflicts(existing));
    }
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO accounts (id, profile, token_type, access_token, refresh_token,
                                   expires_at, scopes, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
             ON CONFLICT (id) DO UPDATE SET
                profile = excluded.profile, token_type = excluded.token_type,
                access_token = excluded.access_token, refresh_token = excluded.refresh_token,
                expires_at = excluded.expires_at, scopes = excluded.scopes,
                updated_at = excluded.updated_at",
        )?;
        for a in accounts {
            upsert.execute(params![
                a.id,
                a.profile,
                a.token_type.as_str(),
                a.access_token.as_ref().map(|s| s.expose_secret()),
                a.refresh_token.as_ref().map(|s| s.expose_secret()),
                a.expires_at,
                a.scopes,
                now,
            ])?;
        }
    }
    tx.commit()?;
    Ok(Linked::Done {
        inserted: accounts.len() - existing.len(),
        replaced: live,
    })
}

/// Write a new grant through the schema's triggers (see [`link`]).
pub(super) fn relink(c: &mut Connection, a: &NewAccount, now: i64) -> Result<bool, StoreError> {
    super::schema::with_triggers(c, |c| relink_row(c, a, now))
}

fn relink_row(c: &mut Connection, a: &NewAccount, now: i64) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE accounts SET access_token = ?2, refresh_token = ?3, expires_at = ?4,
            scopes = COALESCE(?5, scopes), updated_at = ?6
         WHERE id = ?1",
        params![
            a.id,
            a.access_token.as_ref().map(|s| s.expose_secret()),
            a.refresh_token.as_ref().map(|s| s.expose_secret()),
            a.expires_at,
            a.scopes,
            now
        ],
    )?;
    Ok(n == 1)
}

/// The row of `id` with its rowid, read as a whole (an unreadable row is `Err`).
fn row_of(tx: &Connection, id: &str) -> Result<Option<ReadRow>, StoreError> {
    let found = select_accounts(
        tx,
        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"),
        [id],
    )?;
    Ok(found.into_iter().next())
}

pub(super) fn remove(c: &mut Connection, id: &str) -> Result<Option<Account>, StoreError> {
    let tx = immediate(c)?;
    let Some((rowid, row)) = row_of(&tx, id)? else {
        return Ok(None);
    };
    tx.execute("DELETE FROM accounts WHERE rowid = ?1", [rowid])?;
    tx.commit()?;
    Ok(row.ok())
}

pub(super) fn remove_holding(
    c: &mut Connection,
    id: &str,
    access: Option<&SecretString>,
    refresh: Option<&SecretString>,
) -> Result<Unlinked, StoreError> {
    let tx = immediate(c)?;
    let Some((rowid, row)) = row_of(&tx, id)? else {
        return Ok(Unlinked::Missing);
    };
    let same = |held: &Option<SecretString>, expected: Option<&SecretString>| {
        held.as_ref().map(|t| t.expose_secret()) == expected.map(|t| t.expose_secret())
    };
    match row {
        Ok(a) if same(&a.access_token, access) && same(&a.refresh_token, refresh) => {}
        _ => return Ok(Unlinked::Changed),
    }
    tx.execute("DELETE FROM accounts WHERE rowid = ?1", [rowid])?;
    tx.commit()?;
    Ok(Unlinked::Removed)
}

pub(super) fn resume(c: &mut Connection, id: &str, now: i64) -> Result<Option<State>, StoreError> {
    let tx = immediate(c)?;
    let prior: Option<(String, Option<String>)> = tx
        .query_row(
            "SELECT state, profile FROM accounts WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((state, profile)) = prior else {
        return Ok(None);
    };
    let from = State::parse(&state).unwrap_or(State::Invalid);
    tx.execute(
        "UPDATE accounts SET state_since = ?2, state = 'active', state_reason = 'resumed by an operator',
            next_action_at = 0, failures = 0, lease_owner = NULL, lease_until = NULL,
            revision = revision + 1, updated_at = ?2
         WHERE id = ?1",
        params![id, now],
    )?;
    if from != State::Active {
        insert_event(
            &tx,
            EventKind::State,
            Some(id),
            profile.as_deref(),
            Some(from),
            Some(State::Active),
            Some("resumed by an operator"),
            now,
        )?;
    }
    tx.commit()?;
    Ok(Some(from))
}

/// `profile IS ?` or, for the only profile, rows without a profile too.
const OF_PROFILE: &str = "(profile = ?1 OR (?2 AND profile IS NULL))";

pub(super) fn pause_profile(
    c: &mut Connection,
    p: &PausedProfile,
    single: bool,
    now: i64,
) -> Result<u64, StoreError> {
    let tx = immediate(c)?;
    let existed = tx
        .prepare_cached("SELECT 1 FROM profiles WHERE name = ?1")?
        .exists([&p.name])?;
    tx.execute(
        "INSERT INTO profiles (name, paused_reason, paused_at, fingerprint) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET paused_reason = excluded.paused_reason,
            fingerprint = excluded.fingerprint",
        params![p.name, p.reason, now, p.fingerprint],
    )?;
    if !existed {
        insert_event(
            &tx,
            EventKind::ProfilePaused,
            None,
            Some(&p.name),
            None,
            None,
            Some(&p.reason),
            now,
        )?;
    }
    // Rows with a request in flight keep it; their own outcome decides their state.
    let cond = format!("{OF_PROFILE} AND state IN ('active', 'failing') AND attempt_id IS NULL");
    tx.execute(
        &format!(
            "INSERT INTO account_events (kind, account_id, profile, from_state, to_state, reason, at)
             SELECT 'state', id, profile, state, 'paused', ?3, ?4 FROM accounts WHERE {cond}"
        ),
        params![p.name, single, p.reason, now],
    )?;
    let n = tx.execute(
        &format!(
            "UPDATE accounts SET state = 'paused', state_since = ?4, state_reason = ?3, next_action_at = NULL,
                lease_owner = NULL, lease_until = NULL, revision = revision + 1, updated_at = ?4
             WHERE {cond}"
        ),
        params![p.name, single, p.reason, now],
    )?;
    tx.commit()?;
    Ok(n as u64)
}

pub(super) fn resume_profile(
    c: &mut Connection,
    profile: &str,
    single: bool,
    reason: &str,
    now: i64,
) -> Result<u64, StoreError> {
    let tx = immediate(c)?;
    let was_paused = tx.execute("DELETE FROM profiles WHERE name = ?1", [profile])? > 0;
    let cond = format!("{OF_PROFILE} AND state = 'paused'");
    tx.execute(
        &format!(
            "INSERT INTO account_events (kind, account_id, profile, from_state, to_state, reason, at)
             SELECT 'state', id, profile, 'paused', 'active', ?3, ?4 FROM accounts WHERE {cond}"
        ),
        params![profile, single, reason, now],
    )?;
    // Evaluated again: tokens still valid are scheduled by their expiry, not all refreshed now.
    let n = tx.execute(
        &format!(
            "UPDATE accounts SET state = 'active', state_since = ?4, state_reason = ?3, next_action_at = 0,
                failures = 0, revision = revision + 1, updated_at = ?4
             WHERE {cond}"
        ),
        params![profile, single, reason, now],
    )?;
    if was_paused {
        insert_event(
            &tx,
            EventKind::ProfileResumed,
            None,
            Some(profile),
            None,
            None,
            Some(reason),
            now,
        )?;
    }
    tx.commit()?;
    Ok(n as u64)
}

pub(super) fn probe_profile(
    c: &mut Connection,
    profile: &str,
    single: bool,
    now: i64,
) -> Result<bool, StoreError> {
    let n = c.execute(
        &format!(
            "UPDATE accounts SET next_action_at = ?3, revision = revision + 1
             WHERE rowid = (SELECT rowid FROM accounts
                            WHERE {OF_PROFILE} AND state = 'paused' AND token_type = 'user'
                              AND refresh_token IS NOT NULL AND refresh_token != ''
                            ORDER BY id LIMIT 1)"
        ),
        params![profile, single, now],
    )?;
    Ok(n == 1)
}

pub(super) fn paused_profiles(c: &Connection) -> Result<Vec<PausedProfile>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT name, paused_reason, paused_at, fingerprint FROM profiles ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(PausedProfile {
            name: r.get(0)?,
            reason: r.get(1)?,
            since: r.get(2)?,
            fingerprint: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn wake_failing(
    c: &mut Connection,
    profile: &str,
    single: bool,
    now: i64,
) -> Result<u64, StoreError> {
    Ok(c.execute(
        &format!(
            "UPDATE accounts SET next_action_at = ?3, revision = revision + 1
             WHERE {OF_PROFILE} AND state = 'failing' AND next_action_at > ?3
               AND (lease_until IS NULL OR lease_until <= ?3)"
        ),
        params![profile, single, now],
    )? as u64)
}

pub(super) fn attention(c: &Connection, limit: usize) -> Result<Vec<(String, State)>, StoreError> {
    // An IN list, not `<> 'active'`, so the state index serves it.
    let mut stmt = c.prepare_cached(
        "SELECT id, state FROM accounts
         WHERE state IN ('failing', 'needs_reauth', 'revoked', 'paused', 'invalid')
         ORDER BY state, id LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, state) = row?;
        out.push((id, State::parse(&state).unwrap_or(State::Invalid)));
    }
    Ok(out)
}

pub(super) fn at_risk(
    c: &Connection,
    before: i64,
    limit: usize,
) -> Result<(Vec<String>, u64), StoreError> {
    // INDEXED BY: without statistics SQLite prefers accounts_state, which reads every
    // account (seconds at ten million, on every health snapshot).
    let ids = c
        .prepare_cached(
            "SELECT id FROM accounts INDEXED BY accounts_refresh_age
             WHERE token_type = 'user' AND state IN ('active', 'failing')
               AND refresh_issued_at < ?1 ORDER BY refresh_issued_at LIMIT ?2",
        )?
        .query_map(params![before, limit as i64], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    let count: i64 = c
        .prepare_cached(
            "SELECT COUNT(*) FROM accounts INDEXED BY accounts_refresh_age
             WHERE token_type = 'user' AND state IN ('active', 'failing')
               AND refresh_issued_at < ?1",
        )?
        .query_row([before], |r| r.get(0))?;
    Ok((ids, count as u64))
}

pub(super) fn lapsed(
    c: &Connection,
    now: i64,
    limit: usize,
) -> Result<(Vec<String>, u64), StoreError> {
    // Only accounts tokend has refreshed before: a row linked with an expired token is not a
    // lapse of tokend's. Per profile, along accounts_expiry (profile, expires_at): reads the
    // lapsed rows only.
    let mut listed: Vec<(i64, String)> = Vec::new();
    let mut count = 0;
    let mut list = c.prepare_cached(
        "SELECT expires_at, id FROM accounts INDEXED BY accounts_expiry
         WHERE profile IS ?1 AND token_type = 'user' AND state IN ('active', 'failing')
           AND expires_at < ?2 AND last_refresh_at IS NOT NULL ORDER BY expires_at LIMIT ?3",
    )?;
    let mut counted = c.prepare_cached(
        "SELECT COUNT(*) FROM accounts INDEXED BY accounts_expiry
         WHERE profile IS ?1 AND token_type = 'user' AND state IN ('active', 'failing')
           AND expires_at < ?2 AND last_refresh_at IS NOT NULL",
    )?;
    for g in kept_alive_profiles(c)? {
        let n: i64 = counted.query_row(params![g, now], |r| r.get(0))?;
        if n == 0 {
            continue;
        }
        count += n as u64;
        let rows = list.query_map(params![g, now, limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        for row in rows {
            listed.push(row?);
        }
    }
    listed.sort();
    Ok((
        listed.into_iter().take(limit).map(|(_, id)| id).collect(),
        count,
    ))
}

/// The profiles (`None`: rows naming none) of user accounts tokend keeps alive, found along
/// accounts_expiry one profile at a time (a few reads per profile, whatever the row count).
fn kept_alive_profiles(c: &Connection) -> Result<Vec<Option<String>>, StoreError> {
    let has_null = c
        .prepare_cached(
            "SELECT 1 FROM accounts INDEXED BY accounts_expiry
             WHERE profile IS NULL AND token_type = 'user' AND state IN ('active', 'failing')
             LIMIT 1",
        )?
        .exists([])?;
    let mut out: Vec<Option<String>> = has_null.then_some(None).into_iter().collect();
    let mut stmt = c.prepare_cached(
        "SELECT profile FROM accounts INDEXED BY accounts_expiry
         WHERE profile > ?1 AND token_type = 'user' AND state IN ('active', 'failing')
         ORDER BY profile LIMIT 1",
    )?;
    let mut after = String::new();
    while let Some(p) = stmt
        .query_row([&after], |r| r.get::<_, String>(0))
        .optional()?
    {
        out.push(Some(p.clone()));
        after = p;
    }
    Ok(out)
}

pub(super) fn min_expiry(c: &Connection) -> Result<Vec<(Option<String>, i64)>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT MIN(expires_at) FROM accounts INDEXED BY accounts_expiry
         WHERE profile IS ?1 AND token_type = 'user' AND state IN ('active', 'failing')
           AND expires_at IS NOT NULL",
    )?;
    let mut out = Vec::new();
    for g in kept_alive_profiles(c)? {
        if let Some(min) = stmt.query_row([&g], |r| r.get::<_, Option<i64>>(0))? {
            out.push((g, min));
        }
    }
    Ok(out)
}

pub(super) fn company_accounts(c: &Connection, now: i64) -> Result<Vec<Account>, StoreError> {
    Ok(select_accounts(
        c,
        &format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts
             WHERE token_type = 'company' AND state IN ('active', 'failing')
               AND (lease_until IS NULL OR lease_until <= ?1)
             ORDER BY id"
        ),
        [now],
    )?
    .into_iter()
    .filter_map(|(_, a)| a.ok())
    .collect())
}

pub(super) fn store_id(c: &Connection) -> Result<String, StoreError> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get(0)
        })?,
    )
}

pub(super) fn sweep(c: &mut Connection, before: i64, now: i64) -> Result<Swept, StoreError> {
    let tx = immediate(c)?;
    let mut out = Swept::default();
    let pick = |sql: &str,
                p: &[&dyn rusqlite::ToSql]|
     -> Result<Vec<(String, Option<String>)>, StoreError> {
        let mut stmt = tx.prepare_cached(sql)?;
        let rows = stmt.query_map(p, |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    };
    // Once per refresh token: no at_risk event since the token was issued.
    out.at_risk = pick(
        "SELECT id, profile FROM accounts a INDEXED BY accounts_refresh_age
         WHERE token_type = 'user' AND state IN ('active', 'failing') AND refresh_issued_at < ?1
           AND NOT EXISTS (SELECT 1 FROM account_events e WHERE e.account_id = a.id
                           AND e.kind = 'at_risk' AND e.at >= a.refresh_issued_at)
         LIMIT 1000",
        &[&before],
    )?;
    // Once per expiry: no lapse event since the token expired. Per profile, along
    // accounts_expiry.
    for g in kept_alive_profiles(&tx)? {
        let room = 1000 - out.lapsed.len().min(1000);
        if room == 0 {
            break;
        }
        out.lapsed.extend(pick(
            "SELECT id, profile FROM accounts a INDEXED BY accounts_expiry
             WHERE profile IS ?1 AND token_type = 'user' AND state IN ('active', 'failing')
               AND expires_at < ?2 AND last_refresh_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM account_events e WHERE e.account_id = a.id
                               AND e.kind = 'lapse' AND e.at >= a.expires_at)
             LIMIT ?3",
            &[&g, &now, &(room as i64)],
        )?);
    }
    for (id, profile) in &out.at_risk {
        insert_event(
            &tx,
            EventKind::AtRisk,
            Some(id),
            profile.as_deref(),
            None,
            None,
            Some(
                "the refresh token nears the end of its lifetime; the account needs reauthorisation unless it refreshes",
            ),
            now,
        )?;
    }
    for (id, profile) in &out.lapsed {
        insert_event(
            &tx,
            EventKind::Lapse,
            Some(id),
            profile.as_deref(),
            None,
            None,
            Some("the access token expired and no refresh is stored yet"),
            now,
        )?;
    }
    tx.commit()?;
    Ok(out)
}

/// The account failing the longest, and since when.
pub(super) fn oldest_failure(c: &Connection) -> Result<Option<(String, i64)>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT id, state_since FROM accounts WHERE state = 'failing' AND state_since IS NOT NULL
         ORDER BY state_since LIMIT 1",
    )?
    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()?)
}
