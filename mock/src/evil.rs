//! A hostile other host: the target of a redirect that a careful client must not follow. It
//! accepts anything and answers like a generous token server, so a client that follows the
//! redirect gets an answer it could believe; it records what it was sent, so a test can see a
//! leak (the client secret, a refresh token) or, better, that nothing arrived.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use tokio_util::sync::CancellationToken;

use crate::config::MockClock;

/// One request as the hostile host saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Every header as (name, value), values read lossily as UTF-8.
    pub headers: Vec<(String, String)>,
    /// The body, read lossily as UTF-8.
    pub body: String,
}

/// A running hostile host on `127.0.0.1:0`. Dropping it stops the server.
pub struct EvilHost {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    stop: CancellationToken,
}

impl Drop for EvilHost {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Clone)]
struct EvilState {
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    clock: MockClock,
}

impl EvilHost {
    /// Start in the current tokio runtime. Every request, any method and path, gets `200` with a
    /// token-like, active-looking JSON body.
    pub async fn start() -> std::io::Result<EvilHost> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = EvilState {
            seen: seen.clone(),
            clock: MockClock::system(),
        };
        let app = Router::new().fallback(answer).with_state(state);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(EvilHost { addr, seen, stop })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything received so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.seen).clone()
    }

    pub fn count(&self) -> usize {
        lock(&self.seen).len()
    }
}

fn lock(m: &Mutex<Vec<SeenRequest>>) -> std::sync::MutexGuard<'_, Vec<SeenRequest>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn answer(State(state): State<EvilState>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let seen = SeenRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let n = {
        let mut seen_all = lock(&state.seen);
        seen_all.push(seen);
        seen_all.len()
    };
    let body = serde_json::json!({
        "access_token": format!("evil-access-{n}"),
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": format!("evil-refresh-{n}"),
        "created_at": state.clock.now_ms() / 1000,
        "active": true,
    });
    let mut r = Response::new(Body::from(body.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}
