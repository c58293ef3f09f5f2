//! `tokend events`: the event log, read-only, with what each sink was told of each event; like
//! `journalctl`, `--follow` keeps printing new events and notification outcomes (it polls).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use clap::Args;

use crate::clock::{Clock, rfc3339};
use crate::daemon::EXIT_IOERR;
use crate::notify::policy;
use crate::store::{DeliveryView, Event, Store};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events, and notification outcomes, as they happen.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only this account's events.
    #[arg(long)]
    account: Option<String>,
    /// Only events from this long ago on (e.g. 30m, 1h, 2d).
    #[arg(long, value_parser = super::parse_dur)]
    since: Option<Duration>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Events read per query.
const PAGE: usize = 500;
/// How often `--follow` looks again.
const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// `--follow` keeps looking at an event this long after printing it (its notifications may
/// not be planned yet), and after that while any of them is not final.
const WATCH_GRACE: Duration = Duration::from_secs(30);
/// Most events `--follow` keeps watching.
const WATCH_MAX: usize = 10_000;

/// What `--follow` watches: events recently printed or with notifications not final yet, and
/// the status last printed for each notification.
#[derive(Default)]
struct Watch {
    events: BTreeMap<i64, std::time::Instant>,
    printed: BTreeMap<(i64, String), String>,
}

pub fn main(path: &Path, args: EventsArgs) -> i32 {
    super::quiet_logs();
    let p = super::places(path);
    super::runtime().block_on(async move {
        let store = match Store::open_read_only(&p.database) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tokend: {e}");
                return EXIT_IOERR;
            }
        };
        match show(&store, &args).await {
            Ok(()) => 0,
            Err(Stop::Store(e)) => {
                eprintln!("tokend: {e}");
                EXIT_IOERR
            }
            // The reader went away (a closed pipe): not an error.
            Err(Stop::Output) => 0,
        }
    })
}

enum Stop {
    Store(crate::store::StoreError),
    Output,
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Stop {
        Stop::Store(e)
    }
}

impl From<std::io::Error> for Stop {
    fn from(_: std::io::Error) -> Stop {
        Stop::Output
    }
}

async fn show(store: &Store, args: &EventsArgs) -> Result<(), Stop> {
    let clock = Clock::system();
    let since = args
        .since
        .map(|d| clock.now() - i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let store_id = store.store_id().await?;
    let mut after = 0;
    let mut watch = Watch::default();
    let mut out = std::io::stdout().lock();
    loop {
        let events = store
            .events(args.account.clone(), after, since, PAGE)
            .await?;
        if let (Some(first), Some(last)) = (events.first(), events.last()) {
            let views = group(store.notify_views(first.seq, last.seq).await?);
            for e in &events {
                let seen = views.get(&e.seq).map(Vec::as_slice).unwrap_or_default();
                print_event(&mut out, &store_id, e, seen, args.json)?;
                if args.follow && watch.events.len() < WATCH_MAX {
                    watch.events.insert(e.seq, std::time::Instant::now());
                    for v in seen {
                        watch
                            .printed
                            .insert((v.seq, v.sink.clone()), status_text(v));
                    }
                }
            }
            after = last.seq;
            out.flush()?;
            if events.len() == PAGE {
                continue;
            }
        }
        if !args.follow {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
        follow_outcomes(store, &mut out, &mut watch, args.json, &clock).await?;
    }
}

/// Print the notifications of watched events that appeared or changed since last printed.
async fn follow_outcomes(
    store: &Store,
    out: &mut impl Write,
    watch: &mut Watch,
    json: bool,
    clock: &Clock,
) -> Result<(), Stop> {
    let (Some((&from, _)), Some((&to, _))) = (
        watch.events.first_key_value(),
        watch.events.last_key_value(),
    ) else {
        return Ok(());
    };
    let views = group(store.notify_views(from, to).await?);
    for &seq in watch.events.keys() {
        for v in views.get(&seq).map(Vec::as_slice).unwrap_or_default() {
            let key = (seq, v.sink.clone());
            let now = status_text(v);
            if watch.printed.get(&key) == Some(&now) {
                continue;
            }
            if json {
                let line = serde_json::json!({"at": rfc3339(clock.now()), "notification": v});
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}  {}  {}: {now}", rfc3339(clock.now()), v.id, v.sink)?;
            }
            watch.printed.insert(key, now);
        }
    }
    out.flush()?;
    // Stop watching events past their grace whose notifications are all final.
    let done: Vec<i64> = watch
        .events
        .iter()
        .filter(|(seq, at)| {
            at.elapsed() > WATCH_GRACE && views.get(seq).is_none_or(|vs| vs.iter().all(is_final))
        })
        .map(|(seq, _)| *seq)
        .collect();
    for seq in done {
        watch.events.remove(&seq);
        watch.printed.retain(|(s, _), _| *s != seq);
    }
    Ok(())
}

fn group(views: Vec<DeliveryView>) -> BTreeMap<i64, Vec<DeliveryView>> {
    let mut by_seq: BTreeMap<i64, Vec<DeliveryView>> = BTreeMap::new();
    for v in views {
        by_seq.entry(v.seq).or_default().push(v);
    }
    by_seq
}

fn is_final(v: &DeliveryView) -> bool {
    match v.status.as_str() {
        "held" | "pending" => false,
        "summarised" => !matches!(v.summary_status.as_deref(), Some("open" | "pending")),
        _ => true,
    }
}

/// What happened to a notification, in words.
fn status_text(v: &DeliveryView) -> String {
    let err = v.last_error.as_deref().unwrap_or("");
    let at = |t: Option<i64>| t.map(rfc3339).unwrap_or_else(|| "-".into());
    match v.status.as_str() {
        "held" => format!(
            "held until {} (sent only if still failing then)",
            at(v.next_attempt_at)
        ),
        "pending" if v.attempts == 0 => "queued".into(),
        "pending" => format!(
            "retrying: attempt {} failed ({err}); next at {}",
            v.attempts,
            at(v.next_attempt_at)
        ),
        "delivered" if v.attempts > 1 => format!("delivered (attempt {})", v.attempts),
        "delivered" => "delivered".into(),
        "rejected" => format!("REJECTED by the receiver, not retried: {err}"),
        "dead" => format!("DEAD LETTER: {err}"),
        "summarised" => format!(
            "in summary {} ({})",
            v.summary.as_deref().unwrap_or("?"),
            v.summary_status.as_deref().unwrap_or("?")
        ),
        "suppressed" => err.to_owned(),
        other => other.to_owned(),
    }
}

fn print_event(
    out: &mut impl Write,
    store_id: &str,
    e: &Event,
    seen: &[DeliveryView],
    json: bool,
) -> std::io::Result<()> {
    let id = format!("{store_id}:{}", e.seq);
    let kind = policy::type_of(e);
    if json {
        let line = serde_json::json!({
            "id": id,
            "seq": e.seq,
            "kind": e.kind,
            "type": kind,
            "account_id": e.account_id,
            "profile": e.profile,
            "from_state": e.from_state,
            "to_state": e.to_state,
            "reason": e.reason,
            "at": rfc3339(e.at),
            "notifications": seen,
        });
        return writeln!(out, "{line}");
    }
    let subject = match (&e.account_id, &e.profile) {
        (Some(a), Some(p)) => format!("{a} ({p})"),
        (Some(a), None) => a.clone(),
        (None, Some(p)) => format!("profile {p}"),
        (None, None) => "-".into(),
    };
    let change = match (&e.from_state, &e.to_state) {
        (Some(f), Some(t)) => format!("  {f} -> {t}"),
        (None, Some(t)) => format!("  -> {t}"),
        _ => String::new(),
    };
    let reason = e
        .reason
        .as_deref()
        .map(|r| format!("  {r}"))
        .unwrap_or_default();
    let told = if seen.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = seen
            .iter()
            .map(|v| format!("{}: {}", v.sink, status_text(v)))
            .collect();
        format!("  [{}]", parts.join("; "))
    };
    writeln!(
        out,
        "{}  {id}  {}  {subject}{change}{reason}{told}",
        rfc3339(e.at),
        kind.unwrap_or(e.kind.as_str()),
    )
}
