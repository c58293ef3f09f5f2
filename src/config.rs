//! Configuration: one TOML file, loaded and validated by [`Config::load`].
//!
//! Every error names the file, the key and, where the TOML parser knows it, the line, and says what
//! would be right. Secrets are resolved at load time (file, environment variable, or systemd
//! credential) and kept in [`secrecy::SecretString`], whose `Debug` prints nothing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

mod api;
pub use api::{ApiConfig, ApiToken, DEFAULT_SOCKET, Scopes};
mod notify;
pub use notify::*;

pub const PRODUCTION_BASE_URL: &str = "https://api.factorialhr.com";
pub const SANDBOX_BASE_URL: &str = "https://api.demo.factorialhr.dev";
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tokend/tokend.toml";

/// A configuration problem, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn at(path: &Path, line: Option<usize>, msg: impl fmt::Display) -> Self {
        ConfigError(located(path, line, msg))
    }
}

/// `file:line: msg`, or `file: msg` when the line is unknown: errors and warnings alike.
fn located(path: &Path, line: Option<usize>, msg: impl fmt::Display) -> String {
    match line {
        Some(line) => format!("{}:{line}: {msg}", path.display()),
        None => format!("{}: {msg}", path.display()),
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub profiles: Vec<Profile>,
    pub api: ApiConfig,
    /// `[[notify]]` sinks: who is told when a person must act.
    pub notify: Vec<NotifySink>,
    /// Non-fatal findings (an inline secret, for instance), logged once tracing is up.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: DaemonConfig,
    #[serde(default, rename = "profile")]
    profiles: Vec<RawProfile>,
    #[serde(default)]
    api: api::RawApi,
    #[serde(default)]
    notify: Vec<RawNotify>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// SQLite database holding the linked accounts.
    pub database: PathBuf,
    /// JSON health file, rewritten atomically.
    pub health_file: PathBuf,
    /// Refresh a user token this long before it expires.
    pub refresh_lead: Dur,
    /// Spread refreshes randomly over up to this much extra lead.
    pub refresh_jitter: Dur,
    pub max_concurrent_refreshes: NonZeroUsize,
    pub http_connect_timeout: Dur,
    /// Whole-request timeout (connect, send, and read the body).
    pub http_timeout: Dur,
    /// Largest token response body accepted, in bytes.
    pub max_response_bytes: NonZeroUsize,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    /// How long in-flight work may take to finish on SIGTERM.
    pub shutdown_timeout: Dur,
    /// Heartbeat of the health file.
    pub health_interval: Dur,
    /// How long a claim on an account lasts; another instance may take it over after this.
    pub lease: Dur,
    /// First retry delay after a transient failure; doubles up to `retry_max`.
    pub retry_initial: Dur,
    pub retry_max: Dur,
    /// Factorial refresh tokens die after this long unused.
    pub refresh_token_lifetime: Dur,
    /// Report an account at risk this long before its refresh token's lifetime ends.
    pub refresh_token_margin: Dur,
    /// Six-field cron expression (with seconds, UTC) for company-token revocation checks.
    pub revocation_schedule: String,
    /// A "dead" probe answer is confirmed by a second probe this much later (at least 30s).
    pub revocation_confirm_delay: Dur,
    /// Spacing between two revocation probes to the same profile (its request rate limit).
    pub probe_interval: Dur,
    /// How long a write waits for another program's lock on the database before it fails (and
    /// the outcome is held and retried; a rotated pair goes to the recovery journal).
    pub store_busy_timeout: Dur,
    /// A refresh is never due sooner than this after the token was issued (at least 1s).
    pub min_refresh_interval: Dur,
    /// Hard ceiling of token requests per account per hour (at least 1).
    pub max_token_requests_per_hour: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            database: PathBuf::from("/var/lib/tokend/tokend.db"),
            health_file: PathBuf::from("/run/tokend/health.json"),
            refresh_lead: Dur::from_secs(600),
            refresh_jitter: Dur::from_secs(120),
            max_concurrent_refreshes: NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN),
            http_connect_timeout: Dur::from_secs(5),
            http_timeout: Dur::from_secs(15),
            max_response_bytes: NonZeroUsize::new(64 * 1024).unwrap_or(NonZeroUsize::MIN),
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            shutdown_timeout: Dur::from_secs(20),
            health_interval: Dur::from_secs(30),
            lease: Dur::from_secs(60),
            retry_initial: Dur::from_secs(10),
            retry_max: Dur::from_secs(600),
            refresh_token_lifetime: Dur::from_secs(7 * 86_400),
            refresh_token_margin: Dur::from_secs(86_400),
            revocation_schedule: "0 */15 * * * *".to_owned(),
            revocation_confirm_delay: Dur::from_secs(30),
            probe_interval: Dur(Duration::from_millis(200)),
            store_busy_timeout: Dur::from_secs(5),
            min_refresh_interval: Dur::from_secs(60),
            max_token_requests_per_hour: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Production,
    Sandbox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    User,
    Company,
}

impl TokenType {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::User => "user",
            TokenType::Company => "company",
        }
    }

    pub fn parse(s: &str) -> Option<TokenType> {
        match s {
            "user" => Some(TokenType::User),
            "company" => Some(TokenType::Company),
            _ => None,
        }
    }
}

/// How a company token is checked for revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// `GET {base}/oauth/token/info` with the token as Bearer.
    TokenInfo,
    /// RFC 7662 `POST {base}/oauth/introspect` with client credentials.
    Introspect,
    /// `GET probe_url` with the token as Bearer; 401 means dead.
    Url,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    #[serde(default = "default_environment")]
    environment: Environment,
    #[serde(default)]
    base_url: Option<HttpUrl>,
    client_id: String,
    #[serde(default)]
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    client_secret_env: Option<String>,
    #[serde(default)]
    client_secret_credential: Option<String>,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default = "default_token_type")]
    token_type: TokenType,
    #[serde(default = "default_probe")]
    probe: ProbeKind,
    #[serde(default)]
    probe_url: Option<HttpUrl>,
    #[serde(default = "default_token_lifetime")]
    default_token_lifetime: Dur,
    #[serde(default = "default_true")]
    revoke_superseded: bool,
    #[serde(default)]
    allow_insecure_http: bool,
}

fn default_environment() -> Environment {
    Environment::Production
}
fn default_token_type() -> TokenType {
    TokenType::User
}
fn default_probe() -> ProbeKind {
    ProbeKind::TokenInfo
}
fn default_token_lifetime() -> Dur {
    Dur::from_secs(3600)
}
fn default_true() -> bool {
    true
}

/// A connector profile: one OAuth application at Factorial.
#[derive(Clone)]
pub struct Profile {
    pub name: String,
    pub environment: Environment,
    /// Base URL without a trailing slash.
    pub base_url: String,
    /// `{base_url}/oauth/token`, parsed once.
    pub token_url: reqwest::Url,
    pub client_id: String,
    pub client_secret: SecretString,
    pub scopes: Vec<String>,
    pub token_type: TokenType,
    pub probe: ProbeKind,
    pub probe_url: Option<String>,
    /// Access-token lifetime assumed when the provider's `expires_in` is missing or unusable.
    pub default_token_lifetime: Dur,
    /// Revoke the superseded refresh token once its rotation is stored.
    pub revoke_superseded: bool,
    /// Plain `http://` to a non-loopback host is accepted (with a warning).
    pub allow_insecure_http: bool,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("environment", &self.environment)
            .field("base_url", &self.base_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("scopes", &self.scopes)
            .field("token_type", &self.token_type)
            .field("probe", &self.probe)
            .field("default_token_lifetime", &self.default_token_lifetime)
            .field("revoke_superseded", &self.revoke_superseded)
            .field("allow_insecure_http", &self.allow_insecure_http)
            .finish()
    }
}

impl Profile {
    /// A fingerprint of everything that affects requests, so a reload can tell whether the
    /// profile changed (and a paused profile should be retried) without comparing secrets in
    /// the clear.
    pub fn fingerprint(&self) -> u64 {
        use secrecy::ExposeSecret;
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.base_url.hash(&mut h);
        self.client_id.hash(&mut h);
        self.client_secret.expose_secret().hash(&mut h);
        self.scopes.hash(&mut h);
        h.finish()
    }
}

/// A duration written as `30s`, `10m`, `2h`, `7d`, `500ms` or a sum such as `1h30m`
/// (see [`parse_duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn from_secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
    pub fn as_secs_i64(self) -> i64 {
        i64::try_from(self.0.as_secs()).unwrap_or(i64::MAX)
    }
}

/// The longest duration accepted: anything beyond ten years is a typo, not a schedule.
/// Counted in humantime's years (365.25 days), so `"10y"` itself is accepted.
const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Parse a duration written with units (humantime's syntax: `"30s"`, `"1h30m"`, `"1h 30m"`,
/// `"500ms"`, `"2weeks"`). A bare number is refused: `"10"` could mean seconds or minutes.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let d = humantime::parse_duration(s.trim()).ok()?;
    (d <= MAX_DURATION).then_some(d)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: write a number with a unit, e.g. \"30s\", \"10m\", \"2h\", \"7d\" or \"1h30m\""
            ))
        })
    }
}

/// An absolute `http` or `https` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub String);

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match reqwest::Url::parse(&s) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {
                Ok(HttpUrl(s.trim_end_matches('/').to_owned()))
            }
            _ => Err(serde::de::Error::custom(format!(
                "invalid URL {:?}: expected an absolute http(s) URL such as \"https://api.factorialhr.com\"",
                redact_userinfo(&s)
            ))),
        }
    }
}

/// `text` with the user-info part of any URL in it (`user:pass@`) replaced by `***@`, so a
/// message can quote a line without echoing a password.
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(['/', '?', '#', '"', '\'', ' '])
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// How a URL may be used: an error (already phrased) for user info, else whether requests to
/// it would go in cleartext over the network (plain http to a host that is not loopback).
fn url_in_cleartext(url: &HttpUrl) -> Result<bool, String> {
    let u = reqwest::Url::parse(&url.0).map_err(|_| "not a valid URL".to_owned())?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "must not carry a user name or password (`user:pass@`): the client authenticates with client_id and its client secret; remove them from the URL".into(),
        );
    }
    let loopback = match u.host_str() {
        Some(host) => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || bare
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    };
    Ok(u.scheme() == "http" && !loopback)
}

impl Config {
    /// Read, parse and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::at(path, None, format!("cannot read the config file: {e}"))
        })?;
        Config::parse(path, &text)
    }

    /// Parse and validate `text` as if read from `path` (which is only used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(path, text, true)
    }

    /// Load without reading client secrets, for commands that never talk to the provider
    /// (`status`, `accounts`, `token`) and may run without access to them.
    pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::at(path, None, format!("cannot read the config file: {e}"))
        })?;
        Config::parse_with(path, &text, false)
    }

    fn parse_with(path: &Path, text: &str, resolve_secrets: bool) -> Result<Config, ConfigError> {
        let toml_err = |e: toml::de::Error| {
            let line = e.span().map(|s| line_of(text, s.start));
            let msg = e.message().trim().to_owned();
            let context = line
                .and_then(|l| text.lines().nth(l - 1))
                .map(|l| format!(" (at `{}`)", quotable(l)))
                .unwrap_or_default();
            ConfigError::at(path, line, format!("{msg}{context}"))
        };
        // Parse once into the spanned document: its spans give the lines of errors found after
        // deserialising, and the typed config is deserialised from the same document.
        let doc = toml::de::DeTable::parse(text).map_err(toml_err)?;
        let lines = KeyLines::new(text, doc.get_ref());
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(doc)).map_err(toml_err)?;
        validate(path, &lines, raw, resolve_secrets, chrono::Utc::now())
    }
}

/// A config line as an error may quote it: never an inline secret's value or a URL's password.
fn quotable(line: &str) -> String {
    let line = line.trim();
    for key in ["client_secret", "secret"] {
        if let Some(rest) = line.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return format!("{key} = …");
        }
    }
    redact_userinfo(line)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line of every key of `[daemon]` and of each `[[profile]]`, taken from the TOML parser's
/// spans, for errors found after deserialising. A key that appears in several tables (or
/// inside a string) is found in the table it belongs to.
#[derive(Debug, Default)]
struct KeyLines {
    daemon: HashMap<String, usize>,
    api: HashMap<String, usize>,
    profiles: Vec<ProfileLines>,
    /// The `[[notify]]` tables, in the same shape as profiles.
    notify: Vec<ProfileLines>,
}

#[derive(Debug, Default)]
struct ProfileLines {
    /// Where the table starts (its `[[profile]]` header), when it has no `name` line.
    start: Option<usize>,
    keys: HashMap<String, usize>,
}

impl KeyLines {
    fn new(text: &str, doc: &toml::de::DeTable<'_>) -> KeyLines {
        let keys_of = |table: &toml::de::DeTable<'_>| {
            table
                .iter()
                .map(|(k, _)| (k.get_ref().to_string(), line_of(text, k.span().start)))
                .collect::<HashMap<_, _>>()
        };
        let table = |name: &str| match doc.get(name).map(|v| v.get_ref()) {
            Some(toml::de::DeValue::Table(t)) => keys_of(t),
            _ => HashMap::new(),
        };
        let (daemon, api) = (table("daemon"), table("api"));
        let tables = |name: &str| match doc.get(name).map(|v| v.get_ref()) {
            Some(toml::de::DeValue::Array(items)) => items
                .iter()
                .map(|item| match item.get_ref() {
                    toml::de::DeValue::Table(t) => ProfileLines {
                        start: Some(line_of(text, item.span().start)),
                        keys: keys_of(t),
                    },
                    _ => ProfileLines::default(),
                })
                .collect(),
            _ => Vec::new(),
        };
        KeyLines {
            daemon,
            api,
            profiles: tables("profile"),
            notify: tables("notify"),
        }
    }

    /// The line of `key` in `[api]`.
    fn api(&self, key: &str) -> Option<usize> {
        self.api.get(key).copied()
    }

    /// The line of the first of `keys` written in `[daemon]`.
    fn daemon(&self, keys: &[&str]) -> Option<usize> {
        keys.iter().find_map(|k| self.daemon.get(*k).copied())
    }

    /// The line of `key` in the `index`th profile, else of its `name`, else of its header.
    fn profile(&self, index: usize, key: &str) -> Option<usize> {
        Self::table_line(self.profiles.get(index)?, key)
    }

    /// As [`Self::profile`], for the `index`th `[[notify]]` table.
    fn notify(&self, index: usize, key: &str) -> Option<usize> {
        Self::table_line(self.notify.get(index)?, key)
    }

    fn table_line(p: &ProfileLines, key: &str) -> Option<usize> {
        p.keys
            .get(key)
            .or_else(|| p.keys.get("name"))
            .copied()
            .or(p.start)
    }
}

fn validate(
    path: &Path,
    lines: &KeyLines,
    raw: RawConfig,
    resolve_secrets: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Config, ConfigError> {
    let d = &raw.daemon;
    let mut warnings = Vec::new();
    let daemon_err = |key: &str, msg: &str| {
        let line = lines.daemon(&[key]);
        ConfigError::at(path, line, format!("daemon.{key}: {msg}"))
    };
    if d.refresh_lead.get() < Duration::from_secs(1) {
        return Err(daemon_err("refresh_lead", "must be at least 1s"));
    }
    if d.retry_initial.get().is_zero() || d.retry_max < d.retry_initial {
        return Err(daemon_err(
            "retry_max",
            "retry_initial must be above zero and retry_max at least retry_initial",
        ));
    }
    if d.http_timeout.get().is_zero() || d.http_connect_timeout.get().is_zero() {
        return Err(daemon_err("http_timeout", "timeouts must be above zero"));
    }
    if d.shutdown_timeout < d.http_timeout {
        return Err(ConfigError::at(
            path,
            lines.daemon(&["shutdown_timeout", "http_timeout"]),
            format!(
                "daemon.shutdown_timeout ({}) is shorter than http_timeout ({}): in-flight refreshes could be abandoned with their rotated tokens; make it at least http_timeout",
                humantime::format_duration(d.shutdown_timeout.get()),
                humantime::format_duration(d.http_timeout.get()),
            ),
        ));
    }
    if d.refresh_lead.get() > Duration::from_secs(30 * 60) {
        warnings.push(located(
            path,
            lines.daemon(&["refresh_lead"]),
            format!(
                "daemon.refresh_lead ({}) is longer than half of Factorial's documented 1 h lifetime: tokend clamps the lead per token to at most half the token's lifetime",
                humantime::format_duration(d.refresh_lead.get()),
            ),
        ));
    }
    if d.lease.get() <= d.http_timeout.get() {
        return Err(daemon_err(
            "lease",
            "must be longer than http_timeout, or a claim could lapse while its request is in flight",
        ));
    }
    if d.health_interval.get() < Duration::from_secs(1) {
        return Err(daemon_err("health_interval", "must be at least 1s"));
    }
    if d.refresh_token_margin >= d.refresh_token_lifetime {
        return Err(daemon_err(
            "refresh_token_margin",
            "must be shorter than refresh_token_lifetime",
        ));
    }
    check_schedule(&d.revocation_schedule, now)
        .map_err(|msg| daemon_err("revocation_schedule", &msg))?;
    if d.min_refresh_interval.get() < Duration::from_secs(1) {
        return Err(daemon_err("min_refresh_interval", "must be at least 1s"));
    }
    if d.max_token_requests_per_hour == 0 {
        return Err(daemon_err(
            "max_token_requests_per_hour",
            "must be at least 1, or no account could ever be refreshed",
        ));
    }
    if d.revocation_confirm_delay.get() < Duration::from_secs(30) {
        return Err(daemon_err(
            "revocation_confirm_delay",
            "must be at least 30s, so one bad answer cannot revoke an account",
        ));
    }
    if raw.profiles.is_empty() {
        return Err(ConfigError::at(
            path,
            None,
            "no [[profile]] defined: add at least one connector profile with name, client_id and a client secret source",
        ));
    }

    let mut names = HashSet::new();
    let mut profiles = Vec::with_capacity(raw.profiles.len());
    for (index, p) in raw.profiles.into_iter().enumerate() {
        let name = p.name.clone();
        let perr = |key: &str, msg: String| {
            let line = lines.profile(index, key);
            ConfigError::at(path, line, format!("profile {name:?}: {key}: {msg}"))
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(perr(
                "name",
                "must be non-empty and use only letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(perr(
                "name",
                "duplicate profile name: each [[profile]] needs its own name".into(),
            ));
        }
        if p.client_id.trim().is_empty() {
            return Err(perr("client_id", "must not be empty".into()));
        }
        for (key, url) in [("base_url", &p.base_url), ("probe_url", &p.probe_url)] {
            let Some(url) = url else { continue };
            let cleartext = url_in_cleartext(url).map_err(|e| perr(key, e))?;
            if cleartext && !p.allow_insecure_http {
                return Err(perr(
                    key,
                    format!(
                        "{:?} is plain http to a host that is not loopback: the client secret and tokens would travel in cleartext; use https://, or set allow_insecure_http = true in this profile",
                        url.0
                    ),
                ));
            }
            if cleartext {
                let carried = if key == "base_url" {
                    "the client secret and tokens travel"
                } else {
                    "the access tokens it probes travel"
                };
                warnings.push(located(
                    path,
                    lines.profile(index, key),
                    format!(
                        "profile {name:?}: {key} {:?} is plain http (allow_insecure_http = true): {carried} in cleartext",
                        url.0
                    ),
                ));
            }
        }
        let sources: Vec<&str> = [
            ("client_secret_file", p.client_secret_file.is_some()),
            ("client_secret_env", p.client_secret_env.is_some()),
            (
                "client_secret_credential",
                p.client_secret_credential.is_some(),
            ),
            ("client_secret", p.client_secret.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect();
        if sources.len() != 1 {
            // Point at the second source when there are two, else at the profile.
            return Err(perr(
                sources.get(1).copied().unwrap_or("client_secret_file"),
                format!(
                    "give exactly one client secret source (client_secret_file, client_secret_env, client_secret_credential or client_secret); found {}",
                    sources.len()
                ),
            ));
        }
        // The secret, and the key of the file it came from when that file is open to others.
        let (secret, loose): (String, Option<(&str, PathBuf, u32)>) = if !resolve_secrets {
            ("unresolved".to_owned(), None)
        } else if let Some(file) = &p.client_secret_file {
            let key = "client_secret_file";
            let secret = read_secret_file(file).map_err(|e| perr(key, e))?;
            let loose = secret.loose_mode.map(|mode| (key, file.clone(), mode));
            (secret.text, loose)
        } else if let Some(var) = &p.client_secret_env {
            let secret = std::env::var(var).map_err(|_| {
                perr(
                    "client_secret_env",
                    format!("environment variable {var:?} is not set (or not UTF-8)"),
                )
            })?;
            (secret, None)
        } else if let Some(cred) = &p.client_secret_credential {
            let key = "client_secret_credential";
            let (file, secret) = read_credential(cred).map_err(|e| perr(key, e))?;
            let loose = secret.loose_mode.map(|mode| (key, file, mode));
            (secret.text, loose)
        } else {
            warnings.push(located(
                path,
                lines.profile(index, "client_secret"),
                format!(
                    "profile {name:?}: client_secret is written inline in the config file; prefer client_secret_file, client_secret_env or client_secret_credential"
                ),
            ));
            (p.client_secret.clone().unwrap_or_default(), None)
        };
        if let Some((key, file, mode)) = loose {
            let file = file.display();
            warnings.push(located(
                path,
                lines.profile(index, key),
                format!(
                    "profile {name:?}: {key}: {file} has mode {mode:04o}, so users other than its owner may read the client secret: chmod 600 {file}"
                ),
            ));
        }
        if secret.trim().is_empty() {
            return Err(perr("client_secret", "the client secret is empty".into()));
        }
        if p.probe == ProbeKind::Url && p.probe_url.is_none() {
            return Err(perr(
                "probe_url",
                "probe = \"url\" needs probe_url = \"https://...\"".into(),
            ));
        }
        if p.default_token_lifetime.get() < Duration::from_secs(60) {
            return Err(perr(
                "default_token_lifetime",
                "must be at least 60s: it stands in for a token lifetime the provider did not give"
                    .into(),
            ));
        }
        let base_url = match (&p.base_url, p.environment) {
            (Some(u), _) => u.0.clone(),
            (None, Environment::Production) => PRODUCTION_BASE_URL.to_owned(),
            (None, Environment::Sandbox) => SANDBOX_BASE_URL.to_owned(),
        };
        let token_url = reqwest::Url::parse(&format!("{base_url}/oauth/token"))
            .map_err(|e| perr("base_url", e.to_string()))?;
        profiles.push(Profile {
            name,
            environment: p.environment,
            token_url,
            base_url,
            client_id: p.client_id,
            client_secret: SecretString::from(secret.trim().to_owned()),
            scopes: p.scopes,
            token_type: p.token_type,
            probe: p.probe,
            probe_url: p.probe_url.map(|u| u.0),
            default_token_lifetime: p.default_token_lifetime,
            revoke_superseded: p.revoke_superseded,
            allow_insecure_http: p.allow_insecure_http,
        });
    }
    let api = api::validate(raw.api, resolve_secrets, &mut warnings)
        .map_err(|(key, msg)| ConfigError::at(path, lines.api(key), format!("api.{key}: {msg}")))?;
    let names: Vec<String> = profiles.iter().map(|p| p.name.clone()).collect();
    let notify = notify::validate(
        path,
        lines,
        raw.notify,
        &names,
        resolve_secrets,
        &mut warnings,
    )?;
    Ok(Config {
        path: path.to_owned(),
        daemon: raw.daemon,
        profiles,
        api,
        notify,
        warnings,
    })
}

/// Check a revocation schedule as tokio-cron-scheduler will run it (six fields with seconds,
/// day-of-month and day-of-week both required to match, UTC): it must fire within a year of
/// `now`, and never twice within a minute, since every run probes every company token.
fn check_schedule(expr: &str, now: chrono::DateTime<chrono::Utc>) -> Result<(), String> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .map_err(|_| {
            format!(
                "invalid cron expression {expr:?}: use six fields with seconds, e.g. \"0 */15 * * * *\""
            )
        })?;
    let next: Vec<_> = cron.iter_after(now).take(3).collect();
    let listed = || {
        next.iter()
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // A year from any instant, leap day included, is at most 366 days.
    let Some(first) = next
        .first()
        .filter(|t| **t <= now + chrono::TimeDelta::days(366))
    else {
        let found = if next.is_empty() {
            "no fire time found".to_owned()
        } else {
            format!("next: {}", listed())
        };
        return Err(format!(
            "{expr:?} does not fire within the next year ({found}): revoked company tokens would go unnoticed; e.g. \"0 */15 * * * *\""
        ));
    };
    // The seconds field is independent of the others: every minute the schedule fires in, it
    // fires at each second it lists. So two listed seconds mean two firings under a minute
    // apart, however rarely the minute comes round ("0,30 0 0 1 1 *").
    let minute = *first - chrono::TimeDelta::seconds(i64::from(chrono::Timelike::second(first)));
    let per_minute = (0..60)
        .filter(|s| {
            cron.is_time_matching(&(minute + chrono::TimeDelta::seconds(*s)))
                .unwrap_or(false)
        })
        .count();
    if per_minute > 1 {
        return Err(format!(
            "{expr:?} fires more often than once a minute ({per_minute} times in each minute it runs; next: {}): every run probes every company token; give the seconds field one value, e.g. \"0 */15 * * * *\"",
            listed()
        ));
    }
    Ok(())
}

/// The directories systemd searches for credentials (`LoadCredential=NAME` without a path,
/// `ImportCredential=`), in its order; the encrypted ones are left out, tokend cannot decrypt.
const SYSTEMD_CREDSTORES: [&str; 4] = [
    "/etc/credstore",
    "/run/credstore",
    "/usr/local/lib/credstore",
    "/usr/lib/credstore",
];

/// Replaces [`SYSTEMD_CREDSTORES`] (colon-separated directories) outside systemd: for tests and
/// unusual layouts.
const CREDSTORE_PATH_ENV: &str = "TOKEND_CREDSTORE_PATH";

/// Where to look for credential `name`: `$CREDENTIALS_DIRECTORY` alone when set (the service
/// runs under systemd, which put its credentials there), else the credential stores, so that
/// `check-config` run by an operator finds what the service will get.
fn credential_paths(
    name: &str,
    credentials_directory: Option<std::ffi::OsString>,
    credstore_path: Option<std::ffi::OsString>,
) -> Vec<PathBuf> {
    if let Some(dir) = credentials_directory.filter(|d| !d.is_empty()) {
        return vec![Path::new(&dir).join(name)];
    }
    match credstore_path {
        Some(dirs) => std::env::split_paths(&dirs)
            .filter(|d| !d.as_os_str().is_empty())
            .map(|d| d.join(name))
            .collect(),
        None => SYSTEMD_CREDSTORES
            .iter()
            .map(|d| Path::new(d).join(name))
            .collect(),
    }
}

/// Find and read credential `name`; the first place that has it wins.
fn read_credential(name: &str) -> Result<(PathBuf, SecretFile), String> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err("must be a credential name, not a path".into());
    }
    let credentials_directory = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty());
    let under_systemd = credentials_directory.is_some();
    let candidates = credential_paths(
        name,
        credentials_directory,
        std::env::var_os(CREDSTORE_PATH_ENV),
    );
    let mut looked = Vec::new();
    for file in candidates {
        match std::fs::metadata(&file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                looked.push(file.display().to_string());
            }
            // A store this user may not search (they are root-only): say so, keep looking.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                looked.push(format!("{} (permission denied)", file.display()));
            }
            _ => return read_secret_file(&file).map(|secret| (file, secret)),
        }
    }
    let hint = if under_systemd {
        format!(
            "CREDENTIALS_DIRECTORY is set, so only there; add LoadCredential={name}:/path/to/secret to the unit"
        )
    } else {
        format!(
            "put it in one of these, or set CREDENTIALS_DIRECTORY (systemd) or {CREDSTORE_PATH_ENV}"
        )
    };
    if looked.is_empty() {
        return Err(format!(
            "credential {name:?}: nowhere to look, {CREDSTORE_PATH_ENV} names no directory"
        ));
    }
    Err(format!(
        "credential {name:?} not found; looked in {}: {hint}",
        looked.join(", ")
    ))
}

/// Largest secret file read: a client secret is tens of bytes, and the cap keeps a wrong path
/// (a log file, a disk image) from being read into memory.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// A secret read from a file, trimmed.
struct SecretFile {
    text: String,
    /// Permission bits, when the file's group or others have any access to it.
    loose_mode: Option<u32>,
}

/// Read a secret file: a regular file of at most [`MAX_SECRET_BYTES`], never blocking (a FIFO
/// or a device is refused, not opened for reading).
fn read_secret_file(path: &Path) -> Result<SecretFile, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    let shown = path.display();
    let not_regular = |t: std::fs::FileType| {
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "not a plain file"
        };
        format!("{shown} is {kind}, not a regular file: point it at a file holding only the secret")
    };
    let cannot_read = |e: std::io::Error| format!("cannot read {shown}: {e}");
    // Look before opening: opening a FIFO for reading would wait for a writer.
    let meta = std::fs::metadata(path).map_err(cannot_read)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    // O_NONBLOCK in case the path was swapped for a FIFO since; no effect on a regular file.
    let flags = rustix::fs::OFlags::RDONLY
        | rustix::fs::OFlags::NONBLOCK
        | rustix::fs::OFlags::NOCTTY
        | rustix::fs::OFlags::CLOEXEC;
    let file = std::fs::File::from(
        rustix::fs::open(path, flags, rustix::fs::Mode::empty())
            .map_err(|e| cannot_read(e.into()))?,
    );
    let meta = file.metadata().map_err(cannot_read)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let too_large = || {
        format!(
            "{shown} is larger than {} KiB: a client secret is a short string; is this the right file?",
            MAX_SECRET_BYTES / 1024
        )
    };
    if meta.len() > MAX_SECRET_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(too_large());
    }
    let text = String::from_utf8(bytes).map_err(|_| format!("{shown} is not UTF-8 text"))?;
    let mode = meta.permissions().mode() & 0o7777;
    Ok(SecretFile {
        text: text.trim().to_owned(),
        loose_mode: (mode & 0o077 != 0).then_some(mode),
    })
}

impl Config {
    /// The profile called `name`.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The only profile, when there is exactly one.
    pub fn single_profile(&self) -> Option<&Profile> {
        match self.profiles.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }

    /// The profile an account or a command names: `None` or `Some("")` means the only one
    /// (and nothing when there are several); a name looks the profile up.
    pub fn profile_for(&self, name: Option<&str>) -> Option<&Profile> {
        match name {
            None | Some("") => self.single_profile(),
            Some(name) => self.profile(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("10x"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
        assert_eq!(parse_duration("10y"), Some(MAX_DURATION));
        assert_eq!(parse_duration("3653d"), None, "over the ten-year ceiling");
    }

    #[test]
    fn schedules_fire_within_a_year_and_at_most_once_a_minute() {
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.to_utc())
                .unwrap_or_default()
        };
        let mid_2026 = at("2026-06-01T12:00:00Z");
        for ok in [
            "0 */15 * * * *",
            "0 * * * * *",
            "0 0 0 1 1 *",
            "59 59 23 31 12 *",
        ] {
            assert_eq!(check_schedule(ok, mid_2026), Ok(()), "{ok}");
        }
        // On 1 January just after midnight the next firing is a whole year away: still fine.
        assert_eq!(
            check_schedule("0 0 0 1 1 *", at("2028-01-01T00:00:01Z")),
            Ok(())
        );
        // A leap day: more than a year away from mid-2026, within a year from mid-2027.
        assert!(check_schedule("0 0 0 29 2 *", mid_2026).is_err());
        assert_eq!(
            check_schedule("0 0 0 29 2 *", at("2027-06-01T00:00:00Z")),
            Ok(())
        );
        let err = check_schedule("*/10 * * * * *", mid_2026).unwrap_err();
        assert!(
            err.contains("next: 2026-06-01T12:00:10Z, 2026-06-01T12:00:20Z, 2026-06-01T12:00:30Z"),
            "{err}"
        );
        // Twice in one minute a year: still twice within a minute.
        let err = check_schedule("0,30 0 0 1 1 *", mid_2026).unwrap_err();
        assert!(err.contains("2 times in each minute"), "{err}");
        assert!(
            err.contains("2027-01-01T00:00:00Z, 2027-01-01T00:00:30Z, 2028-01-01T00:00:00Z"),
            "{err}"
        );
        let err = check_schedule("0 0 0 31 2 *", mid_2026).unwrap_err();
        assert!(err.contains("does not fire within the next year"), "{err}");
    }

    #[test]
    fn credentials_are_looked_for_where_systemd_looks() {
        let paths = |cd: Option<&str>, store: Option<&str>| {
            credential_paths("c", cd.map(Into::into), store.map(Into::into))
        };
        assert_eq!(
            paths(None, None),
            [
                "/etc/credstore/c",
                "/run/credstore/c",
                "/usr/local/lib/credstore/c",
                "/usr/lib/credstore/c"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            paths(Some("/run/credentials/tokend.service"), Some("/x")),
            [PathBuf::from("/run/credentials/tokend.service/c")]
        );
        assert_eq!(
            paths(Some(""), Some("/x::/y")),
            [PathBuf::from("/x/c"), PathBuf::from("/y/c")]
        );
    }

    #[test]
    fn user_info_is_redacted() {
        assert_eq!(
            redact_userinfo(r#"base_url = "https://u:p@x.test/a@b" # or http://v@y"#),
            r#"base_url = "https://***@x.test/a@b" # or http://***@y"#
        );
        assert_eq!(
            redact_userinfo("https://x.test/?q=a@b"),
            "https://x.test/?q=a@b"
        );
        assert_eq!(redact_userinfo("no url here"), "no url here");
    }
}
