//! The one clock: every part of tokend reads wall time here and sleeps through it.
//!
//! In production it is the system clock. In tests it is driven by tokio's clock, so under
//! `tokio::time::pause` unix time moves only when tokio's time does (auto-advance or
//! `tokio::time::advance`), and a test can age tokens by hours in microseconds.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix time, milliseconds.
pub type UnixMs = i64;

#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    System,
    /// `base` unix ms at tokio instant `start`, then moving with tokio's clock.
    Tokio {
        base: UnixMs,
        start: tokio::time::Instant,
        offset: Arc<std::sync::atomic::AtomicI64>,
    },
}

impl Clock {
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// A clock that follows tokio's time, starting at the current system time. Call it inside
    /// the runtime whose clock it should follow (tests: after `tokio::time::pause`).
    pub fn tokio() -> Clock {
        Clock(Source::Tokio {
            base: system_ms(),
            start: tokio::time::Instant::now(),
            offset: Arc::default(),
        })
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> UnixMs {
        match &self.0 {
            Source::System => system_ms(),
            Source::Tokio {
                base,
                start,
                offset,
            } => {
                let elapsed = tokio::time::Instant::now().duration_since(*start);
                base + elapsed.as_millis() as i64
                    + offset.load(std::sync::atomic::Ordering::Relaxed)
            }
        }
    }

    /// Unix time in whole seconds (what the database stores).
    pub fn now(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Move wall time without moving tokio's timers (tests only: a clock step, a suspend).
    /// Does nothing on the system clock.
    pub fn jump(&self, by: Duration) {
        if let Source::Tokio { offset, .. } = &self.0 {
            offset.fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Time from now until the start of unix second `t` (zero if past).
    pub fn until(&self, t: i64) -> Duration {
        let ms = t.saturating_mul(1000).saturating_sub(self.now_ms());
        Duration::from_millis(ms.max(0) as u64)
    }

    /// The first whole unix second at or after `delay` from now, so a wait the server asked
    /// for (`Retry-After`) is never cut short by rounding.
    pub fn after(&self, delay: Duration) -> i64 {
        let at = self.now_ms() + delay.as_millis() as i64;
        at.div_euclid(1000) + i64::from(at.rem_euclid(1000) > 0)
    }

    /// Sleep until the start of unix second `t`. Wakes early only if the wall clock is stepped;
    /// callers re-read the time when they wake.
    pub async fn sleep_until(&self, t: i64) {
        tokio::time::sleep(self.until(t)).await
    }
}

fn system_ms() -> UnixMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds as an RFC 3339 UTC string, for humans (logs, CLI, API).
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_tokio_time_only() {
        let c = Clock::tokio();
        let t0 = c.now_ms();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(c.now_ms() - t0, 3_600_000);
        c.jump(Duration::from_secs(5));
        assert_eq!(c.now_ms() - t0, 3_605_000);
        let before = c.now();
        c.sleep_until(before + 10).await;
        assert!(c.now() >= before + 10);
        assert_eq!(c.after(Duration::from_millis(1)), c.now() + 1);
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
