//! `[[notify]]`: the sinks that tell a person when a person must act (see [`crate::notify`]).
//!
//! Validated like the rest of the file: errors name the file, the line and the key. A webhook's
//! signing secret is resolved at load time from the same sources as client secrets.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

use super::{ConfigError, Dur, HttpUrl, KeyLines, located, read_credential, read_secret_file};

/// Every notification type a sink can ask for in `events`, as sent in the body's `type`.
pub const EVENT_TYPES: [&str; 9] = [
    "account.needs_reauth",
    "account.revoked",
    "account.failing",
    "account.invalid",
    "account.recovered",
    "account.refresh_token_at_risk",
    "account.lapse",
    "profile.paused",
    "profile.resumed",
];

/// The summary that stands in for a burst of account notifications. It follows the events it
/// summarises, so `events` does not name it.
pub const SUMMARY_TYPE: &str = "profile.summary";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Webhook,
    Exec,
}

/// Where a sink delivers.
#[derive(Clone)]
pub enum Target {
    /// POST the JSON body to `url`, signed with `secret`.
    Webhook { url: String, secret: SecretString },
    /// Run `command` (no shell) with the JSON body on standard input.
    Exec { command: Vec<String> },
}

/// One `[[notify]]` entry, validated.
#[derive(Clone)]
pub struct NotifySink {
    pub name: String,
    pub target: Target,
    /// Notification types sent (`None`: all).
    pub events: Option<Vec<String>>,
    /// Profiles whose events are sent (`None`: all).
    pub profiles: Option<Vec<String>>,
    /// One attempt's time limit.
    pub timeout: Dur,
    /// How long a notification is retried after it was queued before it is dead-lettered.
    pub max_age: Dur,
    /// A `failing` notification waits this long for the account to recover first.
    pub failing_after: Dur,
    /// More account notifications of one profile within a minute than this: a summary instead.
    pub burst_threshold: u32,
    pub max_concurrency: usize,
    pub rate_per_second: f64,
}

impl NotifySink {
    pub fn kind(&self) -> SinkKind {
        match self.target {
            Target::Webhook { .. } => SinkKind::Webhook,
            Target::Exec { .. } => SinkKind::Exec,
        }
    }

    /// Whether this sink takes notifications of type `t` (summaries follow the account types).
    pub fn wants(&self, t: &str) -> bool {
        self.events
            .as_ref()
            .is_none_or(|e| e.iter().any(|x| x == t))
    }

    /// Whether this sink takes events of `profile` (events without a profile always pass).
    pub fn covers(&self, profile: Option<&str>) -> bool {
        match (&self.profiles, profile) {
            (None, _) | (_, None) => true,
            (Some(list), Some(p)) => list.iter().any(|x| x == p),
        }
    }
}

impl fmt::Debug for NotifySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("NotifySink");
        d.field("name", &self.name);
        match &self.target {
            // Webhook URLs often carry a secret of their own in the path: only the host shows.
            Target::Webhook { url, .. } => d
                .field("kind", &"webhook")
                .field("host", &host_of(url))
                .field("secret", &"[redacted]"),
            Target::Exec { command } => d.field("kind", &"exec").field("command", command),
        };
        d.field("events", &self.events)
            .field("profiles", &self.profiles)
            .field("timeout", &self.timeout)
            .field("max_age", &self.max_age)
            .field("failing_after", &self.failing_after)
            .field("burst_threshold", &self.burst_threshold)
            .field("max_concurrency", &self.max_concurrency)
            .field("rate_per_second", &self.rate_per_second)
            .finish()
    }
}

/// `host[:port]` of a URL: what logs and messages may show of a webhook URL.
pub fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => "the receiver".to_owned(),
        },
        Err(_) => "the receiver".to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNotify {
    name: String,
    kind: SinkKind,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    profiles: Option<Vec<String>>,
    #[serde(default)]
    url: Option<HttpUrl>,
    #[serde(default)]
    secret_credential: Option<String>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default = "default_timeout")]
    timeout: Dur,
    #[serde(default = "default_max_age")]
    max_age: Dur,
    #[serde(default = "default_failing_after")]
    failing_after: Dur,
    #[serde(default = "default_burst_threshold")]
    burst_threshold: u32,
    #[serde(default = "default_max_concurrency")]
    max_concurrency: u32,
    #[serde(default = "default_rate")]
    rate_per_second: Rate,
}

fn default_timeout() -> Dur {
    Dur::from_secs(10)
}
fn default_max_age() -> Dur {
    Dur::from_secs(24 * 3600)
}
fn default_failing_after() -> Dur {
    Dur::from_secs(15 * 60)
}
fn default_burst_threshold() -> u32 {
    50
}
fn default_max_concurrency() -> u32 {
    4
}
fn default_rate() -> Rate {
    Rate(10.0)
}

/// A rate written as an integer or a float (`10`, `0.5`).
#[derive(Debug, Clone, Copy)]
struct Rate(f64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Num {
            Int(i64),
            Float(f64),
        }
        match Num::deserialize(d) {
            Ok(Num::Int(n)) => Ok(Rate(n as f64)),
            Ok(Num::Float(f)) => Ok(Rate(f)),
            Err(_) => Err(serde::de::Error::custom(
                "expected a number of deliveries per second, e.g. 10 or 0.5",
            )),
        }
    }
}

/// Validate the `[[notify]]` entries against the profiles (`profiles`: their names).
pub(super) fn validate(
    path: &Path,
    lines: &KeyLines,
    raw: Vec<RawNotify>,
    profiles: &[String],
    resolve_secrets: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<NotifySink>, ConfigError> {
    let mut names = HashSet::new();
    let mut sinks = Vec::with_capacity(raw.len());
    for (index, n) in raw.into_iter().enumerate() {
        let name = n.name.clone();
        let line = |key: &str| lines.notify(index, key);
        let err = |key: &str, msg: String| {
            ConfigError::at(path, line(key), format!("notify {name:?}: {key}: {msg}"))
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(err(
                "name",
                "must be non-empty and use only letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                "name",
                "duplicate sink name: each [[notify]] needs its own name (its delivery state is kept under it)".into(),
            ));
        }
        if let Some(events) = &n.events {
            if events.is_empty() {
                return Err(err(
                    "events",
                    "an empty list sends nothing: leave events out for all types, or name some"
                        .into(),
                ));
            }
            for e in events {
                if e == SUMMARY_TYPE {
                    return Err(err(
                        "events",
                        format!(
                            "{SUMMARY_TYPE:?} is not chosen: a summary stands in for the account events it summarises and follows their filter"
                        ),
                    ));
                }
                if !EVENT_TYPES.contains(&e.as_str()) {
                    return Err(err(
                        "events",
                        format!(
                            "unknown event type {e:?}; one of: {}",
                            EVENT_TYPES.join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(ps) = &n.profiles {
            if ps.is_empty() {
                return Err(err(
                    "profiles",
                    "an empty list sends nothing: leave profiles out for all, or name some".into(),
                ));
            }
            for p in ps {
                if !profiles.contains(p) {
                    return Err(err(
                        "profiles",
                        format!(
                            "no [[profile]] named {p:?}; profiles: {}",
                            profiles.join(", ")
                        ),
                    ));
                }
            }
        }
        let positive = |key: &str, d: Dur| {
            if d.get().is_zero() {
                Err(err(key, "must be above zero".into()))
            } else {
                Ok(())
            }
        };
        positive("timeout", n.timeout)?;
        positive("max_age", n.max_age)?;
        if n.max_age < n.timeout {
            return Err(err(
                "max_age",
                format!(
                    "({}) is shorter than timeout ({}): a notification would be given up before one attempt could finish",
                    humantime::format_duration(n.max_age.get()),
                    humantime::format_duration(n.timeout.get())
                ),
            ));
        }
        if n.burst_threshold == 0 {
            return Err(err(
                "burst_threshold",
                "must be at least 1 (the number of account notifications of one profile a minute sent one by one)".into(),
            ));
        }
        if n.max_concurrency == 0 {
            return Err(err("max_concurrency", "must be at least 1".into()));
        }
        if !(n.rate_per_second.0.is_finite() && n.rate_per_second.0 > 0.0) {
            return Err(err(
                "rate_per_second",
                "must be a number above zero, e.g. 10 or 0.5".into(),
            ));
        }
        let secret_keys: Vec<&str> = [
            ("secret_credential", n.secret_credential.is_some()),
            ("secret_file", n.secret_file.is_some()),
            ("secret_env", n.secret_env.is_some()),
            ("secret", n.secret.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let target = match n.kind {
            SinkKind::Webhook => {
                if n.command.is_some() {
                    return Err(err(
                        "command",
                        "belongs to kind = \"exec\"; a webhook has a url".into(),
                    ));
                }
                let Some(url) = &n.url else {
                    return Err(err(
                        "url",
                        "kind = \"webhook\" needs url = \"https://...\"".into(),
                    ));
                };
                check_url(url).map_err(|m| err("url", m))?;
                if secret_keys.len() != 1 {
                    return Err(err(
                        secret_keys.get(1).copied().unwrap_or("secret_file"),
                        format!(
                            "give exactly one signing secret source (secret_credential, secret_file, secret_env or secret); found {}",
                            secret_keys.len()
                        ),
                    ));
                }
                let secret = if resolve_secrets {
                    resolve_secret(path, lines, index, &name, &n, warnings)?
                } else {
                    "unresolved".to_owned()
                };
                if secret.is_empty() {
                    return Err(err(secret_keys[0], "the signing secret is empty".into()));
                }
                if secret.len() < 16 && resolve_secrets {
                    warnings.push(located(
                        path,
                        line(secret_keys[0]),
                        format!(
                            "notify {name:?}: the signing secret is {} characters long; use at least 32 random characters",
                            secret.len()
                        ),
                    ));
                }
                Target::Webhook {
                    url: url.0.clone(),
                    secret: SecretString::from(secret),
                }
            }
            SinkKind::Exec => {
                if n.url.is_some() {
                    return Err(err(
                        "url",
                        "belongs to kind = \"webhook\"; an exec sink has a command".into(),
                    ));
                }
                if let Some(key) = secret_keys.first() {
                    return Err(err(
                        key,
                        "an exec sink is not signed (the command runs on this host); remove it"
                            .into(),
                    ));
                }
                match &n.command {
                    Some(c) if !c.is_empty() && !c[0].trim().is_empty() => {
                        Target::Exec { command: c.clone() }
                    }
                    _ => {
                        return Err(err(
                            "command",
                            "kind = \"exec\" needs command = [\"/path/to/program\", \"arg\", ...] (run without a shell)".into(),
                        ));
                    }
                }
            }
        };
        sinks.push(NotifySink {
            name,
            target,
            events: n.events,
            profiles: n.profiles,
            timeout: n.timeout,
            max_age: n.max_age,
            failing_after: n.failing_after,
            burst_threshold: n.burst_threshold,
            max_concurrency: n.max_concurrency as usize,
            rate_per_second: n.rate_per_second.0,
        });
    }
    Ok(sinks)
}

/// A webhook URL: https, or plain http to a loopback host; never `user:pass@`.
fn check_url(url: &HttpUrl) -> Result<(), String> {
    let u = reqwest::Url::parse(&url.0).map_err(|_| "not a valid URL".to_owned())?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "must not carry a user name or password (`user:pass@`): receivers check the Tokend-Signature header instead; remove them from the URL".into(),
        );
    }
    match super::url_in_cleartext(url) {
        Ok(false) => Ok(()),
        Ok(true) => Err(format!(
            "plain http to {} is not loopback: events and their signatures would travel in cleartext; use https://",
            host_of(&url.0)
        )),
        Err(e) => Err(e),
    }
}

/// The signing secret from its one source, as client secrets are resolved.
fn resolve_secret(
    path: &Path,
    lines: &KeyLines,
    index: usize,
    name: &str,
    n: &RawNotify,
    warnings: &mut Vec<String>,
) -> Result<String, ConfigError> {
    let err = |key: &str, msg: String| {
        ConfigError::at(
            path,
            lines.notify(index, key),
            format!("notify {name:?}: {key}: {msg}"),
        )
    };
    let loose = |key: &str, file: &Path, mode: u32, warnings: &mut Vec<String>| {
        let file = file.display();
        warnings.push(located(
            path,
            lines.notify(index, key),
            format!(
                "notify {name:?}: {key}: {file} has mode {mode:04o}, so users other than its owner may read the signing secret: chmod 600 {file}"
            ),
        ));
    };
    if let Some(file) = &n.secret_file {
        let s = read_secret_file(file).map_err(|e| err("secret_file", e))?;
        if let Some(mode) = s.loose_mode {
            loose("secret_file", file, mode, warnings);
        }
        return Ok(s.text);
    }
    if let Some(var) = &n.secret_env {
        return std::env::var(var)
            .map(|s| s.trim().to_owned())
            .map_err(|_| {
                err(
                    "secret_env",
                    format!("environment variable {var:?} is not set (or not UTF-8)"),
                )
            });
    }
    if let Some(cred) = &n.secret_credential {
        let (file, s) = read_credential(cred).map_err(|e| err("secret_credential", e))?;
        if let Some(mode) = s.loose_mode {
            loose("secret_credential", &file, mode, warnings);
        }
        return Ok(s.text);
    }
    warnings.push(located(
        path,
        lines.notify(index, "secret"),
        format!(
            "notify {name:?}: secret is written inline in the config file; prefer secret_file, secret_env or secret_credential"
        ),
    ));
    Ok(n.secret.clone().unwrap_or_default().trim().to_owned())
}
