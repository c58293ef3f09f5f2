//! What the mock can answer instead of doing its job, or on top of it.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::books::random_token;
use crate::oauth::invalid_token;

/// A fault the mock can answer with instead of doing its job. All but `Delay` and `Odd200`
/// answer without touching the server's records (see [`Fault::does_the_work`]).
#[derive(Debug, Clone)]
pub enum Fault {
    /// This status with a small body, and `Retry-After` when given (seconds or an HTTP date).
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// Wait, then answer normally (a slow but working server). The wait and the work happen even
    /// if the client hangs up meanwhile, as on a real server that has received the request.
    Delay(Duration),
    /// Wait, then drop the connection without doing anything.
    Hang(Duration),
    /// Close the connection mid-response.
    Drop,
    /// `200` with an HTML body.
    Html,
    /// `200` with JSON cut in the middle.
    Truncated,
    /// `200` with JSON lacking `access_token`.
    NoAccessToken,
    /// `200` with a full-looking body whose `expires_in` is this.
    ExpiresIn(i64),
    /// `200` with a body of this many bytes.
    Huge(usize),
    /// A body sent one byte per interval.
    Trickle(Duration),
    /// `401 invalid_token`, as token/info answers for a dead token.
    InvalidToken,
    /// This status (301, 302, 303, 307 or 308) with `Location: <location>` and an empty body,
    /// without doing the work. A client that follows it sends its request elsewhere.
    Redirect { status: u16, location: String },
    /// Token endpoint: do the real exchange (rotation and books exactly as for a normal `200`),
    /// then send its body with this one alteration. Other endpoints answer normally.
    Odd200(OddShape),
}

impl Fault {
    /// Whether the server still does its real work (and so changes its records) under this
    /// fault; every other fault answers instead of the work.
    pub(crate) fn does_the_work(&self) -> bool {
        matches!(self, Fault::Delay(_) | Fault::Odd200(_))
    }
}

/// How [`Fault::Odd200`] alters a real token answer (whose exchange did happen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OddShape {
    /// No `expires_in` key.
    ExpiresInMissing,
    /// `"expires_in":"3600"`: the real TTL as a JSON string.
    ExpiresInString,
    /// `"expires_in":0`.
    ExpiresInZero,
    /// `"expires_in":-5`.
    ExpiresInNegative,
    /// `"expires_in":1000000000000`.
    ExpiresInHuge,
    /// No `access_token` key.
    NoAccessToken,
    /// `"access_token":""`.
    EmptyAccessToken,
    /// No `refresh_token` key although the server rotated: the new refresh token is lost to the
    /// client (and the presented one is spent as usual).
    NoRefreshToken,
}

impl OddShape {
    pub(crate) fn reshape(self, body: &mut serde_json::Map<String, serde_json::Value>) {
        use serde_json::Value;
        match self {
            OddShape::ExpiresInMissing => {
                body.remove("expires_in");
            }
            OddShape::ExpiresInString => {
                if let Some(Value::Number(n)) = body.get("expires_in") {
                    let s = n.to_string();
                    body.insert("expires_in".into(), Value::String(s));
                }
            }
            OddShape::ExpiresInZero => {
                body.insert("expires_in".into(), 0.into());
            }
            OddShape::ExpiresInNegative => {
                body.insert("expires_in".into(), (-5).into());
            }
            OddShape::ExpiresInHuge => {
                body.insert("expires_in".into(), 1_000_000_000_000i64.into());
            }
            OddShape::NoAccessToken => {
                body.remove("access_token");
            }
            OddShape::EmptyAccessToken => {
                body.insert("access_token".into(), "".into());
            }
            OddShape::NoRefreshToken => {
                body.remove("refresh_token");
            }
        }
    }
}

/// Which endpoint a fault plan applies to (and a request in [`crate::Request`] went to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Endpoint {
    /// `POST /oauth/token`
    Token,
    /// `GET /oauth/token/info`
    TokenInfo,
    /// `POST /oauth/introspect`
    Introspect,
    /// `POST /oauth/revoke`
    Revoke,
    /// `GET /api/me`
    Me,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct FaultPlan {
    pub(crate) queue: VecDeque<Fault>,
    /// Each request draws once; the first entry whose cumulative probability covers the draw wins.
    pub(crate) random: Vec<(f64, Fault)>,
    pub(crate) outage: bool,
}

/// The answer to a fault that does not do the work (`Delay` and `Odd200` are the caller's).
pub(crate) async fn answer_fault(f: Fault, now_s: i64) -> Response {
    let body_200 = |b: Body| {
        let mut r = Response::new(b);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        r
    };
    match f {
        Fault::Status { code, retry_after } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = (status, "<html><body>Service Unavailable</body></html>").into_response();
            if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, ra);
            }
            r
        }
        Fault::Redirect { status, location } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
            let mut r = Response::new(Body::empty());
            *r.status_mut() = status;
            if let Ok(l) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, l);
            }
            r
        }
        // The work is the caller's; answering these here would skip it.
        Fault::Delay(_) | Fault::Odd200(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "mock: fault answered out of place",
        )
            .into_response(),
        Fault::Hang(d) => {
            tokio::time::sleep(d).await;
            broken_body()
        }
        Fault::Drop => broken_body(),
        Fault::Html => body_200(Body::from(
            "<!DOCTYPE html><html><body>Maintenance</body></html>",
        )),
        Fault::Truncated => body_200(Body::from(r#"{"access_token":"abc","token_type":"Bea"#)),
        Fault::NoAccessToken => body_200(Body::from(
            r#"{"token_type":"Bearer","expires_in":3600,"refresh_token":"x","created_at":1}"#,
        )),
        Fault::ExpiresIn(e) => body_200(Body::from(format!(
            r#"{{"access_token":"{}","token_type":"Bearer","expires_in":{e},"refresh_token":"{}","scope":"read write","created_at":{}}}"#,
            random_token(),
            random_token(),
            now_s
        ))),
        Fault::Huge(n) => body_200(Body::from(vec![b' '; n])),
        Fault::InvalidToken => invalid_token(),
        Fault::Trickle(every) => {
            let stream = futures_util::stream::unfold(0u32, move |i| async move {
                if i > 10_000 {
                    return None;
                }
                tokio::time::sleep(every).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b" ")), i + 1))
            });
            body_200(Body::from_stream(stream))
        }
    }
}

/// Faults after which no complete HTTP answer reaches the client.
pub(crate) fn leaves_no_answer(f: &Fault) -> bool {
    matches!(f, Fault::Hang(_) | Fault::Drop)
}

fn broken_body() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other(
            "connection dropped by fault injection",
        ))
    });
    Response::new(Body::from_stream(stream))
}
