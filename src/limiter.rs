//! Adaptive concurrency per profile: how many token requests may be in flight to a profile's
//! server, following its measured latency (additive increase while latency stays near the
//! least seen, multiplicative decrease when it grows or the server sheds load), as Envoy's
//! adaptive concurrency filter and Netflix's concurrency-limits do.
//!
//! Why: a request the server has received is processed even if tokend dies, and under strict
//! rotation a grant whose answer never arrives is lost. Against a server that serves one request
//! at a time, a fixed 32 in flight means 31 queued there, each a grant exposed to a crash; the
//! limit keeps the queue at the server to a couple of requests while keeping its throughput.

use std::sync::Mutex;
use std::time::Duration;

/// Where a profile's limit starts: low, so a slow server is not flooded before it is measured.
const INITIAL: f64 = 4.0;
/// Latency up to `TOLERANCE` × the least seen (plus `SLACK`) counts as "not queueing".
const TOLERANCE: f64 = 2.0;
const SLACK: Duration = Duration::from_millis(2);
/// The least latency is forgotten after this many samples, so a server that got slower
/// permanently is measured afresh.
const MIN_WINDOW: u32 = 2000;
/// Decrease factor on overload.
const BACKOFF: f64 = 0.75;

#[derive(Debug, Clone)]
struct Limit {
    limit: f64,
    in_flight: usize,
    min_rtt: Option<Duration>,
    /// The least latency in the current window, which becomes `min_rtt` when it ends.
    window_min: Option<Duration>,
    samples: u32,
    /// Still doubling (until the first sign of queueing).
    slow_start: bool,
    /// Samples to ignore after a decrease (requests sent before it).
    cooldown: usize,
}

impl Limit {
    fn new(ceiling: usize) -> Limit {
        Limit {
            limit: INITIAL.min(ceiling as f64).max(1.0),
            in_flight: 0,
            min_rtt: None,
            window_min: None,
            samples: 0,
            slow_start: true,
            cooldown: 0,
        }
    }

    fn decrease(&mut self) {
        self.limit = (self.limit * BACKOFF).max(1.0);
        self.slow_start = false;
        self.cooldown = self.in_flight;
    }
}

/// What a finished request says about the server's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// An answer (success or a definite refusal): its latency is a sample.
    Answered,
    /// 429, 503, a timeout: the server is overloaded or down.
    Overloaded,
    /// Says nothing about load (a connection refused, a bad response).
    Nothing,
}

#[derive(Debug, Default)]
pub struct Limits {
    by_profile: Mutex<crate::FastMap<String, Limit>>,
}

impl Limits {
    fn lock(&self) -> std::sync::MutexGuard<'_, crate::FastMap<String, Limit>> {
        self.by_profile.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many more requests may go to `profile` now (`ceiling`: `max_concurrent_refreshes`).
    pub fn free(&self, profile: &str, ceiling: usize) -> usize {
        let mut m = self.lock();
        let l = m
            .entry(profile.to_owned())
            .or_insert_with(|| Limit::new(ceiling));
        l.limit = l.limit.min(ceiling as f64).max(1.0);
        (l.limit.floor() as usize).saturating_sub(l.in_flight)
    }

    /// How many accounts to claim for `profile` now, when `queued` claimed ones already wait
    /// for a slot: enough to fill its limit and as many again waiting, once a quarter of the
    /// limit can be claimed (or nothing is in flight or waiting). Claims then come in batches,
    /// one transaction for many rows, and a finished request is followed at once by a waiting
    /// one instead of by a round trip to the store.
    pub fn claimable(&self, profile: &str, ceiling: usize, queued: usize) -> usize {
        let mut m = self.lock();
        let l = m
            .entry(profile.to_owned())
            .or_insert_with(|| Limit::new(ceiling));
        l.limit = l.limit.min(ceiling as f64).max(1.0);
        let limit = l.limit.floor() as usize;
        let held = l.in_flight + queued;
        let want = (2 * limit).saturating_sub(held);
        if held == 0 || want >= (limit / 4).max(1) {
            want
        } else {
            0
        }
    }

    /// A request to `profile` goes out.
    pub fn started(&self, profile: &str, ceiling: usize) {
        let mut m = self.lock();
        m.entry(profile.to_owned())
            .or_insert_with(|| Limit::new(ceiling))
            .in_flight += 1;
    }

    /// A request to `profile` came back after `rtt`.
    pub fn finished(&self, profile: &str, rtt: Duration, signal: Signal, ceiling: usize) {
        let mut m = self.lock();
        let Some(l) = m.get_mut(profile) else {
            return;
        };
        let in_flight_then = l.in_flight;
        l.in_flight = l.in_flight.saturating_sub(1);
        if l.cooldown > 0 {
            l.cooldown -= 1;
            if signal != Signal::Overloaded {
                return;
            }
        }
        match signal {
            Signal::Nothing => {}
            Signal::Overloaded => l.decrease(),
            Signal::Answered => {
                l.samples += 1;
                l.window_min = Some(l.window_min.map_or(rtt, |m| m.min(rtt)));
                let min = *l.min_rtt.get_or_insert(rtt);
                if rtt < min {
                    l.min_rtt = Some(rtt);
                }
                if l.samples >= MIN_WINDOW {
                    l.min_rtt = l.window_min.take();
                    l.samples = 0;
                }
                let min = l.min_rtt.unwrap_or(rtt);
                let queueing =
                    rtt.as_secs_f64() > min.as_secs_f64() * TOLERANCE + SLACK.as_secs_f64();
                if queueing {
                    l.decrease();
                } else if in_flight_then as f64 >= l.limit.floor() * 0.5 {
                    // Only grow a limit that is being used.
                    l.limit += if l.slow_start { 1.0 } else { 1.0 / l.limit };
                }
                l.limit = l.limit.min(ceiling as f64).max(1.0);
            }
        }
    }

    /// `(profile, limit, in flight)`, for health and metrics.
    pub fn snapshot(&self) -> Vec<(String, f64, usize)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, l)| (k.clone(), l.limit, l.in_flight))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn in_flight(&self) -> usize {
        self.lock().values().map(|l| l.in_flight).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive the limiter against a model server that serves one request at a time in `service`,
    /// for `n` requests; returns the largest number in flight (queued at the server) over the
    /// whole run and after the first 100 answers, and the time taken.
    fn against_serial_server(service: Duration, n: usize, ceiling: usize) -> (usize, usize, f64) {
        let l = Limits::default();
        let mut clock = Duration::ZERO;
        // (finish time, start time)
        let mut out: Vec<(Duration, Duration)> = Vec::new();
        let mut server_free_at = Duration::ZERO;
        let mut sent = 0;
        let mut queued = 0;
        let mut most = 0;
        let mut settled = 0;
        let mut done = 0;
        while done < n {
            // As the engine does: claim ahead in batches, send while a slot is free.
            let claim = l.claimable("p", ceiling, queued);
            queued += claim.min(n - sent - queued);
            while queued > 0 && l.free("p", ceiling) > 0 {
                queued -= 1;
                l.started("p", ceiling);
                let start = clock;
                let finish = server_free_at.max(start) + service;
                server_free_at = finish;
                out.push((finish, start));
                sent += 1;
            }
            most = most.max(out.len());
            if done >= 100 {
                settled = settled.max(out.len());
            }
            out.sort();
            let (finish, start) = out.remove(0);
            clock = finish;
            l.finished("p", finish - start, Signal::Answered, ceiling);
            done += 1;
        }
        (most, settled, clock.as_secs_f64())
    }

    #[test]
    fn against_a_one_at_a_time_server_the_queue_stays_short_and_throughput_full() {
        for ms in [5, 20, 100] {
            let service = Duration::from_millis(ms);
            let (most, settled, took) = against_serial_server(service, 2000, 32);
            // A fixed limit of 32 would keep 31 queued there.
            assert!(most <= 6, "{ms} ms: queued up to {most} at a serial server");
            assert!(settled <= 4, "{ms} ms: queued up to {settled} once settled");
            // The best any concurrency can do is one request per service time.
            let best = 2000.0 * service.as_secs_f64();
            assert!(
                took <= best * 1.1,
                "{ms} ms: took {took:.2}s, best {best:.2}s"
            );
        }
    }

    #[test]
    fn against_a_parallel_server_the_limit_grows_to_the_ceiling() {
        let l = Limits::default();
        for _ in 0..500 {
            let free = l.free("p", 32);
            for _ in 0..free {
                l.started("p", 32);
            }
            let n = l.snapshot()[0].2;
            for _ in 0..n {
                l.finished("p", Duration::from_millis(30), Signal::Answered, 32);
            }
        }
        assert_eq!(l.free("p", 32), 32);
    }

    #[test]
    fn claims_run_a_limit_ahead_in_batches_of_a_quarter() {
        let l = Limits::default();
        // Grow the limit to 32 (the ceiling).
        for _ in 0..200 {
            let free = l.free("p", 32);
            for _ in 0..free {
                l.started("p", 32);
            }
            for _ in 0..l.snapshot()[0].2 {
                l.finished("p", Duration::from_millis(30), Signal::Answered, 32);
            }
        }
        assert_eq!(
            l.claimable("p", 32, 0),
            64,
            "nothing held: a limit in flight, a limit waiting"
        );
        for _ in 0..32 {
            l.started("p", 32);
        }
        assert_eq!(
            l.claimable("p", 32, 32),
            0,
            "all in flight, a limit waiting"
        );
        let finish = |n: usize| {
            for _ in 0..n {
                l.finished("p", Duration::from_millis(30), Signal::Answered, 32);
            }
        };
        finish(7);
        assert_eq!(
            l.claimable("p", 32, 32),
            0,
            "7 short: wait for a batch of 8"
        );
        finish(1);
        assert_eq!(l.claimable("p", 32, 32), 8);
        assert_eq!(l.claimable("p", 32, 0), 40);
    }

    #[test]
    fn overload_halves_towards_one() {
        let l = Limits::default();
        assert_eq!(l.free("p", 32), 4);
        for _ in 0..10 {
            l.started("p", 32);
            l.finished("p", Duration::from_secs(1), Signal::Overloaded, 32);
        }
        assert_eq!(l.free("p", 32), 1);
    }
}
