//! `tokend status`: the health file, summarised, as an exit code a probe can use.

use std::path::{Path, PathBuf};

use super::plural;
use crate::clock::{Clock, rfc3339};
use crate::health;

/// Liveness: the engine loop turned within this many seconds (plus a heartbeat).
const STALL: i64 = 30;

pub(super) fn main(path: &Path, json: bool, health_file: Option<PathBuf>, liveness: bool) -> i32 {
    let file = match health_file {
        Some(p) => p,
        None => super::places(path).health_file,
    };
    let h = match health::read(&file) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("tokend: {e}");
            return if liveness { 1 } else { 3 };
        }
    };
    let now = Clock::system().now();
    let age = now - h.updated_at;
    let stale = h.stopped_at.is_none() && age > 3 * h.heartbeat_s.max(1) as i64;
    if liveness {
        // Alive: not stopped, the file is fresh, and the engine loop turned recently. Before its
        // first turn is on file, a daemon counts from its start: one that just started (the
        // file written at start has no turn yet) has not stalled.
        let progress = h.progress_at.map(|t| now - t);
        let alive = h.stopped_at.is_none()
            && !stale
            && progress.unwrap_or(now - h.started_at) <= STALL + h.heartbeat_s as i64;
        if json {
            println!(
                "{}",
                serde_json::json!({"alive": alive, "pid": h.pid, "updated_s_ago": age, "progress_s_ago": progress})
            );
        } else if alive {
            println!(
                "alive (pid {}, engine turned {}s ago)",
                h.pid,
                progress.unwrap_or(0)
            );
        } else if h.stopped_at.is_some() {
            println!("not alive: stopped");
        } else {
            println!(
                "not alive: health file updated {age}s ago, engine last turned {}",
                progress
                    .map(|p| format!("{p}s ago"))
                    .unwrap_or_else(|| "never".into())
            );
        }
        return i32::from(!alive);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
    } else {
        print!("{}", render(&h, age, stale));
    }
    if stale || h.stopped_at.is_some() {
        return 3;
    }
    match h.status.as_str() {
        "ok" => 0,
        "failing" => 2,
        _ => 1,
    }
}

/// The human summary `tokend status` prints.
pub fn render(h: &health::Health, age: i64, stale: bool) -> String {
    let mut s = String::new();
    let staleness = if stale {
        " -- STALE: the daemon is not updating it"
    } else {
        ""
    };
    s += &format!(
        "tokend {}: {} (updated {age}s ago{staleness}; pid {}, up since {})\n",
        h.version,
        h.status,
        h.pid,
        rfc3339(h.started_at)
    );
    if let Some(t) = h.stopped_at {
        s += &format!("stopped cleanly at {}\n", rfc3339(t));
    }
    s += &format!(
        "accounts: {}: {}\n",
        plural(h.accounts.total, "account", "accounts"),
        health::one_line(h)
    );
    let types: Vec<String> = h
        .accounts
        .by_token_type
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    if !types.is_empty() {
        s += &format!("by type: {}\n", types.join(", "));
    }
    match h.next_refresh_at {
        Some(t) => s += &format!("next refresh: {}\n", rfc3339(t)),
        None => s += "next refresh: none scheduled\n",
    }
    s += &format!(
        "since start: {}, {} failed; {}, {} failed\n",
        plural(h.refreshes.ok, "refresh", "refreshes"),
        h.refreshes.failed,
        plural(h.probes.ok, "probe", "probes"),
        h.probes.failed
    );
    if let Some(t) = h.revocation.last_run_at {
        s += &format!("last revocation run: {}", rfc3339(t));
        if let Some(n) = h.revocation.last_run_probed {
            s += &format!(" ({})", plural(n, "token probed", "tokens probed"));
        }
        s += "\n";
    }
    if let Some(t) = h.revocation.next_run_at {
        s += &format!("next revocation run: {}\n", rfc3339(t));
    }
    for (name, p) in &h.profiles {
        if p.paused {
            s += &format!(
                "profile {name}: PAUSED since {}: {}\n",
                p.paused_since.map(rfc3339).unwrap_or_else(|| "?".into()),
                p.paused_reason.as_deref().unwrap_or("")
            );
        }
        if p.circuit_open {
            s += &format!("profile {name}: most requests fail; probing with one at a time\n");
        }
    }
    if !h.config.last_reload_ok {
        s += &format!(
            "config: last reload FAILED: {}\n",
            h.config.last_reload_error.as_deref().unwrap_or("")
        );
    }
    if !h.store.writable {
        s += &format!(
            "store: NOT WRITABLE: {}\n",
            h.store.error.as_deref().unwrap_or("")
        );
    }
    if !h.journaled.is_empty() {
        s += &format!(
            "rotated pairs waiting in the recovery journal: {}\n",
            h.journaled.join(", ")
        );
    }
    if h.lapsed.count > 0 {
        s += &format!(
            "LAPSED (access token expired, no refresh stored): {} ({})\n",
            h.lapsed.count,
            h.lapsed.accounts.join(", ")
        );
    }
    if let Some(f) = &h.oldest_failure {
        s += &format!("failing longest: {} since {}\n", f.id, rfc3339(f.since));
    }
    for (kind, e) in &h.last_errors {
        s += &format!("last {kind} error ({}): {}\n", rfc3339(e.at), e.message);
    }
    for (name, n) in &h.notifications {
        if n.backlog > 0 || n.dead_letters > 0 {
            s += &format!(
                "notifications to {name}: {} waiting, {} given up{}\n",
                n.backlog,
                n.dead_letters,
                n.last_error
                    .as_deref()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    if !h.attention.is_empty() {
        s += "needs attention:\n";
        for a in &h.attention {
            s += &format!("  {:<24} {}\n", a.id, a.state);
        }
    }
    if h.at_risk.count > 0 {
        s += &format!(
            "refresh token near end of life: {} ({})\n",
            h.at_risk.count,
            h.at_risk.accounts.join(", ")
        );
    }
    s
}
