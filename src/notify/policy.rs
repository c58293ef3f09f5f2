//! What an event means for a sink, and what an answer means for a notification. Pure: the
//! notifier loop and the store apply it, tests call it directly.
//!
//! - A state event becomes `account.<state>` for `needs_reauth`, `revoked`, `invalid`;
//!   `failing` is held for `failing_after` and dropped if the account leaves `failing` first;
//!   back to `active` is `account.recovered` from `needs_reauth`, `revoked` or `invalid`
//!   always, and from anything else only when a `failing` was sent (never a recovered for a
//!   failing nobody heard of). `paused` accounts are told by `profile.paused`.
//! - `at_risk`, `lapse`, `profile_paused`, `profile_resumed` map one to one; `superseded` and
//!   `rotation_lost` are not sent (a lost rotation arrives as its `needs_reauth`).
//! - Answers: 2xx delivered; 4xx but 408 and 429 rejected; anything else retried with
//!   exponential backoff and jitter until `max_age`, then dead. Exec: exit 0 delivered, exit
//!   65 (EX_DATAERR) rejected, anything else retried.

use std::time::Duration;

use crate::config::NotifySink;
use crate::state::State;
use crate::store::{Event, EventKind, Finish, Step, Told};

pub const NEEDS_REAUTH: &str = "account.needs_reauth";
pub const REVOKED: &str = "account.revoked";
pub const FAILING: &str = "account.failing";
pub const INVALID: &str = "account.invalid";
pub const RECOVERED: &str = "account.recovered";
pub const AT_RISK: &str = "account.refresh_token_at_risk";
pub const LAPSE: &str = "account.lapse";
pub const PROFILE_PAUSED: &str = "profile.paused";
pub const PROFILE_RESUMED: &str = "profile.resumed";

/// First retry of a notification after this long, doubling up to [`RETRY_MAX`] (each wait
/// jittered down to half).
pub const RETRY_INITIAL: Duration = Duration::from_secs(5);
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// A sink whose receiver fails is probed with one notification at a time, at most this far
/// apart, until it answers again.
pub const SINK_PAUSE_MAX: Duration = Duration::from_secs(60);
/// The exit status with which an exec sink's command refuses an event for good (sysexits'
/// EX_DATAERR).
pub const EXIT_REJECTED: i32 = 65;

/// The notification type a trouble state is told by.
fn trouble(s: State) -> Option<&'static str> {
    match s {
        State::NeedsReauth => Some(NEEDS_REAUTH),
        State::Revoked => Some(REVOKED),
        State::Invalid => Some(INVALID),
        State::Failing => Some(FAILING),
        State::Active | State::Paused => None,
    }
}

/// What `e` means for `sink`, given what the sink was told about the account.
/// `default_profile`: the only profile, for rows that name none.
pub fn plan(sink: &NotifySink, default_profile: Option<&str>, e: &Event, told: Told) -> Vec<Step> {
    let profile = e.profile.as_deref().or(default_profile);
    if !sink.covers(profile) {
        return Vec::new();
    }
    let queue = |t: &'static str| sink.wants(t).then_some(Step::Queue(t));
    let mut steps = Vec::new();
    match EventKind::parse(&e.kind) {
        Some(EventKind::State) => {
            let from = e.from_state.as_deref().and_then(State::parse);
            let to = e.to_state.as_deref().and_then(State::parse);
            if from == Some(State::Failing) && to != Some(State::Failing) && told.held {
                steps.push(Step::DropHeld);
            }
            match to {
                Some(State::Failing) if !told.held && sink.wants(FAILING) => {
                    let wait = sink.failing_after.as_secs_i64();
                    steps.push(if wait == 0 {
                        Step::Queue(FAILING)
                    } else {
                        Step::Hold {
                            due_at: e.at.saturating_add(wait),
                        }
                    });
                }
                Some(s @ (State::NeedsReauth | State::Revoked | State::Invalid)) => {
                    steps.extend(trouble(s).and_then(queue));
                }
                Some(State::Active) => {
                    let recovered = match from {
                        Some(State::NeedsReauth | State::Revoked | State::Invalid) => true,
                        // A failing dropped just now was never sent: told.failing_sent is false.
                        _ => told.failing_sent,
                    };
                    if recovered {
                        steps.extend(queue(RECOVERED));
                    }
                }
                _ => {}
            }
        }
        Some(EventKind::AtRisk) => steps.extend(queue(AT_RISK)),
        Some(EventKind::Lapse) => steps.extend(queue(LAPSE)),
        Some(EventKind::ProfilePaused) => steps.extend(queue(PROFILE_PAUSED)),
        Some(EventKind::ProfileResumed) => steps.extend(queue(PROFILE_RESUMED)),
        Some(EventKind::Superseded | EventKind::RotationLost) | None => {}
    }
    steps
}

/// The notification type an event would be told by, storm rules aside (for `tokend events`).
pub fn type_of(e: &Event) -> Option<&'static str> {
    match EventKind::parse(&e.kind)? {
        EventKind::State => {
            let to = e.to_state.as_deref().and_then(State::parse)?;
            let from = e.from_state.as_deref().and_then(State::parse);
            match to {
                State::Active if from.is_some_and(|f| trouble(f).is_some()) => Some(RECOVERED),
                s => trouble(s),
            }
        }
        EventKind::AtRisk => Some(AT_RISK),
        EventKind::Lapse => Some(LAPSE),
        EventKind::ProfilePaused => Some(PROFILE_PAUSED),
        EventKind::ProfileResumed => Some(PROFILE_RESUMED),
        EventKind::Superseded | EventKind::RotationLost => None,
    }
}

/// What one attempt's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Refused for good: logged, counted, not retried.
    Rejected(String),
    /// Try again, not sooner than `after` when the receiver said so.
    Retry {
        error: String,
        after: Option<Duration>,
    },
}

/// A webhook's HTTP status.
pub fn http_verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 429 => Verdict::Retry {
            error: format!("http {status}"),
            after: None,
        },
        400..=499 => Verdict::Rejected(format!("http {status}")),
        _ => Verdict::Retry {
            error: format!("http {status}"),
            after: None,
        },
    }
}

/// An exec sink's exit code (`None`: killed by a signal).
pub fn exit_verdict(code: Option<i32>) -> Verdict {
    match code {
        Some(0) => Verdict::Delivered,
        Some(EXIT_REJECTED) => Verdict::Rejected(format!("exit {EXIT_REJECTED}")),
        Some(c) => Verdict::Retry {
            error: format!("exit {c}"),
            after: None,
        },
        None => Verdict::Retry {
            error: "killed by a signal".into(),
            after: None,
        },
    }
}

/// The wait before attempt `attempt + 1`: [`RETRY_INITIAL`] doubling per attempt up to
/// [`RETRY_MAX`], scaled by `0.5 + jitter / 2` (`jitter` in `0..1`).
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let doubled = RETRY_INITIAL.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    doubled
        .min(RETRY_MAX)
        .mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// How long a failing sink waits before its next probe, after `streak` failures in a row.
pub fn sink_pause(streak: u32, jitter: f64) -> Duration {
    backoff(streak, jitter).min(SINK_PAUSE_MAX)
}

/// After a failed attempt (the `attempts`th) of a notification queued at `queued_at`: retry,
/// or give up once `max_age` has passed. The last retry is at the deadline itself.
pub fn after_failure(
    now: i64,
    queued_at: i64,
    attempts: u32,
    max_age: Duration,
    error: String,
    after: Option<Duration>,
    jitter: f64,
) -> Finish {
    let deadline = queued_at.saturating_add(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX));
    if now >= deadline {
        return Finish::Dead(format!(
            "{error} (given up after {attempts} {} over {})",
            if attempts == 1 { "attempt" } else { "attempts" },
            humantime::format_duration(max_age)
        ));
    }
    let wait = backoff(attempts, jitter).max(after.unwrap_or_default());
    let at = now
        .saturating_add(wait.as_secs().max(1) as i64)
        .min(deadline);
    Finish::Retry { error, at }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn sink(extra: &str) -> NotifySink {
        let text = format!(
            "[[profile]]\nname = \"p\"\nclient_id = \"a\"\nclient_secret = \"s\"\n\
             [[profile]]\nname = \"q\"\nclient_id = \"a\"\nclient_secret = \"s\"\n\
             [[notify]]\nname = \"ops\"\nkind = \"exec\"\ncommand = [\"/bin/true\"]\n{extra}"
        );
        let c = Config::parse(std::path::Path::new("t.toml"), &text).expect("config");
        c.notify[0].clone()
    }

    fn state(seq: i64, from: &str, to: &str, at: i64) -> Event {
        Event {
            seq,
            kind: "state".into(),
            account_id: Some("a".into()),
            profile: Some("p".into()),
            from_state: Some(from.into()),
            to_state: Some(to.into()),
            reason: None,
            at,
        }
    }

    #[test]
    fn trouble_is_told_and_failing_waits() {
        let s = sink("");
        let t = Told::default();
        assert_eq!(
            plan(&s, None, &state(1, "active", "needs_reauth", 10), t),
            [Step::Queue(NEEDS_REAUTH)]
        );
        assert_eq!(
            plan(&s, None, &state(1, "active", "failing", 10), t),
            [Step::Hold { due_at: 910 }]
        );
        let held = Told {
            held: true,
            failing_sent: false,
        };
        // Left failing in time: the held one is dropped and no recovered follows.
        assert_eq!(
            plan(&s, None, &state(2, "failing", "active", 100), held),
            [Step::DropHeld]
        );
        // Failing was sent: recovered follows.
        let sent = Told {
            held: false,
            failing_sent: true,
        };
        assert_eq!(
            plan(&s, None, &state(3, "failing", "active", 2000), sent),
            [Step::Queue(RECOVERED)]
        );
        // From a dead grant, recovered is always sent (a relink).
        assert_eq!(
            plan(&s, None, &state(4, "needs_reauth", "active", 10), t),
            [Step::Queue(RECOVERED)]
        );
        // Failing into needs_reauth before failing_after: needs_reauth only.
        assert_eq!(
            plan(&s, None, &state(5, "failing", "needs_reauth", 10), held),
            [Step::DropHeld, Step::Queue(NEEDS_REAUTH)]
        );
        // Paused and resumed accounts are told per profile, not per account.
        assert!(plan(&s, None, &state(6, "active", "paused", 10), t).is_empty());
        assert!(plan(&s, None, &state(7, "paused", "active", 10), t).is_empty());
        let now = sink("failing_after = \"0s\"");
        assert_eq!(
            plan(&now, None, &state(8, "active", "failing", 10), t),
            [Step::Queue(FAILING)]
        );
    }

    #[test]
    fn filters_apply_before_the_storm_rules() {
        let s = sink("events = [\"account.recovered\"]\nprofiles = [\"q\"]");
        let t = Told::default();
        assert!(plan(&s, None, &state(1, "needs_reauth", "active", 1), t).is_empty());
        let mut e = state(1, "needs_reauth", "active", 1);
        e.profile = None;
        assert_eq!(
            plan(&s, Some("q"), &e, t),
            [Step::Queue(RECOVERED)],
            "a row without a profile belongs to the only one"
        );
        e.profile = Some("q".into());
        e.to_state = Some("failing".into());
        e.from_state = Some("active".into());
        assert!(plan(&s, None, &e, t).is_empty(), "failing is not wanted");
    }

    #[test]
    fn answers_and_backoff() {
        assert_eq!(http_verdict(204), Verdict::Delivered);
        assert!(matches!(http_verdict(410), Verdict::Rejected(_)));
        assert!(matches!(http_verdict(429), Verdict::Retry { .. }));
        assert!(matches!(http_verdict(408), Verdict::Retry { .. }));
        assert!(matches!(http_verdict(503), Verdict::Retry { .. }));
        assert!(matches!(http_verdict(302), Verdict::Retry { .. }));
        assert_eq!(exit_verdict(Some(0)), Verdict::Delivered);
        assert!(matches!(exit_verdict(Some(65)), Verdict::Rejected(_)));
        assert!(matches!(exit_verdict(Some(75)), Verdict::Retry { .. }));
        assert!(matches!(exit_verdict(None), Verdict::Retry { .. }));
        assert_eq!(backoff(1, 1.0), Duration::from_secs(5));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(20));
        assert_eq!(backoff(30, 1.0), RETRY_MAX);
        assert_eq!(backoff(1, 0.0), Duration::from_millis(2500));
        let day = Duration::from_secs(86_400);
        assert_eq!(
            after_failure(100, 100, 1, day, "x".into(), None, 1.0),
            Finish::Retry {
                error: "x".into(),
                at: 105
            }
        );
        assert_eq!(
            after_failure(
                100,
                100,
                1,
                day,
                "x".into(),
                Some(Duration::from_secs(60)),
                1.0
            ),
            Finish::Retry {
                error: "x".into(),
                at: 160
            }
        );
        // The last retry is at the deadline, then dead.
        assert_eq!(
            after_failure(86_390, 0, 9, day, "x".into(), None, 1.0),
            Finish::Retry {
                error: "x".into(),
                at: 86_400
            }
        );
        assert!(matches!(
            after_failure(86_400, 0, 10, day, "x".into(), None, 1.0),
            Finish::Dead(_)
        ));
    }
}
