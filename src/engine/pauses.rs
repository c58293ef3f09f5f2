//! Profile pauses: a profile whose client is refused (`invalid_client`, a wrong URL) stops
//! sending requests; at its retry time one request goes out to find out whether it works again,
//! with a doubling backoff; a reload that changes the profile retries at once.
//!
//! Built like the circuit breaker (`breaker.rs`): a small state machine per profile, no I/O.
//! The store records the pause too, so it survives a restart.

use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone)]
struct Pause {
    reason: String,
    since: i64,
    fingerprint: String,
    retry_at: i64,
    backoff: Duration,
    /// A probe request may go out (granted at retry time, taken by the claim).
    probe_granted: bool,
    /// A probe request is out; its outcome decides.
    probing: bool,
}

/// What to do for a paused profile whose retry time came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub profile: String,
    /// The settings changed (a reload): the pause may simply be over.
    pub changed: bool,
}

#[derive(Debug, Default)]
pub struct Pauses {
    paused: Mutex<crate::FastMap<String, Pause>>,
}

impl Pauses {
    fn lock(&self) -> std::sync::MutexGuard<'_, crate::FastMap<String, Pause>> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take back a pause recorded by a previous run (`recorded`): retried at once if the
    /// profile's settings changed since (`current` fingerprint), else after `initial`.
    pub fn restore(
        &self,
        recorded: &crate::store::PausedProfile,
        current: &str,
        now: i64,
        initial: Duration,
    ) {
        let changed = recorded.fingerprint != current;
        self.lock().insert(
            recorded.name.clone(),
            Pause {
                reason: recorded.reason.clone(),
                since: recorded.since,
                fingerprint: recorded.fingerprint.clone(),
                retry_at: if changed {
                    now
                } else {
                    now + initial.as_secs() as i64
                },
                backoff: initial,
                probe_granted: false,
                probing: false,
            },
        );
    }

    /// Pause `profile` (or, if it was probing, stay paused twice as long). Returns whether it
    /// was newly paused.
    pub fn pause(
        &self,
        profile: &str,
        reason: &str,
        fingerprint: &str,
        now: i64,
        initial: Duration,
        max: Duration,
    ) -> bool {
        let mut m = self.lock();
        match m.get_mut(profile) {
            Some(p) => {
                p.reason = reason.to_owned();
                p.fingerprint = fingerprint.to_owned();
                if p.probing {
                    p.probing = false;
                    p.backoff = (p.backoff * 2).min(max.max(initial));
                    p.retry_at = now + p.backoff.as_secs() as i64;
                }
                false
            }
            None => {
                m.insert(
                    profile.to_owned(),
                    Pause {
                        reason: reason.to_owned(),
                        since: now,
                        fingerprint: fingerprint.to_owned(),
                        retry_at: now + initial.as_secs() as i64,
                        backoff: initial,
                        probe_granted: false,
                        probing: false,
                    },
                );
                true
            }
        }
    }

    /// Profiles whose retry time came, or whose settings changed (`fingerprint` gives the
    /// current ones; a profile gone from the config is forgotten). Each gets one probe.
    pub fn due(&self, now: i64, fingerprint: impl Fn(&str) -> Option<String>) -> Vec<Retry> {
        let mut m = self.lock();
        m.retain(|name, _| fingerprint(name).is_some());
        let mut out = Vec::new();
        for (name, p) in m.iter_mut() {
            let current = fingerprint(name).unwrap_or_default();
            let changed = current != p.fingerprint;
            if !changed && (p.retry_at > now || p.probe_granted || p.probing) {
                continue;
            }
            if changed {
                p.fingerprint = current;
                p.probing = false;
            }
            p.retry_at = now + p.backoff.as_secs() as i64;
            p.probe_granted = true;
            out.push(Retry {
                profile: name.clone(),
                changed,
            });
        }
        out
    }

    /// Whether `profile` is paused, and whether a probe request may go out now (taken).
    pub fn admission(&self, profile: &str) -> Option<bool> {
        let mut m = self.lock();
        let p = m.get_mut(profile)?;
        if p.probe_granted {
            p.probe_granted = false;
            p.probing = true;
            return Some(true);
        }
        Some(false)
    }

    /// A granted probe found nothing to send: grant it again at the next turn.
    pub fn unused_probe(&self, profile: &str) {
        if let Some(p) = self.lock().get_mut(profile)
            && p.probing
        {
            p.probing = false;
            p.probe_granted = true;
        }
    }

    /// The probe came back without a verdict (a transient failure): try again at the retry time.
    pub fn inconclusive(&self, profile: &str) {
        if let Some(p) = self.lock().get_mut(profile) {
            p.probing = false;
        }
    }

    /// The profile works: the pause is over. Returns whether it was paused.
    pub fn resume(&self, profile: &str) -> bool {
        self.lock().remove(profile).is_some()
    }

    pub fn is_paused(&self, profile: &str) -> bool {
        self.lock().contains_key(profile)
    }

    /// `(profile, reason, since)` of every pause.
    pub fn list(&self) -> Vec<(String, String, i64)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, p)| (k.clone(), p.reason.clone(), p.since))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(30);
    const M: Duration = Duration::from_secs(600);

    #[test]
    fn a_pause_grants_one_probe_per_retry_and_doubles_when_it_fails() {
        let p = Pauses::default();
        assert!(p.pause("x", "invalid_client", "f1", 100, I, M));
        assert_eq!(p.admission("x"), Some(false));
        assert!(p.due(110, |_| Some("f1".into())).is_empty());
        let due = p.due(130, |_| Some("f1".into()));
        assert_eq!(due.len(), 1);
        assert_eq!(p.admission("x"), Some(true), "one probe");
        assert_eq!(p.admission("x"), Some(false), "only one");
        // The probe is refused again: twice as long.
        assert!(!p.pause("x", "invalid_client", "f1", 130, I, M));
        assert!(p.due(180, |_| Some("f1".into())).is_empty());
        assert_eq!(p.due(190, |_| Some("f1".into())).len(), 1);
        assert!(p.resume("x"));
        assert_eq!(p.admission("x"), None);
    }

    #[test]
    fn changed_settings_retry_at_once_and_an_unused_probe_is_granted_again() {
        let p = Pauses::default();
        p.pause("x", "bad", "f1", 100, I, M);
        let due = p.due(101, |_| Some("f2".into()));
        assert_eq!(
            due,
            vec![Retry {
                profile: "x".into(),
                changed: true
            }]
        );
        assert_eq!(p.admission("x"), Some(true));
        p.unused_probe("x");
        assert_eq!(p.admission("x"), Some(true));
        // A profile that left the config is forgotten.
        assert!(p.due(500, |_| None).is_empty());
        assert!(!p.is_paused("x"));
    }

    fn recorded(fingerprint: &str) -> crate::store::PausedProfile {
        crate::store::PausedProfile {
            name: "x".into(),
            reason: "bad".into(),
            since: 50,
            fingerprint: fingerprint.into(),
        }
    }

    #[test]
    fn a_restored_pause_with_other_settings_is_retried_at_once() {
        let p = Pauses::default();
        p.restore(&recorded("old"), "new", 100, I);
        assert_eq!(p.due(100, |_| Some("new".into())).len(), 1);
        let q = Pauses::default();
        q.restore(&recorded("same"), "same", 100, I);
        assert!(q.due(100, |_| Some("same".into())).is_empty());
        assert_eq!(q.list(), vec![("x".into(), "bad".into(), 50)]);
    }
}
