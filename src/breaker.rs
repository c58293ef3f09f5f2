//! A per-profile circuit breaker: while most requests to a profile fail, stop sending them,
//! let one probe through per period, and close again on the first success.
//!
//! Per-account backoff alone bounds what one account costs; the breaker bounds what a profile
//! costs during an outage, whatever its number of accounts.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Outcomes remembered per profile.
const WINDOW: usize = 20;
/// Fewest outcomes before the breaker may open.
const MIN_SAMPLES: usize = 10;
/// Failure share that opens it.
const OPEN_RATIO: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The request is the one probe of an open breaker.
    Probe,
    /// Defer until this unix time; no request.
    Defer(i64),
}

#[derive(Debug, Default)]
struct Circuit {
    window: VecDeque<bool>,
    /// Set while open: no requests until then, except one probe after it.
    open_until: Option<i64>,
    open_for: Duration,
    probing: bool,
}

#[derive(Debug, Default)]
pub struct Breakers {
    circuits: Mutex<crate::FastMap<String, Circuit>>,
}

impl Breakers {
    pub fn admit(&self, profile: &str, now: i64) -> Admit {
        let Ok(mut m) = self.circuits.lock() else {
            return Admit::Yes;
        };
        let Some(c) = m.get_mut(profile) else {
            return Admit::Yes;
        };
        match c.open_until {
            None => Admit::Yes,
            Some(until) if now < until || c.probing => Admit::Defer(
                until.max(now) + 1 + fastrand::i64(0..=c.open_for.as_secs() as i64 / 4),
            ),
            Some(_) => {
                c.probing = true;
                Admit::Probe
            }
        }
    }

    /// As [`Self::admit`], without taking the probe: `Defer` while open.
    pub fn peek(&self, profile: &str, now: i64) -> Admit {
        let Ok(m) = self.circuits.lock() else {
            return Admit::Yes;
        };
        match m
            .get(profile)
            .and_then(|c| c.open_until.map(|u| (u, c.probing)))
        {
            None => Admit::Yes,
            Some((until, probing)) if now < until || probing => Admit::Defer(until.max(now) + 1),
            Some(_) => Admit::Probe,
        }
    }

    /// A probe admitted by [`Self::admit`] was not sent: let the next turn send it.
    pub fn cancel_probe(&self, profile: &str) {
        if let Ok(mut m) = self.circuits.lock()
            && let Some(c) = m.get_mut(profile)
        {
            c.probing = false;
        }
    }

    /// Record a request's outcome (`failed`: transient failure). Returns `Some(true)` when the
    /// breaker closed (the profile recovered), `Some(false)` when it opened.
    pub fn record(
        &self,
        profile: &str,
        failed: bool,
        now: i64,
        initial: Duration,
        max: Duration,
    ) -> Option<bool> {
        let mut m = self.circuits.lock().ok()?;
        let c = m.entry(profile.to_owned()).or_default();
        if c.window.len() == WINDOW {
            c.window.pop_front();
        }
        c.window.push_back(failed);
        if !failed {
            if c.open_until.is_some() {
                *c = Circuit::default();
                return Some(true);
            }
            return None;
        }
        if c.probing {
            // The probe failed: stay open, twice as long.
            c.probing = false;
            c.open_for = (c.open_for * 2).min(max);
            c.open_until = Some(now + c.open_for.as_secs() as i64);
            return None;
        }
        let failures = c.window.iter().filter(|f| **f).count();
        if c.open_until.is_none()
            && c.window.len() >= MIN_SAMPLES
            && failures as f64 >= OPEN_RATIO * c.window.len() as f64
        {
            c.open_for = initial.min(max);
            c.open_until = Some(now + c.open_for.as_secs() as i64);
            return Some(false);
        }
        None
    }

    /// Profiles whose breaker is open now.
    pub fn open(&self) -> Vec<String> {
        self.circuits
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, c)| c.open_until.is_some())
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_mostly_failures_probes_once_and_closes_on_success() {
        let b = Breakers::default();
        let (i, m) = (Duration::from_secs(10), Duration::from_secs(60));
        for n in 0..9 {
            assert_eq!(b.record("p", true, 100, i, m), None, "opened after {n}");
        }
        assert_eq!(b.record("p", true, 100, i, m), Some(false));
        assert!(matches!(b.admit("p", 105), Admit::Defer(t) if t > 110));
        assert_eq!(b.admit("p", 110), Admit::Probe);
        assert!(
            matches!(b.admit("p", 110), Admit::Defer(_)),
            "a second probe while one is out"
        );
        // The probe fails: open twice as long.
        assert_eq!(b.record("p", true, 110, i, m), None);
        assert!(matches!(b.admit("p", 125), Admit::Defer(_)));
        assert_eq!(b.admit("p", 130), Admit::Probe);
        assert_eq!(b.record("p", false, 130, i, m), Some(true));
        assert_eq!(b.admit("p", 130), Admit::Yes);
        assert_eq!(b.admit("other", 0), Admit::Yes);
    }

    #[test]
    fn occasional_failures_do_not_open() {
        let b = Breakers::default();
        let (i, m) = (Duration::from_secs(10), Duration::from_secs(60));
        for n in 0..100 {
            assert_eq!(b.record("p", n % 3 == 0, 100, i, m), None);
        }
        assert_eq!(b.admit("p", 100), Admit::Yes);
    }
}
