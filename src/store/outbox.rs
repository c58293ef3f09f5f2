//! The notification outbox. `account_events` is written in the same transaction as every state
//! change, so it is the outbox: a crash can delay a notification, never lose one. Beside it this
//! file keeps what delivery needs, per sink: how far events were planned (`notify_sinks`),
//! `failing` notifications waiting out `failing_after` (`notify_held`), and each notification
//! with its status, attempts and lease (`notify_deliveries`).
//!
//! What an event means for a sink is the notifier's policy, handed in as a function (as the
//! engine hands in its decisions). Planning runs in one transaction with the cursor, so each
//! notification is queued once per sink whatever crashes; a delivery whose answer was lost is
//! sent again with the same id (at least once).

use std::collections::{BTreeMap, HashMap};

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::sql::{EVENT_COLUMNS, immediate, read_event};
use super::{Event, Store, StoreError, Touches};
use crate::config::SUMMARY_TYPE;

/// The burst rule counts a sink's account notifications of one profile over this many seconds;
/// a summary collects for as long before it is sent.
pub const BURST_WINDOW: i64 = 60;
/// Most account ids a summary lists.
const SUMMARY_LIST: usize = 100;
/// The notification types that open or close an account's trouble (for `recovered`).
const TROUBLE: [&str; 5] = [
    "account.failing",
    "account.needs_reauth",
    "account.revoked",
    "account.invalid",
    "account.recovered",
];
const FAILING: &str = "account.failing";

/// A sink as planning sees it.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    pub burst_threshold: u32,
    /// Events of rows without a profile belong to the only profile, when there is one.
    pub default_profile: Option<String>,
    /// A sink seen for the first time starts with the events at or after this time.
    pub start_at: i64,
}

/// What a sink was told about one account so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Told {
    /// A `failing` notification is held, waiting out `failing_after`.
    pub held: bool,
    /// The last trouble notification queued (sent, or folded into a summary) was `failing`.
    pub failing_sent: bool,
}

/// What one event means for one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Queue a notification of this type about the event.
    Queue(&'static str),
    /// Hold a `failing` notification about the event until `due_at`.
    Hold { due_at: i64 },
    /// The account left `failing`: the held `failing` notification is not sent.
    DropHeld,
}

/// The policy: `(sink name, event, what the sink was told about the account) -> steps`.
pub type PlanFn = Box<dyn Fn(&str, &Event, Told) -> Vec<Step> + Send>;

/// What a planning pass did.
#[derive(Debug, Clone, Default)]
pub struct Planned {
    /// More events wait than one pass takes.
    pub more: bool,
    pub queued: usize,
    pub held: usize,
    /// Held `failing` notifications dropped because the account left `failing` in time.
    pub suppressed: usize,
    /// `(sink, profile, count)` folded into a summary this pass.
    pub folded: Vec<(String, Option<String>, usize)>,
    /// Summaries closed and queued this pass.
    pub closed: usize,
    /// The earliest time a held notification or an open summary is due.
    pub next_wake: Option<i64>,
}

/// A notification claimed for one attempt. Its fields never change between attempts, so every
/// attempt sends the same body.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub ord: i64,
    pub sink: String,
    pub id: String,
    pub seq: i64,
    pub kind: String,
    pub account_id: Option<String>,
    pub profile: Option<String>,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    pub reason: Option<String>,
    pub occurred_at: i64,
    /// A summary's counts (JSON).
    pub details: Option<String>,
    /// Including this one.
    pub attempts: u32,
    pub queued_at: i64,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Delivered,
    /// The receiver refused it for good; not retried.
    Rejected(String),
    Retry {
        error: String,
        at: i64,
    },
    /// Given up after `max_age`.
    Dead(String),
}

/// A sink's queue, for the health file and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    pub backlog: u64,
    pub oldest: Option<i64>,
    pub dead: u64,
    /// When the next notification not in flight is due.
    pub next_due: Option<i64>,
}

/// One notification as `tokend events` shows it beside its event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryView {
    pub seq: i64,
    pub sink: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `held` (waiting out `failing_after`), `pending`, `delivered`, `rejected`, `dead`,
    /// `summarised`, `suppressed`.
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<i64>,
    /// The summary it was folded into, and that summary's status.
    pub summary: Option<String>,
    pub summary_status: Option<String>,
}

impl Store {
    /// Plan new events for `sinks` (at most `limit` events) with `plan`, release held
    /// notifications whose time has come, fold bursts, close summaries: one transaction.
    pub async fn notify_plan(
        &self,
        sinks: Vec<SinkPlan>,
        now: i64,
        limit: usize,
        plan: PlanFn,
    ) -> Result<Planned, StoreError> {
        self.write(Touches::Nothing, move |c| {
            plan_tx(c, &sinks, now, limit, &plan)
        })
        .await
    }

    /// The highest event sequence number (0 without events).
    pub async fn notify_head(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM account_events",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Lease up to `limit` notifications of `sink` due at `now` for one attempt each: in order
    /// per account (a notification waits while an earlier one of its account is undelivered).
    pub async fn notify_claim(
        &self,
        sink: &str,
        now: i64,
        limit: usize,
        owner: &str,
        until: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let (sink, owner) = (sink.to_owned(), owner.to_owned());
        self.write(Touches::Nothing, move |c| {
            claim_tx(c, &sink, now, limit, &owner, until)
        })
        .await
    }

    /// Record how an attempt ended (only while `owner` still holds its lease).
    pub async fn notify_finish(
        &self,
        ord: i64,
        owner: &str,
        finish: Finish,
        now: i64,
    ) -> Result<(), StoreError> {
        let owner = owner.to_owned();
        self.write(Touches::Nothing, move |c| {
            finish_tx(c, ord, &owner, &finish, now)
        })
        .await
    }

    /// Per sink: undelivered notifications, the oldest one's queue time, dead letters since
    /// `dead_since`, and when the next one not in flight at `now` is due.
    pub async fn notify_stats(
        &self,
        sinks: Vec<String>,
        now: i64,
        dead_since: i64,
    ) -> Result<Vec<(String, SinkStats)>, StoreError> {
        self.read(move |c| {
            let mut out = Vec::with_capacity(sinks.len());
            for s in sinks {
                let st = stats(c, &s, now, dead_since)?;
                out.push((s, st));
            }
            Ok(out)
        })
        .await
    }

    /// Owners holding leases on notifications (to release those of dead processes).
    pub async fn notify_lease_owners(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT DISTINCT lease_owner FROM notify_deliveries WHERE lease_owner IS NOT NULL",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Make the notifications `owner` held claimable now (it is gone).
    pub async fn notify_release(&self, owner: &str) -> Result<u64, StoreError> {
        let owner = owner.to_owned();
        self.write(Touches::Nothing, move |c| {
            Ok(c.execute(
                "UPDATE notify_deliveries SET lease_owner = NULL, lease_until = NULL
                 WHERE lease_owner = ?1",
                [owner],
            )? as u64)
        })
        .await
    }

    /// Forget finished notifications done before `before`.
    pub async fn notify_prune(&self, before: i64) -> Result<u64, StoreError> {
        self.write(Touches::Nothing, move |c| {
            Ok(c.execute(
                "DELETE FROM notify_deliveries
                 WHERE status IN ('delivered', 'rejected', 'dead', 'suppressed', 'summarised')
                   AND done_at < ?1",
                [before],
            )? as u64)
        })
        .await
    }

    /// The notifications of events `from..=to` (by sequence number), held ones included.
    pub async fn notify_views(&self, from: i64, to: i64) -> Result<Vec<DeliveryView>, StoreError> {
        self.read(move |c| views(c, from, to)).await
    }
}

/// An account notification ready to queue (or fold), in planning order.
struct Ready {
    sink: usize,
    kind: &'static str,
    event: Event,
}

fn plan_tx(
    c: &mut Connection,
    sinks: &[SinkPlan],
    now: i64,
    limit: usize,
    plan: &PlanFn,
) -> Result<Planned, StoreError> {
    let tx = immediate(c)?;
    let store_id: String =
        tx.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get(0)
        })?;
    let mut cursors = Vec::with_capacity(sinks.len());
    for s in sinks {
        let known: Option<i64> = tx
            .prepare_cached("SELECT cursor FROM notify_sinks WHERE name = ?1")?
            .query_row([&s.name], |r| r.get(0))
            .optional()?;
        let cursor = match known {
            Some(c) => c,
            None => {
                let start: i64 = tx.query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM account_events WHERE at < ?1",
                    [s.start_at],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "INSERT INTO notify_sinks (name, cursor, added_at) VALUES (?1, ?2, ?3)",
                    params![s.name, start, now],
                )?;
                start
            }
        };
        cursors.push(cursor);
    }
    let mut out = Planned::default();
    let Some(&from) = cursors.iter().min() else {
        tx.commit()?;
        return Ok(out);
    };
    let events: Vec<Event> = tx
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM account_events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?
        .query_map(params![from, limit as i64], read_event)?
        .collect::<Result<_, _>>()?;
    out.more = events.len() == limit;

    // What each sink was told about each account, as this pass changes it.
    let mut told: HashMap<(usize, String), Told> = HashMap::new();
    let mut ready: Vec<Ready> = Vec::new();
    for e in &events {
        for (i, s) in sinks.iter().enumerate() {
            if e.seq <= cursors[i] {
                continue;
            }
            let before = match &e.account_id {
                Some(a) => match told.get(&(i, a.clone())) {
                    Some(t) => *t,
                    None => told_db(&tx, &s.name, a)?,
                },
                None => Told::default(),
            };
            let mut after = before;
            for step in plan(&s.name, e, before) {
                match step {
                    Step::Queue(kind) => {
                        if TROUBLE.contains(&kind) {
                            after.failing_sent = kind == FAILING;
                        }
                        ready.push(Ready {
                            sink: i,
                            kind,
                            event: e.clone(),
                        });
                    }
                    Step::Hold { due_at } => {
                        if let Some(a) = &e.account_id {
                            tx.prepare_cached(
                                "INSERT INTO notify_held (sink, seq, account_id, due_at)
                                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                            )?
                            .execute(params![s.name, e.seq, a, due_at])?;
                            after.held = true;
                            out.held += 1;
                        }
                    }
                    Step::DropHeld => {
                        if let Some(a) = &e.account_id {
                            out.suppressed += suppress(&tx, &store_id, s, a, e, now)?;
                            after.held = false;
                        }
                    }
                }
            }
            if let Some(a) = &e.account_id {
                told.insert((i, a.clone()), after);
            }
        }
    }
    if let Some(last) = events.last() {
        for (i, s) in sinks.iter().enumerate() {
            if cursors[i] < last.seq {
                tx.prepare_cached("UPDATE notify_sinks SET cursor = ?2 WHERE name = ?1")?
                    .execute(params![s.name, last.seq])?;
            }
        }
    }
    // Held notifications whose time has come, once every event before now is planned (a later
    // event may say the account recovered meanwhile).
    if !out.more {
        for (i, s) in sinks.iter().enumerate() {
            let due: Vec<Event> = tx
                .prepare_cached(
                    "SELECT e.seq, e.kind, e.account_id, e.profile, e.from_state, e.to_state,
                            e.reason, e.at
                     FROM notify_held h JOIN account_events e ON e.seq = h.seq
                     WHERE h.sink = ?1 AND h.due_at <= ?2 ORDER BY h.due_at, h.seq",
                )?
                .query_map(params![s.name, now], read_event)?
                .collect::<Result<_, _>>()?;
            for e in due {
                tx.prepare_cached("DELETE FROM notify_held WHERE sink = ?1 AND seq = ?2")?
                    .execute(params![s.name, e.seq])?;
                ready.push(Ready {
                    sink: i,
                    kind: FAILING,
                    event: e,
                });
            }
            // A held row whose event is gone cannot be sent.
            tx.prepare_cached(
                "DELETE FROM notify_held WHERE sink = ?1 AND due_at <= ?2
                   AND NOT EXISTS (SELECT 1 FROM account_events e WHERE e.seq = notify_held.seq)",
            )?
            .execute(params![s.name, now])?;
        }
    }
    queue(&tx, &store_id, sinks, ready, now, &mut out)?;
    out.closed = close_summaries(&tx, sinks, now)?;
    for s in sinks {
        let held: Option<i64> = tx
            .prepare_cached("SELECT MIN(due_at) FROM notify_held WHERE sink = ?1")?
            .query_row([&s.name], |r| r.get(0))?;
        let open: Option<i64> = tx
            .prepare_cached(
                "SELECT MIN(next_attempt_at) FROM notify_deliveries
                 WHERE status = 'open' AND sink = ?1",
            )?
            .query_row([&s.name], |r| r.get(0))?;
        for t in [held, open].into_iter().flatten() {
            out.next_wake = Some(out.next_wake.map_or(t, |w: i64| w.min(t)));
        }
    }
    tx.commit()?;
    Ok(out)
}

/// What `sink` was told about `account`, from the store.
fn told_db(tx: &Connection, sink: &str, account: &str) -> Result<Told, StoreError> {
    let held = tx
        .prepare_cached("SELECT 1 FROM notify_held WHERE sink = ?1 AND account_id = ?2")?
        .exists(params![sink, account])?;
    let last: Option<String> = tx
        .prepare_cached(
            "SELECT type FROM notify_deliveries
             WHERE sink = ?1 AND okey = ?2 AND status != 'suppressed'
               AND type IN ('account.failing', 'account.needs_reauth', 'account.revoked',
                            'account.invalid', 'account.recovered')
             ORDER BY ord DESC LIMIT 1",
        )?
        .query_row(params![sink, account_key(account)], |r| r.get(0))
        .optional()?;
    Ok(Told {
        held,
        failing_sent: last.as_deref() == Some(FAILING),
    })
}

fn account_key(account: &str) -> String {
    format!("a:{account}")
}

fn profile_key(profile: Option<&str>) -> String {
    format!("p:{}", profile.unwrap_or(""))
}

/// Drop `account`'s held `failing` notifications for `sink`, recording them as suppressed.
fn suppress(
    tx: &Connection,
    store_id: &str,
    sink: &SinkPlan,
    account: &str,
    left: &Event,
    now: i64,
) -> Result<usize, StoreError> {
    let held: Vec<Event> = tx
        .prepare_cached(
            "SELECT e.seq, e.kind, e.account_id, e.profile, e.from_state, e.to_state, e.reason, e.at
             FROM notify_held h JOIN account_events e ON e.seq = h.seq
             WHERE h.sink = ?1 AND h.account_id = ?2",
        )?
        .query_map(params![sink.name, account], read_event)?
        .collect::<Result<_, _>>()?;
    for e in &held {
        let why = format!(
            "not sent: the account left failing (to {}) after {}s, within failing_after",
            left.to_state.as_deref().unwrap_or("?"),
            (left.at - e.at).max(0)
        );
        insert(
            tx,
            store_id,
            sink,
            FAILING,
            e,
            "suppressed",
            None,
            Some(&why),
            now,
        )?;
    }
    tx.prepare_cached("DELETE FROM notify_held WHERE sink = ?1 AND account_id = ?2")?
        .execute(params![sink.name, account])?;
    Ok(held.len())
}

/// Insert one notification row. `pending` rows are due at once; other statuses are final
/// (`summarised` into `summary`, `suppressed` with `note`).
#[allow(clippy::too_many_arguments)]
fn insert(
    tx: &Connection,
    store_id: &str,
    sink: &SinkPlan,
    kind: &str,
    e: &Event,
    status: &str,
    summary: Option<&str>,
    note: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    let profile = e.profile.clone().or_else(|| sink.default_profile.clone());
    let okey = match &e.account_id {
        Some(a) => account_key(a),
        None => profile_key(profile.as_deref()),
    };
    let pending = status == "pending";
    tx.prepare_cached(
        "INSERT INTO notify_deliveries (sink, id, seq, type, okey, account_id, profile,
            from_state, to_state, reason, occurred_at, status, summary, queued_at,
            next_attempt_at, last_error, done_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
         ON CONFLICT (sink, id) DO NOTHING",
    )?
    .execute(params![
        sink.name,
        format!("{store_id}:{}", e.seq),
        e.seq,
        kind,
        okey,
        e.account_id,
        profile,
        e.from_state,
        e.to_state,
        e.reason,
        e.at,
        status,
        summary,
        now,
        pending.then_some(now),
        note,
        (!pending).then_some(now),
    ])?;
    Ok(())
}

/// Queue ready notifications in planning order, folding a burst into its profile's summary:
/// when a sink's account notifications of one profile queued in the last [`BURST_WINDOW`]
/// seconds and this pass's together exceed its `burst_threshold`, this pass's are folded.
fn queue(
    tx: &Connection,
    store_id: &str,
    sinks: &[SinkPlan],
    ready: Vec<Ready>,
    now: i64,
    out: &mut Planned,
) -> Result<(), StoreError> {
    let profile_of = |r: &Ready| {
        r.event
            .profile
            .clone()
            .or_else(|| sinks[r.sink].default_profile.clone())
    };
    let mut batch: BTreeMap<(usize, Option<String>), usize> = BTreeMap::new();
    for r in ready.iter().filter(|r| r.event.account_id.is_some()) {
        *batch.entry((r.sink, profile_of(r))).or_default() += 1;
    }
    let mut fold: HashMap<(usize, Option<String>), Option<String>> = HashMap::new();
    for ((i, profile), n) in &batch {
        let recent: i64 = tx
            .prepare_cached(
                "SELECT COUNT(*) FROM notify_deliveries
                 WHERE sink = ?1 AND profile IS ?2 AND queued_at > ?3
                   AND account_id IS NOT NULL AND status != 'suppressed'",
            )?
            .query_row(params![sinks[*i].name, profile, now - BURST_WINDOW], |r| {
                r.get(0)
            })?;
        if recent as u64 + *n as u64 > u64::from(sinks[*i].burst_threshold) {
            fold.insert((*i, profile.clone()), None);
            out.folded
                .push((sinks[*i].name.clone(), profile.clone(), *n));
        }
    }
    for r in ready {
        let s = &sinks[r.sink];
        let key = (r.sink, profile_of(&r));
        let folded = r.event.account_id.is_some() && fold.contains_key(&key);
        if !folded {
            insert(
                tx, store_id, s, r.kind, &r.event, "pending", None, None, now,
            )?;
            out.queued += 1;
            continue;
        }
        let summary = match fold.get(&key).cloned().flatten() {
            Some(id) => id,
            None => {
                let id = open_summary(tx, store_id, s, key.1.as_deref(), &r.event, now)?;
                fold.insert(key, Some(id.clone()));
                id
            }
        };
        insert(
            tx,
            store_id,
            s,
            r.kind,
            &r.event,
            "summarised",
            Some(&summary),
            None,
            now,
        )?;
    }
    Ok(())
}

/// The open summary of `profile` for `sink`, opened now (with `first` as its first event) if
/// there is none.
fn open_summary(
    tx: &Connection,
    store_id: &str,
    sink: &SinkPlan,
    profile: Option<&str>,
    first: &Event,
    now: i64,
) -> Result<String, StoreError> {
    let okey = profile_key(profile);
    let open: Option<String> = tx
        .prepare_cached(
            "SELECT id FROM notify_deliveries WHERE sink = ?1 AND okey = ?2 AND status = 'open'",
        )?
        .query_row(params![sink.name, okey], |r| r.get(0))
        .optional()?;
    if let Some(id) = open {
        return Ok(id);
    }
    let id = format!("{store_id}:{}:summary", first.seq);
    tx.prepare_cached(
        "INSERT INTO notify_deliveries (sink, id, seq, type, okey, profile, occurred_at, status,
            queued_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'open', ?8, ?9)",
    )?
    .execute(params![
        sink.name,
        id,
        first.seq,
        SUMMARY_TYPE,
        okey,
        profile,
        first.at,
        now,
        now + BURST_WINDOW,
    ])?;
    Ok(id)
}

/// A summary's counts, stored with it and sent in its body.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SummaryDetails {
    /// Notifications folded into it.
    pub count: u64,
    /// Distinct accounts among them.
    pub accounts_total: u64,
    pub by_type: BTreeMap<String, u64>,
    /// The first accounts (at most 100), in order.
    pub accounts: Vec<String>,
    /// Unix seconds of the first and last event folded.
    pub first_at: i64,
    pub last_at: i64,
}

/// Queue the open summaries of `sinks` whose collection time is over.
fn close_summaries(tx: &Connection, sinks: &[SinkPlan], now: i64) -> Result<usize, StoreError> {
    let mut closed = 0;
    for s in sinks {
        let due: Vec<(i64, String)> = tx
            .prepare_cached(
                "SELECT ord, id FROM notify_deliveries
                 WHERE status = 'open' AND sink = ?1 AND next_attempt_at <= ?2",
            )?
            .query_map(params![s.name, now], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (ord, id) in due {
            let mut d = SummaryDetails::default();
            let mut seen = std::collections::HashSet::new();
            let mut first: Option<i64> = None;
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT type, account_id, occurred_at FROM notify_deliveries
                     WHERE sink = ?1 AND summary = ?2 ORDER BY ord",
                )?;
                let rows = stmt.query_map(params![s.name, id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?;
                for row in rows {
                    let (kind, account, at) = row?;
                    d.count += 1;
                    *d.by_type.entry(kind).or_default() += 1;
                    if let Some(a) = account
                        && seen.insert(a.clone())
                        && d.accounts.len() < SUMMARY_LIST
                    {
                        d.accounts.push(a);
                    }
                    first = Some(first.map_or(at, |f| f.min(at)));
                    d.last_at = d.last_at.max(at);
                }
            }
            d.accounts_total = seen.len() as u64;
            d.first_at = first.unwrap_or(now);
            let details = serde_json::to_string(&d).map_err(|e| StoreError::Sql {
                kind: super::SqlKind::Other,
                message: e.to_string(),
            })?;
            tx.prepare_cached(
                "UPDATE notify_deliveries SET status = 'pending', details = ?2,
                    occurred_at = ?3, next_attempt_at = ?4
                 WHERE ord = ?1",
            )?
            .execute(params![ord, details, d.first_at, now])?;
            closed += 1;
        }
    }
    Ok(closed)
}

const DELIVERY_COLUMNS: &str = "ord, sink, id, seq, type, account_id, profile, from_state, \
     to_state, reason, occurred_at, details, attempts, queued_at";

fn read_delivery(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        ord: r.get(0)?,
        sink: r.get(1)?,
        id: r.get(2)?,
        seq: r.get(3)?,
        kind: r.get(4)?,
        account_id: r.get(5)?,
        profile: r.get(6)?,
        from_state: r.get(7)?,
        to_state: r.get(8)?,
        reason: r.get(9)?,
        occurred_at: r.get(10)?,
        details: r.get(11)?,
        attempts: r.get::<_, i64>(12)?.clamp(0, u32::MAX as i64) as u32,
        queued_at: r.get(13)?,
    })
}

fn claim_tx(
    c: &mut Connection,
    sink: &str,
    now: i64,
    limit: usize,
    owner: &str,
    until: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let tx = immediate(c)?;
    // In order per account (and per profile for profile notifications): a notification waits
    // while an earlier one of its key is undelivered, in flight, or in a summary not yet sent.
    let mut rows: Vec<Delivery> = tx
        .prepare_cached(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM notify_deliveries d
             WHERE d.sink = ?1 AND d.status = 'pending' AND d.next_attempt_at <= ?2
               AND (d.lease_until IS NULL OR d.lease_until <= ?2)
               AND NOT EXISTS (
                   SELECT 1 FROM notify_deliveries e
                   WHERE e.sink = d.sink AND e.okey = d.okey AND e.ord < d.ord
                     AND e.status IN ('pending', 'open', 'summarised')
                     AND (e.status != 'summarised' OR EXISTS (
                         SELECT 1 FROM notify_deliveries s
                         WHERE s.sink = e.sink AND s.id = e.summary
                           AND s.status IN ('open', 'pending'))))
             ORDER BY d.ord LIMIT ?3"
        ))?
        .query_map(params![sink, now, limit as i64], read_delivery)?
        .collect::<Result<_, _>>()?;
    {
        let mut lease = tx.prepare_cached(
            "UPDATE notify_deliveries SET lease_owner = ?2, lease_until = ?3,
                attempts = attempts + 1, first_attempt_at = COALESCE(first_attempt_at, ?4)
             WHERE ord = ?1",
        )?;
        for d in &mut rows {
            lease.execute(params![d.ord, owner, until, now])?;
            d.attempts += 1;
        }
    }
    tx.commit()?;
    Ok(rows)
}

fn finish_tx(
    c: &mut Connection,
    ord: i64,
    owner: &str,
    finish: &Finish,
    now: i64,
) -> Result<(), StoreError> {
    let (status, error, next) = match finish {
        Finish::Delivered => ("delivered", None, None),
        Finish::Rejected(e) => ("rejected", Some(e.as_str()), None),
        Finish::Retry { error, at } => ("pending", Some(error.as_str()), Some(*at)),
        Finish::Dead(e) => ("dead", Some(e.as_str()), None),
    };
    c.prepare_cached(
        "UPDATE notify_deliveries SET status = ?3, last_error = ?4,
            next_attempt_at = ?5, done_at = CASE WHEN ?3 = 'pending' THEN NULL ELSE ?6 END,
            lease_owner = NULL, lease_until = NULL
         WHERE ord = ?1 AND lease_owner = ?2",
    )?
    .execute(params![ord, owner, status, error, next, now])?;
    Ok(())
}

fn stats(c: &Connection, sink: &str, now: i64, dead_since: i64) -> Result<SinkStats, StoreError> {
    let mut st = SinkStats::default();
    for status in ["pending", "open"] {
        let (n, oldest): (i64, Option<i64>) = c
            .prepare_cached(
                "SELECT COUNT(*), MIN(queued_at) FROM notify_deliveries
                 WHERE status = ?2 AND sink = ?1",
            )?
            .query_row(params![sink, status], |r| Ok((r.get(0)?, r.get(1)?)))?;
        st.backlog += n as u64;
        if let Some(o) = oldest {
            st.oldest = Some(st.oldest.map_or(o, |x: i64| x.min(o)));
        }
    }
    let dead: i64 = c
        .prepare_cached(
            "SELECT COUNT(*) FROM notify_deliveries
             WHERE status = 'dead' AND done_at >= ?2 AND sink = ?1",
        )?
        .query_row(params![sink, dead_since], |r| r.get(0))?;
    st.dead = dead as u64;
    st.next_due = c
        .prepare_cached(
            "SELECT MIN(next_attempt_at) FROM notify_deliveries
             WHERE status = 'pending' AND sink = ?1 AND (lease_until IS NULL OR lease_until <= ?2)",
        )?
        .query_row(params![sink, now], |r| r.get(0))?;
    Ok(st)
}

fn views(c: &Connection, from: i64, to: i64) -> Result<Vec<DeliveryView>, StoreError> {
    let mut out: Vec<DeliveryView> = c
        .prepare_cached(
            "SELECT d.seq, d.sink, d.id, d.type, d.status, d.attempts, d.last_error,
                    d.next_attempt_at, d.summary, s.status
             FROM notify_deliveries d
             LEFT JOIN notify_deliveries s ON s.sink = d.sink AND s.id = d.summary
             WHERE d.seq BETWEEN ?1 AND ?2 AND d.type != ?3
             ORDER BY d.seq, d.sink",
        )?
        .query_map(params![from, to, SUMMARY_TYPE], |r| {
            Ok(DeliveryView {
                seq: r.get(0)?,
                sink: r.get(1)?,
                id: r.get(2)?,
                kind: r.get(3)?,
                status: r.get(4)?,
                attempts: r.get::<_, i64>(5)?.clamp(0, u32::MAX as i64) as u32,
                last_error: r.get(6)?,
                next_attempt_at: r.get(7)?,
                summary: r.get(8)?,
                summary_status: r.get(9)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let store_id: String =
        c.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get(0)
        })?;
    let held = c
        .prepare_cached(
            "SELECT seq, sink, due_at FROM notify_held WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
        )?
        .query_map(params![from, to], |r| {
            Ok(DeliveryView {
                seq: r.get(0)?,
                sink: r.get(1)?,
                id: String::new(),
                kind: "account.failing".into(),
                status: "held".into(),
                attempts: 0,
                last_error: None,
                next_attempt_at: r.get(2)?,
                summary: None,
                summary_status: None,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for mut h in held {
        h.id = format!("{store_id}:{}", h.seq);
        out.push(h);
    }
    out.sort_by(|a, b| (a.seq, &a.sink).cmp(&(b.seq, &b.sink)));
    Ok(out)
}
