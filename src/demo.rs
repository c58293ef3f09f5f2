//! `tokend demo`: the real engine against the built-in mock provider, with tokens that live 30s,
//! in a temporary directory. Ends with a one-line summary from the mock's own books.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Config, LogFormat, LogLevel, TokenType};
use crate::daemon::{self, Control};
use crate::store::{NewAccount, Store};
use tokend_mock::{MockConfig, MockProvider, Rotation};

const TOKEN_TTL: Duration = Duration::from_secs(30);
const COMPANY_ACCOUNTS: usize = 4;

pub fn main(duration: Option<Duration>, accounts: usize) -> i32 {
    let _ = crate::telemetry::init(LogLevel::Info, LogFormat::Text);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokend demo: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(demo(duration, accounts)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tokend demo: {e:#}");
            1
        }
    }
}

async fn demo(duration: Option<Duration>, accounts: usize) -> anyhow::Result<i32> {
    let dir = tempfile::tempdir()?;
    let mock = MockProvider::start(MockConfig {
        rotation: Rotation::RevokeOnUse,
        access_ttl: TOKEN_TTL,
        ..MockConfig::default()
    })
    .await?;
    let secret = dir.path().join("client_secret");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)?;
        std::io::Write::write_all(&mut f, b"mock-secret")?;
    }
    let config_path = dir.path().join("tokend.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"[daemon]
database = "{db}"
health_file = "{health}"
refresh_lead = "10s"
refresh_jitter = "5s"
max_concurrent_refreshes = 8
retry_initial = "1s"
retry_max = "5s"
health_interval = "5s"
min_refresh_interval = "5s"
revocation_schedule = "0 * * * * *"

[[profile]]
name = "demo"
environment = "sandbox"
base_url = "{url}"
client_id = "mock-client"
client_secret_file = "{secret}"

[api]
socket = "{socket}"
"#,
            db = dir.path().join("tokend.db").display(),
            health = dir.path().join("health.json").display(),
            url = mock.url(),
            secret = secret.display(),
            socket = dir.path().join("api.sock").display(),
        ),
    )?;
    let config = Config::load(&config_path)?;

    // Accounts at every age, so refreshes are spread over the run and some are due at once.
    let (store, _) = Store::open(&config.daemon.database)?;
    let mut rows = Vec::new();
    for i in 0..accounts {
        let age = Duration::from_millis(fastrand::u64(0..TOKEN_TTL.as_millis() as u64 - 5000));
        let t = mock.issue_user(&format!("user-{i:03}"), age);
        rows.push(NewAccount {
            id: format!("user-{i:03}"),
            profile: None,
            token_type: TokenType::User,
            access_token: Some(t.access_token.into()),
            refresh_token: t.refresh_token.map(Into::into),
            expires_at: t.expires_at,
            scopes: Some("read write".into()),
        });
    }
    for i in 0..COMPANY_ACCOUNTS {
        let t = mock.issue_company(&format!("company-{i}"));
        rows.push(NewAccount {
            id: format!("company-{i}"),
            profile: None,
            token_type: TokenType::Company,
            access_token: Some(t.access_token.into()),
            refresh_token: None,
            expires_at: None,
            scopes: None,
        });
    }
    store.link(rows, false, Clock::system().now()).await?;
    drop(store);
    tracing::info!(accounts, companies = COMPANY_ACCOUNTS, dir = %dir.path().display(),
        "demo: mock provider at {}, tokens live {}s; Ctrl-C to stop", mock.url(), TOKEN_TTL.as_secs());
    eprintln!(
        "demo: from another terminal: tokend --config {} token user-000 --min-ttl 25s",
        config_path.display()
    );

    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    daemon::spawn_signal_handler(shutdown.clone(), reload_tx)?;
    if let Some(d) = duration {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.cancel();
        });
    }
    let started = std::time::Instant::now();
    daemon::run(
        config,
        Control {
            config_path,
            shutdown,
            reload: reload_rx,
            log: None,
            clock: Clock::system(),
        },
    )
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let t = mock.totals();
    let expired = mock.expired_now().len() as u64;
    let lapses = t.lapses + expired;
    use crate::cli::plural;
    println!(
        "demo: {} in {:.0}s ({:.2}/s), {}, {}, {}",
        plural(t.grants, "refresh", "refreshes"),
        elapsed,
        t.grants as f64 / elapsed.max(1.0),
        plural(lapses, "lapse", "lapses"),
        plural(t.reuse_attempts, "reuse attempt", "reuse attempts"),
        plural(t.probes, "probe", "probes"),
    );
    Ok(if lapses == 0 && t.reuse_attempts == 0 {
        0
    } else {
        1
    })
}
