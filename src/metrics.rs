//! Prometheus metrics, with the official client (`prometheus-client`), served at `/metrics` in
//! the OpenMetrics text format (which Prometheus scrapes natively).
//!
//! Counters and histograms are updated where things happen; gauges that describe the store
//! (accounts by state, the least token headroom) are set just before each scrape.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn profile(p: &str) -> Labels {
    vec![("profile", p.to_owned())]
}

pub struct Metrics {
    registry: Mutex<Registry>,
    refreshes: Family<Labels, Counter>,
    refresh_duration: Family<Labels, Histogram>,
    accounts: Family<Labels, Gauge>,
    lapses: Family<Labels, Counter>,
    headroom: Family<Labels, Gauge>,
    probes: Family<Labels, Counter>,
    paused: Family<Labels, Gauge>,
    breaker_open: Family<Labels, Gauge>,
    in_flight: Gauge,
    concurrency_limit: Family<Labels, Gauge>,
    commit_duration: Histogram,
    api_requests: Family<Labels, Counter>,
    notifications: Family<Labels, Counter>,
    notify_backlog: Family<Labels, Gauge>,
    notify_dead: Family<Labels, Gauge>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            refreshes: Family::default(),
            refresh_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            accounts: Family::default(),
            lapses: Family::default(),
            headroom: Family::default(),
            probes: Family::default(),
            paused: Family::default(),
            breaker_open: Family::default(),
            in_flight: Gauge::default(),
            concurrency_limit: Family::default(),
            commit_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
            api_requests: Family::default(),
            notifications: Family::default(),
            notify_backlog: Family::default(),
            notify_dead: Family::default(),
        };
        r.register(
            "tokend_refreshes",
            "Token requests by profile and outcome (refreshed, invalid_grant, misconfigured, transient)",
            m.refreshes.clone(),
        );
        r.register(
            "tokend_refresh_duration_seconds",
            "Time from sending a token request to its answer",
            m.refresh_duration.clone(),
        );
        r.register(
            "tokend_accounts",
            "Accounts by profile and state",
            m.accounts.clone(),
        );
        r.register(
            "tokend_token_lapses",
            "Access tokens of kept-alive accounts that expired before their refresh was stored",
            m.lapses.clone(),
        );
        r.register(
            "tokend_min_token_headroom_seconds",
            "Least time left on any kept-alive user access token (negative: a lapse under way)",
            m.headroom.clone(),
        );
        r.register(
            "tokend_probes",
            "Revocation probes by profile and outcome",
            m.probes.clone(),
        );
        r.register(
            "tokend_profile_paused",
            "1 while a profile is paused for misconfiguration",
            m.paused.clone(),
        );
        r.register(
            "tokend_breaker_open",
            "1 while a profile's circuit breaker is open",
            m.breaker_open.clone(),
        );
        r.register(
            "tokend_refreshes_in_flight",
            "Token requests in flight",
            m.in_flight.clone(),
        );
        r.register(
            "tokend_concurrency_limit",
            "Adaptive limit of token requests in flight per profile",
            m.concurrency_limit.clone(),
        );
        r.register(
            "tokend_store_commit_duration_seconds",
            "Time to commit a group of outcomes to the store",
            m.commit_duration.clone(),
        );
        r.register(
            "tokend_api_requests",
            "Local API requests by route and status code",
            m.api_requests.clone(),
        );
        r.register(
            "tokend_notifications",
            "Notification deliveries by sink and result (delivered, rejected, retried, dead)",
            m.notifications.clone(),
        );
        r.register(
            "tokend_notification_backlog",
            "Notifications waiting for delivery, per sink",
            m.notify_backlog.clone(),
        );
        r.register(
            "tokend_notification_dead_letters",
            "Notifications given up on, per sink",
            m.notify_dead.clone(),
        );
        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);
        r.register("tokend_build_info", "The running tokend's version", build);
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }
}

/// The outcomes a refresh is counted under.
pub const REFRESH_OUTCOMES: [&str; 4] =
    ["refreshed", "invalid_grant", "misconfigured", "transient"];

impl Metrics {
    pub fn refresh(&self, profile: &str, outcome: &str, took: Duration) {
        self.refreshes
            .get_or_create(&vec![
                ("profile", profile.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
        self.refresh_duration
            .get_or_create(&self::profile(profile))
            .observe(took.as_secs_f64());
    }

    pub fn probe(&self, profile: &str, outcome: &str) {
        self.probes
            .get_or_create(&vec![
                ("profile", profile.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    pub fn lapse(&self, profile: &str, n: u64) {
        self.lapses.get_or_create(&self::profile(profile)).inc_by(n);
    }

    pub fn commit_duration(&self, took: Duration) {
        self.commit_duration.observe(took.as_secs_f64());
    }

    pub fn api_request(&self, route: &str, code: u16) {
        self.api_requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("code", code.to_string()),
            ])
            .inc();
    }

    pub fn notification(&self, sink: &str, result: &str) {
        self.notifications
            .get_or_create(&vec![
                ("sink", sink.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    pub fn notify_queue(&self, sink: &str, backlog: u64, dead: u64) {
        let l = vec![("sink", sink.to_owned())];
        self.notify_backlog.get_or_create(&l).set(backlog as i64);
        self.notify_dead.get_or_create(&l).set(dead as i64);
    }

    /// Set the gauges that describe the present, then encode everything.
    pub fn render(&self, now: Gauges) -> String {
        self.accounts.clear();
        for (p, state, n) in now.accounts {
            self.accounts
                .get_or_create(&vec![("profile", p), ("state", state.to_owned())])
                .set(n as i64);
        }
        self.headroom.clear();
        for (p, secs) in now.headroom {
            self.headroom.get_or_create(&profile(&p)).set(secs);
        }
        for (p, paused, open) in now.profiles {
            // Every profile's counters exist from the first scrape, at 0: `rate()` and alerts
            // on `increase()` then see a profile before its first refresh or lapse.
            for outcome in REFRESH_OUTCOMES {
                drop(self.refreshes.get_or_create(&vec![
                    ("profile", p.clone()),
                    ("outcome", outcome.to_owned()),
                ]));
            }
            drop(self.lapses.get_or_create(&profile(&p)));
            self.paused
                .get_or_create(&profile(&p))
                .set(i64::from(paused));
            self.breaker_open
                .get_or_create(&profile(&p))
                .set(i64::from(open));
        }
        for (p, limit) in now.limits {
            self.concurrency_limit
                .get_or_create(&profile(&p))
                .set(limit as i64);
        }
        self.in_flight.set(now.in_flight as i64);
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The present state, for the gauges.
#[derive(Debug, Default)]
pub struct Gauges {
    /// (profile, state, count)
    pub accounts: Vec<(String, &'static str, u64)>,
    /// (profile, least seconds left)
    pub headroom: Vec<(String, i64)>,
    /// (profile, paused, breaker open)
    pub profiles: Vec<(String, bool, bool)>,
    /// (profile, adaptive limit)
    pub limits: Vec<(String, f64)>,
    pub in_flight: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_families() {
        let m = Metrics::default();
        m.refresh("p", "refreshed", Duration::from_millis(20));
        m.lapse("p", 1);
        m.api_request("/v1/accounts/{id}/token", 200);
        let text = m.render(Gauges {
            accounts: vec![("p".into(), "active", 3)],
            headroom: vec![("p".into(), 120)],
            profiles: vec![("p".into(), false, true)],
            limits: vec![("p".into(), 4.0)],
            in_flight: 2,
        });
        for needle in [
            "tokend_refreshes_total{profile=\"p\",outcome=\"refreshed\"} 1",
            "tokend_refresh_duration_seconds_bucket",
            "tokend_accounts{profile=\"p\",state=\"active\"} 3",
            "tokend_token_lapses_total{profile=\"p\"} 1",
            "tokend_min_token_headroom_seconds{profile=\"p\"} 120",
            "tokend_breaker_open{profile=\"p\"} 1",
            "tokend_profile_paused{profile=\"p\"} 0",
            "tokend_refreshes_in_flight 2",
            "tokend_store_commit_duration_seconds_bucket",
            "tokend_api_requests_total{route=\"/v1/accounts/{id}/token\",code=\"200\"} 1",
            "tokend_build_info{version=",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
    }

    #[test]
    fn a_profile_s_counters_exist_at_zero_before_anything_happens() {
        let m = Metrics::default();
        let text = m.render(Gauges {
            profiles: vec![("quiet".into(), false, false)],
            ..Gauges::default()
        });
        for outcome in REFRESH_OUTCOMES {
            let needle =
                format!("tokend_refreshes_total{{profile=\"quiet\",outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&needle), "{needle} not in:\n{text}");
        }
        assert!(
            text.contains("tokend_token_lapses_total{profile=\"quiet\"} 0"),
            "{text}"
        );
    }
}
