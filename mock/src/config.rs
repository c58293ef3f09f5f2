//! The server's modes and where it reads time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Doorkeeper's two refresh-token rotation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The old pair stays valid until the new access token is first used (Doorkeeper's default).
    RevokeOnUse,
    /// The old pair dies the moment the new one is issued.
    Immediate,
}

/// Where the mock reads unix time (milliseconds). Tests hand it the daemon's driven clock so
/// expiries, lapses and `created_at` follow the same time as the daemon.
#[derive(Clone)]
pub struct MockClock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl MockClock {
    pub fn new(now_ms: impl Fn() -> i64 + Send + Sync + 'static) -> MockClock {
        MockClock(Arc::new(now_ms))
    }
    pub fn system() -> MockClock {
        MockClock::new(system_now_ms)
    }
    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for MockClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockClock")
    }
}

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub rotation: Rotation,
    /// Lifetime of seeded user access tokens; refreshed tokens copy their predecessor's (as
    /// Doorkeeper 5.5 does).
    pub access_ttl: Duration,
    /// Factorial's refresh tokens die after a week; stock Doorkeeper's never do (`None`).
    pub refresh_ttl: Option<Duration>,
    pub client_id: String,
    pub client_secret: String,
    /// Answer refreshes without a `refresh_token` (the old one stays valid), as some servers do.
    pub omit_refresh_token: bool,
    pub clock: MockClock,
    /// Serve token, introspect and revoke requests one at a time, in arrival order, each taking
    /// this long (like a single-threaded Rails server). `None`: all at once. A `Fault::Delay`
    /// adds to a request's service time; faults that replace the work (`Status`, `Redirect`,
    /// `Hang`, ...) are answered on arrival, outside the queue.
    pub serial: Option<Duration>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            rotation: Rotation::RevokeOnUse,
            access_ttl: Duration::from_secs(3600),
            refresh_ttl: None,
            client_id: "mock-client".into(),
            client_secret: "mock-secret".into(),
            omit_refresh_token: false,
            clock: MockClock::system(),
            serial: None,
        }
    }
}

fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
