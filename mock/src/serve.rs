//! How a request that does real work is carried out: in a task of its own, so that it finishes
//! even if the client hangs up (hyper drops a handler whose connection closed; Doorkeeper does
//! not stop a request it has received), and, when the server is serial, one at a time in
//! arrival order, like a single-threaded Rails server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use crate::books::lock;
use crate::provider::AppState;

/// The one-at-a-time queue (`MockConfig::serial`). Each request takes its place on arrival
/// and waits for the one before it: a chain of oneshot channels, so the order is the arrival
/// order whatever order the tasks happen to be polled in.
pub(crate) struct Serial {
    service: Option<Duration>,
    /// Resolves (or is dropped) when the last request to join is done.
    last: Mutex<Option<oneshot::Receiver<()>>>,
    queued: AtomicUsize,
}

/// A place in the queue; leaving it (drop, including on panic) lets the next request in.
struct Place {
    before: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
    service: Duration,
    serial: Arc<Serial>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.serial.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Serial {
    pub(crate) fn new(service: Option<Duration>) -> Serial {
        Serial {
            service,
            last: Mutex::new(None),
            queued: AtomicUsize::new(0),
        }
    }

    /// Requests waiting or in service now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Takes the next place, or `None` when the server is not serial.
    fn join(self: &Arc<Serial>, state: &AppState) -> Option<Place> {
        let service = self.service?;
        let (done, next) = oneshot::channel();
        let before = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(next);
        let n = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut g = lock(&state.inner);
        g.totals.max_queued = g.totals.max_queued.max(n);
        Some(Place {
            before,
            _done: done,
            service,
            serial: self.clone(),
        })
    }
}

impl Place {
    /// Waits for the requests ahead, then spends the service time.
    async fn serve(&mut self) {
        if let Some(before) = self.before.take() {
            // An error only means the one ahead is gone: either way it is done.
            let _ = before.await;
        }
        tokio::time::sleep(self.service).await;
    }
}

/// Does `work` after `delay` (and, if `queued` and the server is serial, after its turn and
/// service time) in a task that outlives the handler, and answers with its response.
pub(crate) async fn carry_out<W>(
    state: &AppState,
    queued: bool,
    delay: Option<Duration>,
    work: W,
) -> Response
where
    W: FnOnce() -> Response + Send + 'static,
{
    // The place is taken here, on arrival, not when the task first runs.
    let place = if queued {
        state.serial.join(state)
    } else {
        None
    };
    let task = tokio::spawn(async move {
        let mut place = place;
        if let Some(p) = place.as_mut() {
            p.serve().await;
        }
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let r = work();
        drop(place);
        r
    });
    task.await.unwrap_or_else(|_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "<html><body>Internal Server Error</body></html>",
        )
            .into_response()
    })
}
