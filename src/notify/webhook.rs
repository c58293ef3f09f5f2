//! `kind = "webhook"`: POST the JSON body, signed as Stripe signs its webhooks:
//! `Tokend-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, with
//! `Tokend-Event-Id` (what receivers dedupe on) and `Tokend-Event-Type`. Redirects are never
//! followed. `t` is the time of each attempt, so a receiver rejects a captured request replayed
//! later; the id stays the same on every attempt.
//!
//! Messages name the receiver's host only: webhook URLs often carry a secret in their path.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use super::policy::{Verdict, http_verdict};
use crate::config::host_of;

#[derive(Clone, Debug)]
pub struct Webhook {
    http: reqwest::Client,
}

/// The `Tokend-Signature` value for `body` sent at unix time `t`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let mac = ctx.sign();
    let hex: String = mac.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

impl Webhook {
    pub fn new() -> anyhow::Result<Webhook> {
        crate::provider::install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Webhook { http })
    }

    /// One attempt. `t`: unix seconds now (signed with the body).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        url: &str,
        secret: &SecretString,
        id: &str,
        kind: &str,
        body: &str,
        t: i64,
        timeout: Duration,
        abort: &CancellationToken,
    ) -> Verdict {
        let request = self
            .http
            .post(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Tokend-Event-Id", id)
            .header("Tokend-Event-Type", kind)
            .header(
                "Tokend-Signature",
                signature(secret.expose_secret().as_bytes(), t, body.as_bytes()),
            )
            .body(body.to_owned());
        let sent = tokio::select! {
            r = request.send() => r,
            _ = abort.cancelled() => {
                return Verdict::Retry { error: "interrupted by shutdown".into(), after: None };
            }
        };
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| crate::provider::parse_retry_after(v, unix(t)));
                match http_verdict(status) {
                    Verdict::Retry { error, .. } if response.status().is_redirection() => {
                        Verdict::Retry {
                            error: format!(
                                "{error}: a redirect, not followed (fix the sink's url)"
                            ),
                            after,
                        }
                    }
                    Verdict::Retry { error, .. } => Verdict::Retry { error, after },
                    v => v,
                }
            }
            Err(e) => Verdict::Retry {
                error: describe(&e, url, timeout),
                after: None,
            },
        }
    }
}

fn unix(secs: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

/// A transport failure, naming the host only (never the URL's path or query, nor reqwest's
/// message, which quotes the whole URL).
fn describe(e: &reqwest::Error, url: &str, timeout: Duration) -> String {
    let host = host_of(url);
    if e.is_timeout() {
        return format!(
            "no answer from {host} within {}",
            humantime::format_duration(timeout)
        );
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut io = None;
    while let Some(s) = source {
        if let Some(i) = s.downcast_ref::<std::io::Error>() {
            io = Some(i.kind());
        }
        source = s.source();
    }
    use std::io::ErrorKind as K;
    match io {
        Some(K::ConnectionRefused) => format!("connection refused ({host})"),
        Some(K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof) => {
            format!("connection closed by {host} before an answer")
        }
        Some(kind) => format!("cannot reach {host}: {kind}"),
        None if e.is_connect() => format!("cannot connect to {host}"),
        None => format!("request to {host} failed before an answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_t_dot_body() {
        // Computed independently with: printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature(b"secret", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }
}
