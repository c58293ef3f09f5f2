//! A client of the local API over its Unix socket, for the command line: when the daemon runs,
//! `tokend token` and the account commands ask it, so they work for a member of `socket_group`
//! and go through the daemon's leases.

use std::path::Path;

use reqwest::Method;

/// An answer: status and JSON body (`Null` when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Answer {
    /// The error message an API error carries, for the command line.
    pub fn message(&self) -> String {
        let b = &self.body;
        let mut m = b["message"]
            .as_str()
            .or_else(|| b["reason"].as_str())
            .unwrap_or("")
            .to_owned();
        if let Some(state) = b["state"].as_str() {
            m = format!(
                "state {state}{}",
                if m.is_empty() {
                    String::new()
                } else {
                    format!(": {m}")
                }
            );
        }
        if let Some(field) = b["field"].as_str() {
            m = format!("{field}: {m}");
        }
        if m.is_empty() {
            m = format!("http {}", self.status);
        }
        m
    }
}

pub struct Client {
    http: reqwest::Client,
}

/// Why the client could not be used.
#[derive(Debug)]
pub enum Unreachable {
    /// No socket there, or nobody serving it: the daemon is not running.
    NotRunning,
    /// The socket is there but this user may not connect (not in `socket_group`).
    Refused(std::io::Error),
}

impl Client {
    /// A client for the socket at `path`, if a daemon is serving it.
    pub fn connect(path: &Path) -> Result<Client, Unreachable> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Unreachable::Refused(e));
            }
            Err(_) => return Err(Unreachable::NotRunning),
        }
        crate::provider::install_crypto_provider();
        let http = reqwest::Client::builder()
            .unix_socket(path)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| Unreachable::NotRunning)?;
        Ok(Client { http })
    }

    /// Send a request; `body` as JSON when given.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Answer, String> {
        let mut req = self.http.request(method, format!("http://tokend{path}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("the daemon's API did not answer: {e}"))?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        Ok(Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        })
    }
}
