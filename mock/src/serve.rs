//! How a request that does real work is carried out: in a task of its own, so that it finishes
//! even if the client hangs up (hyper drops a handler whose connection closed; Doorkeeper does
//! not stop a request it has received).

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Does `work` after `delay` in a task that outlives the handler, and answers with its response.
pub(crate) async fn carry_out<W>(delay: Option<Duration>, work: W) -> Response
where
    W: FnOnce() -> Response + Send + 'static,
{
    let task = tokio::spawn(async move {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        work()
    });
    task.await.unwrap_or_else(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "<html><body>Internal Server Error</body></html>",
        )
            .into_response()
    })
}
