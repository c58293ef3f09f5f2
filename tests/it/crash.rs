//! kill -9 at random moments, many times, in both rotation modes: the database stays sound,
//! no pair the provider answered is silently lost, and every cut chain is reported.

use std::time::Duration;

use rusqlite::Connection;
use tokend_mock::{Endpoint, Fault, MockConfig, Rotation};

use crate::helpers::{Env, eventually};

const ACCOUNTS: usize = 200;
const KILLS: usize = 30;

async fn crash_loop(rotation: Rotation) {
    let env = Env::new(
        MockConfig {
            rotation,
            access_ttl: Duration::from_secs(6),
            ..MockConfig::default()
        },
        "refresh_lead = \"3s\"\nrefresh_jitter = \"1s\"\nlease = \"3s\"\nhttp_timeout = \"2s\"\nshutdown_timeout = \"5s\"\nmax_concurrent_refreshes = 16\nlog_level = \"warn\"",
    )
    .await;
    let ids: Vec<String> = (0..ACCOUNTS).map(|i| format!("u{i:03}")).collect();
    for id in &ids {
        env.add_user(id, Duration::from_millis(fastrand::u64(0..5000)));
    }
    // Slightly slow answers keep refreshes in flight when the kill comes.
    env.mock.add_random_fault(
        Endpoint::Token,
        0.5,
        Fault::Delay(Duration::from_millis(80)),
    );
    let mut in_flight_kills = 0;
    // Per account, how many kills left a refresh of it in flight (sent, not committed: the row
    // still records the attempt). Only those can be presented again or lost.
    let mut exposed: std::collections::HashMap<String, u64> = Default::default();
    for k in 0..KILLS {
        let mut bin = env.spawn_binary(&[]);
        // A random moment in the process's life (it is killed, not waited on).
        let lifetime = Duration::from_millis(fastrand::u64(150..700));
        let born = std::time::Instant::now();
        while born.elapsed() < lifetime {
            if k % 2 == 0 && env.mock.in_flight() > 0 && born.elapsed() > lifetime / 2 {
                // Every other kill lands while requests are in flight, when there are any.
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = bin.child.kill(); // SIGKILL
        let _ = bin.child.wait();
        let left: Vec<String> = {
            let c = env.conn();
            let mut s = c
                .prepare("SELECT id FROM accounts WHERE attempt_id IS NOT NULL")
                .expect("prepare");
            s.query_map([], |r| r.get(0))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        if !left.is_empty() {
            in_flight_kills += 1;
        }
        for id in left {
            *exposed.entry(id).or_default() += 1;
        }
    }
    let exposed_total: u64 = exposed.values().sum();
    // A last, clean run long enough for every account to refresh again.
    let before: Vec<u64> = ids.iter().map(|id| env.mock.account(id).grants).collect();
    let mut bin = env.spawn_binary(&[]);
    eventually(
        Duration::from_secs(40),
        "every account handled after the kills",
        || {
            ids.iter()
                .zip(&before)
                .all(|(id, n)| env.mock.account(id).grants > *n || env.state(id) != "active")
        },
    )
    .await;
    // Stop cleanly: in-flight refreshes finish and commit.
    bin.signal("TERM");
    assert_eq!(bin.wait(Duration::from_secs(15)).await, Some(0));

    let conn = Connection::open(&env.db).expect("open");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("check");
    assert_eq!(check, "ok");
    let t = env.mock.totals();
    let mut cut = Vec::new();
    for id in &ids {
        let state = env.state(id);
        let (_, refresh, _) = env.tokens(id);
        let live = refresh
            .as_deref()
            .is_some_and(|r| env.mock.refresh_token_live(r));
        match (state.as_str(), live) {
            ("active", true) => {}
            ("needs_reauth", _) if rotation == Rotation::Immediate => cut.push(id.clone()),
            (s, l) => panic!("{id}: state {s}, refresh token live at the mock: {l}"),
        }
    }
    eprintln!(
        "{rotation:?}: {KILLS} kills ({in_flight_kills} with refreshes in flight, {exposed_total} refreshes left in flight), {} grants, {} reuse attempts, {} chains cut and reported as needs_reauth",
        t.grants,
        t.reuse_attempts,
        cut.len()
    );
    assert!(
        in_flight_kills >= 5,
        "too few kills landed while refreshes were in flight"
    );
    // A refresh token is presented again only where a kill left its refresh in flight (the
    // server may have rotated without tokend hearing): at most once per such kill, per account.
    for id in &ids {
        let reuse = env.mock.account(id).reuse_attempts;
        let left = exposed.get(id).copied().unwrap_or(0);
        assert!(
            reuse <= left,
            "{id}: {reuse} reuse attempts but only {left} kills left a refresh of it in flight"
        );
    }
    if rotation == Rotation::Immediate {
        // Every chain reported cut is a real one (the mock refused a reuse of it), never a
        // spurious needs_reauth. (A reuse does not always cut: the retry after a kill may reach
        // the server before the dead process's own request, which then fails instead.)
        for id in &cut {
            let reuse = env.mock.account(id).reuse_attempts;
            assert!(reuse > 0, "{id}: reported cut, but the mock saw no reuse");
        }
        // Each is reported as a rotation lost in a crash, not as a grant the user revoked.
        let reported: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM account_events WHERE to_state = 'needs_reauth' AND reason LIKE '%rotation was lost%'",
                [],
                |r| r.get(0),
            )
            .expect("events");
        assert_eq!(reported as usize, cut.len());
        let lost: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM account_events WHERE kind = 'rotation_lost'",
                [],
                |r| r.get(0),
            )
            .expect("events");
        assert_eq!(
            lost as usize,
            cut.len(),
            "one rotation_lost event per cut chain"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_revoke_on_use() {
    crash_loop(Rotation::RevokeOnUse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_immediate() {
    crash_loop(Rotation::Immediate).await;
}
