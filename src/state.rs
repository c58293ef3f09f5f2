//! The account-state vocabulary shared by the database, logs, health file and CLI.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Holding a valid token; refreshed or checked on schedule.
    Active,
    /// Transient errors; still being retried.
    Failing,
    /// The grant is dead (`invalid_grant`, or the refresh token outlived its lifetime).
    NeedsReauth,
    /// A company token the provider confirmed dead.
    Revoked,
    /// Its profile is misconfigured (`invalid_client`); waits for the profile to work again.
    Paused,
    /// The row itself is unusable; the reason says why.
    Invalid,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Active,
        State::Failing,
        State::NeedsReauth,
        State::Revoked,
        State::Paused,
        State::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Failing => "failing",
            State::NeedsReauth => "needs_reauth",
            State::Revoked => "revoked",
            State::Paused => "paused",
            State::Invalid => "invalid",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// States in which tokend keeps the account alive on a schedule.
    pub fn is_schedulable(self) -> bool {
        matches!(self, State::Active | State::Failing)
    }

    /// States that only a new grant written into the row can leave.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::NeedsReauth | State::Revoked | State::Invalid)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::parse(s).ok_or_else(|| {
            format!(
                "unknown state {s:?}; one of: {}",
                State::ALL.map(State::as_str).join(", ")
            )
        })
    }
}
