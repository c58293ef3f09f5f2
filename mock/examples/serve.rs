//! The mock provider as a process of its own, for tools outside the Rust tests (CI's API fuzzing
//! in `.ci/api-fuzz`): starts on `127.0.0.1:0`, issues a few grants, writes what a tokend needs
//! to use them into OUT_DIR, and serves until killed.
//!
//! cargo run --locked -p tokend-mock --example serve -- OUT_DIR
//!
//! OUT_DIR receives `secret` (the client secret; the client id is `mock-client`),
//! `import.json` (the grants, in `tokend accounts import` format, for profile `factorial`) and,
//! last, `url` (the base URL): once `url` exists, the rest is complete and the mock answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokend_mock::{MockConfig, MockProvider};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next().map(PathBuf::from), args.next()) else {
        eprintln!("usage: serve OUT_DIR");
        std::process::exit(2);
    };
    if let Err(e) = run(&out).await {
        eprintln!("serve: {e}");
        std::process::exit(1);
    }
}

async fn run(out: &Path) -> std::io::Result<()> {
    let config = MockConfig::default();
    let secret = config.client_secret.clone();
    let mock = MockProvider::start(config).await?;
    // Users at three points of a token's life (fresh, due soon, expired an hour ago), so the
    // daemon has refreshes to do and the token route has both answers to give; and companies,
    // whose tokens never expire.
    let mut rows = Vec::new();
    for (id, age) in [("user-1", 0), ("user-2", 3_300), ("user-3", 7_200)] {
        let t = mock.issue_user(id, Duration::from_secs(age));
        rows.push(
            json!({"id": id, "profile": "factorial", "token_type": "user",
            "access_token": t.access_token, "refresh_token": t.refresh_token,
            "expires_at": t.expires_at, "scopes": ["read", "write"]}),
        );
    }
    for id in ["company-1", "company-2"] {
        let t = mock.issue_company(id);
        rows.push(
            json!({"id": id, "profile": "factorial", "token_type": "company",
            "access_token": t.access_token}),
        );
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("secret"), secret)?;
    std::fs::write(
        out.join("import.json"),
        serde_json::to_vec_pretty(&json!({"accounts": rows}))?,
    )?;
    // `url` last, by rename: whoever waits for it finds the other files complete.
    std::fs::write(out.join("url.tmp"), mock.url())?;
    std::fs::rename(out.join("url.tmp"), out.join("url"))?;
    println!("mock provider at {}", mock.url());
    std::future::pending::<()>().await;
    Ok(())
}
