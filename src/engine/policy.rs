//! Row policy, pure: a row, the configuration and `now` in; a decision out. No I/O, no clock,
//! no memory between calls (randomness only for jitter).
//!
//! This is the one place that says what a row means: the import, the API, the engine and the
//! revocation checks all validate rows with [`check`], and every change the engine writes is
//! made here from a row and an answer.

use std::time::Duration;

use secrecy::ExposeSecret;

use crate::config::{Config, DaemonConfig, Profile, TokenType};
use crate::provider::{Grant, RefreshError};
use crate::state::State;
use crate::store::{Account, Change, Decision, EventKind, NewTokens, Note};

/// The fields of a row that make it usable, from a stored row or one about to be linked.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub id: &'a str,
    pub profile: Option<&'a str>,
    pub token_type: TokenType,
    pub has_access: bool,
    pub has_refresh: bool,
}

impl<'a> Fields<'a> {
    pub fn of(a: &'a Account) -> Fields<'a> {
        let present = |t: &Option<secrecy::SecretString>| {
            t.as_ref()
                .is_some_and(|s| !s.expose_secret().trim().is_empty())
        };
        Fields {
            id: &a.id,
            profile: a.profile.as_deref(),
            token_type: a.token_type,
            has_access: present(&a.access_token),
            has_refresh: present(&a.refresh_token),
        }
    }
}

/// What is wrong with a row: the field at fault and why, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

/// Check a row. The one validator.
pub fn check<'c>(config: &'c Config, f: &Fields<'_>) -> Result<&'c Profile, Invalid> {
    if f.id.is_empty() || f.id.trim() != f.id {
        return Err(invalid(
            "id",
            "id is empty or has leading/trailing whitespace",
        ));
    }
    let profile = match f.profile.filter(|p| !p.is_empty()) {
        Some(name) => config
            .profile(name)
            .ok_or_else(|| invalid("profile", format!("unknown profile {name:?}")))?,
        None => config.single_profile().ok_or_else(|| {
            invalid(
                "profile",
                format!(
                    "no profile named, and the config has {} profiles",
                    config.profiles.len()
                ),
            )
        })?,
    };
    match f.token_type {
        TokenType::User if !f.has_refresh => Err(invalid(
            "refresh_token",
            "a user token needs a refresh_token",
        )),
        TokenType::Company if !f.has_access => Err(invalid(
            "access_token",
            "a company token needs an access_token",
        )),
        _ => Ok(profile),
    }
}

/// Whether a profile may send token requests now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Open,
    /// Paused for misconfiguration: no requests.
    Paused,
    /// One request may go out to find out whether the profile (or its server) works again.
    Probe,
    /// Its circuit breaker is open: no requests until then.
    Defer(i64),
}

/// What policy needs besides the row.
#[derive(Clone, Copy)]
pub struct Cx<'a> {
    pub config: &'a Config,
    pub now: i64,
}

/// What a row is, once judged: an update to write without any request, or what scheduling
/// needs to know.
struct Judged<'c> {
    profile: &'c Profile,
    /// A believable expiry (missing, non-positive or absurd ones are unknown).
    expires_at: Option<i64>,
}

fn change(a: &Account, to: State, reason: Option<String>, next: Option<i64>) -> Change {
    Change {
        to,
        reason,
        next_action_at: next,
        failures: if to == State::Failing { a.failures } else { 0 },
        last_error: None,
        checked_at: None,
        profile: None,
    }
}

fn error(mut c: Change, e: impl Into<String>) -> Change {
    c.last_error = Some(e.into());
    c
}

/// The state a row keeps when it is rescheduled.
fn keep(state: State) -> State {
    match state {
        State::Failing => State::Failing,
        _ => State::Active,
    }
}

fn judge<'c>(cx: &Cx<'c>, a: &Account) -> Result<Judged<'c>, Change> {
    let d = &cx.config.daemon;
    let profile = check(cx.config, &Fields::of(a)).map_err(|e| {
        error(
            change(a, State::Invalid, Some(e.reason.clone()), None),
            e.reason,
        )
    })?;
    // Only a new grant brings an account out of these (the relink trigger does, and records
    // it); a row inserted or touched in one stays there.
    if a.state.is_terminal() {
        let mut c = change(a, a.state, None, None);
        c.failures = a.failures;
        return Err(c);
    }
    if a.token_type == TokenType::Company {
        // Company tokens never expire; the revocation checks look after them.
        let to = if a.state == State::Failing {
            State::Failing
        } else {
            State::Active
        };
        return Err(change(a, to, None, None));
    }
    // Refresh-token age: past its lifetime the grant is dead, so no request is wasted on it.
    if let Some(age) = refresh_token_age(a, cx.now)
        && age >= d.refresh_token_lifetime.as_secs_i64()
    {
        let reason = format!(
            "refresh token is {}h old, past its {}h lifetime",
            age / 3600,
            d.refresh_token_lifetime.as_secs_i64() / 3600
        );
        return Err(error(
            change(a, State::NeedsReauth, Some(reason.clone()), None),
            reason,
        ));
    }
    Ok(Judged {
        profile,
        expires_at: a
            .expires_at
            .filter(|e| *e > 0 && *e < cx.now + 366 * 86_400),
    })
}

/// How old the account's refresh token is, when that is known and believable.
pub fn refresh_token_age(a: &Account, now: i64) -> Option<i64> {
    a.refresh_issued_at
        .filter(|t| *t > 0 && *t <= now + 86_400)
        .map(|t| now - t)
}

/// Whether the account's refresh token is past `lifetime − margin` (a person should act soon).
pub fn at_risk(d: &DaemonConfig, a: &Account, now: i64) -> bool {
    a.token_type == TokenType::User
        && refresh_token_age(a, now).is_some_and(|age| {
            age >= (d.refresh_token_lifetime.get() - d.refresh_token_margin.get()).as_secs() as i64
        })
}

/// The earliest time tokend may send another token request for `a`: half the lifetime of the
/// token it holds, and at least `min_refresh_interval`, after that token was issued. `None` when
/// tokend did not obtain the token itself (a row linked by another program).
pub fn earliest_refresh(d: &DaemonConfig, a: &Account) -> Option<i64> {
    let issued = a.last_refresh_at?;
    let lifetime = a.expires_at.map(|e| e - issued).unwrap_or(0).max(0);
    Some(issued + (lifetime / 2).max(d.min_refresh_interval.as_secs_i64()))
}

/// When a token issued at `issued` (if tokend obtained it) and expiring at `expires_at` should be
/// refreshed: `refresh_lead` plus up to `refresh_jitter` before expiry, but never sooner than the
/// minimum gap after issue. The flag says whether the lead had to be clamped to fit.
pub fn due_time(d: &DaemonConfig, expires_at: i64, issued: Option<i64>) -> (i64, bool) {
    let jitter = d.refresh_jitter.as_secs_i64();
    let spread = if jitter > 0 {
        fastrand::i64(0..=jitter)
    } else {
        0
    };
    let wanted = expires_at - d.refresh_lead.as_secs_i64() - spread;
    let Some(issued) = issued else {
        return (wanted, false);
    };
    let lifetime = (expires_at - issued).max(0);
    let floor = issued + (lifetime / 2).max(d.min_refresh_interval.as_secs_i64());
    (wanted.max(floor), wanted < floor)
}

/// Exponential backoff with jitter between half and all of the step.
pub fn backoff(d: &DaemonConfig, failures: u32) -> Duration {
    let initial = d.retry_initial.get().as_secs_f64();
    let step = initial * 2f64.powi(failures.saturating_sub(1).min(30) as i32);
    let capped = step.min(d.retry_max.get().as_secs_f64());
    Duration::from_secs_f64(capped * (0.5 + fastrand::f64() * 0.5))
}

/// A row just inserted or changed by another program: schedule it (for now, if it is due).
/// Never a request: due rows are claimed with [`plan`].
pub fn schedule(cx: &Cx<'_>, a: &Account, admission: Admission) -> Decision {
    let j = match judge(cx, a) {
        Ok(j) => j,
        Err(c) => return Decision::Write(c),
    };
    if admission == Admission::Paused {
        let reason = format!("profile {} is paused", j.profile.name);
        return Decision::Write(change(a, State::Paused, Some(reason), None));
    }
    let due = match j.expires_at {
        Some(e) if Fields::of(a).has_access => due_time(&cx.config.daemon, e, None).0.max(cx.now),
        _ => cx.now,
    };
    let due = earliest_refresh(&cx.config.daemon, a).map_or(due, |e| due.max(e));
    let to = if a.state == State::Paused {
        State::Active
    } else {
        keep(a.state)
    };
    let mut c = change(a, to, None, Some(due.max(1)));
    c.failures = if to == State::Failing { a.failures } else { 0 };
    if a.profile.is_none() {
        c.profile = Some(j.profile.name.clone());
    }
    Decision::Write(c)
}

/// A row whose time came: refresh it, unless something says not to (a bad row, a paused
/// profile, an open breaker, the minimum gap, the hourly ceiling).
pub fn plan(cx: &Cx<'_>, a: &Account, admission: Admission) -> Decision {
    let d = &cx.config.daemon;
    let j = match judge(cx, a) {
        Ok(j) => j,
        Err(c) => return Decision::Write(c),
    };
    match admission {
        Admission::Paused => {
            let reason = format!("profile {} is paused", j.profile.name);
            return Decision::Write(change(a, State::Paused, Some(reason), None));
        }
        Admission::Defer(until) => {
            let reason = format!(
                "circuit open for profile {}: most requests fail",
                j.profile.name
            );
            let mut c = change(a, State::Failing, Some(reason.clone()), Some(until));
            c.last_error = Some(reason);
            return Decision::Write(c);
        }
        Admission::Open | Admission::Probe => {}
    }
    let state = if a.state == State::Paused {
        // The probe of a paused profile: its outcome says what comes next.
        State::Paused
    } else {
        keep(a.state)
    };
    // Never sooner than the minimum gap after the token tokend holds was issued.
    if let Some(earliest) = earliest_refresh(d, a)
        && earliest > cx.now
    {
        let mut c = change(a, state, None, Some(earliest));
        c.failures = a.failures;
        return Decision::Write(c);
    }
    // The hard ceiling of token requests per account per hour, whatever the provider answers.
    let ceiling = d.max_token_requests_per_hour;
    if let Some(start) = a.window_start
        && cx.now >= start
        && cx.now - start < crate::store::WINDOW_SECS
        && a.window_requests >= ceiling
    {
        // The second after the window, so no hour-long span holds more than the ceiling.
        let until = start + crate::store::WINDOW_SECS + 1;
        let why = format!(
            "{ceiling} token requests within the hour (the ceiling, max_token_requests_per_hour); next request at {}",
            crate::clock::rfc3339(until)
        );
        let mut c = change(a, state, None, Some(until));
        c.failures = a.failures;
        c.last_error = Some(why);
        return Decision::Write(c);
    }
    Decision::Request
}

/// What a claim of a company row for a revocation probe decides.
pub fn plan_probe(cx: &Cx<'_>, a: &Account) -> Decision {
    match check(cx.config, &Fields::of(a)) {
        Ok(_)
            if a.token_type == TokenType::Company
                && matches!(a.state, State::Active | State::Failing) =>
        {
            Decision::Probe
        }
        _ => Decision::Keep,
    }
}

/// What to write after a token request, and what to say about it.
#[derive(Debug)]
pub struct Refreshed {
    pub tokens: Option<NewTokens>,
    pub change: Change,
    pub notes: Vec<Note>,
    /// The answer's expiry was unusable and the profile's default lifetime stands in: why.
    pub expiry_guessed: Option<String>,
    /// The configured lead did not fit this token's lifetime and was clamped.
    pub lead_clamped: Option<i64>,
    /// The token this account held had expired before this outcome (a lapse), by this much.
    pub lapsed_by: Option<i64>,
}

/// Map one token-endpoint answer to what is written. `now` is when the answer came.
pub fn refreshed(
    cx: &Cx<'_>,
    profile: &Profile,
    a: &Account,
    result: &Result<Grant, RefreshError>,
) -> Refreshed {
    let d = &cx.config.daemon;
    let now = cx.now;
    let mut out = Refreshed {
        tokens: None,
        change: change(a, State::Active, None, None),
        notes: Vec::new(),
        expiry_guessed: None,
        lead_clamped: None,
        lapsed_by: None,
    };
    match result {
        Ok(g) => {
            if let Some(old) = a.expires_at
                && a.last_refresh_at.is_some()
                && old < now
                && g.access_token.is_some()
            {
                out.lapsed_by = Some(now - old);
                out.notes.push(Note {
                    kind: EventKind::Lapse,
                    reason: format!(
                        "the access token expired {}s before its refresh was stored",
                        now - old
                    ),
                    unless_since: Some(old),
                });
            }
            let Some(access) = &g.access_token else {
                // The refresh token was rotated (kept), but there is no access token: try
                // again after the minimum gap.
                let reason =
                    "the provider rotated the refresh token but sent no usable access token"
                        .to_owned();
                let next = now + d.min_refresh_interval.as_secs_i64();
                let mut c = change(a, State::Failing, Some(reason.clone()), Some(next));
                c.failures = a.failures.saturating_add(1);
                c.last_error = Some(reason);
                out.change = c;
                out.tokens = Some(NewTokens {
                    access_token: None,
                    refresh_token: g.refresh_token.clone(),
                    expires_at: None,
                    scopes: g.scopes.clone(),
                });
                return out;
            };
            let expires_in = match g.expires_in {
                Some(e) => e,
                None => {
                    out.expiry_guessed = g.expiry_problem.clone();
                    profile.default_token_lifetime.as_secs_i64()
                }
            };
            let expires_at = g.issued_at + expires_in;
            let (due, clamped) = due_time(d, expires_at, Some(g.issued_at));
            if clamped {
                out.lead_clamped = Some(expires_in);
            }
            let reason = (a.state != State::Active).then(|| "refreshed".to_owned());
            out.change = change(a, State::Active, reason, Some(due));
            out.tokens = Some(NewTokens {
                access_token: Some(access.clone()),
                refresh_token: g.refresh_token.clone(),
                expires_at: Some(expires_at),
                scopes: g.scopes.clone(),
            });
        }
        Err(RefreshError::InvalidGrant(desc)) => {
            let reason = match &a.left_in_flight_by {
                Some(owner) => {
                    let why = format!(
                        "the rotation was lost: a refresh of this grant was in flight in {owner} when it stopped (crashed or stalled), and the provider now rejects the refresh token it had presented (invalid_grant). Only a new authorisation helps"
                    );
                    out.notes.push(Note {
                        kind: EventKind::RotationLost,
                        reason: why.clone(),
                        unless_since: None,
                    });
                    why
                }
                None => "the provider rejected the grant (invalid_grant): revoked, expired or reused; a new authorisation is needed".to_owned(),
            };
            out.change = error(
                change(a, State::NeedsReauth, Some(reason), None),
                format!("invalid_grant: {desc}"),
            );
        }
        Err(RefreshError::Misconfigured { code, description }) => {
            let reason = format!("profile {}: {code}: {description}", profile.name);
            let mut c = change(a, State::Paused, Some(reason.clone()), None);
            c.failures = a.failures;
            out.change = error(c, reason);
        }
        Err(RefreshError::Transient {
            reason,
            retry_after,
        }) => {
            let failures = a.failures.saturating_add(1);
            let delay = backoff(d, failures).max(retry_after.unwrap_or_default());
            let at_ms = now * 1000 + delay.max(Duration::from_secs(1)).as_millis() as i64;
            let next = at_ms.div_euclid(1000) + i64::from(at_ms.rem_euclid(1000) > 0);
            let mut c = change(a, State::Failing, Some(reason.clone()), Some(next));
            c.failures = failures;
            out.change = error(c, reason.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Account;
    use secrecy::SecretString;
    use std::path::Path;

    const NOW: i64 = 1_800_000_000;

    fn config(extra: &str) -> Config {
        Config::parse(
            Path::new("t.toml"),
            &format!(
                "[daemon]\nrefresh_lead = \"10m\"\nrefresh_jitter = \"0s\"\n{extra}\n[[profile]]\nname = \"p\"\nclient_id = \"c\"\nclient_secret = \"s\"\n"
            ),
        )
        .expect("config")
    }

    fn user(expires_at: Option<i64>) -> Account {
        Account {
            id: "u".into(),
            profile: None,
            token_type: TokenType::User,
            access_token: Some(SecretString::from("a")),
            refresh_token: Some(SecretString::from("r")),
            expires_at,
            refresh_issued_at: Some(NOW - 60),
            scopes: None,
            state: State::Active,
            failures: 0,
            last_refresh_at: None,
            lease_owner: None,
            attempt: None,
            attempt_at: None,
            window_start: None,
            window_requests: 0,
            left_in_flight_by: None,
        }
    }

    #[test]
    fn a_short_token_is_never_due_before_half_its_life_nor_the_minimum_interval() {
        let c = config("min_refresh_interval = \"60s\"");
        let d = &c.daemon;
        // 5-minute token, 10-minute lead: without the floor it would be due before it was issued.
        let (due, clamped) = due_time(d, NOW + 300, Some(NOW));
        assert_eq!(due, NOW + 150);
        assert!(clamped);
        // 20-second token: the minimum interval wins.
        assert_eq!(due_time(d, NOW + 20, Some(NOW)).0, NOW + 60);
        // An hour-long token: the lead applies.
        assert_eq!(due_time(d, NOW + 3600, Some(NOW)), (NOW + 3000, false));
        // A row linked by another program: no floor (tokend does not know its issue time).
        assert_eq!(due_time(d, NOW + 300, None).0, NOW - 300);
    }

    #[test]
    fn a_due_row_inside_its_minimum_gap_is_rescheduled_not_requested() {
        let c = config("");
        let cx = Cx {
            config: &c,
            now: NOW,
        };
        let mut a = user(Some(NOW + 10));
        a.last_refresh_at = Some(NOW - 5);
        match plan(&cx, &a, Admission::Open) {
            Decision::Write(ch) => assert_eq!(ch.next_action_at, Some(NOW - 5 + 60)),
            other => panic!("{other:?}"),
        }
        a.last_refresh_at = Some(NOW - 3600);
        assert!(matches!(plan(&cx, &a, Admission::Open), Decision::Request));
    }

    #[test]
    fn the_hourly_ceiling_defers_to_the_end_of_the_window() {
        let c = config("max_token_requests_per_hour = 3");
        let cx = Cx {
            config: &c,
            now: NOW,
        };
        let mut a = user(Some(NOW));
        a.window_start = Some(NOW - 100);
        a.window_requests = 3;
        match plan(&cx, &a, Admission::Open) {
            Decision::Write(ch) => {
                assert_eq!(ch.next_action_at, Some(NOW - 100 + 3600 + 1));
                assert_eq!(ch.to, State::Active);
            }
            other => panic!("{other:?}"),
        }
        a.window_start = Some(NOW - 3600);
        assert!(matches!(plan(&cx, &a, Admission::Open), Decision::Request));
    }

    #[test]
    fn an_answer_with_an_unusable_expiry_keeps_the_rotated_pair() {
        let c = config("");
        let cx = Cx {
            config: &c,
            now: NOW,
        };
        let a = user(Some(NOW + 60));
        let grant = Grant {
            access_token: Some(SecretString::from("a2")),
            refresh_token: Some(SecretString::from("r2")),
            issued_at: NOW,
            expires_in: None,
            expiry_problem: Some("expires_in is missing".into()),
            scopes: None,
        };
        let r = refreshed(&cx, &c.profiles[0], &a, &Ok(grant));
        let t = r.tokens.expect("tokens");
        assert_eq!(t.refresh_token.expect("rotated").expose_secret(), "r2");
        assert_eq!(t.expires_at, Some(NOW + 3600), "the default lifetime");
        assert_eq!(r.change.to, State::Active);
        assert!(r.expiry_guessed.is_some());
    }

    #[test]
    fn an_answer_without_access_token_keeps_the_new_refresh_token_and_retries_after_the_gap() {
        let c = config("");
        let cx = Cx {
            config: &c,
            now: NOW,
        };
        let a = user(Some(NOW + 600));
        let grant = Grant {
            access_token: None,
            refresh_token: Some(SecretString::from("r2")),
            issued_at: NOW,
            expires_in: Some(3600),
            expiry_problem: None,
            scopes: None,
        };
        let r = refreshed(&cx, &c.profiles[0], &a, &Ok(grant));
        let t = r.tokens.expect("tokens");
        assert!(t.access_token.is_none() && t.expires_at.is_none());
        assert_eq!(t.refresh_token.expect("rotated").expose_secret(), "r2");
        assert_eq!(r.change.next_action_at, Some(NOW + 60));
    }

    #[test]
    fn invalid_grant_after_a_crash_says_the_rotation_was_lost() {
        let c = config("");
        let cx = Cx {
            config: &c,
            now: NOW,
        };
        let mut a = user(Some(NOW));
        let plain = refreshed(
            &cx,
            &c.profiles[0],
            &a,
            &Err(RefreshError::InvalidGrant("x".into())),
        );
        assert!(plain.notes.is_empty());
        a.left_in_flight_by = Some("host:1:2:3".into());
        let lost = refreshed(
            &cx,
            &c.profiles[0],
            &a,
            &Err(RefreshError::InvalidGrant("x".into())),
        );
        assert_eq!(lost.change.to, State::NeedsReauth);
        assert!(
            lost.change
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("rotation was lost"))
        );
        assert_eq!(lost.notes[0].kind, EventKind::RotationLost);
    }
}
