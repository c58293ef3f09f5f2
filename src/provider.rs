//! The OAuth client for Factorial's Doorkeeper server: refresh a grant, probe a token, revoke a
//! token.
//!
//! Every answer is classified: a usable grant, a dead grant, the profile's fault, or a transient
//! failure (with the server's `Retry-After` when it gave one). Bodies are size-limited and never
//! trusted, but whatever token a 200 carries is kept: once the server has rotated the refresh
//! token the old one may be dead, so a grant with an odd `expires_in` or no access token is still
//! a grant. Only a 200 with no usable token at all is transient.
//!
//! Redirects are never followed: every request carries a secret (a token, the client secret), and
//! a redirect would hand it to whatever host the `Location` names. A 3xx is the profile's fault.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

use crate::config::{DaemonConfig, ProbeKind, Profile};

/// Longest `Retry-After` honoured; a server asking for more gets this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// `expires_in` beyond this is not a lifetime a token server means.
pub const MAX_EXPIRES_IN: i64 = 366 * 86_400;
/// `created_at` further than this from our clock is ignored in favour of our clock.
const MAX_CLOCK_SKEW: i64 = 86_400;
/// Longest token accepted.
const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RefreshError {
    /// The grant is dead (`invalid_grant`): only a new authorisation helps.
    #[error("invalid_grant: {0}")]
    InvalidGrant(String),
    /// The profile is at fault (`invalid_client`, `unauthorized_client`, a wrong URL).
    #[error("{code}: {description}")]
    Misconfigured { code: String, description: String },
    /// Try again later.
    #[error("{reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// What a refresh answer carried: at least one of the two tokens.
#[derive(Debug, Clone)]
pub struct Grant {
    /// None: the answer rotated the refresh token but carried no usable access token.
    pub access_token: Option<SecretString>,
    /// None: the server did not rotate; the old refresh token stays.
    pub refresh_token: Option<SecretString>,
    /// When the token was issued: `created_at` when believable, else `now`.
    pub issued_at: i64,
    /// Seconds of life as sent, within `1..=MAX_EXPIRES_IN`. None: unknown (see `expiry_problem`).
    pub expires_in: Option<i64>,
    /// Why `expires_in` is None, for the operator: "expires_in is missing", "expires_in is 0",
    /// "expires_in is -5", "expires_in \"soon\" is not a number", "expires_in 1000000000000 is
    /// more than a year".
    pub expiry_problem: Option<String>,
    pub scopes: Option<String>,
}

impl Grant {
    /// When the access token expires (unix seconds), when its lifetime is known.
    pub fn expires_at(&self) -> Option<i64> {
        self.expires_in.map(|e| self.issued_at + e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Active,
    /// The provider says the token is dead (`401`, `active:false`).
    Dead(String),
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    Misconfigured(String),
}

#[derive(Clone, Debug)]
pub struct Provider {
    http: reqwest::Client,
    max_body: usize,
}

/// RFC 7009's `token_type_hint`: what kind of token a revocation carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenHint {
    RefreshToken,
    AccessToken,
}

impl TokenHint {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenHint::RefreshToken => "refresh_token",
            TokenHint::AccessToken => "access_token",
        }
    }
}

impl Provider {
    pub fn new(daemon: &DaemonConfig) -> anyhow::Result<Provider> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(daemon.http_connect_timeout.get())
            .timeout(daemon.http_timeout.get())
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(daemon.max_concurrent_refreshes.get())
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Provider {
            http,
            max_body: daemon.max_response_bytes.get(),
        })
    }

    /// Exchange `refresh_token` for a new pair. `now` is unix seconds.
    pub async fn refresh(
        &self,
        profile: &Profile,
        refresh_token: &SecretString,
        now: i64,
    ) -> Result<Grant, RefreshError> {
        let url = profile.token_url.clone();
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
            ("client_id", profile.client_id.as_str()),
            ("client_secret", profile.client_secret.expose_secret()),
        ];
        let secrets = [
            refresh_token.expose_secret(),
            profile.client_secret.expose_secret(),
        ];
        match self
            .exchange(self.http.post(url).form(&form), unix(now))
            .await
        {
            Ok(a) => classify(a.status, &a.body, a.retry_after, now, &secrets),
            Err(Failed::Redirect { status, target }) => Err(RefreshError::Misconfigured {
                code: format!("http {status}"),
                description: refused(&target, TOKEN_ENDPOINT),
            }),
            Err(Failed::Transport {
                reason,
                retry_after,
            }) => Err(transient(reason, retry_after)),
        }
    }

    /// Ask the provider whether a company token still works, as the profile's probe says.
    /// `now` is unix seconds (for a `Retry-After` given as a date).
    pub async fn probe(
        &self,
        profile: &Profile,
        access_token: &SecretString,
        now: i64,
    ) -> ProbeOutcome {
        let request = match profile.probe {
            ProbeKind::TokenInfo => self
                .http
                .get(format!("{}/oauth/token/info", profile.base_url))
                .bearer_auth(access_token.expose_secret()),
            ProbeKind::Url => self
                .http
                .get(profile.probe_url.clone().unwrap_or_default())
                .bearer_auth(access_token.expose_secret()),
            ProbeKind::Introspect => self
                .http
                .post(format!("{}/oauth/introspect", profile.base_url))
                .form(&[
                    ("token", access_token.expose_secret()),
                    ("client_id", profile.client_id.as_str()),
                    ("client_secret", profile.client_secret.expose_secret()),
                ]),
        };
        self.probe_with(profile, profile.probe, request, access_token, now)
            .await
    }

    /// Use `access_token` once: a Bearer `GET {base}/oauth/token/info` (the profile's
    /// `probe_url` when it probes by URL). To Doorkeeper under `revoke_on_use` rotation a use
    /// retires the pair this token's refresh replaced (introspection is not a use, so this never
    /// introspects); under `immediate` rotation it changes nothing. Answers as a probe does.
    pub async fn use_token(
        &self,
        profile: &Profile,
        access_token: &SecretString,
        now: i64,
    ) -> ProbeOutcome {
        let (kind, url) = match (profile.probe, &profile.probe_url) {
            (ProbeKind::Url, Some(url)) => (ProbeKind::Url, url.clone()),
            _ => (
                ProbeKind::TokenInfo,
                format!("{}/oauth/token/info", profile.base_url),
            ),
        };
        let request = self.http.get(url).bearer_auth(access_token.expose_secret());
        self.probe_with(profile, kind, request, access_token, now)
            .await
    }

    /// Send a probe of `kind` and classify its answer.
    async fn probe_with(
        &self,
        profile: &Profile,
        kind: ProbeKind,
        request: reqwest::RequestBuilder,
        access_token: &SecretString,
        now: i64,
    ) -> ProbeOutcome {
        let secrets = [
            access_token.expose_secret(),
            profile.client_secret.expose_secret(),
        ];
        match self.exchange(request, unix(now)).await {
            Ok(a) => match classify_probe(kind, a.status, &a.body, a.retry_after) {
                // Only an error code from the server can reach these; it must not be a secret.
                ProbeOutcome::Transient {
                    reason,
                    retry_after,
                } => ProbeOutcome::Transient {
                    reason: redact(&reason, &secrets),
                    retry_after,
                },
                other => other,
            },
            Err(Failed::Redirect { status, target }) => ProbeOutcome::Misconfigured(format!(
                "http {status}: {}",
                refused(&target, probe_endpoint(kind))
            )),
            Err(Failed::Transport {
                reason,
                retry_after,
            }) => ProbeOutcome::Transient {
                reason,
                retry_after,
            },
        }
    }

    /// Revoke `token`, of the kind `hint` names (RFC 7009). Doorkeeper answers `200 {}` even for
    /// a token it does not know, so `Ok` says only that the server took the request, never that
    /// the token existed. `Err` is a short description that never contains the token or the
    /// secret.
    pub async fn revoke(
        &self,
        profile: &Profile,
        token: &SecretString,
        hint: TokenHint,
    ) -> Result<(), String> {
        let url = format!("{}/oauth/revoke", profile.base_url);
        let form = [
            ("token", token.expose_secret()),
            ("token_type_hint", hint.as_str()),
            ("client_id", profile.client_id.as_str()),
            ("client_secret", profile.client_secret.expose_secret()),
        ];
        let result = match self
            .exchange(self.http.post(url).form(&form), SystemTime::now())
            .await
        {
            Ok(a) => classify_revoke(a.status, &a.body),
            Err(Failed::Redirect { status, target }) => Err(format!(
                "http {status}: {}",
                refused(&target, REVOCATION_ENDPOINT)
            )),
            Err(Failed::Transport { reason, .. }) => Err(reason),
        };
        let secrets = [token.expose_secret(), profile.client_secret.expose_secret()];
        result.map_err(|e| redact(&e, &secrets))
    }

    /// Send a request and read its answer, bounded. A redirect is returned unread, with where it
    /// points (see [`redirect_target`]).
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        now: SystemTime,
    ) -> Result<Answer, Failed> {
        let response = request.send().await.map_err(|e| Failed::Transport {
            reason: describe_reqwest(&e),
            retry_after: None,
        })?;
        let status = response.status().as_u16();
        if response.status().is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|v| v.to_str().ok());
            return Err(Failed::Redirect {
                status,
                target: redirect_target(response.url(), location),
            });
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        let body = read_limited(response, self.max_body)
            .await
            .map_err(|reason| Failed::Transport {
                reason,
                retry_after,
            })?;
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

/// A non-redirect answer, its body read within the size limit.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

enum Failed {
    /// A 3xx, refused; `target` is what [`redirect_target`] may show of its `Location`.
    Redirect { status: u16, target: String },
    /// No answer, or one whose body could not be read.
    Transport {
        reason: String,
        retry_after: Option<Duration>,
    },
}

/// Who refuses a redirect, and which setting the operator should fix.
#[derive(Clone, Copy)]
struct Endpoint {
    what: &'static str,
    setting: &'static str,
}

const TOKEN_ENDPOINT: Endpoint = Endpoint {
    what: "a token endpoint",
    setting: "base_url",
};

const REVOCATION_ENDPOINT: Endpoint = Endpoint {
    what: "the revocation endpoint",
    setting: "base_url",
};

fn probe_endpoint(kind: ProbeKind) -> Endpoint {
    match kind {
        ProbeKind::Url => Endpoint {
            what: "a probe",
            setting: "probe_url",
        },
        ProbeKind::TokenInfo | ProbeKind::Introspect => Endpoint {
            what: "a probe",
            setting: "base_url",
        },
    }
}

/// "redirect to evil.example refused: tokend never follows redirects from a token endpoint; fix
/// base_url".
fn refused(target: &str, e: Endpoint) -> String {
    format!(
        "{target} refused: tokend never follows redirects from {}; fix {}",
        e.what, e.setting
    )
}

/// What may be shown of a redirect's `Location` (`None`: no header; `Some(None)`: not text):
/// its host, a port that is not the scheme's default, and the scheme when it differs from the
/// request's. Never the path or the query, which could carry a secret.
fn redirect_target(from: &reqwest::Url, location: Option<Option<&str>>) -> String {
    let Some(location) = location else {
        return "redirect without a Location".into();
    };
    let Some(to) = location.and_then(|l| from.join(l.trim()).ok()) else {
        return "redirect to an unreadable Location".into();
    };
    if to.host_str().is_none() {
        return "redirect to a Location without a host".into();
    }
    if to.scheme() != from.scheme() {
        format!("redirect to {}://{}", to.scheme(), host_label(&to))
    } else {
        format!("redirect to {}", host_label(&to))
    }
}

/// A URL's host, with its port when that is not the scheme's default.
fn host_label(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => "the server".to_owned(),
    }
}

/// reqwest with rustls needs a process-wide crypto provider; ring builds fast and needs no C
/// toolchain beyond what is here.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn transient(reason: String, retry_after: Option<Duration>) -> RefreshError {
    RefreshError::Transient {
        reason,
        retry_after,
    }
}

/// A transport failure in words an operator can act on: the host (with its port when that is
/// not the scheme's default) and the cause, told apart by walking the error's sources. Never the
/// URL's path or query, nor reqwest's own message, which quotes the whole URL.
fn describe_reqwest(e: &reqwest::Error) -> String {
    let host = e
        .url()
        .map(host_label)
        .unwrap_or_else(|| "the server".to_owned());
    let causes = causes(e);
    let detail = innermost(&causes);
    if let Some(tls) = causes
        .iter()
        .find_map(|c| c.downcast_ref::<rustls::Error>())
    {
        return format!("TLS error with {host}: {tls}");
    }
    if e.is_timeout() {
        return if e.is_connect() {
            format!("timed out connecting to {host}")
        } else {
            format!("timed out waiting for the response from {host}")
        };
    }
    // hyper-util's connector marks resolver failures only by its message; the cause below it
    // is the resolver's own.
    if e.is_connect() && causes.iter().any(|c| c.to_string() == "dns error") {
        let name = e.url().and_then(|u| u.host_str()).unwrap_or("the server");
        let why = detail
            .strip_prefix("failed to lookup address information: ")
            .unwrap_or(&detail);
        return format!("DNS lookup failed for {name}: {why}");
    }
    if causes.iter().any(|c| {
        c.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message())
    }) {
        return format!("connection closed before the response was complete ({host})");
    }
    let io = causes
        .iter()
        .rev()
        .find_map(|c| c.downcast_ref::<std::io::Error>());
    if let Some(io) = io {
        use std::io::ErrorKind as K;
        match io.kind() {
            K::ConnectionRefused => return format!("connection refused ({host})"),
            K::TimedOut if e.is_connect() => return format!("timed out connecting to {host}"),
            K::TimedOut => return format!("timed out waiting for the response from {host}"),
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                return if e.is_connect() {
                    format!("connection closed by {host} while connecting: {detail}")
                } else {
                    format!("connection closed before the response was complete ({host})")
                };
            }
            K::NetworkUnreachable => return format!("network unreachable for {host}"),
            K::HostUnreachable => return format!("host unreachable ({host})"),
            _ => {}
        }
    }
    if e.is_builder() {
        return format!("invalid request: {detail}");
    }
    if e.is_connect() {
        return format!("could not connect to {host}: {detail}");
    }
    format!("request to {host} failed: {detail}")
}

/// An error and its sources, outermost first. An `io::Error` wrapping another error reports that
/// error's source, not the error itself, so it is unwrapped by hand (rustls errors hide there).
fn causes<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> Vec<&'e (dyn std::error::Error + 'static)> {
    let mut chain = Vec::new();
    let mut next = Some(e);
    while let Some(c) = next {
        chain.push(c);
        next = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
        if chain.len() > 16 {
            break;
        }
    }
    chain
}

/// The most specific message in a chain: the innermost cause that is not reqwest's (whose
/// messages quote the URL), shortened.
fn innermost(causes: &[&(dyn std::error::Error + 'static)]) -> String {
    causes
        .iter()
        .rev()
        .find(|c| !c.is::<reqwest::Error>())
        .map(|c| c.to_string().chars().take(200).collect())
        .unwrap_or_else(|| "unknown cause".to_owned())
}

async fn read_limited(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let url = response.url().clone();
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("response body over {max} bytes"));
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(format!("response body over {max} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(describe_reqwest(&e.with_url(url))),
        }
    }
}

/// Turn one token-endpoint answer into a grant or a classified error. Pure, for tests and fuzzing.
pub fn classify_refresh(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    now: i64,
) -> Result<Grant, RefreshError> {
    classify(status, body, retry_after, now, &[])
}

/// [`classify_refresh`], redacting `secrets` (what the request carried) from the server's
/// `error_description` before it is shortened, so no part of one reaches a log.
fn classify(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    now: i64,
    secrets: &[&str],
) -> Result<Grant, RefreshError> {
    if status == 200 {
        return parse_grant(body, now)
            .map_err(|why| transient(format!("unusable token response: {why}"), retry_after));
    }
    let err = serde_json::from_slice::<serde_json::Value>(body).ok();
    let field = |name: &str| {
        err.as_ref()
            .and_then(|e| e.as_object()?.get(name)?.as_str())
            .unwrap_or_default()
    };
    // Only codes matched below are ever repeated.
    let code = field("error").to_owned();
    let description: String = redact(field("error_description"), secrets)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    match (status, code.as_str()) {
        (400 | 401, "invalid_grant") => Err(RefreshError::InvalidGrant(description)),
        (
            400 | 401 | 403,
            "invalid_client"
            | "unauthorized_client"
            | "unsupported_grant_type"
            | "invalid_scope"
            | "invalid_request",
        ) => Err(RefreshError::Misconfigured { code, description }),
        (404 | 405, _) => Err(RefreshError::Misconfigured {
            code: format!("http {status}"),
            description: "no token endpoint at this base_url".into(),
        }),
        (300..=399, _) => Err(RefreshError::Misconfigured {
            code: format!("http {status}"),
            description: refused("redirect", TOKEN_ENDPOINT),
        }),
        _ => Err(transient(format!("http {status}"), retry_after)),
    }
}

fn parse_grant(body: &[u8], now: i64) -> Result<Grant, String> {
    let Ok(serde_json::Value::Object(r)) = serde_json::from_slice(body) else {
        return Err("body is not a JSON object".into());
    };
    let access_token = usable_token(r.get("access_token"));
    let refresh_token = usable_token(r.get("refresh_token"));
    let (access_token, refresh_token) = match (access_token, refresh_token) {
        (Err(a), Err(r)) => {
            return Err(format!(
                "no usable token (access_token {a}, refresh_token {r})"
            ));
        }
        (a, r) => (a.ok(), r.ok()),
    };
    let (expires_in, expiry_problem) = match parse_expires_in(r.get("expires_in")) {
        Ok(e) => (Some(e), None),
        Err(why) => (None, Some(why)),
    };
    // created_at far from our clock, or one that would make the new token already expired, is
    // not believed: our clock then dates the token.
    let issued_at = r
        .get("created_at")
        .and_then(|c| whole_number(c).ok())
        .filter(|c| (c - now).abs() <= MAX_CLOCK_SKEW)
        .filter(|c| expires_in.is_none_or(|e| c + e > now))
        .unwrap_or(now);
    let scopes = match r.get("scope") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    };
    Ok(Grant {
        access_token,
        refresh_token,
        issued_at,
        expires_in,
        expiry_problem,
        scopes,
    })
}

/// A token string tokend can store and send: non-empty, at most `MAX_TOKEN_LEN` bytes, visible
/// ASCII. `Err` says what it is instead, without quoting it.
fn usable_token(v: Option<&serde_json::Value>) -> Result<SecretString, &'static str> {
    match v {
        None => Err("is missing"),
        Some(serde_json::Value::Null) => Err("is null"),
        Some(serde_json::Value::String(s)) if s.is_empty() => Err("is empty"),
        Some(serde_json::Value::String(s)) if s.len() > MAX_TOKEN_LEN => {
            Err("is longer than 4096 bytes")
        }
        Some(serde_json::Value::String(s)) if !s.bytes().all(|b| b.is_ascii_graphic()) => {
            Err("has characters other than visible ASCII")
        }
        Some(serde_json::Value::String(s)) => Ok(SecretString::from(s.as_str())),
        Some(_) => Err("is not a string"),
    }
}

/// `expires_in` as a lifetime in `1..=MAX_EXPIRES_IN` seconds, or what is wrong with it.
fn parse_expires_in(v: Option<&serde_json::Value>) -> Result<i64, String> {
    let v = match v {
        None => return Err("expires_in is missing".into()),
        Some(serde_json::Value::Null) => return Err("expires_in is null".into()),
        Some(v) => v,
    };
    match whole_number(v) {
        Ok(e) if e <= 0 => Err(format!("expires_in is {e}")),
        Ok(e) if e > MAX_EXPIRES_IN => Err(format!("expires_in {e} is more than a year")),
        Ok(e) => Ok(e),
        Err(NotWhole::TooLarge { negative: true }) => Err(format!("expires_in is {}", shown(v))),
        Err(NotWhole::TooLarge { negative: false }) => {
            Err(format!("expires_in {} is more than a year", shown(v)))
        }
        Err(NotWhole::Fraction) => Err(format!(
            "expires_in {} is not a whole number of seconds",
            shown(v)
        )),
        Err(NotWhole::NotANumber) => Err(format!("expires_in {} is not a number", shown(v))),
    }
}

enum NotWhole {
    NotANumber,
    Fraction,
    TooLarge { negative: bool },
}

/// A JSON integer, an integral float, or a string holding either (surrounding whitespace
/// allowed), as an `i64`.
fn whole_number(v: &serde_json::Value) -> Result<i64, NotWhole> {
    let float = match v {
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => return Ok(i),
            (None, Some(_)) => return Err(NotWhole::TooLarge { negative: false }),
            (None, None) => n.as_f64().ok_or(NotWhole::NotANumber)?,
        },
        serde_json::Value::String(s) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                return Ok(i);
            }
            s.parse::<f64>().map_err(|_| NotWhole::NotANumber)?
        }
        _ => return Err(NotWhole::NotANumber),
    };
    if !float.is_finite() {
        Err(NotWhole::NotANumber)
    } else if float.fract() != 0.0 {
        Err(NotWhole::Fraction)
    } else if float.abs() >= 9.0e18 {
        Err(NotWhole::TooLarge {
            negative: float < 0.0,
        })
    } else {
        Ok(float as i64)
    }
}

/// A server's value, shortened for a message.
fn shown(v: &serde_json::Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 40 {
        text.chars().take(40).chain(['…']).collect()
    } else {
        text
    }
}

/// Classify a revocation answer (RFC 7009: `200` whatever the token was). Pure, for tests.
pub fn classify_revoke(status: u16, body: &[u8]) -> Result<(), String> {
    match status {
        200 => Ok(()),
        300..=399 => Err(format!(
            "http {status}: {}",
            refused("redirect", REVOCATION_ENDPOINT)
        )),
        _ => Err(match error_code(body) {
            Some(code) => format!("http {status} {code}"),
            None => format!("http {status}"),
        }),
    }
}

/// The `error` of an OAuth error body, when it looks like an error code (a short word): anything
/// else from the server is not repeated.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = v.as_object()?.get("error")?.as_str()?;
    let word = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
    (!code.is_empty() && code.len() <= 64 && code.bytes().all(word)).then(|| code.to_owned())
}

/// `text` with every occurrence of each (non-empty) secret replaced.
fn redact(text: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |t, s| t.replace(s, "[redacted]"))
}

/// Unix seconds as a `SystemTime`.
fn unix(secs: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// `Retry-After` as delay-seconds or an HTTP date, relative to `now`; capped at an hour.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Classify a probe answer. Pure, for tests.
pub fn classify_probe(
    kind: ProbeKind,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> ProbeOutcome {
    let transient = |reason: String| ProbeOutcome::Transient {
        reason,
        retry_after,
    };
    match (kind, status) {
        (ProbeKind::Introspect, 200) => {
            match serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("active").and_then(|a| a.as_bool()))
            {
                Some(true) => ProbeOutcome::Active,
                Some(false) => ProbeOutcome::Dead("introspection says active:false".into()),
                None => transient("introspection answer without `active`".into()),
            }
        }
        (ProbeKind::Introspect, 400 | 401 | 403) => ProbeOutcome::Misconfigured(format!(
            "introspection refused client credentials (http {status})"
        )),
        (ProbeKind::TokenInfo, 200) => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) if v.is_object() => ProbeOutcome::Active,
            _ => transient("token info answer is not JSON".into()),
        },
        (ProbeKind::Url, 200..=299) => ProbeOutcome::Active,
        (ProbeKind::TokenInfo | ProbeKind::Url, 401) => {
            let code = error_code(body).unwrap_or_default();
            if kind == ProbeKind::TokenInfo && code != "invalid_token" {
                transient(format!("http 401 without invalid_token ({code:?})"))
            } else {
                ProbeOutcome::Dead("http 401 invalid_token".into())
            }
        }
        (ProbeKind::TokenInfo, 404) => {
            ProbeOutcome::Misconfigured("no token info endpoint at this base_url".into())
        }
        // A redirect could lead anywhere: a `{}` from another host must never count as active.
        (_, 300..=399) => ProbeOutcome::Misconfigured(format!(
            "http {status}: {}",
            refused("redirect", probe_endpoint(kind))
        )),
        (_, status) => transient(format!("http {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, Environment, TokenType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    const NOW: i64 = 1_800_000_000;
    const SECRET: &str = "client-secret-value";

    fn profile(base_url: &str, probe: ProbeKind) -> Profile {
        Profile {
            name: "p".into(),
            environment: Environment::Sandbox,
            base_url: base_url.into(),
            token_url: format!("{base_url}/oauth/token").parse().expect("url"),
            client_id: "cid".into(),
            client_secret: SecretString::from(SECRET),
            scopes: Vec::new(),
            token_type: TokenType::User,
            probe,
            probe_url: Some(format!("{base_url}/api/me")),
            default_token_lifetime: Dur::from_secs(3600),
            revoke_superseded: true,
            allow_insecure_http: true,
        }
    }

    /// A provider that gives up connecting after `timeout`, and on the whole request after twice
    /// that.
    fn provider(timeout: Duration) -> Provider {
        Provider::new(&DaemonConfig {
            http_connect_timeout: Dur(timeout),
            http_timeout: Dur(timeout * 2),
            ..DaemonConfig::default()
        })
        .unwrap()
    }

    /// An HTTP server on 127.0.0.1:0 that answers every request with `answer` and hands back
    /// each request it read (head and body).
    async fn serve(answer: String) -> (String, mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            }
        });
        (base, rx)
    }

    fn redirect(status: &str, location: &str) -> String {
        format!("HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 2\r\n\r\n{{}}")
    }

    #[tokio::test]
    async fn refresh_never_follows_a_redirect() {
        // Where the redirect points: it must never see a connection.
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let there = elsewhere.local_addr().unwrap();
        let (base, mut requests) = serve(redirect(
            "307 Temporary Redirect",
            &format!("http://{there}/steal?refresh_token=r1"),
        ))
        .await;
        let p = provider(Duration::from_secs(5));
        let err = p
            .refresh(
                &profile(&base, ProbeKind::TokenInfo),
                &SecretString::from("r1"),
                NOW,
            )
            .await
            .unwrap_err();
        match err {
            RefreshError::Misconfigured { code, description } => {
                assert_eq!(code, "http 307");
                assert_eq!(
                    description,
                    format!(
                        "redirect to {there} refused: tokend never follows redirects from a \
                         token endpoint; fix base_url"
                    )
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            requests
                .recv()
                .await
                .unwrap()
                .starts_with("POST /oauth/token ")
        );
        let followed = tokio::time::timeout(Duration::from_millis(20), elsewhere.accept()).await;
        assert!(followed.is_err(), "the redirect was followed");
    }

    #[tokio::test]
    async fn probes_never_follow_a_redirect() {
        let (base, _requests) = serve(redirect("302 Found", "https://evil.example/me?t=x")).await;
        let p = provider(Duration::from_secs(5));
        let token = SecretString::from("a1");
        for (kind, setting) in [
            (ProbeKind::TokenInfo, "base_url"),
            (ProbeKind::Introspect, "base_url"),
            (ProbeKind::Url, "probe_url"),
        ] {
            assert_eq!(
                p.probe(&profile(&base, kind), &token, NOW).await,
                ProbeOutcome::Misconfigured(format!(
                    "http 302: redirect to https://evil.example refused: tokend never follows \
                     redirects from a probe; fix {setting}"
                )),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_redirect_shows_its_host_and_nothing_else() {
        let from = reqwest::Url::parse("https://api.factorialhr.com/oauth/token").unwrap();
        let target = |l: Option<Option<&str>>| redirect_target(&from, l);
        assert_eq!(
            target(Some(Some("https://evil.example/oauth/token?code=secret"))),
            "redirect to evil.example"
        );
        assert_eq!(
            target(Some(Some("https://user:pw@evil.example:8443/x#secret"))),
            "redirect to evil.example:8443"
        );
        assert_eq!(
            target(Some(Some("http://api.factorialhr.com/oauth/token"))),
            "redirect to http://api.factorialhr.com"
        );
        assert_eq!(
            target(Some(Some("/login?next=secret"))),
            "redirect to api.factorialhr.com"
        );
        assert_eq!(target(None), "redirect without a Location");
        assert_eq!(target(Some(None)), "redirect to an unreadable Location");
        assert_eq!(
            target(Some(Some("http://[::1"))),
            "redirect to an unreadable Location"
        );
    }

    /// What a refresh against `base` fails with, as a transient reason.
    async fn refresh_failure(p: &Provider, base: &str) -> String {
        let profile = profile(base, ProbeKind::TokenInfo);
        match p.refresh(&profile, &SecretString::from("r1"), NOW).await {
            Err(RefreshError::Transient { reason, .. }) => {
                assert!(
                    !reason.contains("r1") && !reason.contains(SECRET),
                    "{reason}"
                );
                reason
            }
            other => panic!("{other:?}"),
        }
    }

    /// A listener on 127.0.0.1:0 that accepts and never answers.
    async fn silent_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_refused_connection_names_host_and_port() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let p = provider(Duration::from_secs(5));
        assert_eq!(
            refresh_failure(&p, &format!("http://{addr}")).await,
            format!("connection refused ({addr})")
        );
        // A probe URL's query could hold a key: only the host is named.
        let mut probe = profile(&format!("http://{addr}"), ProbeKind::Url);
        probe.probe_url = Some(format!("http://{addr}/api/me?api_key=secret"));
        assert_eq!(
            p.probe(&probe, &SecretString::from("a1"), NOW).await,
            ProbeOutcome::Transient {
                reason: format!("connection refused ({addr})"),
                retry_after: None
            }
        );
    }

    #[tokio::test]
    async fn timeouts_say_which_phase() {
        let addr = silent_server().await;
        let p = provider(Duration::from_millis(200));
        assert_eq!(
            refresh_failure(&p, &format!("http://{addr}")).await,
            format!("timed out waiting for the response from {addr}")
        );
        // Over TLS the handshake never completes: still connecting.
        assert_eq!(
            refresh_failure(&p, &format!("https://{addr}")).await,
            format!("timed out connecting to {addr}")
        );
    }

    #[tokio::test]
    async fn tls_errors_name_the_host_and_what_rustls_saw() {
        // A plain HTTP answer where the TLS handshake expects a ServerHello.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                let _ = socket.write_all(answer).await;
            }
        });
        let p = provider(Duration::from_secs(5));
        assert_eq!(
            refresh_failure(&p, &format!("https://{addr}")).await,
            format!("TLS error with {addr}: received corrupt message of type InvalidContentType")
        );
    }

    #[tokio::test]
    async fn a_connection_closed_early_is_named_so() {
        let p = provider(Duration::from_secs(5));
        // Closed before any answer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.read(&mut [0u8; 4096]).await;
            }
        });
        let closed = format!("connection closed before the response was complete ({addr})");
        assert_eq!(refresh_failure(&p, &format!("http://{addr}")).await, closed);
        // Closed in the middle of the body.
        let (base, _requests) =
            serve("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"access".into()).await;
        let addr = base.trim_start_matches("http://");
        assert_eq!(
            refresh_failure(&p, &base).await,
            format!("connection closed before the response was complete ({addr})")
        );
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        let p = provider(Duration::from_secs(5));
        let (base, _requests) =
            serve("HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n{".into()).await;
        assert_eq!(
            refresh_failure(&p, &base).await,
            "response body over 65536 bytes"
        );
        // No length announced: the limit holds while reading.
        let chunk = format!("8000\r\n{}\r\n", " ".repeat(0x8000));
        let (base, _requests) = serve(format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(3)
        ))
        .await;
        assert_eq!(
            refresh_failure(&p, &base).await,
            "response body over 65536 bytes"
        );
    }

    #[tokio::test]
    async fn a_failed_dns_lookup_names_the_host() {
        let p = provider(Duration::from_secs(3));
        let reason = refresh_failure(&p, "http://tokend-test.invalid").await;
        // Where no resolver answers at all, the connect timeout comes first.
        assert!(
            reason.starts_with("DNS lookup failed for tokend-test.invalid: ")
                || reason == "timed out connecting to tokend-test.invalid",
            "{reason}"
        );
    }

    /// A use is a Bearer GET whatever the profile probes with: introspection is not a use.
    #[tokio::test]
    async fn use_token_is_a_bearer_get_never_an_introspection() {
        let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let p = provider(Duration::from_secs(5));
        for (probe, path) in [
            (ProbeKind::TokenInfo, "/oauth/token/info"),
            (ProbeKind::Introspect, "/oauth/token/info"),
            (ProbeKind::Url, "/api/me"),
        ] {
            let (base, mut requests) = serve(answer.into()).await;
            let outcome = p
                .use_token(&profile(&base, probe), &SecretString::from("a1"), NOW)
                .await;
            assert_eq!(outcome, ProbeOutcome::Active, "{probe:?}");
            let request = requests.recv().await.unwrap();
            assert!(
                request.starts_with(&format!("GET {path} ")),
                "{probe:?}: {request}"
            );
            assert!(
                request
                    .to_ascii_lowercase()
                    .contains("\r\nauthorization: bearer a1\r\n"),
                "{probe:?}: {request}"
            );
        }
    }

    #[tokio::test]
    async fn revoke_sends_rfc7009_form_and_takes_200_as_done() {
        // A refresh token (a user's grant), then an access token (a company's), each named so.
        for (hint, name) in [
            (TokenHint::RefreshToken, "refresh_token"),
            (TokenHint::AccessToken, "access_token"),
        ] {
            let (base, mut requests) =
                serve("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".into()).await;
            let p = provider(Duration::from_secs(5));
            let profile = profile(&base, ProbeKind::TokenInfo);
            p.revoke(&profile, &SecretString::from("r/1+"), hint)
                .await
                .unwrap();
            let request = requests.recv().await.unwrap();
            assert!(request.starts_with("POST /oauth/revoke "), "{request}");
            let body = request.split("\r\n\r\n").nth(1).unwrap();
            let form: Vec<(String, String)> = serde_urlencoded::from_str(body).unwrap();
            let expected = [
                ("token", "r/1+"),
                ("token_type_hint", name),
                ("client_id", "cid"),
                ("client_secret", SECRET),
            ];
            assert_eq!(
                form,
                expected.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec()
            );
        }
    }

    #[tokio::test]
    async fn revoke_failures_are_short_and_hold_no_secret() {
        let p = provider(Duration::from_millis(200));
        let token = SecretString::from("r1-revoked");
        let revoke = |answer: String| {
            let (p, token) = (p.clone(), token.clone());
            async move {
                let (base, _requests) = serve(answer).await;
                p.revoke(
                    &profile(&base, ProbeKind::TokenInfo),
                    &token,
                    TokenHint::RefreshToken,
                )
                .await
                .unwrap_err()
            }
        };
        let json = |status: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        assert_eq!(
            revoke(json(
                "403 Forbidden",
                r#"{"error":"unauthorized_client","error_description":"You are not authorized to revoke this token"}"#
            ))
            .await,
            "http 403 unauthorized_client"
        );
        assert_eq!(
            revoke(json("503 Service Unavailable", "<html>")).await,
            "http 503"
        );
        // A server echoing what it was sent gets none of it repeated.
        assert_eq!(
            revoke(json("400 Bad Request", r#"{"error":"r1-revoked"}"#)).await,
            "http 400 [redacted]"
        );
        assert_eq!(
            revoke(json(
                "400 Bad Request",
                &format!(r#"{{"error":"{SECRET} is wrong"}}"#)
            ))
            .await,
            "http 400"
        );
        assert_eq!(
            revoke(redirect(
                "302 Found",
                "https://evil.example/oauth/revoke?token=r1-revoked"
            ))
            .await,
            "http 302: redirect to https://evil.example refused: tokend never follows redirects \
             from the revocation endpoint; fix base_url"
        );
        // No answer at all.
        let addr = silent_server().await;
        let err = p
            .revoke(
                &profile(&format!("http://{addr}"), ProbeKind::TokenInfo),
                &token,
                TokenHint::RefreshToken,
            )
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!("timed out waiting for the response from {addr}")
        );
    }

    #[tokio::test]
    async fn what_a_server_echoes_back_is_redacted() {
        let p = provider(Duration::from_secs(5));
        let description = format!("bad token r1-{} and {SECRET}", "x".repeat(180));
        let body = format!(r#"{{"error":"invalid_grant","error_description":"{description}"}}"#);
        let (base, _requests) = serve(format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        let refresh_token = SecretString::from(format!("r1-{}", "x".repeat(180)));
        match p
            .refresh(&profile(&base, ProbeKind::TokenInfo), &refresh_token, NOW)
            .await
        {
            Err(RefreshError::InvalidGrant(d)) => {
                assert_eq!(d, "bad token [redacted] and [redacted]")
            }
            other => panic!("{other:?}"),
        }
        let body = r#"{"error":"a1-access"}"#;
        let (base, _requests) = serve(format!(
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        let outcome = p
            .probe(
                &profile(&base, ProbeKind::TokenInfo),
                &SecretString::from("a1-access"),
                NOW,
            )
            .await;
        assert_eq!(
            outcome,
            ProbeOutcome::Transient {
                reason: r#"http 401 without invalid_token ("[redacted]")"#.into(),
                retry_after: None
            }
        );
    }

    #[test]
    fn error_bodies_are_objects_and_descriptions_one_line() {
        // serde would read a JSON array positionally into a struct: not an error body.
        assert!(matches!(
            classify_refresh(400, br#"["invalid_grant","x"]"#, None, NOW),
            Err(RefreshError::Transient { .. })
        ));
        let body =
            br#"{"error":"invalid_grant","error_description":"line one\nline two\u001b[31m"}"#;
        match classify_refresh(400, body, None, NOW) {
            Err(RefreshError::InvalidGrant(d)) => assert_eq!(d, "line one line two [31m"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            classify_probe(
                ProbeKind::TokenInfo,
                401,
                br#"{"error":"not a code"}"#,
                None
            ),
            ProbeOutcome::Transient {
                reason: r#"http 401 without invalid_token ("")"#.into(),
                retry_after: None
            }
        );
    }

    #[test]
    fn revocation_answers() {
        assert_eq!(classify_revoke(200, b"{}"), Ok(()));
        assert_eq!(classify_revoke(200, b"<html>"), Ok(()));
        assert!(classify_revoke(204, b"").is_err());
        assert_eq!(
            classify_revoke(401, br#"{"error":"invalid_client"}"#),
            Err("http 401 invalid_client".into())
        );
        assert_eq!(
            classify_revoke(401, br#"["invalid_client"]"#),
            Err("http 401".into())
        );
        assert!(
            classify_revoke(307, b"")
                .unwrap_err()
                .starts_with("http 307: redirect refused")
        );
        assert_eq!(
            redact("a secret and a token: secret", &["secret", ""]),
            "a [redacted] and a token: [redacted]"
        );
    }

    #[test]
    fn any_3xx_answer_is_the_profiles_fault() {
        for status in [301, 302, 303, 304, 307, 308] {
            assert!(matches!(
                classify_refresh(status, b"{}", None, NOW),
                Err(RefreshError::Misconfigured { .. })
            ));
            for kind in [ProbeKind::TokenInfo, ProbeKind::Introspect, ProbeKind::Url] {
                assert!(matches!(
                    classify_probe(kind, status, br#"{"active":true}"#, None),
                    ProbeOutcome::Misconfigured(_)
                ));
            }
        }
    }

    fn grant(body: &str) -> Grant {
        match classify_refresh(200, body.as_bytes(), None, NOW) {
            Ok(g) => g,
            Err(e) => panic!("{body}: {e:?}"),
        }
    }

    fn secret(t: &Option<SecretString>) -> Option<&str> {
        t.as_ref().map(|t| t.expose_secret())
    }

    #[test]
    fn doorkeeper_success_uses_created_at() {
        let g = grant(&format!(
            r#"{{"access_token":"a1","token_type":"Bearer","expires_in":3600,"refresh_token":"r1","scope":"read write","created_at":{}}}"#,
            NOW - 10
        ));
        assert_eq!(secret(&g.access_token), Some("a1"));
        assert_eq!(secret(&g.refresh_token), Some("r1"));
        assert_eq!((g.issued_at, g.expires_in), (NOW - 10, Some(3600)));
        assert_eq!(g.expires_at(), Some(NOW - 10 + 3600));
        assert_eq!(g.expiry_problem, None);
        assert_eq!(g.scopes.as_deref(), Some("read write"));
    }

    #[test]
    fn unbelievable_created_at_falls_back_to_local_time() {
        for created_at in [
            "5".to_owned(),
            (NOW + MAX_CLOCK_SKEW + 1).to_string(),
            (NOW - MAX_CLOCK_SKEW - 1).to_string(),
            // Would make the new token already expired.
            (NOW - 60).to_string(),
            r#""yesterday""#.to_owned(),
        ] {
            let g = grant(&format!(
                r#"{{"access_token":"a","expires_in":60,"refresh_token":"r","created_at":{created_at}}}"#
            ));
            assert_eq!(g.issued_at, NOW, "{created_at}");
            assert_eq!(g.expires_at(), Some(NOW + 60), "{created_at}");
        }
        // A numeric string or an integral float is believed like an integer.
        for created_at in [format!(r#"" {} ""#, NOW - 5), format!("{}.0", NOW - 5)] {
            let g = grant(&format!(
                r#"{{"access_token":"a","expires_in":60,"created_at":{created_at}}}"#
            ));
            assert_eq!(g.issued_at, NOW - 5, "{created_at}");
        }
        // With no known lifetime, only the clock skew limits it.
        let g = grant(&format!(
            r#"{{"access_token":"a","created_at":{}}}"#,
            NOW - 3600
        ));
        assert_eq!((g.issued_at, g.expires_at()), (NOW - 3600, None));
    }

    #[test]
    fn no_refresh_token_means_no_rotation() {
        let g = grant(r#"{"access_token":"a","expires_in":60}"#);
        assert_eq!(secret(&g.access_token), Some("a"));
        assert!(g.refresh_token.is_none());
        assert_eq!(g.expires_at(), Some(NOW + 60));
        // An unusable refresh_token is no rotation either: the access token is still kept.
        let g = grant(r#"{"access_token":"a","expires_in":60,"refresh_token":""}"#);
        assert!(g.refresh_token.is_none());
    }

    #[test]
    fn expires_in_as_sent_in_the_wild() {
        for (value, expected) in [
            ("3600", 3600),
            ("3600.0", 3600),
            (r#""3600""#, 3600),
            (r#"" 3600\n""#, 3600),
            (r#""7200.0""#, 7200),
            ("1", 1),
            (&MAX_EXPIRES_IN.to_string(), MAX_EXPIRES_IN),
        ] {
            let g = grant(&format!(
                r#"{{"access_token":"a","refresh_token":"r","expires_in":{value}}}"#
            ));
            assert_eq!(g.expires_in, Some(expected), "{value}");
            assert_eq!(g.expiry_problem, None, "{value}");
        }
    }

    #[test]
    fn an_odd_expires_in_still_keeps_the_tokens() {
        for (value, problem) in [
            (None, "expires_in is missing"),
            (Some("null"), "expires_in is null"),
            (Some("0"), "expires_in is 0"),
            (Some("-5"), "expires_in is -5"),
            (Some(r#""-5""#), "expires_in is -5"),
            (Some("-1e300"), "expires_in is -1e+300"),
            (Some(r#""soon""#), r#"expires_in "soon" is not a number"#),
            (Some(r#""""#), r#"expires_in "" is not a number"#),
            (Some(r#""NaN""#), r#"expires_in "NaN" is not a number"#),
            (Some("true"), "expires_in true is not a number"),
            (Some("[3600]"), "expires_in [3600] is not a number"),
            (
                Some("59.5"),
                "expires_in 59.5 is not a whole number of seconds",
            ),
            (
                Some("1000000000000"),
                "expires_in 1000000000000 is more than a year",
            ),
            (
                Some("18446744073709551615"),
                "expires_in 18446744073709551615 is more than a year",
            ),
            (Some("1e300"), "expires_in 1e+300 is more than a year"),
            (
                Some(r#""99999999999999999999""#),
                r#"expires_in "99999999999999999999" is more than a year"#,
            ),
            (
                Some(&format!(r#""{}""#, "x".repeat(100))),
                r#"expires_in "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx… is not a number"#,
            ),
        ] {
            let field = value
                .map(|v| format!(r#","expires_in":{v}"#))
                .unwrap_or_default();
            let g = grant(&format!(
                r#"{{"access_token":"a","refresh_token":"r"{field}}}"#
            ));
            assert_eq!(secret(&g.access_token), Some("a"), "{value:?}");
            assert_eq!(secret(&g.refresh_token), Some("r"), "{value:?}");
            assert_eq!(g.expires_in, None, "{value:?}");
            assert_eq!(g.expires_at(), None, "{value:?}");
            assert_eq!(g.issued_at, NOW, "{value:?}");
            assert_eq!(g.expiry_problem.as_deref(), Some(problem), "{value:?}");
        }
    }

    #[test]
    fn a_rotated_refresh_token_is_kept_without_an_access_token() {
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        for access in [
            None,
            Some("null"),
            Some(r#""""#),
            Some("42"),
            Some(r#"{"t":"a"}"#),
            Some(r#""two words""#),
            Some(r#""caf\u00e9""#),
            Some(r#""tab\there""#),
            Some(&format!(r#""{long}""#)),
        ] {
            let field = access
                .map(|v| format!(r#","access_token":{v}"#))
                .unwrap_or_default();
            let g = grant(&format!(
                r#"{{"refresh_token":"r2","expires_in":3600{field}}}"#
            ));
            assert!(g.access_token.is_none(), "{access:?}");
            assert_eq!(secret(&g.refresh_token), Some("r2"), "{access:?}");
            assert_eq!(g.expires_in, Some(3600), "{access:?}");
        }
        // The longest token accepted, and every visible ASCII character.
        let longest = "b".repeat(MAX_TOKEN_LEN);
        let g = grant(&format!(
            r#"{{"access_token":"{longest}","refresh_token":"!~{{}}\"\\09azAZ"}}"#
        ));
        assert_eq!(secret(&g.access_token), Some(longest.as_str()));
        assert_eq!(secret(&g.refresh_token), Some(r#"!~{}"\09azAZ"#));
    }

    #[test]
    fn unusable_200s_are_transient() {
        for (body, why) in [
            ("<html>oops</html>", "body is not a JSON object"),
            (r#"{"access_token":"a","#, "body is not a JSON object"),
            (r#"["a","r",3600]"#, "body is not a JSON object"),
            (r#""a""#, "body is not a JSON object"),
            (
                r#"{"expires_in":60}"#,
                "no usable token (access_token is missing, refresh_token is missing)",
            ),
            (
                r#"{"access_token":"","refresh_token":null,"expires_in":60}"#,
                "no usable token (access_token is empty, refresh_token is null)",
            ),
            (
                r#"{"access_token":7,"refresh_token":"a b"}"#,
                "no usable token (access_token is not a string, refresh_token has characters \
                 other than visible ASCII)",
            ),
            (
                r#"{"error":"invalid_grant"}"#,
                "no usable token (access_token is missing, refresh_token is missing)",
            ),
        ] {
            match classify_refresh(200, body.as_bytes(), None, NOW) {
                Err(RefreshError::Transient { reason, .. }) => {
                    assert_eq!(reason, format!("unusable token response: {why}"), "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_are_classified() {
        let grant = br#"{"error":"invalid_grant","error_description":"x"}"#;
        assert!(matches!(
            classify_refresh(400, grant, None, NOW),
            Err(RefreshError::InvalidGrant(_))
        ));
        let client = br#"{"error":"invalid_client","error_description":"x"}"#;
        assert!(matches!(
            classify_refresh(401, client, None, NOW),
            Err(RefreshError::Misconfigured { .. })
        ));
        let ra = Some(Duration::from_secs(7));
        match classify_refresh(429, b"", ra, NOW) {
            Err(RefreshError::Transient { retry_after, .. }) => assert_eq!(retry_after, ra),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify_refresh(503, b"<html>", None, NOW),
            Err(RefreshError::Transient { .. })
        ));
        // A 401 without a recognisable body is not proof of anything.
        assert!(matches!(
            classify_refresh(401, b"", None, NOW),
            Err(RefreshError::Transient { .. })
        ));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn probes() {
        let dead = br#"{"error":"invalid_token","error_description":"The access token is invalid","state":"unauthorized"}"#;
        assert!(matches!(
            classify_probe(ProbeKind::TokenInfo, 401, dead, None),
            ProbeOutcome::Dead(_)
        ));
        assert_eq!(
            classify_probe(ProbeKind::TokenInfo, 200, br#"{"expires_in":null}"#, None),
            ProbeOutcome::Active
        );
        assert!(matches!(
            classify_probe(ProbeKind::TokenInfo, 503, b"", None),
            ProbeOutcome::Transient { .. }
        ));
        assert!(matches!(
            classify_probe(ProbeKind::TokenInfo, 200, b"<html>", None),
            ProbeOutcome::Transient { .. }
        ));
        assert!(matches!(
            classify_probe(ProbeKind::Introspect, 200, br#"{"active":false}"#, None),
            ProbeOutcome::Dead(_)
        ));
        assert_eq!(
            classify_probe(
                ProbeKind::Introspect,
                200,
                br#"{"active":true,"exp":0}"#,
                None
            ),
            ProbeOutcome::Active
        );
    }
}
