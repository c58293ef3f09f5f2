//! The local API: how integrations get a currently valid token, and how operators and
//! monitoring see and change accounts, health and metrics.
//!
//! Two listeners serve the same routes (axum): the Unix socket (`api.socket`, mode 0660, group
//! `socket_group`), where the filesystem says who may connect and the peer's uid (`SO_PEERCRED`)
//! what it may do — root and the service's own user get every scope, anyone else who can connect
//! gets `read` and `token`; and an optional TCP listener (`api.listen`) where every request needs
//! `Authorization: Bearer …` from `tokens_file`/`tokens_credential`. Plain HTTP: TLS is a reverse
//! proxy's job. The routes are in [`routes`], described in `api/openapi.yaml`.

pub mod client;
mod routes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::config::{ApiConfig, Scopes};
use crate::engine::Engine;
use crate::health::DaemonInfo;
use crate::shared::Shared;

/// Largest request body accepted (an account is well under a kilobyte).
const MAX_BODY: usize = 64 * 1024;

/// What the routes work with.
pub struct Api {
    pub shared: Arc<Shared>,
    pub engine: Arc<Engine>,
    pub info: Arc<DaemonInfo>,
    /// The uid tokend runs as: on the socket, it and root are administrators.
    service_uid: u32,
}

/// Who is asking, and what they may do.
#[derive(Debug, Clone)]
pub struct Caller {
    pub who: Who,
    pub scopes: Scopes,
}

/// Who a caller is, as audit lines name them: `uid 1000` on the socket, the bearer token's
/// name over TCP. (Cloned for every request's handler: no text is copied.)
#[derive(Debug, Clone)]
pub enum Who {
    Uid(u32),
    Token(Arc<str>),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Uid(uid) => write!(f, "uid {uid}"),
            Who::Token(name) => f.write_str(name),
        }
    }
}

/// The peer of a socket connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: Option<u32>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Peer {
        Peer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// The listeners, bound before the daemon says it is ready, so a socket that cannot be
/// created stops the start with a clear error.
pub struct Listeners {
    socket: Option<(UnixListener, PathBuf)>,
    tcp: Option<TcpListener>,
}

impl Listeners {
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Bind what `[api]` asks for.
pub async fn bind(config: &ApiConfig) -> anyhow::Result<Listeners> {
    let socket = match &config.socket {
        None => None,
        Some(path) => Some((
            bind_socket(path, config.socket_group.as_deref())?,
            path.clone(),
        )),
    };
    let tcp = match config.listen {
        None => None,
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("api.listen: cannot listen on {addr}: {e}"))?,
        ),
    };
    Ok(Listeners { socket, tcp })
}

fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let at = |what: &str, e: &dyn std::fmt::Display| {
        anyhow::anyhow!("api.socket: cannot {what} {}: {e}", path.display())
    };
    // A socket left by a previous run is replaced; a live one (another tokend) or anything
    // else at the path is not touched.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(at("use", &"something other than a socket is there"));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(at(
                "use",
                &"another process is serving it (is another tokend running? give each its own socket)",
            ));
        }
        std::fs::remove_file(path).map_err(|e| at("replace", &e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| at("create", &e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| at("set the mode of", &e))?;
    if let Some(group) = group {
        let gid = group_id(group).ok_or_else(|| {
            anyhow::anyhow!("api.socket_group: no group {group:?} (in /etc/group, or a number)")
        })?;
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| at(&format!("give group {group} to"), &e))?;
    }
    Ok(listener)
}

/// A group's id, by number or by name in `/etc/group`.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(n) = group.parse() {
        return Some(n);
    }
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == group).then(|| f.nth(1)?.parse().ok())?
        })
}

/// Serve until `stop` fires. Returns the tasks serving each listener.
pub fn serve(
    api: Arc<Api>,
    listeners: Listeners,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some((listener, path)) = listeners.socket {
        let app = routes::router()
            .layer(axum::middleware::from_fn_with_state(
                api.clone(),
                socket_auth,
            ))
            .layer(axum::middleware::from_fn_with_state(api.clone(), count))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(api.clone());
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the API socket stopped serving");
            }
            let _ = std::fs::remove_file(&path);
        }));
    }
    if let Some(listener) = listeners.tcp {
        let app = routes::router()
            .layer(axum::middleware::from_fn_with_state(
                api.clone(),
                bearer_auth,
            ))
            .layer(axum::middleware::from_fn_with_state(api.clone(), count))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(api.clone());
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the API's TCP listener stopped serving");
            }
        }));
    }
    tasks
}

impl Api {
    pub fn new(shared: Arc<Shared>, engine: Arc<Engine>, info: Arc<DaemonInfo>) -> Arc<Api> {
        Arc::new(Api {
            shared,
            engine,
            info,
            service_uid: rustix::process::getuid().as_raw(),
        })
    }
}

/// On the socket, the peer's uid decides: root and the service user administer; anyone else
/// who could connect (a member of `socket_group`) reads and fetches tokens.
async fn socket_auth(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(uid) = peer.uid else {
        return ApiError::Unauthorized("cannot tell who is connected".into()).into_response();
    };
    let scopes = if uid == 0 || uid == api.service_uid {
        Scopes::ALL
    } else {
        Scopes::READ_TOKEN
    };
    req.extensions_mut().insert(Caller {
        who: Who::Uid(uid),
        scopes,
    });
    next.run(req).await
}

/// Over TCP, every request carries a bearer token from the configured list.
async fn bearer_auth(State(api): State<Arc<Api>>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return ApiError::Unauthorized("missing Authorization: Bearer".into()).into_response();
    };
    let rt = api.shared.runtime();
    let found = rt
        .config
        .api
        .tokens
        .iter()
        .find(|t| same_secret(presented, &t.secret));
    let Some(token) = found else {
        return ApiError::Unauthorized("unknown bearer token".into()).into_response();
    };
    req.extensions_mut().insert(Caller {
        who: Who::Token(token.name.as_str().into()),
        scopes: token.scopes,
    });
    next.run(req).await
}

/// Compare a presented secret with a configured one in time that does not depend on where
/// they differ (digests first, so lengths do not show either).
fn same_secret(presented: &str, expected: &secrecy::SecretString) -> bool {
    use secrecy::ExposeSecret;
    let a = ring::digest::digest(&ring::digest::SHA256, presented.as_bytes());
    let b = ring::digest::digest(&ring::digest::SHA256, expected.expose_secret().as_bytes());
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Count every answer by route and status, for `tokend_api_requests_total`.
async fn count(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    api.shared
        .metrics
        .api_request(&route, response.status().as_u16());
    response
}

/// Every error the API answers, as JSON with a status code.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized(String),
    Forbidden(&'static str),
    NotFound(String),
    /// The account exists but cannot serve: its state and why.
    Conflict {
        state: String,
        reason: Option<String>,
    },
    /// The request is understood but a field is wrong.
    Invalid {
        field: String,
        message: String,
    },
    /// Not now: try again after this many seconds.
    Unavailable {
        retry_after: u64,
        reason: String,
    },
    /// The provider refused something tokend asked on the caller's behalf.
    Upstream(String),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::Unauthorized(m) => (
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "unauthorized", "message": m}),
            ),
            ApiError::Forbidden(scope) => (
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "forbidden", "message": format!("this needs the {scope} scope")}),
            ),
            ApiError::NotFound(m) => (
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found", "message": m}),
            ),
            ApiError::Conflict { state, reason } => (
                StatusCode::CONFLICT,
                serde_json::json!({"error": "conflict", "state": state, "reason": reason}),
            ),
            ApiError::Invalid { field, message } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({"error": "invalid", "field": field, "message": message}),
            ),
            ApiError::Unavailable {
                retry_after,
                reason,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "unavailable", "message": reason, "retry_after": retry_after}),
            ),
            ApiError::Upstream(m) => (
                StatusCode::BAD_GATEWAY,
                serde_json::json!({"error": "upstream", "message": m}),
            ),
            ApiError::Internal(m) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": "internal", "message": m}),
            ),
        };
        let mut r = (status, axum::Json(body)).into_response();
        match &self {
            ApiError::Unauthorized(_) => {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tokend\""),
                );
            }
            ApiError::Unavailable { retry_after, .. } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        if e.is_transient() {
            ApiError::Unavailable {
                retry_after: 5,
                reason: e.to_string(),
            }
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}
