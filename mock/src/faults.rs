//! What the mock can answer instead of doing its job.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::books::random_token;
use crate::oauth::invalid_token;

/// A fault the mock can answer with instead of doing its job.
#[derive(Debug, Clone)]
pub enum Fault {
    /// This status with a small body, and `Retry-After` when given (seconds or an HTTP date).
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// Wait, then answer normally (a slow but working server).
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
}

/// Which endpoint a fault plan applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Token,
    TokenInfo,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct FaultPlan {
    pub(crate) queue: VecDeque<Fault>,
    /// Each request draws once; the first entry whose cumulative probability covers the draw wins.
    pub(crate) random: Vec<(f64, Fault)>,
    pub(crate) outage: bool,
}

/// Returns the faulty response, or `None` to answer normally after a delay.
pub(crate) async fn apply_fault(f: Fault, now_s: i64) -> Option<Response> {
    let body_200 = |b: Body| {
        let mut r = Response::new(b);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        r
    };
    Some(match f {
        Fault::Status { code, retry_after } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = (status, "<html><body>Service Unavailable</body></html>").into_response();
            if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, ra);
            }
            r
        }
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            return None;
        }
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
    })
}

fn broken_body() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::other(
            "connection dropped by fault injection",
        ))
    });
    Response::new(Body::from_stream(stream))
}
