//! Revoking an account's grant for good before it is unlinked (`accounts remove --revoke`,
//! `DELETE /v1/accounts/{id}?revoke=true`).
//!
//! Doorkeeper 5.5, Factorial's server, answers `200 {}` to a revocation by a refresh token whose
//! access token has expired and revokes nothing; and under its `revoke_on_use` rotation the pair
//! a refresh replaced keeps working until the new access token is first used. Which rotation
//! Factorial runs is not known, so a user's grant is revoked the same way under both:
//! 1. unless the stored access token has more than [`MARGIN`] left, refresh the account through
//!    the engine (its lease, its minimum gap and ceiling, its compare-and-swap commit), so the
//!    new pair is stored before anything else happens with it;
//! 2. use the access token once ([`Provider::use_token`]), which retires its predecessor under
//!    `revoke_on_use` and changes nothing under `immediate`; a token the provider no longer
//!    accepts is refreshed as in 1;
//! 3. revoke by the refresh token, which takes the whole record.
//!
//! A step that fails stops there and nothing is removed (a pair step 1 stored stays stored).
//! A grant the provider already rejects (`invalid_grant`, or an account already `needs_reauth`)
//! is not revoked, and the answer says so and why. The row is deleted only while it still holds
//! the tokens whose grant was revoked.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::clock::rfc3339;
use crate::config::{Profile, TokenType};
use crate::engine::{Engine, OnDemand};
use crate::provider::{ProbeOutcome, Provider, TokenHint};
use crate::state::State;
use crate::store::{Account, StoreError, Unlinked};

/// An access token expiring within this many seconds is refreshed before the revocation: it
/// could expire between the check and the provider's answer.
pub const MARGIN: i64 = 30;

const USE: &str = "using its access token once (which retires the pair it replaced)";
const REVOKE: &str = "revoking its refresh token";

/// What was done at the provider before the row was removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The grant was revoked.
    Revoked,
    /// Nothing was revoked: why (the provider already rejects the grant, or the row holds no
    /// token).
    Nothing(String),
}

/// Why the grant was not revoked (so the account must not be removed). Each says which step.
#[derive(Debug)]
pub enum NotRevoked {
    Unknown,
    /// The row cannot be read, or names a profile the configuration lacks.
    Unreadable(String),
    /// A step cannot happen now; try again (not before `at`, when known).
    NotNow {
        step: String,
        why: String,
        at: Option<i64>,
    },
    /// The account's state forbids the refresh a step needs.
    Refused {
        step: String,
        state: State,
        why: String,
    },
    /// The provider refused a step or did not answer.
    Failed {
        step: String,
        why: String,
    },
    Store(StoreError),
}

impl std::fmt::Display for NotRevoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotRevoked::Unknown => f.write_str("no such account"),
            NotRevoked::Unreadable(why) => {
                write!(f, "not removed: its grant cannot be revoked: {why}")
            }
            NotRevoked::NotNow { step, why, at } => {
                write!(f, "not removed: {step} is not possible now: {why}")?;
                match at {
                    Some(t) => write!(f, "; not before {}", rfc3339(*t)),
                    None => Ok(()),
                }
            }
            NotRevoked::Refused { step, state, why } => {
                write!(f, "not removed: {step} is refused (state {state}): {why}")
            }
            NotRevoked::Failed { step, why } => write!(f, "not removed: {step} failed: {why}"),
            NotRevoked::Store(e) => write!(f, "not removed: {e}"),
        }
    }
}

impl From<StoreError> for NotRevoked {
    fn from(e: StoreError) -> NotRevoked {
        NotRevoked::Store(e)
    }
}

/// How often the grant is revoked again when the row changed under the revocation (a refresh
/// or a relink landed meanwhile) before giving up.
const ATTEMPTS: usize = 3;

/// Revoke account `id`'s grant at its provider for good (see the module's doc), then delete its
/// row, provided it still holds the tokens whose grant was revoked: a pair that a refresh (or a
/// relink) stored meanwhile is revoked in turn. `wait` bounds the refresh this may need (the
/// API's `max_wait`); each request is bounded by `http_timeout`.
pub async fn revoke_and_remove(
    engine: &Arc<Engine>,
    id: &str,
    wait: Option<Duration>,
) -> Result<Revoked, NotRevoked> {
    let store = &engine.shared().store;
    for _ in 0..ATTEMPTS {
        let (revoked, a) = revoke_grant(engine, id, wait).await?;
        match store
            .remove_holding(id, a.access_token, a.refresh_token)
            .await?
        {
            // (Removed by someone else since: the grant is revoked all the same.)
            Unlinked::Removed | Unlinked::Missing => return Ok(revoked),
            Unlinked::Changed => {
                tracing::info!(account_id = %id, "the account got new tokens while its grant was revoked: revoking those too");
            }
        }
    }
    Err(NotRevoked::Failed {
        step: "removing its row".into(),
        why: format!(
            "it got new tokens {ATTEMPTS} times while its grant was revoked (refreshed or relinked meanwhile)"
        ),
    })
}

/// Revoke the grant; returns the row as last read (its tokens are the grant's).
async fn revoke_grant(
    engine: &Arc<Engine>,
    id: &str,
    wait: Option<Duration>,
) -> Result<(Revoked, Account), NotRevoked> {
    let s = engine.shared();
    let mut a = read(engine, id).await?;
    if matches!(a.state, State::NeedsReauth | State::Revoked) {
        let reason = state_reason(engine, id).await?;
        let why = format!(
            "it is {} ({reason}); nothing was sent to the provider",
            a.state
        );
        return Ok((Revoked::Nothing(why), a));
    }
    let rt = s.runtime();
    let Some(profile) = rt.config.profile_for(a.profile.as_deref()).cloned() else {
        return Err(NotRevoked::Unreadable(
            "its profile is not in the configuration".into(),
        ));
    };
    let (TokenType::User, Some(_)) = (a.token_type, &a.refresh_token) else {
        // A company token never expires; a user row without a refresh token has only its
        // access token. Either is revoked as it is: the quirk concerns refresh tokens.
        let Some(access) = a.access_token.clone() else {
            return Ok((Revoked::Nothing("it holds no token".into()), a));
        };
        revoke(&rt.provider, &profile, &access, TokenHint::AccessToken).await?;
        return Ok((Revoked::Revoked, a));
    };
    let mut refreshed = false;
    loop {
        let now = s.clock.now();
        let access = match (&a.access_token, a.expires_at) {
            (Some(t), Some(e)) if e > now + MARGIN => t.clone(),
            _ if refreshed => {
                return Err(NotRevoked::Failed {
                    step: refresh_step(&a, now),
                    why: "the refresh left no live access token".into(),
                });
            }
            _ => {
                let fresh = refresh(engine, id, wait, refresh_step(&a, now)).await?;
                a = fresh.account;
                if let Some(why) = fresh.dead {
                    return Ok((Revoked::Nothing(why), a));
                }
                refreshed = true;
                continue;
            }
        };
        match rt.provider.use_token(&profile, &access, now).await {
            ProbeOutcome::Active => break,
            // Expired early (clocks differ) or revoked: a refresh tells which, and gives a
            // pair to revoke when there is still a grant.
            ProbeOutcome::Dead(_) if !refreshed => {
                let step = "refreshing it first (the provider no longer accepts its access \
                            token, so its refresh token cannot be revoked)";
                let fresh = refresh(engine, id, wait, step.into()).await?;
                a = fresh.account;
                if let Some(why) = fresh.dead {
                    return Ok((Revoked::Nothing(why), a));
                }
                refreshed = true;
            }
            ProbeOutcome::Dead(why)
            | ProbeOutcome::Transient { reason: why, .. }
            | ProbeOutcome::Misconfigured(why) => {
                return Err(NotRevoked::Failed {
                    step: USE.into(),
                    why,
                });
            }
        }
    }
    if let Some(refresh_token) = &a.refresh_token {
        revoke(
            &rt.provider,
            &profile,
            refresh_token,
            TokenHint::RefreshToken,
        )
        .await?;
    }
    tracing::info!(account_id = %id, profile = %profile.name, refreshed, "grant revoked at the provider");
    Ok((Revoked::Revoked, a))
}

/// Why the refresh is needed, as the name of the step.
fn refresh_step(a: &Account, now: i64) -> String {
    let why = match (&a.access_token, a.expires_at) {
        (None, _) => "it holds no access token to use".to_owned(),
        (Some(_), None) => "its access token's expiry is unknown".to_owned(),
        (Some(_), Some(e)) => format!(
            "its access token {}, and the provider ignores a revocation by a refresh token \
             whose access token has expired",
            if e <= now {
                "has expired".to_owned()
            } else {
                format!("expires within {MARGIN} s")
            }
        ),
    };
    format!("refreshing it first ({why})")
}

async fn read(engine: &Engine, id: &str) -> Result<Account, NotRevoked> {
    match engine.shared().store.get(id).await? {
        None => Err(NotRevoked::Unknown),
        Some(Err(p)) => Err(NotRevoked::Unreadable(format!(
            "its row is unreadable: {}",
            p.reason
        ))),
        Some(Ok(a)) => Ok(a),
    }
}

async fn state_reason(engine: &Engine, id: &str) -> Result<String, NotRevoked> {
    Ok(engine
        .shared()
        .store
        .summary(id)
        .await?
        .and_then(|s| s.state_reason)
        .unwrap_or_else(|| "no reason recorded".into()))
}

/// The row a refresh left.
struct Fresh {
    account: Account,
    /// The provider refused the refresh for good (`invalid_grant`): why nothing is left to
    /// revoke.
    dead: Option<String>,
}

/// Refresh through the engine (one flight with any refresh of it under way here, the lease,
/// the minimum gap and ceiling, the commit), then read the row it left.
async fn refresh(
    engine: &Arc<Engine>,
    id: &str,
    wait: Option<Duration>,
    step: String,
) -> Result<Fresh, NotRevoked> {
    let asked = engine.refresh_now(id);
    let outcome = match wait {
        None => asked.await,
        Some(w) => match tokio::time::timeout(w, asked).await {
            Ok(o) => o,
            Err(_) => {
                return Err(NotRevoked::NotNow {
                    step,
                    why: "it did not finish in time (its outcome is stored when it does)".into(),
                    at: None,
                });
            }
        },
    };
    let not_now = |why: String, at| NotRevoked::NotNow {
        step: step.clone(),
        why,
        at,
    };
    match outcome {
        OnDemand::Done => {}
        OnDemand::Unknown => return Err(NotRevoked::Unknown),
        OnDemand::NotBefore(at, why) => return Err(not_now(why, Some(at))),
        OnDemand::HeldElsewhere => {
            return Err(not_now(
                "another tokend is refreshing it right now".into(),
                None,
            ));
        }
        OnDemand::Refused(why) => {
            let state = read(engine, id).await?.state;
            return Err(NotRevoked::Refused { step, state, why });
        }
    }
    let a = read(engine, id).await?;
    match a.state {
        State::Active => Ok(Fresh {
            account: a,
            dead: None,
        }),
        State::NeedsReauth => {
            let why = format!(
                "the provider refused the refresh this needed: {}",
                state_reason(engine, id).await?
            );
            Ok(Fresh {
                account: a,
                dead: Some(why),
            })
        }
        state => {
            let why = engine
                .shared()
                .store
                .summary(id)
                .await?
                .and_then(|s| s.last_error.or(s.state_reason))
                .unwrap_or_else(|| format!("the account is {state}"));
            Err(NotRevoked::Failed { step, why })
        }
    }
}

async fn revoke(
    provider: &Provider,
    profile: &Profile,
    token: &SecretString,
    hint: TokenHint,
) -> Result<(), NotRevoked> {
    provider
        .revoke(profile, token, hint)
        .await
        .map_err(|why| NotRevoked::Failed {
            step: REVOKE.into(),
            why,
        })
}
