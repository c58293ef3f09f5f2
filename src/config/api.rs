//! `[api]`: the local token API's listeners and who may use them.
//!
//! The Unix socket is the default way in: the filesystem (mode 0660, group `socket_group`) says
//! who may connect, and the peer's uid says what it may do. A TCP listener is optional, needs a
//! bearer token on every request, and is refused on a non-loopback address unless
//! `allow_remote = true` (TLS is left to a reverse proxy).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::Dur;

pub const DEFAULT_SOCKET: &str = "/run/tokend/api.sock";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawApi {
    socket: PathBuf,
    socket_group: Option<String>,
    listen: Option<String>,
    tokens_file: Option<PathBuf>,
    tokens_credential: Option<String>,
    allow_remote: bool,
    max_wait: Dur,
}

impl Default for RawApi {
    fn default() -> RawApi {
        RawApi {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: None,
            listen: None,
            tokens_file: None,
            tokens_credential: None,
            allow_remote: false,
            max_wait: Dur::from_secs(20),
        }
    }
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes {
    /// Metadata, health, metrics.
    pub read: bool,
    /// Fetch access tokens.
    pub token: bool,
    /// Write accounts.
    pub admin: bool,
}

impl Scopes {
    pub const ALL: Scopes = Scopes {
        read: true,
        token: true,
        admin: true,
    };
    pub const READ_TOKEN: Scopes = Scopes {
        read: true,
        token: true,
        admin: false,
    };

    fn parse(list: &str) -> Result<Scopes, String> {
        let mut s = Scopes::default();
        for part in list.split(',') {
            match part.trim() {
                "read" => s.read = true,
                "token" => s.token = true,
                "admin" => s.admin = true,
                other => {
                    return Err(format!(
                        "unknown scope {other:?}: use read, token and admin, comma-separated"
                    ));
                }
            }
        }
        Ok(s)
    }
}

/// One bearer token accepted on the TCP listener.
#[derive(Clone)]
pub struct ApiToken {
    pub name: String,
    pub scopes: Scopes,
    pub secret: SecretString,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `None`: no socket (`socket = ""`).
    pub socket: Option<PathBuf>,
    /// The socket's group (a name or a gid); `None`: the service's own group.
    pub socket_group: Option<String>,
    pub listen: Option<SocketAddr>,
    pub tokens: Vec<ApiToken>,
    /// How long a token request waits for a refresh it asked for before answering 503.
    pub max_wait: Dur,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            socket: Some(PathBuf::from(DEFAULT_SOCKET)),
            socket_group: None,
            listen: None,
            tokens: Vec::new(),
            max_wait: Dur::from_secs(20),
        }
    }
}

/// A problem with a key of `[api]`: the key and the message.
pub(super) type ApiProblem = (&'static str, String);

/// Check `[api]` and read its tokens (unless `resolve_secrets` is off). Warnings go to `warnings`.
pub(super) fn validate(
    raw: RawApi,
    resolve_secrets: bool,
    warnings: &mut Vec<String>,
) -> Result<ApiConfig, ApiProblem> {
    let listen = match &raw.listen {
        None => None,
        Some(s) if s.trim().is_empty() => None,
        Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
            (
                "listen",
                format!("{s:?} is not an address and port, e.g. \"127.0.0.1:8477\""),
            )
        })?),
    };
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() && !raw.allow_remote {
            return Err((
                "listen",
                format!(
                    "{addr} is not a loopback address: tokend serves plain HTTP, so a token would cross the network in cleartext; put a TLS reverse proxy in front and listen on loopback, or set allow_remote = true"
                ),
            ));
        }
        if raw.tokens_file.is_none() && raw.tokens_credential.is_none() {
            return Err((
                "listen",
                "a TCP listener needs bearer tokens: set tokens_file or tokens_credential".into(),
            ));
        }
        if !addr.ip().is_loopback() {
            warnings.push(format!(
                "api.listen = {addr}: plain HTTP on a non-loopback address (allow_remote = true); tokens cross the network in cleartext unless a TLS proxy is in front"
            ));
        }
    }
    if raw.tokens_file.is_some() && raw.tokens_credential.is_some() {
        return Err((
            "tokens_file",
            "give tokens_file or tokens_credential, not both".into(),
        ));
    }
    let tokens = if !resolve_secrets {
        Vec::new()
    } else if let Some(file) = &raw.tokens_file {
        let s = super::read_secret_file(file).map_err(|e| ("tokens_file", e))?;
        warn_loose(file, s.loose_mode, warnings);
        parse_tokens(file, &s.text).map_err(|e| ("tokens_file", e))?
    } else if let Some(name) = &raw.tokens_credential {
        let (file, s) = super::read_credential(name).map_err(|e| ("tokens_credential", e))?;
        warn_loose(&file, s.loose_mode, warnings);
        parse_tokens(&file, &s.text).map_err(|e| ("tokens_credential", e))?
    } else {
        Vec::new()
    };
    let socket = Some(raw.socket).filter(|p| !p.as_os_str().is_empty());
    if let Some(s) = &socket
        && !s.is_absolute()
    {
        return Err(("socket", format!("{} is not an absolute path", s.display())));
    }
    if raw.max_wait.get().is_zero() {
        return Err(("max_wait", "must be above zero".into()));
    }
    Ok(ApiConfig {
        socket,
        socket_group: raw.socket_group.filter(|g| !g.is_empty()),
        listen,
        tokens,
        max_wait: raw.max_wait,
    })
}

fn warn_loose(file: &Path, mode: Option<u32>, warnings: &mut Vec<String>) {
    if let Some(mode) = mode {
        warnings.push(format!(
            "{} (API tokens) is readable or writable by others (mode {mode:04o}): chmod 600 {}",
            file.display(),
            file.display()
        ));
    }
}

/// `NAME SCOPE[,SCOPE] SECRET` per line; `#` starts a comment; blank lines are skipped.
fn parse_tokens(file: &Path, text: &str) -> Result<Vec<ApiToken>, String> {
    let mut out: Vec<ApiToken> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |msg: String| format!("{}:{}: {msg}", file.display(), i + 1);
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, scopes, secret] = parts[..] else {
            return Err(at(format!(
                "expected `NAME SCOPE[,SCOPE] SECRET`, found {} fields",
                parts.len()
            )));
        };
        let scopes = Scopes::parse(scopes).map_err(at)?;
        if secret.len() < 16 {
            return Err(at(format!(
                "the secret of {name:?} is {} characters; use at least 16 random ones (e.g. `openssl rand -hex 32`)",
                secret.len()
            )));
        }
        if out.iter().any(|t| t.name == name) {
            return Err(at(format!("{name:?} is named twice")));
        }
        if out.iter().any(|t| t.secret.expose_secret() == secret) {
            return Err(at(format!("{name:?} reuses another token's secret")));
        }
        out.push(ApiToken {
            name: name.to_owned(),
            scopes,
            secret: SecretString::from(secret.to_owned()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_need_three_fields_known_scopes_and_long_secrets() {
        let f = Path::new("/etc/tokend/api-tokens");
        let ok = parse_tokens(
            f,
            "# who scopes secret\nbilling token,read 0123456789abcdef0123\n\nops admin fedcba9876543210fedc # the on-call\n",
        )
        .expect("valid");
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].scopes, Scopes::READ_TOKEN);
        assert!(ok[1].scopes.admin && !ok[1].scopes.token);
        assert!(!format!("{ok:?}").contains("0123456789abcdef"));
        for (text, needle) in [
            ("a read", "found 2 fields"),
            ("a write 0123456789abcdef", "unknown scope"),
            ("a read short", "at least 16"),
            (
                "a read 0123456789abcdef\na token 0123456789abcdeg",
                "named twice",
            ),
            (
                "a read 0123456789abcdef\nb token 0123456789abcdef",
                "reuses",
            ),
        ] {
            let e = parse_tokens(f, text).expect_err(text);
            assert!(
                e.contains(needle) && e.starts_with("/etc/tokend/api-tokens:"),
                "{e}"
            );
        }
    }
}
